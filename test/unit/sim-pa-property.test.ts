/**
 * Properties of PA mode (pinning parents), with fast-check:
 * 1. the simulated kernel, sent random raw UPDATE / INVALIDATE / BATCH messages (aligned or not,
 *    over registered memory, private memory and a hole), answers and holds exactly what a page map
 *    written here says vhost_vdpa_pa_map and vhost_vdpa_pa_unmap do: same errno per message, same
 *    entries (one per physically contiguous run), same pinned bytes (VmPin);
 * 2. the agent's table equals the kernel's: random map / unmap requests, validated by the API
 *    server's rules and applied through the agent's guard, leave the agent's mappings covering the
 *    very pages the kernel maps, the agent's pinned-page count equal to VmPin, and a memory
 *    referenced (so never released) exactly while the kernel still pins any page of it.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import { PinnedMemory } from '../../src/device/memlock.ts';
import { type SimIommu, type SimOnchipMap, SimulatedVdpa } from '../../src/device/sim-kernel.ts';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import { AddressSpaces } from '../../src/iotlb/address-spaces.ts';
import type { Mapping } from '../../src/iotlb/types.ts';
import { applyStep } from '../../src/queue/validate.ts';
import { WorkingTables } from '../../src/queue/working.ts';
import { ServiceError } from '../../src/core/errors.ts';
import { IotlbMsgType, VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO } from '../../src/uapi/constants.ts';
import { Ioctl } from '../../src/uapi/ioctl.ts';
import {
  errnoOf,
  PAGE,
  privateMemory,
  rawMsg,
  type TmpRegistry,
  tmpRegistry,
  vpVdpaConfig,
} from './device-helpers.ts';

const LIMIT = 1n << 64n;
const RAM_PAGES = 32n;
const PRIVATE_PAGES = 8n;
const HOLE = 5n;

let tmp: TmpRegistry;
let ram: bigint;
let priv: ReturnType<typeof privateMemory>;
before(() => {
  tmp = tmpRegistry();
  ram = tmp.registry.create({ id: 'ram', size: RAM_PAGES * PAGE, kind: 'memfd' }).uaddr;
  tmp.registry.create({ id: 'disk', size: RAM_PAGES * PAGE, kind: 'memfd' });
  priv = privateMemory(PRIVATE_PAGES, [HOLE]);
});
after(() => {
  priv.free();
  tmp.cleanup();
});

interface ModelEntry {
  firstPage: bigint;
  pages: bigint;
  uaddr: bigint;
}

/**
 * The kernel's PA mode as a page map: an UPDATE takes the pages its bytes touch, pins the owner's
 * pages from uaddr's page on (registered memory, or the private memory minus its hole), and makes
 * one entry per run of pages in one block of `contiguous` pages (blocks counted from the memfd's
 * offset 0, from address 0 for private memory); an INVALIDATE drops every entry with a page in
 * its range.
 */
class PageModel {
  entries: ModelEntry[] = [];
  pinnedPages = 0n;

  constructor(
    private readonly contiguous: bigint,
    private readonly limitPages: bigint,
  ) {}

  update(iova: bigint, size: bigint, uaddr: bigint): string | undefined {
    const first = iova / PAGE;
    const last = (iova + size - 1n) / PAGE;
    if (this.entries.some((e) => e.firstPage <= last && first < e.firstPage + e.pages)) return 'EFAULT';
    const pages = last - first + 1n;
    if (pages + this.pinnedPages > this.limitPages) return 'EFAULT';
    const frames: string[] = [];
    for (let i = 0n; i < pages; i++) {
      const frame = this.frame(uaddr / PAGE + i);
      if (frame === undefined) return 'EFAULT';
      frames.push(frame);
    }
    let start = 0;
    for (let i = 1; i <= frames.length; i++) {
      if (i < frames.length && frames[i] === frames[i - 1]) continue;
      this.entries.push({
        firstPage: first + BigInt(start),
        pages: BigInt(i - start),
        uaddr: (uaddr / PAGE + BigInt(start)) * PAGE,
      });
      start = i;
    }
    this.pinnedPages += pages;
    return undefined;
  }

