/**
 * Load: concurrent clients over gRPC and REST, mixed map / unmap / set-mem-table on both devices
 * (platform and on-chip IOMMU), against the real agent and API server processes. The final state,
 * as the API lists it and as the agent itself has it mapped, must equal the model built from the
 * answers: nothing lost, nothing extra, no unexpected error. Latencies are reported, not asserted.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import { agentTable, createRig, desiredTable } from './process-harness.ts';
import {
  type ClientSpec,
  grpcWriter,
  ModelClient,
  percentile,
  restWriter,
  type Transport,
} from './workload.ts';

const OPS_PER_CLIENT = 250;
const DEVICES = ['vdpa0', 'vdpa1'] as const;

/** Six map/unmap clients on address space 0, and one set-mem-table client per device on space 1. */
function specs(): (ClientSpec & { transport: Transport })[] {
  const layout: [Transport, string, number, ClientSpec['style'], bigint][] = [
    ['rest', 'vdpa0', 0, 'mapUnmap', 0x1000_0000n],
    ['rest', 'vdpa1', 0, 'mapUnmap', 0x1000_0000n],
    ['rest', 'vdpa0', 0, 'mapUnmap', 0x2000_0000n],
    ['rest', 'vdpa0', 1, 'memTable', 0x1000_0000n],
    ['grpc', 'vdpa0', 0, 'mapUnmap', 0x3000_0000n],
    ['grpc', 'vdpa1', 0, 'mapUnmap', 0x2000_0000n],
    ['grpc', 'vdpa1', 0, 'mapUnmap', 0x3000_0000n],
    ['grpc', 'vdpa1', 1, 'memTable', 0x1000_0000n],
  ];
  return layout.map(([transport, device, asid, style, base], k) => ({
    transport,
    name: `${transport}-${k}`,
    device,
    asid,
    style,
    base,
    slots: 32,
    memory: 'ram',
    memoryBase: BigInt(k) * 0x10_0000n,
    seed: 1000 + k,
  }));
}

test('concurrent REST and gRPC clients: the final state equals the model of the answers', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const rig = createRig(t, 'load');
  await rig.startAgent(['sim:vdpa0,asnum=2', 'sim:vdpa1,iommu=onchip']);
  const api = await rig.startApi();
  assert.equal((await api.http('POST', '/v1/memory', { id: 'ram', size: '0x1000000' })).status, 201);

  const clients = specs().map(
    (s) => new ModelClient(s, s.transport === 'rest' ? restWriter(api.http) : grpcWriter(api.grpc)),
  );
  const started = performance.now();
  await Promise.all(clients.map((c) => c.run({ ops: OPS_PER_CLIENT, retries: 0 })));
  const seconds = (performance.now() - started) / 1000;

  for (const c of clients) {
    assert.deepEqual(c.unexpected, [], `${c.spec.name}: unexpected answers`);
    assert.equal(c.inDoubt, undefined, `${c.spec.name}: an answer was lost`);
    assert.equal(c.acked.length, OPS_PER_CLIENT, `${c.spec.name}: not every op was acknowledged`);
  }
  const agent = rig.agentClient();
  for (const device of DEVICES) {
    const expected = clients
      .filter((c) => c.spec.device === device)
      .flatMap((c) => c.expected())
      .sort();
    assert.ok(expected.length > 0);
    assert.deepEqual(await desiredTable(api, device), expected, `${device}: desired state`);
    assert.deepEqual(await agentTable(agent, device), expected, `${device}: the agent's table`);
  }

  const total = clients.length * OPS_PER_CLIENT;
  t.diagnostic(
    `${total} ops by ${clients.length} clients in ${seconds.toFixed(2)} s (${Math.round(total / seconds)} ops/s)`,
  );
  for (const transport of ['grpc', 'rest'] as const) {
    const ms = clients.filter((c) => c.writer.transport === transport).flatMap((c) => c.latencies);
    t.diagnostic(
      `${transport}: ${ms.length} ops, p50 ${percentile(ms, 0.5).toFixed(2)} ms, p99 ${percentile(ms, 0.99).toFixed(2)} ms`,
    );
  }
});
