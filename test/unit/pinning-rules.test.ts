/**
 * The rules of a pinning (PA-mode) parent, kept by the agent's guard and the API server's
 * validation alike: mappings are whole pages (vhost_vdpa_pa_map rounds entries out to pages), and
 * an INVALIDATE must cover every mapping it touches whole (the kernel holds a mapping as one entry
 * per physically contiguous run and would drop only the runs touched). VA-mode parents keep
 * taking any byte range, as the kernel does.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { PinnedMemory } from '../../src/device/memlock.ts';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import { AddressSpaces } from '../../src/iotlb/address-spaces.ts';
import { PlanError, planUnmap, validateTarget } from '../../src/iotlb/planner.ts';
import { IovaTable } from '../../src/iotlb/table.ts';
import type { IotlbOp, Region } from '../../src/iotlb/types.ts';
import type { WriteRequest } from '../../src/queue/types.ts';
import { applyStep } from '../../src/queue/validate.ts';
import { WorkingTables } from '../../src/queue/working.ts';
import { ServiceError } from '../../src/core/errors.ts';
import { PAGE, type TmpRegistry, tmpRegistry } from './device-helpers.ts';

const region = (iova: bigint, size: bigint, offset = 0n): Region => ({
  iova,
  size,
  memory: 'ram',
  offset,
  perm: 'rw',
});
const update = (iova: bigint, size: bigint, offset = 0n): IotlbOp => ({
  type: 'update',
  asid: 0,
  ...region(iova, size, offset),
});
const invalidate = (iova: bigint, size: bigint): IotlbOp => ({ type: 'invalidate', asid: 0, iova, size });

describe('the table of a pinning parent', () => {
  test('refuses an unaligned iova, size or memory offset, naming the field', () => {
    const pa = new IovaTable(0, undefined, PAGE);
    const cases: [Region, string, RegExp][] = [
      [region(0x10_0800n, PAGE), 'iova', /iova 0x100800 is not page aligned/],
      [region(0x10_0000n, 0x800n), 'size', /size 0x800 is not a whole number of pages/],
      [region(0x10_0000n, PAGE, 0x10n), 'offset', /offset 0x10 into memory ram is not page aligned/],
    ];
    for (const [r, field, message] of cases) {
      const v = pa.checkMap(r);
      assert.equal(v?.reason, 'UNALIGNED');
      assert.equal(v?.field, field);
      assert.equal(v?.errno, 'EINVAL');
      assert.match(v?.message ?? '', message);
      assert.match(v?.message ?? '', /whole pages of 0x1000 bytes/);
    }
    pa.map(region(0x10_0000n, 2n * PAGE, PAGE));
    assert.equal(pa.count, 1);
  });

  test('a VA-mode table takes any byte range, as the kernel does', () => {
    const va = new IovaTable();
    va.map(region(0x10_0800n, 0x800n, 0x10n));
    va.map(region(0x10_0000n, 0x800n));
    assert.equal(va.count, 2);
  });

  test('names the first mapping an INVALIDATE covers only in part (u64 arithmetic as the kernel)', () => {
    const t = new IovaTable(0, undefined, PAGE);
    t.map(region(0x1000n, 4n * PAGE));
    t.map(region(0x10000n, PAGE));
    assert.equal(t.firstPartlyInvalidated(0x2000n, PAGE)?.iova, 0x1000n);
    assert.equal(t.firstPartlyInvalidated(0x800n, 0x4800n), undefined, 'covers [0x1000, 0x5000) whole');
    assert.equal(t.firstPartlyInvalidated(0n, 0n), undefined, 'iova 0 size 0 is everything');
    assert.equal(t.firstPartlyInvalidated(0x10000n, 0x800n)?.iova, 0x10000n);
  });

  test('set-mem-table regions are checked the same way, by index', () => {
    assert.throws(
      () => validateTarget([region(0n, PAGE), region(0x10000n, PAGE, 0x200n)], undefined, PAGE),
      (e: unknown) =>
        e instanceof PlanError && e.code === 'INVALID_REGION' && e.field === 'regions[1].offset',
    );
    assert.equal(validateTarget([region(0x10000n, 0x200n, 0x200n)]).length, 1, 'VA mode');
  });

  test('unmap splits a mapping only at page boundaries, and whole pages are re-mapped', () => {
    const t = new IovaTable(0, undefined, PAGE);
    t.map(region(0x10_0000n, 16n * PAGE));
    const plan = planUnmap(t, 0x10_5000n, PAGE);
    assert.deepEqual(
      plan.ops.map((op) => [op.type, op.iova, op.size]),
      [
        ['invalidate', 0x10_0000n, 16n * PAGE],
        ['update', 0x10_0000n, 5n * PAGE],
        ['update', 0x10_6000n, 10n * PAGE],
      ],
    );
    for (const [iova, size, field] of [
      [0x10_5800n, PAGE, 'iova'],
      [0x10_5000n, 0x800n, 'size'],
    ] as const) {
      assert.throws(
        () => planUnmap(t, iova, size),
        (e: unknown) =>
          e instanceof PlanError &&
          e.code === 'UNALIGNED_SPLIT' &&
          e.field === field &&
          /would split the mapping \[0x100000, 0x110000\)/.test(e.message),
      );
    }
    // Unaligned edges that split nothing are fine.
    assert.equal(planUnmap(t, 0xf_f800n, 17n * PAGE).ops.length, 1);
  });
});

describe("the API server's validation of a pinning device", () => {
  const memory = { sizeOf: (id: string) => (id === 'ram' ? 1n << 20n : undefined) };
  const step = (work: WorkingTables, request: WriteRequest) => applyStep(work, memory, request, 0);
  const map = (iova: bigint, size: bigint, offset = 0n): WriteRequest => ({
    kind: 'map',
    spec: { asid: 0, ...region(iova, size, offset) },
  });

  test('an unaligned map or split is INVALID_ARGUMENT naming the field; VA mode accepts it', async () => {
    const pa = new WorkingTables(new AddressSpaces(1, undefined, PAGE));
    for (const [request, field] of [
      [map(0x800n, PAGE), 'iova'],
      [map(0n, 0x1800n), 'size'],
      [map(0n, PAGE, 0x100n), 'offset'],
    ] as const) {
      await assert.rejects(
        step(pa, request),
        (e: unknown) =>
          e instanceof ServiceError &&
          e.code === 'INVALID_ARGUMENT' &&
          e.details.field === field &&
          /pinning \(PA-mode\) parent/.test(e.message),
      );
    }
    await step(pa, map(0x10_0000n, 4n * PAGE));
    await assert.rejects(
      step(pa, { kind: 'unmap', spec: { asid: 0, iova: 0x10_1000n, size: 0x100n } }),
      (e: unknown) =>
        e instanceof ServiceError && e.code === 'INVALID_ARGUMENT' && e.details.field === 'size',
    );
    assert.equal([...pa.spaces.table(0).entries()].length, 1, 'nothing applied');

    const va = new WorkingTables(new AddressSpaces(1));
    await step(va, map(0x800n, 0x800n, 0x100n));
    await step(va, { kind: 'unmap', spec: { asid: 0, iova: 0x900n, size: 0x10n } });
    assert.equal([...va.spaces.table(0).entries()].length, 2);
  });
});

describe("the agent's guard on a pinning device", () => {
  let tmp: TmpRegistry;
  before(() => {
    tmp = tmpRegistry();
    tmp.registry.create({ id: 'ram', size: 1n << 20n, kind: 'memfd' });
  });
  after(() => tmp.cleanup());

  test('refuses a partial INVALIDATE naming the mapping; memory stays referenced until a whole one', async () => {
    const pins = new PinnedMemory(() => 1n << 30n);
    const dev = new SimulatedDevice({ name: 'pa', memlock: 1n << 30n, pins }, tmp.registry);
    try {
      assert.deepEqual(await dev.apply([update(0x10_0000n, 16n * PAGE)]), [{ ok: true }]);
      const written = dev.counters().messagesWritten;
      const [partial] = await dev.apply([invalidate(0x10_5000n, PAGE)]);
      assert.ok(partial && !partial.ok);
      assert.equal(partial.code, 'PARTIAL_UNMAP');
      assert.equal(partial.errno, 'EINVAL');
      assert.equal(partial.field, 'iova');
      assert.match(partial.message, /covers only part of the mapping \[0x100000, 0x110000\) in asid 0/);
      assert.match(partial.message, /memory ram at offset 0x0, perm rw/);
      assert.equal(dev.counters().messagesWritten, written, 'nothing written');
      assert.equal(dev.mappings().length, 1);
      assert.equal(pins.pinnedBytes, 16n * PAGE);
      assert.throws(() => tmp.registry.release('ram'), /still mapped by 1 IOTLB entries/);

      const [unaligned] = await dev.apply([update(0x20_0800n, PAGE)]);
      assert.ok(unaligned && !unaligned.ok && unaligned.code === 'UNALIGNED' && unaligned.field === 'iova');
      assert.match(unaligned.message, /the kernel would not refuse it, vdpa-mapd does/);

      assert.deepEqual(await dev.apply([invalidate(0x10_0000n, 16n * PAGE)]), [{ ok: true }]);
      assert.equal(pins.pinnedBytes, 0n);
      assert.equal(tmp.registry.get('ram')?.mappedEntries, 0);
    } finally {
      await dev.close();
    }
  });

  test('reset without IOTLB_PERSIST empties a pinning device with whole-mapping INVALIDATEs', async () => {
    const dev = new SimulatedDevice({ name: 'pa', features: 0xen }, tmp.registry);
    try {
      const top = (1n << 64n) - 2n * PAGE;
      assert.deepEqual(await dev.apply([update(0x10_0000n, 4n * PAGE), update(top, 2n * PAGE)]), [
        { ok: true },
        { ok: true },
      ]);
      await dev.reset();
      assert.deepEqual(dev.mappings(), []);
      assert.deepEqual(dev.simulator.kernelMappings(), []);
      assert.equal(dev.simulator.pins?.pinnedBytes, 0n);
      assert.equal(tmp.registry.get('ram')?.mappedEntries, 0);
    } finally {
      await dev.close();
    }
  });

  test('a VA-mode device still drops a partly covered mapping whole, as its kernel does', async () => {
    const dev = new SimulatedDevice({ name: 'va', iommu: 'onchip' }, tmp.registry);
    try {
      assert.equal(dev.facts().pinned, false);
      assert.deepEqual(await dev.apply([update(0x10_0000n, 0x1800n, 0x10n)]), [{ ok: true }]);
      assert.deepEqual(await dev.apply([invalidate(0x10_0800n, 0x10n)]), [{ ok: true }]);
      assert.equal(dev.mappings().length, 0);
    } finally {
      await dev.close();
    }
  });
});
