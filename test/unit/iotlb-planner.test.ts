/**
 * The planner against an independent model (test/unit/iotlb-model.ts): the ops it plans are
 * applied to a plain list of entries under the kernel's rules, and the result is compared, entry by
 * entry and byte by byte, with what was asked for.
 *
 * "Minimal" here: among plans whose every INVALIDATE removes exactly one whole live entry (the
 * rule the planner keeps, see planner.ts), the plan has one INVALIDATE per live entry that is not
 * in the target identically (same iova, size, memory, offset, perm) and one UPDATE per target
 * entry that is not live identically, and no op touches a byte of an entry that is in both.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import {
  diffSorted,
  type IotlbOp,
  IovaTable,
  type Perm,
  type Plan,
  PlanError,
  planUnmap,
  type Region,
  validateTarget,
} from '../../src/iotlb/index.ts';
import { addressMap, canonical, IotlbModel, identical, sharesByte, withAsid } from './iotlb-model.ts';

const LIMIT = 1n << 64n;
/** Each case lives in [base, base + SPAN): a byte map of it stays small. */
const SPAN = 64n;
/**
 * Bases around 2^53 and above, where IOVAs no longer fit a double exactly, across 2^64 - 1024
 * (above it they round up to 2^64), and at the top of u64.
 */
const BASES = [0n, (1n << 53n) - 24n, (1n << 60n) + 7n, LIMIT - 1024n - SPAN / 2n, LIMIT - SPAN];
const PERMS: Perm[] = ['ro', 'wo', 'rw'];

/** set-mem-table as the queue's applySetMemTable plans it for one address space. */
function planSetMemTable(table: IovaTable, target: readonly Region[]): Plan {
  return diffSorted([...table.entries()], validateTarget(target, table.range, table.pinPageSize), table.asid);
}

function tableOf(regions: readonly Region[]): IovaTable {
  const table = new IovaTable();
  for (const r of regions) table.map(r);
  return table;
}

/** A random non-overlapping table in [base, base + SPAN), in IOVA order. */
const regionsArb = (base: bigint): fc.Arbitrary<Region[]> =>
  fc
    .array(
      fc.record({
        gap: fc.integer({ min: 0, max: 3 }),
        len: fc.integer({ min: 1, max: 6 }),
        memory: fc.constantFrom('m0', 'm1'),
        offset: fc.integer({ min: 0, max: 3 }),
        perm: fc.constantFrom(...PERMS),
      }),
      { maxLength: 16 },
    )
    .map((parts) => {
      const out: Region[] = [];
      let cursor = base;
      for (const { gap, len, memory, offset, perm } of parts) {
        const iova = cursor + BigInt(gap);
        cursor = iova + BigInt(len);
        if (cursor > base + SPAN) break;
        out.push({ iova, size: BigInt(len), memory, offset: BigInt(offset), perm });
      }
      return out;
    });

type Edit = 'keep' | 'drop' | 'offset' | 'perm' | 'shrink';

function edited(r: Region, edit: Edit): Region | undefined {
  switch (edit) {
    case 'keep':
      return r;
    case 'drop':
      return undefined;
    case 'offset':
      return { ...r, offset: r.offset + 1n };
    case 'perm':
      return { ...r, perm: r.perm === 'rw' ? 'ro' : 'rw' };
    case 'shrink':
      return r.size > 1n ? { ...r, size: r.size - 1n } : { ...r, memory: r.memory === 'm0' ? 'm1' : 'm0' };
  }
}

/**
 * A live table and a target derived from it (entries kept, dropped, changed, plus fresh ones in
 * the gaps), so that both share entries often; the target arrives sorted or in any order.
 */
