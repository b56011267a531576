import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { sortedMappings, toSnapshot } from '../../src/state/desired.ts';
import type { Outcome, WriteRequest } from '../../src/queue/types.ts';
import { IotlbMsgType } from '../../src/uapi/constants.ts';
import type { BatchResult, MapResult } from '../../src/core/types.ts';
import { FaultyFs, holdNextApply, PAGE, queueFixture } from './core-harness.ts';

const map = (iova: bigint, pages = 1n, offset = 0n): WriteRequest => ({
  kind: 'map',
  spec: { asid: 0, iova, size: pages * PAGE, memory: 'm0', offset, perm: 'rw' },
});
const unmap = (iova: bigint, pages = 1n): WriteRequest => ({
  kind: 'unmap',
  spec: { asid: 0, iova, size: pages * PAGE },
});

function ok(o: Outcome) {
  assert.ok(o.ok, o.ok ? '' : `${o.error.code}: ${o.error.message}`);
  return o.answer;
}

function failed(o: Outcome) {
  assert.ok(!o.ok, 'expected a failure');
  return o.error;
}

const iovas = (ms: { iova: bigint }[]) => ms.map((m) => m.iova);

describe('device queue: order and group commit', () => {
  test('a group is validated in order against what its earlier requests do, and sent as one apply()', async () => {
    const f = await queueFixture();
    try {
      const hold = holdNextApply(f.agent);
      const first = f.write(map(0x100000n));
      await hold.arrived;
      // These wait behind the held group and are drained together as the next one.
      const group = [
        f.write(map(0x200000n, 2n)),
        f.write(unmap(0x200000n, 2n)),
        f.write(map(0x201000n, 4n)), // overlaps the first map of the group, which the unmap removed
        f.write(map(0x204000n, 1n)), // overlaps the one just before: refused
      ];
      hold.release();
      ok(await first);
      const [a, b, c, d] = await Promise.all(group);
      ok(a!);
      ok(b!);
      assert.deepEqual((ok(c!) as MapResult).mapping.iova, 0x201000n);
      const conflict = failed(d!);
      assert.equal(conflict.code, 'CONFLICT');
      assert.equal(conflict.errno, 'EEXIST');
      assert.equal(conflict.field, 'iova');
      assert.match(conflict.message, /\[0x201000, 0x205000\) -> m0\+0x0 rw/);

      assert.equal(f.agent.applies.length, 2);
      assert.deepEqual(
        f.agent.applies[1]!.ops.map((op) => `${op.type} ${op.iova.toString(16)}`),
        ['update 200000', 'invalidate 200000', 'update 201000'],
      );
      assert.deepEqual(iovas(f.agent.device('vdpa0').mappings()), [0x100000n, 0x201000n]);
      assert.deepEqual(iovas(sortedMappings(f.store.state.devices.get('vdpa0'))), [0x100000n, 0x201000n]);
      assert.equal(f.store.state.devices.get('vdpa0')?.nextSequence, 6n);
    } finally {
      await f.cleanup();
    }
  });

  test('N concurrent maps take fewer apply() calls than requests, each caller gets its own result', async () => {
    const f = await queueFixture();
    try {
      const n = 20;
      const outcomes = await Promise.all(
        Array.from({ length: n }, (_, i) =>
          // Request 10 collides with request 9 (same IOVA): only it fails.
          f.write(map(0x1000000n + BigInt(i === 10 ? 9 : i) * 0x10000n, 1n, BigInt(i) * PAGE)),
        ),
      );
      assert.ok(f.agent.applies.length < n, `${f.agent.applies.length} apply() calls for ${n} requests`);
      outcomes.forEach((o, i) => {
        if (i === 10) {
          assert.match(failed(o).message, /overlaps the mapping \[0x1090000, 0x1091000\)/);
        } else {
          const r = ok(o) as MapResult;
          assert.equal(r.mapping.offset, BigInt(i) * PAGE);
          assert.equal(r.ops.length, 1);
        }
      });
      assert.equal(f.agent.device('vdpa0').mappings().length, n - 1);
    } finally {
      await f.cleanup();
    }
  });

  test('the queue is bounded: beyond maxQueued requests are refused with RESOURCE_EXHAUSTED', async () => {
    const f = await queueFixture({ name: 'vdpa0' }, { maxQueued: 3 });
    try {
      const hold = holdNextApply(f.agent);
      const inFlight = f.write(map(0x1000n));
      await hold.arrived;
      const waiting = [f.write(map(0x2000n)), f.write(map(0x3000n)), f.write(map(0x4000n))];
      assert.equal(f.queue.depth, 3);
      assert.throws(
        () => f.queue.checkAccepts('sync'),
        (e: unknown) => {
          assert.equal((e as { code: string }).code, 'RESOURCE_EXHAUSTED');
          assert.ok(((e as { details: { retryAfterMs?: number } }).details.retryAfterMs ?? 0) > 0);
          return true;
        },
      );
      hold.release();
      for (const o of await Promise.all([inFlight, ...waiting])) ok(o);
      f.queue.checkAccepts('sync');
    } finally {
      await f.cleanup();
    }
  });
});

