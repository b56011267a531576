import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import type { ServiceError } from '../../src/core/errors.ts';
import type { IotlbOp, Mapping, Perm, Region } from '../../src/iotlb/types.ts';
import { memoryDir } from '../../src/memory/allowlist.ts';
import { type Harness, harness, holdNextApply, mapReq, PAGE } from './core-harness.ts';
import { addressMap, canonical, IotlbModel, identical, sharesByte } from './iotlb-model.ts';

const code = (e: unknown) => (e as ServiceError).code;
const iovas = (ms: { iova: bigint }[]) => ms.map((m) => m.iova);

/**
 * Checks, on the independent model, that `ops` take a device holding `held` to `desired`: entry by
 * entry and page by page, every INVALIDATE dropping one whole entry, nothing already right touched,
 * one op per entry that is not.
 */
function assertConverges(
  held: readonly Mapping[],
  ops: readonly IotlbOp[],
  desired: readonly Mapping[],
): void {
  const model = new IotlbModel(held);
  model.applyWholeEntryOps(ops);
  assert.deepEqual(addressMap(model.mappings(), PAGE), addressMap(desired, PAGE), 'page by page');
  assert.deepEqual(model.mappings(), canonical(desired), 'entry by entry');
  const isIn = (m: Mapping, list: readonly Mapping[]) =>
    list.some((o) => o.asid === m.asid && identical(m, o));
  const right = held.filter((m) => isIn(m, desired));
  for (const op of ops) {
    const hit = right.find((m) => m.asid === op.asid && sharesByte(m, op));
    assert.equal(hit, undefined, `${op.type} ${op.iova}+${op.size} touches a mapping that was right`);
  }
  const stale = held.length - right.length;
  const missing = desired.filter((m) => !isIn(m, held)).length;
  assert.equal(ops.length, stale + missing, 'one op per wrong or missing mapping');
}

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
      const mark = h.agent.applies.length;
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
      // The ops that reached each device take its empty table to the desired one, one UPDATE each.
      for (const [device, want] of [
        ['vdpa0', desired0],
        ['vdpa1', desired1],
      ] as const) {
        const ops = h.agent.applies
          .slice(mark)
          .filter((c) => c.device === device)
          .flatMap((c) => c.ops);
        assertConverges([], ops, want);
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

describe('reconciliation, property', () => {
  const MEMORY = { file: 64n, small: 16n } as const;
  /** vdpa0: PA mode (pins pages), one address space; vdpa1: VA mode, two. */
  const SPACES = [
    { device: 'vdpa0', asid: 0 },
    { device: 'vdpa1', asid: 0 },
    { device: 'vdpa1', asid: 1 },
  ];
  const BASE = 0x10_0000n;

  /** A non-overlapping table of one address space on a page grid of 32 pages. */
  const regionsArb: fc.Arbitrary<Region[]> = fc
    .array(
      fc.record({
        gap: fc.integer({ min: 0, max: 3 }),
        pages: fc.integer({ min: 1, max: 4 }),
        memory: fc.constantFrom<keyof typeof MEMORY>('file', 'small'),
        at: fc.nat({ max: 15 }),
        perm: fc.constantFrom<Perm>('ro', 'wo', 'rw'),
      }),
      { maxLength: 8 },
    )
    .map((parts) => {
      const out: Region[] = [];
      let page = 0n;
      for (const { gap, pages, memory, at, perm } of parts) {
        const first = page + BigInt(gap);
        page = first + BigInt(pages);
        if (page > 32n) break;
        const offset = BigInt(at) % (MEMORY[memory] - BigInt(pages) + 1n);
        out.push({
          iova: BASE + first * PAGE,
          size: BigInt(pages) * PAGE,
          memory,
          offset: offset * PAGE,
          perm,
        });
      }
      return out;
    });

  /** What happens to the devices behind the service's back before it reconciles. */
  const upsetArb = fc.oneof(
    fc.constant({ kind: 'none' as const }),
    fc.constant({ kind: 'restart' as const }),
    fc.record({
      kind: fc.constant('drift' as const),
      // Written straight to the devices: some are refused (EEXIST), which is fine.
      ops: fc.array(
        fc.tuple(fc.nat({ max: SPACES.length - 1 }), regionsArb, fc.boolean(), fc.nat({ max: 31 })),
        { maxLength: 3 },
      ),
      // Desired mappings re-mapped in place with another offset or permission.
      altered: fc.array(fc.tuple(fc.nat(), fc.boolean()), { maxLength: 3 }),
    }),
  );

  /** `m` with its memory offset moved by a page (inside the memory) or, if it cannot, its perm changed. */
  function altered(m: Mapping, offset: boolean): Mapping {
    const limit = MEMORY[m.memory as keyof typeof MEMORY] * PAGE;
    if (offset && m.offset + m.size + PAGE <= limit) return { ...m, offset: m.offset + PAGE };
    if (offset && m.offset >= PAGE) return { ...m, offset: m.offset - PAGE };
    return { ...m, perm: m.perm === 'rw' ? 'ro' : 'rw' };
  }

  let h: Harness;
  before(async () => {
    h = await harness([{ name: 'vdpa0' }, { name: 'vdpa1', iommu: 'onchip', asNum: 2 }]);
    for (const [id, pages] of Object.entries(MEMORY))
      await h.service.registerMemory({ id, size: pages * PAGE });
  });
  after(() => h.cleanup());

  test('after reconcile, what the agent reports mapped equals the model of the desired state', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.tuple(...SPACES.map(() => regionsArb)),
        upsetArb,
        fc.infiniteStream(fc.nat()),
        async (tables, upset, seeds) => {
          const s = h.service;
          const desired = new Map<string, Mapping[]>([
            ['vdpa0', []],
            ['vdpa1', []],
          ]);
          for (const [k, { device, asid }] of SPACES.entries()) {
            const regions = tables[k]!;
            // In any order: the request need not arrive sorted.
            const shuffled = [...regions].sort(() => (seeds.next().value % 3) - 1);
            await s.setMemTable({ device, asid, regions: shuffled });
            desired.get(device)!.push(...regions.map((r) => ({ ...r, asid })));
          }
          if (upset.kind === 'restart') await h.agent.restart();
          if (upset.kind === 'drift') {
            for (const [k, regions, unmapFirst, page] of upset.ops) {
              const { device, asid } = SPACES[k]!;
              const ops: IotlbOp[] = regions.map((r) => ({ type: 'update', asid, ...r }));
              if (unmapFirst)
                ops.unshift({ type: 'invalidate', asid, iova: BASE + BigInt(page) * PAGE, size: 4n * PAGE });
              await h.agent.device(device).apply(ops);
            }
            const all = [...desired].flatMap(([device, ms]) => ms.map((m) => ({ device, m })));
            for (const [n, offset] of all.length > 0 ? upset.altered : []) {
              const { device, m } = all[n % all.length]!;
              await h.agent.device(device).apply([
                { type: 'invalidate', asid: m.asid, iova: m.iova, size: m.size },
                { type: 'update', ...altered(m, offset) },
              ]);
            }
          }
          const held = new Map<string, Mapping[]>();
          for (const device of desired.keys()) held.set(device, (await h.agent.listMapped(device)).mappings);

          const mark = h.agent.applies.length;
          h.agent.goAway();
          h.agent.comeBack();
          await s.reconcile();
          for (const [device, want] of desired) {
            const { mappings } = await h.agent.listMapped(device);
            assert.deepEqual(addressMap(mappings, PAGE), addressMap(want, PAGE), `${device}: page by page`);
            assert.deepEqual(canonical(mappings), canonical(want), `${device}: entry by entry`);
            const ops = h.agent.applies
              .slice(mark)
              .filter((c) => c.device === device)
              .flatMap((c) => c.ops);
            assertConverges(held.get(device)!, ops, want);
          }
        },
      ),
      { numRuns: 30 },
    );
  });
});
