/**
 * A device that refuses one op in the middle of a batch (the agent's `failIova` fault injection:
 * every UPDATE for that IOVA fails with EFAULT, as a failed pin would), on both IOMMU kinds, with
 * real agent and API server processes. A non-atomic batch reports each op's own fate; an atomic
 * one is compensated back to exactly the state before it, on the device and in the desired state,
 * which a SIGKILLed and restarted API server finds on disk and on the device unchanged.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  type ApiProcess,
  agentTable,
  createRig,
  desiredTable,
  mappingKeys,
  reconciliations,
} from './process-harness.ts';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import { grpcWriter, PAGE, restWriter, type Writer } from './workload.ts';

const FAILING_IOVA = 0x30000n;
const hex = (n: bigint) => `0x${n.toString(16)}`;

const mapOp = (iova: bigint, pages = 1n) => ({
  op: 'map',
  iova: hex(iova),
  size: hex(pages * PAGE),
  memory: 'ram',
  offset: hex(iova),
  perm: 'rw',
});
const unmapOp = (iova: bigint, pages = 1n) => ({ op: 'unmap', iova: hex(iova), size: hex(pages * PAGE) });

/** The mappings `[iova, pages]` of `device` in address space 0, as mappingKeys. */
const table = (device: string, entries: [bigint, bigint][]) =>
  mappingKeys(
    device,
    entries.map(([iova, pages]) => ({
      asid: 0,
      iova,
      size: pages * PAGE,
      memory: 'ram',
      offset: iova,
      perm: 'rw' as const,
    })),
  );

interface OpResult {
  ok?: boolean;
  error?: { code: string; errno?: string; field?: string };
}

async function batch(writer: Writer, device: string, ops: object[], atomic: boolean) {
  const reply = await writer.send({
    method: 'batch',
    device,
    requestId: `${device}-${atomic}`,
    body: { ops, atomic, requestId: `${device}-${atomic}` },
  });
  assert.equal(reply.kind, 'ok', JSON.stringify(reply));
  const body = (reply as { body: { committed?: boolean; results: OpResult[] } }).body;
  // gRPC leaves false booleans out.
  return {
    committed: body.committed === true,
    results: body.results.map((r) => ({ ...r, ok: r.ok === true })),
  };
}

test('a mid-batch device refusal: each op its own result; an atomic batch leaves no trace', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const rig = createRig(t, 'faults-batch');
  const agentProc = await rig.startAgent([
    `sim:vdpa0,failIova=${hex(FAILING_IOVA)}`,
    `sim:vdpa1,iommu=onchip,failIova=${hex(FAILING_IOVA)}`,
  ]);
  let api: ApiProcess = await rig.startApi();
  assert.equal((await api.http('POST', '/v1/memory', { id: 'ram', size: '0x1000000' })).status, 201);
  const agent = rig.agentClient();
  const expectState = async (device: string, entries: [bigint, bigint][], what: string) => {
    const want = table(device, entries);
    assert.deepEqual(await desiredTable(api, device), want, `${device} ${what}: desired state`);
    assert.deepEqual(await agentTable(agent, device), want, `${device} ${what}: the agent's table`);
  };

  const writers: Record<string, Writer> = { vdpa0: restWriter(api.http), vdpa1: grpcWriter(api.grpc) };
  for (const device of ['vdpa0', 'vdpa1']) {
    const writer = writers[device]!;
    for (const { op: _, ...body } of [mapOp(0x10000n, 4n), mapOp(0x100000n, 4n)]) {
      const reply = await writer.send({ method: 'map', device, requestId: `${device}-${body.iova}`, body });
      assert.equal(reply.kind, 'ok', JSON.stringify(reply));
    }

    const loose = await batch(
      writer,
      device,
      [
        mapOp(0x20000n),
        mapOp(FAILING_IOVA),
        mapOp(0x40000n),
        mapOp(0x102000n), // overlaps 0x100000 (4 pages): refused by validation, on its own
        unmapOp(0x10000n, 4n),
      ],
      false,
    );
    assert.equal(loose.committed, true);
    assert.deepEqual(
      loose.results.map((r) => r.ok),
      [true, false, true, false, true],
    );
    assert.deepEqual(
      [loose.results[1]!.error?.code, loose.results[1]!.error?.errno, loose.results[1]!.error?.field],
      ['DEVICE_ERROR', 'EFAULT', 'ops[1]'],
    );
    assert.equal(loose.results[3]!.error?.code, 'CONFLICT');
    const settled: [bigint, bigint][] = [
      [0x20000n, 1n],
      [0x40000n, 1n],
      [0x100000n, 4n],
    ];
    await expectState(device, settled, 'after the non-atomic batch');

    const atomic = await batch(
      writer,
      device,
      [unmapOp(0x101000n), mapOp(0x50000n), mapOp(FAILING_IOVA), mapOp(0x60000n)], // the unmap splits 0x100000
      true,
    );
    assert.equal(atomic.committed, false);
    assert.deepEqual(
      [atomic.results[2]!.error?.code, atomic.results[2]!.error?.errno, atomic.results[2]!.error?.field],
      ['DEVICE_ERROR', 'EFAULT', 'ops[2]'],
    );
    for (const i of [0, 1, 3]) assert.equal(atomic.results[i]!.error?.code, 'CONFLICT', `ops[${i}]`);
    await expectState(device, settled, 'after the atomic batch');
  }

  // Nothing of the atomic batches reached the disk, and the devices were put back exactly: a
  // restarted API server finds nothing to change.
  assert.equal((await api.kill('SIGKILL')).signal, 'SIGKILL');
  api = await rig.startApi();
  assert.ok(agentProc.running);
  assert.deepEqual(await reconciliations(api, ['vdpa0', 'vdpa1']), { vdpa0: 0, vdpa1: 0 });
  for (const device of ['vdpa0', 'vdpa1']) {
    await expectState(
      device,
      [
        [0x20000n, 1n],
        [0x40000n, 1n],
        [0x100000n, 4n],
      ],
      'after the restart',
    );
  }
});