describe('device queue: device refusals', () => {
  const failing = new Set<bigint>();
  const spec = {
    name: 'vdpa0',
    failOn: (msg: { iotlb: { type: number; iova: bigint } }) =>
      msg.iotlb.type === IotlbMsgType.UPDATE && failing.has(msg.iotlb.iova),
  };

  test('atomic batch: an op the device refuses mid-way rolls the device back to before the batch', async () => {
    failing.clear();
    const f = await queueFixture(spec);
    try {
      ok(await f.write(map(0x10000n, 4n)));
      const before = f.agent.device('vdpa0').mappings();
      const stored = toSnapshot(f.store.state);
      failing.add(0x30000n);
      const o = await f.write({
        kind: 'batch',
        atomic: true,
        ops: [
          { op: 'unmap', asid: 0, iova: 0x11000n, size: PAGE }, // splits the existing mapping
          { op: 'map', asid: 0, iova: 0x20000n, size: PAGE, memory: 'm0', offset: 0n, perm: 'rw' },
          { op: 'map', asid: 0, iova: 0x30000n, size: PAGE, memory: 'm0', offset: 0n, perm: 'rw' },
          { op: 'map', asid: 0, iova: 0x40000n, size: PAGE, memory: 'm0', offset: 0n, perm: 'rw' },
        ],
      });
      const r = ok(o) as BatchResult;
      assert.equal(r.committed, false);
      assert.equal(r.results[2]!.error?.code, 'DEVICE_ERROR');
      assert.equal(r.results[2]!.error?.errno, 'EFAULT');
      assert.equal(r.results[2]!.error?.field, 'ops[2]');
      for (const i of [0, 1, 3]) assert.equal(r.results[i]!.error?.code, 'CONFLICT');
      assert.deepEqual(f.agent.device('vdpa0').mappings(), before);
      assert.deepEqual(
        toSnapshot(f.store.state).devices,
        stored.devices.map((d) => ({ ...d, nextSequence: 3n })),
      );
      // The batch went as one apply(); the compensation (planned from what the agent had) as another.
      const [, batch, undo] = f.agent.applies;
      assert.equal(batch!.ops.length, 6);
      assert.deepEqual(
        undo!.ops.map((op) => `${op.type} ${op.iova.toString(16)} ${op.size.toString(16)}`),
        [
          'invalidate 10000 1000',
          'invalidate 12000 2000',
          'invalidate 20000 1000',
          'invalidate 40000 1000',
          'update 10000 4000',
        ],
      );
    } finally {
      await f.cleanup();
    }
  });

  test('non-atomic batch and separate requests: only the refused unit fails; later ones are re-run', async () => {
    failing.clear();
    const f = await queueFixture(spec);
    try {
      failing.add(0x30000n);
      const hold = holdNextApply(f.agent);
      const first = f.write(map(0x1000n));
      await hold.arrived;
      const batch = f.write({
        kind: 'batch',
        atomic: false,
        ops: [
          { op: 'map', asid: 0, iova: 0x20000n, size: PAGE, memory: 'm0', offset: 0n, perm: 'rw' },
          { op: 'map', asid: 0, iova: 0x30000n, size: PAGE, memory: 'm0', offset: 0n, perm: 'rw' },
          { op: 'map', asid: 0, iova: 0x40000n, size: PAGE, memory: 'm0', offset: 0n, perm: 'rw' },
        ],
      });
      const after = f.write(map(0x50000n));
      hold.release();
      ok(await first);
      const r = ok(await batch) as BatchResult;
      assert.equal(r.committed, true);
      assert.deepEqual(
        r.results.map((x) => x.ok),
        [true, false, true],
      );
      assert.equal(r.results[1]!.error?.code, 'DEVICE_ERROR');
      assert.equal(r.results[1]!.error?.errno, 'EFAULT');
      ok(await after);
      const want = [0x1000n, 0x20000n, 0x40000n, 0x50000n];
      assert.deepEqual(iovas(f.agent.device('vdpa0').mappings()), want);
      assert.deepEqual(iovas(sortedMappings(f.store.state.devices.get('vdpa0'))), want);
    } finally {
      await f.cleanup();
    }
  });

  test('a refused op is blamed on the unit that sent it, past units that sent no op', async () => {
    failing.clear();
    const f = await queueFixture(spec);
    try {
      failing.add(0x30000n);
      const r = ok(
        await f.write({
          kind: 'batch',
          atomic: false,
          ops: [
            // Nothing mapped there: a unit of no ops, whose ops would start where the next one's do.
            { op: 'unmap', asid: 0, iova: 0x90000n, size: PAGE },
            { op: 'map', asid: 0, iova: 0x30000n, size: PAGE, memory: 'm0', offset: 0n, perm: 'rw' },
            { op: 'map', asid: 0, iova: 0x40000n, size: PAGE, memory: 'm0', offset: 0n, perm: 'rw' },
          ],
        }),
      ) as BatchResult;
      assert.deepEqual(
        r.results.map((x) => x.ok),
        [true, false, true],
      );
      assert.equal(r.results[1]!.error?.code, 'DEVICE_ERROR');
      assert.equal(r.results[1]!.error?.field, 'ops[1]');
      assert.deepEqual(iovas(f.agent.device('vdpa0').mappings()), [0x40000n]);
    } finally {
      await f.cleanup();
    }
  });
});