  invalidate(iova: bigint, size: bigint): void {
    const last = (iova + size - 1n + LIMIT) % LIMIT;
    if (last < iova) return;
    const [first, lastPage] = [iova / PAGE, last / PAGE];
    const gone = this.entries.filter((e) => e.firstPage <= lastPage && first < e.firstPage + e.pages);
    this.entries = this.entries.filter((e) => !gone.includes(e));
    for (const e of gone) this.pinnedPages -= e.pages;
  }

  /** Which physical block a page of the owner is in, or undefined when it cannot be pinned. */
  private frame(page: bigint): string | undefined {
    const ramPage = page - ram / PAGE;
    if (ramPage >= 0n && ramPage < RAM_PAGES) return `ram:${ramPage / this.contiguous}`;
    const privPage = page - priv.addr / PAGE;
    if (privPage >= 0n && privPage < PRIVATE_PAGES && privPage !== HOLE)
      return `priv:${page / this.contiguous}`;
    return undefined;
  }

  sorted(): { iova: bigint; size: bigint; uaddr: bigint }[] {
    return this.entries
      .map((e) => ({ iova: e.firstPage * PAGE, size: e.pages * PAGE, uaddr: e.uaddr }))
      .sort((a, b) => (a.iova < b.iova ? -1 : 1));
  }
}

type RawOp =
  | { type: 'update'; iova: bigint; size: bigint; uaddr: bigint; perm: number }
  | { type: 'invalidate'; iova: bigint; size: bigint }
  | { type: 'batch'; begin: boolean }
  /** A virtio reset (SET_STATUS 0) without IOTLB_PERSIST: the parent drops its table, the kernel keeps its own. */
  | { type: 'reset' };

const half = fc.constantFrom(0n, 0n, 0n, 0x800n);
const rawUpdate: fc.Arbitrary<RawOp> = fc
  .record({
    page: fc.integer({ min: 0, max: 40 }),
    iovaDelta: half,
    pages: fc.integer({ min: 1, max: 6 }),
    sizeDelta: fc.constantFrom(0n, 0n, 0n, 0x800n, -0x800n),
    inPrivate: fc.boolean(),
    at: fc.integer({ min: 0, max: 7 }),
    uaddrDelta: half,
    perm: fc.constantFrom(VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW),
  })
  .map((r) => {
    const size = BigInt(r.pages) * PAGE + r.sizeDelta;
    // Stay inside the memory (+ one page) so that nothing of the process but the hole is met.
    const base = r.inPrivate ? priv.addr + BigInt(r.at % 2) * PAGE : ram + BigInt(r.at * 3) * PAGE;
    return {
      type: 'update' as const,
      iova: BigInt(r.page) * PAGE + r.iovaDelta,
      size: size > 0n ? size : PAGE,
      uaddr: base + r.uaddrDelta,
      perm: r.perm,
    };
  });
const rawInvalidate: fc.Arbitrary<RawOp> = fc
  .record({
    page: fc.integer({ min: 0, max: 48 }),
    delta: half,
    pages: fc.integer({ min: 0, max: 8 }),
    sizeDelta: half,
  })
  .map((r) => ({
    type: 'invalidate' as const,
    iova: BigInt(r.page) * PAGE + r.delta,
    size: BigInt(r.pages) * PAGE + r.sizeDelta,
  }));
const rawOps = fc.array(
  fc.oneof(
    { weight: 5, arbitrary: rawUpdate },
    { weight: 3, arbitrary: rawInvalidate },
    { weight: 1, arbitrary: fc.boolean().map((begin): RawOp => ({ type: 'batch', begin })) },
    { weight: 1, arbitrary: fc.constant<RawOp>({ type: 'reset' }) },
  ),
  { maxLength: 30 },
);
const kind = fc.constantFrom<{ iommu: SimIommu; onchipMap?: SimOnchipMap }>(
  { iommu: 'platform' },
  { iommu: 'onchip', onchipMap: 'set_map' },
  { iommu: 'onchip', onchipMap: 'dma_map' },
);

/** The kernel's entries with the owner address each starts at. */
function kernelEntries(sim: SimulatedVdpa) {
  return sim.kernelMappings().map((m) => ({ iova: m.iova, size: m.size, uaddr: uaddrOf(m) }));
}

function uaddrOf(m: Mapping): bigint {
  if (m.memory === 'ram') return ram + m.offset;
  const unregistered = /^unregistered@(0x[0-9a-f]+)$/.exec(m.memory);
  assert.ok(unregistered, `unexpected memory ${m.memory}`);
  return BigInt(unregistered[1]!) + m.offset;
}