const setMemTableCaseArb = fc
  .constantFrom(...BASES)
  .chain((base) =>
    fc.record({
      current: regionsArb(base),
      fresh: regionsArb(base),
      edits: fc.array(fc.constantFrom<Edit>('keep', 'keep', 'drop', 'offset', 'perm', 'shrink'), {
        maxLength: 16,
      }),
    }),
  )
  .chain(({ current, fresh, edits }) => {
    const target = current.flatMap((r, i) => edited(r, edits[i] ?? 'keep') ?? []);
    for (const r of fresh) if (!target.some((t) => sharesByte(t, r))) target.push(r);
    return fc.record({
      current: fc.constant(current),
      target: fc.constant(canonical(withAsid(target, 0)).map(({ asid: _, ...r }) => r)),
      arrival: fc.oneof(
        fc.constant(canonical(withAsid(target, 0)).map(({ asid: _, ...r }) => r)),
        fc.shuffledSubarray(target, { minLength: target.length, maxLength: target.length }),
      ),
    });
  });

const count = (ops: readonly IotlbOp[], type: IotlbOp['type']) => ops.filter((op) => op.type === type).length;

test('property: set-mem-table ops turn the model of the live table into exactly the target, minimally', () => {
  fc.assert(
    fc.property(setMemTableCaseArb, ({ current, target, arrival }) => {
      const table = tableOf(current);
      const arrived = [...arrival];
      const plan = planSetMemTable(table, arrival);
      assert.deepEqual(arrival, arrived, 'the request is not reordered');

      const model = new IotlbModel(withAsid(current, 0));
      model.applyWholeEntryOps(plan.ops);
      assert.deepEqual(addressMap(model.mappings()), addressMap(withAsid(target, 0)), 'byte by byte');
      assert.deepEqual(model.mappings(), canonical(withAsid(target, 0)), 'entry by entry');

      const kept = current.filter((c) => target.some((t) => identical(c, t)));
      const stale = current.filter((c) => !kept.includes(c));
      const added = target.filter((t) => !current.some((c) => identical(c, t)));
      for (const op of plan.ops) {
        const hit = kept.find((k) => sharesByte(k, op));
        assert.equal(hit, undefined, `${op.type} ${op.iova}+${op.size} touches an entry that stays`);
      }
      assert.equal(count(plan.ops, 'invalidate'), stale.length, 'one INVALIDATE per stale entry');
      assert.equal(count(plan.ops, 'update'), added.length, 'one UPDATE per new entry');
      assert.equal(plan.unchanged, kept.length);
      assert.deepEqual(canonical(withAsid(plan.invalidated, 0)), canonical(withAsid(stale, 0)));
      assert.deepEqual(canonical(withAsid(plan.mapped, 0)), canonical(withAsid(added, 0)));
    }),
    { numRuns: 600 },
  );
});

/** A small seeded generator (a fast-check array of thousands of regions would shrink slowly). */
function lcg(seed: number): { nextInt(min: number, max: number): number } {
  let state = seed >>> 0;
  return {
    nextInt(min, max) {
      state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
      return min + (state % (max - min + 1));
    },
  };
}

test('property: a large target in any order is validated into IOVA order, across every digit boundary', () => {
  // Large enough for validateTarget's radix sort; IOVAs across 2^32, 2^48, 2^53, and up to 2^64
  // (across 2^64 - 1024, above which they round up to 2^64 as doubles).
  const caseArb = fc.record({
    start: fc.constantFrom(0n, (1n << 32n) - 9000n, (1n << 48n) - 9000n, (1n << 53n) - 9000n, 'top' as const),
    count: fc.integer({ min: 4096, max: 5000 }),
    seed: fc.integer(),
  });
  fc.assert(
    fc.property(caseArb, ({ start, count, seed }) => {
      const rng = lcg(seed);
      const relative: [bigint, bigint][] = [];
      let end = 0n;
      for (let i = 0; i < count; i++) {
        const at = end + BigInt(rng.nextInt(0, 3));
        const size = BigInt(rng.nextInt(1, 3));
        end = at + size;
        relative.push([at, size]);
      }
      const base = start === 'top' ? LIMIT - end : start;
      const sorted = relative.map(
        ([at, size]): Region => ({ iova: base + at, size, memory: 'm0', offset: 0n, perm: 'rw' }),
      );
      const arrival = [...sorted];
      for (let i = arrival.length - 1; i > 0; i--) {
        const j = rng.nextInt(0, i);
        [arrival[i], arrival[j]] = [arrival[j]!, arrival[i]!];
      }
      assert.deepEqual(validateTarget(arrival), sorted);
      // Two regions on one IOVA are refused, whichever of them comes first.
      const twin = rng.nextInt(0, count - 1);
      assert.throws(() => validateTarget([...arrival, { ...arrival[twin]!, size: 1n }]), {
        code: 'TARGET_OVERLAP',
      });
    }),
    { numRuns: 25 },
  );
});

