import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { ServiceError } from '../../src/core/errors.ts';
import type { BatchOp, FlushResult } from '../../src/core/types.ts';
import { harness, holdNextApply, mapReq, PAGE } from './core-harness.ts';

const mapOp = (iova: bigint, pages = 1n): BatchOp => ({
  op: 'map',
  asid: 0,
  iova,
  size: pages * PAGE,
  memory: 'm0',
  offset: 0n,
  perm: 'rw',
});

const code = (e: unknown) => (e as ServiceError).code;

describe('submit and flush', () => {
  test('submit answers once journaled, before the device applies it; flush waits for it', async () => {
    const h = await harness();
    try {
      const s = h.service;
      await s.registerMemory({ id: 'm0', size: 64n * PAGE });
      const hold = holdNextApply(h.agent);
      const blocker = s.map(mapReq(0x1000n));
      await hold.arrived;
      const { sequence } = await s.submit({ device: 'vdpa0', ops: [mapOp(0x10000n)] });
      // Durably queued: in the store as pending, not yet at the device.
      assert.ok(h.reopenState().devices.get('vdpa0')?.pending.has(sequence));
      assert.equal(h.agent.device('vdpa0').mappings().length, 0);
      const flushed = s.flush('vdpa0');
      hold.release();
      await blocker;
      const r = await flushed;
      assert.ok(r.sequence >= sequence);
      assert.deepEqual(r.failures, []);
      assert.deepEqual(
        h.agent
          .device('vdpa0')
          .mappings()
          .map((m) => m.iova),
        [0x1000n, 0x10000n],
      );
      assert.equal(h.reopenState().devices.get('vdpa0')?.pending.size, 0);
    } finally {
      await h.cleanup();
    }
  });

  test('failures of submitted ops are reported by the next flush, once', async () => {
    const h = await harness();
    try {
      const s = h.service;
      await s.registerMemory({ id: 'm0', size: 64n * PAGE });
      const a = await s.submit({ device: 'vdpa0', ops: [mapOp(0x10000n, 2n)] });
      const b = await s.submit({ device: 'vdpa0', ops: [mapOp(0x20000n), mapOp(0x11000n)] });
      assert.ok(b.sequence > a.sequence);
      const first = await s.flush('vdpa0');
      assert.equal(first.sequence, b.sequence);
      assert.equal(first.failures.length, 1);
      assert.equal(first.failures[0]!.sequence, b.sequence);
      assert.equal(first.failures[0]!.error.code, 'CONFLICT');
      assert.equal(first.failures[0]!.error.field, 'ops[1].iova');
      assert.deepEqual(
        (await s.listMappings('vdpa0')).map((m) => m.iova),
        [0x10000n, 0x20000n],
      );
      assert.deepEqual((await s.flush('vdpa0')).failures, []);
    } finally {
      await h.cleanup();
    }
  });

  test('while the agent is down submits are kept, flush times out, and they run after reconciling', async () => {
    const h = await harness([{ name: 'vdpa0' }], { flushTimeoutMs: 20, maxQueued: 3 });
    try {
      const s = h.service;
      await s.registerMemory({ id: 'm0', size: 64n * PAGE });
      h.agent.goAway();
      await assert.rejects(s.map(mapReq(0x1000n)), (e) => code(e) === 'UNAVAILABLE');
      const { sequence } = await s.submit({ device: 'vdpa0', ops: [mapOp(0x10000n)] });
      await s.submit({ device: 'vdpa0', ops: [mapOp(0x20000n)] });
      await assert.rejects(s.flush('vdpa0'), (e) => code(e) === 'UNAVAILABLE');
      await s.submit({ device: 'vdpa0', ops: [mapOp(0x30000n)] });
      await assert.rejects(
        s.submit({ device: 'vdpa0', ops: [mapOp(0x40000n)] }),
        (e) => code(e) === 'RESOURCE_EXHAUSTED',
      );
      // Reads of the desired state still work.
      assert.deepEqual(await s.listMappings('vdpa0'), []);
      h.agent.comeBack();
      await s.reconcile();
      // Ready again: the queued submits run now; with this service's 20 ms flush deadline, a flush
      // may time out while their group commit is at the disk, so it is asked again (bounded).
      let r: FlushResult | undefined;
      for (let i = 0; i < 500 && r === undefined; i++) {
        r = await s.flush('vdpa0').catch((e: unknown) => {
          if (code(e) !== 'UNAVAILABLE' || !s.isReady()) throw e;
          return undefined;
        });
      }
      assert.ok(r && r.sequence > sequence);
      assert.deepEqual(
        h.agent
          .device('vdpa0')
          .mappings()
          .map((m) => m.iova),
        [0x10000n, 0x20000n, 0x30000n],
      );
    } finally {
      await h.cleanup();
    }
  });

  test('submits journaled before an API server restart are applied after it', async () => {
    const h = await harness();
    try {
      await h.service.registerMemory({ id: 'm0', size: 64n * PAGE });
      h.agent.goAway();
      const { sequence } = await h.service.submit({ device: 'vdpa0', ops: [mapOp(0x10000n)] });
      const s = await h.reopen();
      h.agent.comeBack();
      await s.reconcile();
      const r = await s.flush('vdpa0');
      assert.ok(r.sequence >= sequence);
      assert.deepEqual(
        h.agent
          .device('vdpa0')
          .mappings()
          .map((m) => m.iova),
        [0x10000n],
      );
      // Sequence numbers never repeat across the restart.
      assert.ok((await s.submit({ device: 'vdpa0', ops: [] })).sequence > sequence);
    } finally {
      await h.cleanup();
    }
  });
});