test('PA mode: the simulated kernel agrees with a page map of vhost_vdpa_pa_map', () => {
  fc.assert(
    fc.property(
      rawOps,
      kind,
      fc.constantFrom(1n, 2n, 4n),
      fc.constantFrom(8n, 20n, 1n << 40n),
      (ops, k, contiguous, limitPages) => {
        const sim = new SimulatedVdpa(
          vpVdpaConfig({
            ...k,
            useVa: false,
            contiguousPages: Number(contiguous),
            memlock: limitPages * PAGE,
          }),
          tmp.registry,
        );
        const model = new PageModel(contiguous, limitPages);
        const t = sim.open();
        t.ioctl(Ioctl.VHOST_SET_OWNER);
        let inBatch = false;
        // The address space exists from the first UPDATE or BATCH_BEGIN on; before, any other
        // message is EFAULT (docs/kernel-notes.md R2).
        let allocated = false;
        const unallocated = () => (allocated ? undefined : 'EFAULT');
        // The parent's own table: what dma_map / iommu_map added and dma_unmap did not remove since
        // the last reset; a set_map parent's is the kernel's at its last push (unknown from a reset
        // to the next certain push).
        type Entry = ReturnType<PageModel['sorted']>[number];
        const key = (e: Entry) => `${e.iova}+${e.size}@${e.uaddr}`;
        let parentModel: Entry[] = [];
        let pushedSinceReset = true;
        try {
          ops.forEach((op, i) => {
            if (op.type === 'reset') {
              t.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(0));
              parentModel = [];
              pushedSinceReset = false;
              assert.equal(sim.deviceTable(0)!.count, 0, `reset ${i} empties the parent's table`);
              assert.deepEqual(kernelEntries(sim), model.sorted(), `reset ${i} keeps the kernel's table`);
              return;
            }
            if (op.type === 'batch') {
              const type = op.begin ? IotlbMsgType.BATCH_BEGIN : IotlbMsgType.BATCH_END;
              allocated ||= op.begin;
              assert.equal(
                errnoOf(() => t.write(rawMsg(1, 0, type))),
                unallocated(),
                `op ${i}`,
              );
              if (allocated && inBatch && !op.begin) pushedSinceReset = true;
              if (allocated) inBatch = op.begin;
              return;
            }
            const before = model.sorted();
            if (op.type === 'update') {
              allocated = true;
              const got = errnoOf(() =>
                t.write(rawMsg(1, 0, IotlbMsgType.UPDATE, op.iova, op.size, op.uaddr, op.perm)),
              );
              const expectedErrno = model.update(op.iova, op.size, op.uaddr);
              assert.equal(got, expectedErrno, `op ${i}`);
              if (expectedErrno === undefined && !inBatch) pushedSinceReset = true;
            } else {
              const got = errnoOf(() => t.write(rawMsg(1, 0, IotlbMsgType.INVALIDATE, op.iova, op.size)));
              assert.equal(got, unallocated(), `op ${i}`);
              if (allocated && !inBatch) pushedSinceReset = true;
              model.invalidate(op.iova, op.size);
            }
            const expected = model.sorted();
            const [was, now] = [new Set(before.map(key)), new Set(expected.map(key))];
            parentModel = [
              ...parentModel.filter((e) => now.has(key(e)) || !was.has(key(e))),
              ...expected.filter((e) => !was.has(key(e))),
            ].sort((a, b) => (a.iova < b.iova ? -1 : 1));
            assert.deepEqual(kernelEntries(sim), expected, `entries after op ${i}`);
            assert.equal(sim.pins?.pinnedBytes, model.pinnedPages * PAGE, `VmPin after op ${i}`);
            const parent = [...sim.deviceTable(0)!.entries()].map((r) => ({ iova: r.iova, size: r.size }));
            const parentExpected = sim.hasSetMap
              ? inBatch || !pushedSinceReset
                ? undefined
                : expected
              : parentModel;
            if (parentExpected !== undefined) {
              assert.deepEqual(
                parent,
                parentExpected.map((e) => ({ iova: e.iova, size: e.size })),
                `the parent's table after op ${i}`,
              );
            }
          });
        } finally {
          t.close();
        }
        assert.equal(sim.pins?.pinnedBytes, 0n, 'close unpins everything');
      },
    ),
    { numRuns: 150 },
  );
});