/** The model's rules for one region of a target, with `range` the device's window (inclusive). */
const validInModel = (r: Region, range: { first: bigint; last: bigint }): boolean =>
  PERMS.includes(r.perm) && r.size > 0n && r.iova >= range.first && r.iova + r.size - 1n <= range.last;

test('property: a bad or overlapping target is refused naming a guilty region, and changes nothing', () => {
  const regionArb = (base: bigint) =>
    fc
      .record({
        at: fc.integer({ min: -4, max: Number(SPAN) + 4 }),
        size: fc.integer({ min: 0, max: 8 }),
        perm: fc.constantFrom<string>('ro', 'wo', 'rw', 'rx'),
        offset: fc.integer({ min: 0, max: 3 }),
      })
      .map(({ at, size, perm, offset }) => ({
        iova: base + BigInt(at),
        size: BigInt(size),
        memory: 'm0',
        offset: BigInt(offset),
        perm: perm as Perm,
      }));
  const caseArb = fc.constantFrom(...BASES).chain((base) =>
    fc.record({
      base: fc.constant(base),
      live: regionsArb(base),
      target: fc.array(regionArb(base), { maxLength: 8 }),
    }),
  );
  fc.assert(
    fc.property(caseArb, ({ base, live, target }) => {
      const range = { first: base, last: base + SPAN - 1n };
      const table = new IovaTable(0, range);
      for (const r of live) table.map(r);
      const liveBefore = [...table.entries()];
      const asked = [...target];
      const firstBad = target.findIndex((r) => !validInModel(r, range));
      const overlapping = target.flatMap((r, i) =>
        target.some((o, j) => j !== i && sharesByte(r, o)) ? [i] : [],
      );
      let result: Plan | undefined;
      let error: unknown;
      try {
        result = planSetMemTable(table, target);
      } catch (e) {
        error = e;
      }
      if (firstBad >= 0) {
        assert.ok(
          error instanceof PlanError && error.code === 'INVALID_REGION',
          `regions[${firstBad}] is refused`,
        );
        assert.ok(
          error.field.startsWith(`regions[${firstBad}].`),
          `${error.field} names regions[${firstBad}]`,
        );
      } else if (overlapping.length > 0) {
        assert.ok(error instanceof PlanError && error.code === 'TARGET_OVERLAP', 'an overlap is refused');
        const named = /^regions\[(\d+)\]\.iova$/.exec(error.field);
        assert.ok(
          named && overlapping.includes(Number(named[1])),
          `${error.field} names an overlapping region`,
        );
      } else {
        assert.equal(error, undefined);
        assert.ok(result);
      }
      assert.deepEqual(target, asked, 'the request is untouched');
      assert.deepEqual([...table.entries()], liveBefore, 'the table is untouched');
    }),
    { numRuns: 600 },
  );
});

