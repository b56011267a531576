import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import {
  type IotlbOp,
  IovaTable,
  type Perm,
  PlanError,
  planMemTable,
  planUnmap,
  type Region,
  sameRegion,
} from '../../src/iotlb/index.ts';

const UNIT = 0x1000n;
const R = (iova: bigint, size: bigint, extra: Partial<Region> = {}): Region => ({
  iova,
  size,
  memory: 'ram0',
  offset: 0n,
  perm: 'rw',
  ...extra,
});

/** Random non-overlapping tables on a small grid, so current and target collide often. */
const tableArb: fc.Arbitrary<Region[]> = fc
  .array(
    fc.record({
      gap: fc.integer({ min: 0, max: 3 }),
      len: fc.integer({ min: 1, max: 4 }),
      memory: fc.constantFrom('ram0', 'ram1'),
      offset: fc.integer({ min: 0, max: 3 }),
      perm: fc.constantFrom<Perm>('ro', 'rw'),
    }),
    { maxLength: 25 },
  )
  .map((parts) => {
    let cursor = 0n;
    return parts.map(({ gap, len, memory, offset, perm }) => {
      const iova = cursor + BigInt(gap) * UNIT;
      cursor = iova + BigInt(len) * UNIT;
      return R(iova, BigInt(len) * UNIT, { memory, offset: BigInt(offset) * UNIT, perm });
    });
  });

function tableOf(regions: Region[]): IovaTable {
  const table = new IovaTable();
  for (const r of regions) table.map(r);
  return table;
}

/** Applies ops under the kernel's rules, also checking each INVALIDATE hits exactly one whole entry. */
function applyStrict(table: IovaTable, ops: IotlbOp[]): void {
  for (const op of ops) {
    if (op.type === 'update') table.map(op);
    else {
      const removed = table.invalidate(op.iova, op.size);
      assert.equal(removed.length, 1, 'an INVALIDATE covers exactly one existing entry');
      assert.equal(removed[0]!.iova, op.iova);
      assert.equal(removed[0]!.size, op.size);
    }
  }
}

const shuffle = <T>(xs: T[], seed: number): T[] =>
  xs
    .map((x, i) => ({ x, k: (i * 7919 + seed) % 104729 }))
    .sort((a, b) => a.k - b.k)
    .map(({ x }) => x);

test('property: applying plan(a, b) to a yields exactly b, touches nothing shared, with the minimal op count', () => {
  fc.assert(
    fc.property(tableArb, tableArb, fc.nat(), (current, target, seed) => {
      const table = tableOf(current);
      const plan = planMemTable(table, shuffle(target, seed));
      const shared = current.filter((c) => target.some((t) => sameRegion(c, t)));
      for (const op of plan.ops) {
        assert.ok(!shared.some((s) => s.iova === op.iova), 'a mapping in both tables is not touched');
      }
      assert.equal(plan.unchanged, shared.length);
      assert.equal(plan.ops.length, current.length - shared.length + (target.length - shared.length));
      applyStrict(table, plan.ops);
      assert.deepEqual([...table.entries()], target);
    }),
    { numRuns: 500 },
  );
});

test('property: no UPDATE of a plan overlaps anything live when it is applied', () => {
  fc.assert(
    fc.property(tableArb, tableArb, (current, target) => {
      const table = tableOf(current);
      for (const op of planMemTable(table, target).ops) {
        if (op.type === 'update') assert.equal(table.checkMap(op), undefined);
        applyStrict(table, [op]);
      }
    }),
  );
});

test('planning the table it already has is empty', () => {
  const regions = [R(0n, UNIT), R(4n * UNIT, 2n * UNIT, { perm: 'ro' })];
  const plan = planMemTable(tableOf(regions), [...regions].reverse());
  assert.deepEqual(plan.ops, []);
  assert.equal(plan.unchanged, 2);
});

test('a region changed in place is invalidated whole, then mapped again', () => {
  const plan = planMemTable(tableOf([R(0n, 4n * UNIT)]), [R(0n, 4n * UNIT, { perm: 'ro' })]);
  assert.deepEqual(
    plan.ops.map((op) => op.type),
    ['invalidate', 'update'],
  );
});

test('the target table is validated, naming the region by its index', () => {
  const table = tableOf([]);
  assert.throws(() => planMemTable(table, [R(0n, UNIT), R(8n * UNIT, 0n)]), {
    name: 'PlanError',
    code: 'INVALID_REGION',
    field: 'regions[1].size',
  });
  assert.throws(() => planMemTable(table, [R(8n * UNIT, 2n * UNIT), R(0n, UNIT), R(9n * UNIT, UNIT)]), {
    code: 'TARGET_OVERLAP',
    field: 'regions[2].iova',
  });
  assert.throws(() => planMemTable(table, [R((1n << 64n) - UNIT, 2n * UNIT)]), { field: 'regions[0].size' });
});

test('property: partial unmap removes exactly the range and keeps every other byte as it was', () => {
  fc.assert(
    fc.property(
      tableArb,
      fc.integer({ min: 0, max: 60 }),
      fc.integer({ min: 1, max: 20 }),
      (current, start, len) => {
        const table = tableOf(current);
        const iova = BigInt(start) * UNIT;
        const size = BigInt(len) * UNIT;
        const before = new Map<bigint, ReturnType<IovaTable['translate']>>();
        for (let u = 0n; u < 120n; u++) before.set(u * UNIT, table.translate(u * UNIT));
        const plan = planUnmap(table, iova, size);
        applyStrict(table, plan.ops);
        for (let u = 0n; u < 120n; u++) {
          const addr = u * UNIT;
          const now = table.translate(addr);
          if (addr >= iova && addr < iova + size) {
            assert.equal(now, undefined, `0x${addr.toString(16)} is unmapped`);
            continue;
          }
          const was = before.get(addr);
          assert.equal(now?.memoryOffset, was?.memoryOffset);
          assert.equal(now?.region.memory, was?.region.memory);
          assert.equal(now?.region.perm, was?.region.perm);
        }
      },
    ),
    { numRuns: 400 },
  );
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