const requests = fc.array(
  fc.oneof(
    {
      weight: 3,
      arbitrary: fc.record({
        kind: fc.constant('map' as const),
        page: fc.integer({ min: 0, max: 40 }),
        pages: fc.integer({ min: 1, max: 8 }),
        memory: fc.constantFrom('ram', 'disk'),
        at: fc.integer({ min: 0, max: 24 }),
        delta: fc.constantFrom(0n, 0n, 0n, 0x800n),
      }),
    },
    {
      weight: 2,
      arbitrary: fc.record({
        kind: fc.constant('unmap' as const),
        page: fc.integer({ min: 0, max: 44 }),
        pages: fc.integer({ min: 1, max: 10 }),
        delta: fc.constantFrom(0n, 0n, 0n, 0x800n),
      }),
    },
  ),
  { maxLength: 25 },
);

/** The IOVA pages a set of mappings covers. */
function pagesCovered(mappings: readonly { iova: bigint; size: bigint }[]): bigint[] {
  const pages: bigint[] = [];
  for (const m of mappings) for (let p = m.iova / PAGE; p < (m.iova + m.size) / PAGE; p++) pages.push(p);
  return pages.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

test("PA mode: the agent's table equals the kernel's; memory stays referenced while pinned", async () => {
  const memory = { sizeOf: (id: string) => tmp.registry.get(id)?.size };
  await fc.assert(
    fc.asyncProperty(requests, kind, fc.constantFrom(1, 4, 512), async (reqs, k, contiguousPages) => {
      const vmPin = new PinnedMemory(() => 1n << 40n);
      const pins = new PinnedMemory(() => 1n << 40n);
      const dev = new SimulatedDevice(
        { name: 'pa', ...k, useVa: false, contiguousPages, vmPin, pins },
        tmp.registry,
      );
      const facts = dev.facts();
      assert.equal(facts.pinned, true);
      const work = new WorkingTables(new AddressSpaces(facts.asNum, facts.iovaRange, facts.pageSize));
      try {
        for (const [i, r] of reqs.entries()) {
          const spec =
            r.kind === 'map'
              ? {
                  kind: 'map' as const,
                  spec: {
                    asid: 0,
                    iova: BigInt(r.page) * PAGE + r.delta,
                    size: BigInt(r.pages) * PAGE,
                    memory: r.memory,
                    offset: BigInt(r.at) * PAGE,
                    perm: 'rw' as const,
                  },
                }
              : {
                  kind: 'unmap' as const,
                  spec: { asid: 0, iova: BigInt(r.page) * PAGE, size: BigInt(r.pages) * PAGE + r.delta },
                };
          let ops: Awaited<ReturnType<typeof applyStep>>['ops'];
          try {
            ops = (await applyStep(work, memory, spec, 0)).ops;
          } catch (e) {
            assert.ok(e instanceof ServiceError, String(e));
            assert.ok(['INVALID_ARGUMENT', 'CONFLICT'].includes(e.code), e.message);
            continue;
          }
          work.settle();
          const results = await dev.apply(ops);
          assert.ok(
            results.every((x) => x.ok),
            `request ${i}: the device refused what validation passed: ${JSON.stringify(results)}`,
          );
          const kernel = dev.simulator.kernelMappings();
          assert.deepEqual(pagesCovered(dev.mappings()), pagesCovered(kernel), `pages after request ${i}`);
          assert.deepEqual(dev.mappings(), work.spaces.mappings(), 'the API server and the agent agree');
          assert.equal(pins.pinnedBytes, vmPin.pinnedBytes, 'the agent counts what VmPin shows');
          for (const id of ['ram', 'disk']) {
            const referenced = (tmp.registry.get(id)?.mappedEntries ?? 0) > 0;
            assert.equal(
              referenced,
              kernel.some((m) => m.memory === id),
              `memory ${id} after request ${i}`,
            );
          }
        }
      } finally {
        await dev.close();
      }
      assert.equal(vmPin.pinnedBytes, 0n);
      assert.equal(tmp.registry.get('ram')?.mappedEntries, 0);
    }),
    { numRuns: 100 },
  );
});