test('property: unmap removes exactly the range from the model and keeps every other byte, minimally', () => {
  const caseArb = fc.constantFrom(...BASES).chain((base) =>
    fc
      .record({
        current: regionsArb(base),
        start: fc.integer({ min: 0, max: Number(SPAN) - 1 }),
        len: fc.integer({ min: 1, max: 20 }),
      })
      .map(({ current, start, len }) => ({
        current,
        iova: base + BigInt(start),
        size: BigInt(Math.min(len, Number(SPAN) - start)),
      })),
  );
  fc.assert(
    fc.property(caseArb, ({ current, iova, size }) => {
      const table = tableOf(current);
      const plan = planUnmap(table, iova, size);
      const model = new IotlbModel(withAsid(current, 0));
      model.applyWholeEntryOps(plan.ops);

      const want = addressMap(withAsid(current, 0));
      for (let a = iova; a < iova + size; a++) want.delete(`0:${a}`);
      assert.deepEqual(addressMap(model.mappings()), want, 'byte by byte');

      const range = { iova, size };
      const touched = current.filter((r) => sharesByte(r, range));
      const remainders = touched.reduce(
        (n, r) => n + (r.iova < iova ? 1 : 0) + (r.iova + r.size > iova + size ? 1 : 0),
        0,
      );
      for (const op of plan.ops) {
        const bystander = current.find((r) => !touched.includes(r) && sharesByte(r, op));
        assert.equal(
          bystander,
          undefined,
          `${op.type} ${op.iova}+${op.size} touches an entry outside the range`,
        );
      }
      assert.equal(count(plan.ops, 'invalidate'), touched.length, 'one INVALIDATE per entry in the range');
      assert.equal(count(plan.ops, 'update'), remainders, 'one UPDATE per remainder');
    }),
    { numRuns: 600 },
  );
});

const UNIT = 0x1000n;
const R = (iova: bigint, size: bigint, extra: Partial<Region> = {}): Region => ({
  iova,
  size,
  memory: 'ram0',
  offset: 0n,
  perm: 'rw',
  ...extra,
});

test('planning the table it already has is empty', () => {
  const regions = [R(0n, UNIT), R(4n * UNIT, 2n * UNIT, { perm: 'ro' })];
  const plan = planSetMemTable(tableOf(regions), [...regions].reverse());
  assert.deepEqual(plan.ops, []);
  assert.equal(plan.unchanged, 2);
});

test('a region changed in place is invalidated whole, then mapped again', () => {
  const plan = planSetMemTable(tableOf([R(0n, 4n * UNIT)]), [R(0n, 4n * UNIT, { perm: 'ro' })]);
  assert.deepEqual(
    plan.ops.map((op) => op.type),
    ['invalidate', 'update'],
  );
});

test('the target table is validated, naming the region by its index', () => {
  const table = tableOf([]);
  assert.throws(() => planSetMemTable(table, [R(0n, UNIT), R(8n * UNIT, 0n)]), {
    name: 'PlanError',
    code: 'INVALID_REGION',
    field: 'regions[1].size',
  });
  assert.throws(() => planSetMemTable(table, [R(8n * UNIT, 2n * UNIT), R(0n, UNIT), R(9n * UNIT, UNIT)]), {
    code: 'TARGET_OVERLAP',
    field: 'regions[2].iova',
  });
  assert.throws(() => planSetMemTable(table, [R((1n << 64n) - UNIT, 2n * UNIT)]), {
    field: 'regions[0].size',
  });
});

test('unmap with exact refuses to split and changes nothing', () => {
  const table = tableOf([R(0n, 4n * UNIT)]);
  assert.throws(
    () => planUnmap(table, UNIT, UNIT, true),
    (e) => e instanceof PlanError && e.code === 'SPLIT_REFUSED',
  );
  assert.equal(table.count, 1);
  assert.equal(planUnmap(table, 0n, 4n * UNIT, true).ops.length, 1);
});

test('unmap of the middle re-maps both sides with their offsets moved along', () => {
  const table = tableOf([R(0x10000n, 0x4000n, { offset: 0x100000n })]);
  const plan = planUnmap(table, 0x11000n, 0x1000n);
  assert.deepEqual(plan.ops, [
    { type: 'invalidate', asid: 0, iova: 0x10000n, size: 0x4000n },
    { type: 'update', asid: 0, ...R(0x10000n, 0x1000n, { offset: 0x100000n }) },
    { type: 'update', asid: 0, ...R(0x12000n, 0x2000n, { offset: 0x102000n }) },
  ]);
});
