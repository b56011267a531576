import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { diffSorted } from '../../src/iotlb/planner.ts';
import { memoryDir } from '../../src/memory/allowlist.ts';
import type { ServiceError } from '../../src/core/errors.ts';
import { harness, holdNextApply, mapReq, PAGE } from './core-harness.ts';

const code = (e: unknown) => (e as ServiceError).code;
const iovas = (ms: { iova: bigint }[]) => ms.map((m) => m.iova);

async function populated() {
  const h = await harness([{ name: 'vdpa0' }, { name: 'vdpa1', iommu: 'onchip', asNum: 2 }]);
  const s = h.service;
  await s.registerMemory({ id: 'file', size: 64n * PAGE });
  await s.registerMemory({ id: 'small', size: 16n * PAGE });
  await s.map(mapReq(0x10000n, 4n, 'file'));
  await s.map(mapReq(0x20000n, 2n, 'file', 8n * PAGE));
  await s.map({ ...mapReq(0x10000n, 1n, 'small'), device: 'vdpa1', asid: 1 });
  return h;
}

describe('reconciliation', () => {
  test('after an agent restart the desired memory and mappings are restored with the planner', async () => {
    const h = await populated();
    try {
      const s = h.service;
      h.agent.device('vdpa0').dmaWrite(0, 0x20010n, Buffer.from('guest data'));
      const desired0 = await s.listMappings('vdpa0');
      const desired1 = await s.listMappings('vdpa1');

      const hold = holdNextApply(h.agent);
      await h.agent.restart();
      assert.deepEqual(h.agent.device('vdpa0').mappings(), [], 'the restarted agent lost every mapping');
      const done = s.reconcile();
      await hold.arrived;
      // Mid-reconciliation: not ready, writes refused, reads of the desired state work.
      assert.equal(s.isReady(), false);
      await assert.rejects(s.map(mapReq(0x90000n, 1n, 'file')), (e) => code(e) === 'UNAVAILABLE');
      assert.deepEqual(await s.listMappings('vdpa0'), desired0);
      hold.release();
      await done;

      assert.equal(s.isReady(), true);
      assert.deepEqual(h.agent.device('vdpa0').mappings(), desired0);
      assert.deepEqual(h.agent.device('vdpa1').mappings(), desired1);
      // The ops that reached each device are the planner's: empty table -> desired.
      const reconciles = h.agent.applies.slice(-2);
      for (const call of reconciles) {
        const want = call.device === 'vdpa0' ? desired0 : desired1;
        const planned = [0, 1].flatMap(
          (asid) =>
            diffSorted(
              [],
              want.filter((m) => m.asid === asid),
              asid,
            ).ops,
        );
        assert.deepEqual(call.ops, planned);
      }
      // File-backed memory was re-opened by path: what the device wrote is still there.
      assert.equal(h.agent.device('vdpa0').dmaRead(0, 0x20010n, 10).toString(), 'guest data');
      assert.deepEqual(
        h.agent.registry
          .list()
          .map((m) => [m.id, m.size])
          .sort(),
        [
          ['file', 64n * PAGE],
          ['small', 16n * PAGE],
        ],
      );
      await s.map(mapReq(0x90000n, 1n, 'file'));
    } finally {
      await h.cleanup();
    }
  });

  test('a restart seen only in an apply() answer: not acknowledged, then reconciled', async () => {
    const h = await populated();
    try {
      const s = h.service;
      await h.agent.restart(false);
      await assert.rejects(s.map(mapReq(0x90000n, 1n, 'file')), (e) => {
        assert.equal(code(e), 'UNAVAILABLE');
        assert.match((e as Error).message, /restarted/);
        return true;
      });
      assert.equal((await s.getDevice('vdpa0')).ready, false);
      await s.reconcile();
      assert.deepEqual(iovas(h.agent.device('vdpa0').mappings()), [0x10000n, 0x20000n]);
      await s.map(mapReq(0x90000n, 1n, 'file'));
      assert.deepEqual(h.agent.device('vdpa0').mappings(), await s.listMappings('vdpa0'));
    } finally {
      await h.cleanup();
    }
  });

  test('a device that drifted is planned back: stray entries invalidated, missing ones mapped', async () => {
    const h = await populated();
    try {
      const s = h.service;
      const dev = h.agent.device('vdpa0');
      const info = h.agent.registry.get('file')!;
      assert.ok(info);
      await dev.apply([
        { type: 'invalidate', asid: 0, iova: 0x20000n, size: 2n * PAGE },
        { type: 'update', asid: 0, iova: 0x70000n, size: PAGE, memory: 'file', offset: 0n, perm: 'ro' },
      ]);
      h.agent.goAway();
      h.agent.comeBack();
      await s.reconcile();
      assert.deepEqual(
        h.agent.applies.at(-1)!.ops.map((op) => `${op.type} ${op.iova.toString(16)}`),
        ['invalidate 70000', 'update 20000'],
      );
      assert.deepEqual(dev.mappings(), await s.listMappings('vdpa0'));
    } finally {
      await h.cleanup();
    }
  });

  test('an API server restart with the agent unchanged sends nothing', async () => {
    const h = await populated();
    try {
      const applies = h.agent.applies.length;
      const s = await h.reopen();
      assert.equal(s.isReady(), true);
      assert.equal(h.agent.applies.length, applies);
      assert.equal((await s.listMappings('vdpa0')).length, 2);
      assert.equal((await s.getDevice('vdpa1')).mappedEntries, 1);
    } finally {
      await h.cleanup();
    }
  });

  test('memory operations need the agent; mappings keep the memory they use', async () => {
    const h = await populated();
    try {
      const s = h.service;
      await s.registerMemory({ id: 'spare', size: PAGE });
      h.agent.goAway();
      await assert.rejects(s.unregisterMemory('spare'), (e) => code(e) === 'UNAVAILABLE');
      await assert.rejects(s.registerMemory({ id: 'more', size: PAGE }), (e) => code(e) === 'UNAVAILABLE');
      assert.deepEqual(
        (await s.listMemory()).map((m) => m.id),
        ['file', 'small', 'spare'],
      );
      h.agent.comeBack();
      await s.reconcile();
      await s.unregisterMemory('spare');
      assert.equal(h.agent.registry.get('spare'), undefined);
    } finally {
      await h.cleanup();
    }
  });

  test('memory the agent was started with is adopted: it can be mapped and is restored after a restart', async () => {
    const h = await populated();
    try {
      const s = h.service;
      // As `agent --memory boot=...` does before serving.
      h.agent.registry.create({ id: 'boot', size: 8n * PAGE });
      await s.reconcile();
      const boot = (await s.listMemory()).find((m) => m.id === 'boot');
      assert.equal(boot?.size, 8n * PAGE);
      await s.map(mapReq(0x80000n, 2n, 'boot'));
      await h.agent.restart();
      await s.reconcile();
      assert.deepEqual(h.agent.device('vdpa0').mappings(), await s.listMappings('vdpa0'));
      assert.ok(h.agent.registry.get('boot'));
    } finally {
      await h.cleanup();
    }
  });

  test('memory the agent cannot reopen: its mappings are left off, the rest restored; a later pass restores them', async () => {
    const h = await populated();
    try {
      const s = h.service;
      const file = path.join(memoryDir(h.agentDir), 'small');
      const away = `${file}.away`;
      fs.renameSync(file, away);
      await h.agent.restart();
      await s.reconcile();
      assert.equal(s.isReady(), true);
      assert.deepEqual(iovas(h.agent.device('vdpa0').mappings()), [0x10000n, 0x20000n]);
      assert.deepEqual(h.agent.device('vdpa1').mappings(), []);
      const view = await s.getDevice('vdpa1');
      assert.deepEqual(
        view.degraded.map(({ memory, mappings, bytes }) => ({ memory, mappings, bytes })),
        [{ memory: 'small', mappings: 1, bytes: PAGE }],
      );
      assert.equal(view.mappedEntries, 0);
      assert.deepEqual(
        (await s.listMappings('vdpa1')).map((m) => m.missing),
        [true],
      );
      assert.deepEqual(s.degraded(), [{ device: 'vdpa1', memory: 'small', mappings: 1 }]);
      await assert.rejects(
        s.map({ ...mapReq(0x30000n, 1n, 'small'), device: 'vdpa1' }),
        (e) => code(e) === 'FAILED_PRECONDITION' && /memory small is unavailable/.test((e as Error).message),
      );

      // The file is back: the next pass (the supervisor retries while some memory is unavailable)
      // registers it again and restores its mappings.
      fs.renameSync(away, file);
      await s.reconcile();
      assert.deepEqual((await s.getDevice('vdpa1')).degraded, []);
      assert.deepEqual(iovas(h.agent.device('vdpa1').mappings()), [0x10000n]);
      assert.deepEqual(s.degraded(), []);
    } finally {
      await h.cleanup();
    }
  });
});