describe('device queue: nothing acknowledged when the outcome is unknown', () => {
  test('the agent going away mid-group: UNAVAILABLE, nothing stored, device not ready', async () => {
    const f = await queueFixture();
    try {
      ok(await f.write(map(0x1000n)));
      const stored = toSnapshot(f.store.state);
      f.agent.beforeApply = () => {
        f.agent.unreachable = true;
        throw new Error('socket closed');
      };
      const o = failed(await f.write(map(0x2000n)));
      assert.equal(o.code, 'UNAVAILABLE');
      assert.ok((o.details.retryAfterMs ?? 0) > 0);
      assert.equal(f.queue.ready, false);
      assert.deepEqual(toSnapshot(f.store.state).devices, stored.devices);
      assert.equal(
        failed(await f.write(map(0x3000n)).catch((e) => ({ ok: false as const, error: e }))).code,
        'UNAVAILABLE',
      );
      f.agent.unreachable = false;
      f.agent.beforeApply = undefined;
      await f.makeReady();
      assert.deepEqual(iovas(f.agent.device('vdpa0').mappings()), [0x1000n]);
      ok(await f.write(map(0x2000n)));
    } finally {
      await f.cleanup();
    }
  });

  test('a failed journal write: callers get UNAVAILABLE, the store is unchanged, reconciling undoes the device', async () => {
    const faulty = new FaultyFs();
    const f = await queueFixture({ name: 'vdpa0' }, { storeFs: faulty });
    try {
      ok(await f.write(map(0x1000n)));
      const stored = toSnapshot(f.store.state);
      faulty.fail('write', 'ENOSPC', { file: /journal/ });
      const o = failed(await f.write(map(0x2000n)));
      assert.equal(o.code, 'UNAVAILABLE');
      assert.equal(o.errno, 'ENOSPC');
      assert.deepEqual(toSnapshot(f.store.state), stored);
      assert.equal(f.queue.ready, false);
      // The device applied it before the commit failed; reconciliation takes it back.
      assert.deepEqual(iovas(f.agent.device('vdpa0').mappings()), [0x1000n, 0x2000n]);
      await f.makeReady();
      assert.deepEqual(iovas(f.agent.device('vdpa0').mappings()), [0x1000n]);
    } finally {
      await f.cleanup();
    }
  });
});
