/**
 * The agent protocol end to end: a real agent process with simulated devices, a real unix socket,
 * and AgentClient on this side.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { AgentClient } from '../../src/agent/client.ts';
import { AgentError } from '../../src/agent/errors.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { startAgentProcess, tempDir } from './agent-harness.ts';

const PAGE = 0x1000n;
const MiB = 1n << 20n;
const U64_MAX = (1n << 64n) - 1n;

/** Awaits `promise`, expecting an AgentError with these properties. */
async function refused(promise: Promise<unknown>, expected: Partial<AgentError>): Promise<AgentError> {
  const err = await promise.then(
    () => assert.fail(`expected ${expected.code ?? 'an error'}`),
    (e: unknown) => e,
  );
  assert.ok(err instanceof AgentError, String(err));
  for (const [key, value] of Object.entries(expected)) {
    assert.equal(err[key as keyof AgentError], value, `${key} of ${err.code}: ${err.message}`);
  }
  return err;
}

test('agent protocol over the unix socket', async (t) => {
  const dir = tempDir(t);
  const shm = path.join(dir, 'shm');
  fs.mkdirSync(shm);
  const agent = await startAgentProcess(t, [
    '--state-dir',
    path.join(dir, 'state'),
    '--device',
    'sim:vdpa0',
    '--device',
    'sim:vdpa1,iommu=onchip',
    '--allowed-root',
    shm,
    '--memory',
    'boot=1M',
  ]);
  const client = new AgentClient({ socketPath: path.join(dir, 'state', 'agent', 'agent.sock') });
  t.after(() => client.close());
  const connected = await client.connect();

  await t.test('GetInfo names the process serving', async () => {
    const info = await client.getInfo();
    assert.equal(info.pid, agent.pid);
    assert.match(info.bootId, /^[0-9a-f-]{36}$/);
    assert.equal(info.bootId, connected.bootId);
    const pkg = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8'));
    assert.equal(info.version, pkg.version);
  });

  await t.test('lists and describes the simulated devices', async () => {
    const devices = await client.listDevices();
    assert.deepEqual(
      devices.map((d) => [d.name, d.kind, d.node, d.iommu]),
      [
        ['vdpa0', 'simulated', null, 'platform'],
        ['vdpa1', 'simulated', null, 'onchip'],
      ],
    );
    const { facts, counters } = await client.describeDevice('vdpa1');
    assert.deepEqual(facts, devices[1]);
    assert.equal(typeof facts.negotiatedFeatures, 'bigint');
    assert.equal(typeof facts.iovaRange.last, 'bigint');
    assert.equal(typeof counters.messagesWritten, 'number');
    await refused(client.describeDevice('nope'), {
      status: status.NOT_FOUND,
      code: 'DEVICE_NOT_FOUND',
      field: 'device',
    });
  });

  await t.test(
    'memory: created at start, created on request, opened by path, refused outside the roots',
    async () => {
      const created = await client.registerMemory({ id: 'ram0', size: MiB });
      assert.equal(created.created, true);
      assert.equal(created.kind, 'file');
      assert.equal(created.size, MiB);
      assert.equal(created.path, path.join(dir, 'state', 'memory', 'ram0'));
      assert.equal(fs.statSync(created.path).size, Number(MiB));

      const memfd = await client.registerMemory({ id: 'ram1', size: 64n * 1024n, kind: 'memfd' });
      assert.equal(memfd.kind, 'memfd');

      const file = path.join(shm, 'guest');
      fs.writeFileSync(file, Buffer.alloc(64 * 1024));
      const opened = await client.registerMemory({ id: 'guest', path: file });
      assert.deepEqual([opened.created, opened.path, opened.size], [false, file, 64n * 1024n]);

      const outside = path.join(dir, 'outside');
      fs.writeFileSync(outside, Buffer.alloc(4096));
      await refused(client.registerMemory({ id: 'evil', path: outside }), {
        status: status.PERMISSION_DENIED,
        code: 'PATH_REFUSED',
        field: 'path',
      });
      await refused(client.registerMemory({ id: 'ram0', size: MiB }), {
        status: status.ALREADY_EXISTS,
        code: 'ALREADY_EXISTS',
      });
      await refused(client.registerMemory({ id: 'odd', size: 1000n }), {
        status: status.INVALID_ARGUMENT,
        code: 'INVALID_SIZE',
      });

      const ids = (await client.listMemory()).map((m) => m.id).sort();
      assert.deepEqual(ids, ['boot', 'guest', 'ram0', 'ram1']);
      assert.ok(!ids.includes('evil'));
    },
  );

  await t.test(
    'apply: one result per op, EEXIST naming the live entry, bounds checked, u64s exact',
    async () => {
      const top = U64_MAX - PAGE + 1n; // the last page of the u64 space
      const ops: IotlbOp[] = [
        { type: 'update', asid: 0, iova: 0x100000n, size: 2n * PAGE, memory: 'ram0', offset: 0n, perm: 'rw' },
        { type: 'update', asid: 0, iova: 0x101000n, size: PAGE, memory: 'ram0', offset: 0n, perm: 'ro' },
        { type: 'update', asid: 0, iova: 0x200000n, size: 2n * MiB, memory: 'ram0', offset: 0n, perm: 'rw' },
        { type: 'update', asid: 0, iova: top, size: PAGE, memory: 'ram1', offset: PAGE, perm: 'wo' },
      ];
      const { results, bootId } = await client.apply('vdpa0', ops);
      assert.equal(bootId, connected.bootId);
      assert.equal(results.length, 4);
      assert.deepEqual(results[0], { ok: true });
      const overlap = results[1]!;
      assert.ok(!overlap.ok);
      assert.equal(overlap.errno, 'EEXIST');
      assert.equal(overlap.code, 'OVERLAP');
      assert.match(overlap.message, /\[0x100000, 0x102000\)/);
      const bounds = results[2]!;
      assert.ok(!bounds.ok);
      assert.equal(bounds.code, 'OUT_OF_BOUNDS');
      assert.deepEqual(results[3], { ok: true });

      const { mappings } = await client.listMapped('vdpa0');
      assert.deepEqual(mappings, [
        { asid: 0, iova: 0x100000n, size: 2n * PAGE, memory: 'ram0', offset: 0n, perm: 'rw' },
        { asid: 0, iova: top, size: PAGE, memory: 'ram1', offset: PAGE, perm: 'wo' },
      ]);
      assert.deepEqual((await client.listMapped('vdpa1')).mappings, []);
      const { counters } = await client.describeDevice('vdpa0');
      assert.ok(counters.messagesWritten >= 2);

      const undo = await client.apply('vdpa0', [{ type: 'invalidate', asid: 0, iova: top, size: PAGE }]);
      assert.deepEqual(undo.results, [{ ok: true }]);
    },
  );

  await t.test(
    'DMA write then read back through the IOTLB, and the bytes are in the backing file',
    async () => {
      const info = (await client.listMemory()).find((m) => m.id === 'ram0')!;
      await client.apply('vdpa1', [
        {
          type: 'update',
          asid: 0,
          iova: 0x40000000n,
          size: 4n * PAGE,
          memory: 'ram0',
          offset: 8n * PAGE,
          perm: 'rw',
        },
      ]);
      const data = Buffer.from('written by the simulated device');
      await client.dmaWrite('vdpa1', 0, 0x40000010n, data);
      assert.deepEqual(await client.dmaRead('vdpa1', 0, 0x40000010n, data.length), data);

      const fd = fs.openSync(info.path, 'r');
      try {
        const onDisk = Buffer.alloc(data.length);
        fs.readSync(fd, onDisk, 0, data.length, Number(8n * PAGE + 0x10n));
        assert.deepEqual(onDisk, data);
      } finally {
        fs.closeSync(fd);
      }

      await refused(client.dmaRead('vdpa1', 0, 0x7000_0000n, 16), {
        status: status.FAILED_PRECONDITION,
        code: 'UNMAPPED',
      });
    },
  );

  await t.test('memory cannot be released while mapped, and can once unmapped', async () => {
    const mapped = (await client.listMemory()).find((m) => m.id === 'ram0')!;
    assert.equal(mapped.mappedEntries, 2); // vdpa0 at 0x100000, vdpa1 at 0x40000000
    await refused(client.releaseMemory('ram0'), {
      status: status.FAILED_PRECONDITION,
      code: 'IN_USE',
      field: 'id',
    });

    await client.apply('vdpa0', [{ type: 'invalidate', asid: 0, iova: 0n, size: 0n }]);
    await client.apply('vdpa1', [{ type: 'invalidate', asid: 0, iova: 0n, size: 0n }]);
    await client.releaseMemory('ram0');
    assert.ok(!(await client.listMemory()).some((m) => m.id === 'ram0'));
    await refused(client.releaseMemory('ram0'), { status: status.NOT_FOUND, code: 'NOT_FOUND' });
  });

  await t.test('reset answers with the device facts', async () => {
    const facts = await client.reset('vdpa0');
    assert.equal(facts.name, 'vdpa0');
    assert.equal(facts.status, 0);
  });
});
