import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { ServiceError } from '../../src/core/errors.ts';
import { harness, mapReq, PAGE } from './core-harness.ts';

const code = (e: unknown) => (e as ServiceError).code;
const field = (e: unknown) => (e as ServiceError).field;

async function withMemory(extra = {}) {
  const h = await harness([{ name: 'vdpa0' }, { name: 'vdpa1' }], extra);
  await h.service.registerMemory({ id: 'm0', size: 64n * PAGE });
  return h;
}

describe('idempotency', () => {
  test('a retry gets the recorded answer and nothing is applied again', async () => {
    const h = await withMemory();
    try {
      const req = { ...mapReq(0x10000n), requestId: 'r1' };
      const first = await h.service.map(req);
      const applies = h.agent.applies.length;
      assert.deepEqual(await h.service.map({ ...req }), first);
      assert.equal(h.agent.applies.length, applies);
      assert.equal(h.agent.device('vdpa0').mappings().length, 1);
      // The same id on another device is another request.
      await h.service.map({ ...req, device: 'vdpa1' });
      assert.equal(h.agent.applies.length, applies + 1);
    } finally {
      await h.cleanup();
    }
  });

  test('the same requestId with a different body is refused, naming requestId', async () => {
    const h = await withMemory();
    try {
      await h.service.map({ ...mapReq(0x10000n), requestId: 'r1' });
      await assert.rejects(
        h.service.map({ ...mapReq(0x20000n), requestId: 'r1' }),
        (e) => code(e) === 'INVALID_ARGUMENT' && field(e) === 'requestId',
      );
      await assert.rejects(
        h.service.unmap({ device: 'vdpa0', asid: 0, iova: 0x10000n, size: PAGE, requestId: 'r1' }),
        (e) => code(e) === 'INVALID_ARGUMENT' && field(e) === 'requestId',
      );
    } finally {
      await h.cleanup();
    }
  });

  test('a recorded refusal is replayed; a transient one is not recorded', async () => {
    const h = await withMemory();
    try {
      await h.service.map(mapReq(0x10000n));
      const clash = { ...mapReq(0x10000n), requestId: 'clash' };
      await assert.rejects(h.service.map(clash), (e) => code(e) === 'CONFLICT');
      await h.service.unmap({ device: 'vdpa0', asid: 0, iova: 0x10000n, size: PAGE });
      await assert.rejects(h.service.map(clash), (e) => code(e) === 'CONFLICT');
      assert.deepEqual(await h.service.listMappings('vdpa0'), []);

      h.agent.goAway();
      const later = { ...mapReq(0x20000n), requestId: 'later' };
      await assert.rejects(h.service.map(later), (e) => code(e) === 'UNAVAILABLE');
      h.agent.comeBack();
      await h.service.reconcile();
      assert.equal((await h.service.map(later)).mapping.iova, 0x20000n);
    } finally {
      await h.cleanup();
    }
  });

  test('records survive an API server restart', async () => {
    const h = await withMemory();
    try {
      const req = { ...mapReq(0x10000n), requestId: 'r1' };
      const first = await h.service.map(req);
      const sub = { device: 'vdpa0', ops: [{ op: 'map' as const, ...mapReq(0x30000n) }], requestId: 's1' };
      const submitted = await h.service.submit(sub);
      await h.service.flush('vdpa0');
      const s = await h.reopen();
      const applies = h.agent.applies.length;
      assert.deepEqual(await s.map(req), first);
      assert.deepEqual(await s.submit(sub), submitted);
      await s.flush('vdpa0');
      assert.equal(h.agent.applies.length, applies);
      assert.equal(h.agent.device('vdpa0').mappings().length, 2);
    } finally {
      await h.cleanup();
    }
  });

  test('concurrent duplicates run once and get the same answer', async () => {
    const h = await withMemory();
    try {
      const req = { ...mapReq(0x10000n), requestId: 'dup' };
      const [a, b] = await Promise.all([h.service.map(req), h.service.map({ ...req })]);
      assert.deepEqual(a, b);
      const ops = h.agent.applies.flatMap((c) => c.ops).filter((op) => op.iova === 0x10000n);
      assert.equal(ops.length, 1);
    } finally {
      await h.cleanup();
    }
  });

  test('the table is bounded: the oldest ids are forgotten', async () => {
    const h = await withMemory({ idempotencyPerDevice: 2 });
    try {
      await h.service.map({ ...mapReq(0x10000n), requestId: 'a' });
      await h.service.map({ ...mapReq(0x20000n), requestId: 'b' });
      await h.service.map({ ...mapReq(0x30000n), requestId: 'c' });
      // 'a' is forgotten: the retry runs again and now collides with its own first run.
      await assert.rejects(
        h.service.map({ ...mapReq(0x10000n), requestId: 'a' }),
        (e) => code(e) === 'CONFLICT',
      );
      assert.equal((await h.service.map({ ...mapReq(0x30000n), requestId: 'c' })).mapping.iova, 0x30000n);
    } finally {
      await h.cleanup();
    }
  });
});
