import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { AddressSpaces, IotlbError, IovaTable, type Perm, type Region } from '../../src/iotlb/index.ts';

const R = (iova: bigint, size: bigint, extra: Partial<Region> = {}): Region => ({
  iova,
  size,
  memory: 'ram0',
  offset: 0n,
  perm: 'rw',
  ...extra,
});
const MiB = 1n << 20n;
const U64 = 1n << 64n;

/** The kernel's rules, as table rows: [name, entries already mapped, region to map, expected]. */
const MAP_CASES: [string, Region[], Region, 'ok' | { reason: string; errno: string; field: string }][] = [
  ['a first mapping', [], R(0x100000n, 2n * MiB), 'ok'],
  [
    'size 0 (vhost_chr_write_iter: EINVAL)',
    [],
    R(0x1000n, 0n),
    { reason: 'ZERO_SIZE', errno: 'EINVAL', field: 'size' },
  ],
  [
    'identical mapping again (no replace)',
    [R(0x1000n, 0x1000n)],
    R(0x1000n, 0x1000n),
    { reason: 'OVERLAP', errno: 'EEXIST', field: 'iova' },
  ],
  [
    'overlap by the first byte',
    [R(0x1000n, 0x1000n)],
    R(0x1fffn, 0x1000n),
    { reason: 'OVERLAP', errno: 'EEXIST', field: 'iova' },
  ],
  [
    'overlap by the last byte',
    [R(0x2000n, 0x1000n)],
    R(0x1000n, 0x1001n),
    { reason: 'OVERLAP', errno: 'EEXIST', field: 'iova' },
  ],
  [
    'a range that swallows an entry',
    [R(0x2000n, 0x10n)],
    R(0x1000n, 0x10000n),
    { reason: 'OVERLAP', errno: 'EEXIST', field: 'iova' },
  ],
  ['adjacent below and above', [R(0x1000n, 0x1000n), R(0x3000n, 0x1000n)], R(0x2000n, 0x1000n), 'ok'],
  [
    'iova + size overflows 2^64',
    [],
    R(U64 - 0x1000n, 0x2000n),
    { reason: 'OVERFLOW', errno: 'EINVAL', field: 'size' },
  ],
  ['ends exactly at 2^64', [], R(U64 - 0x1000n, 0x1000n), 'ok'],
  ['bad perm', [], R(0n, 1n, { perm: 'x' as Perm }), { reason: 'BAD_PERM', errno: 'EINVAL', field: 'perm' }],
];

describe('IovaTable.map follows vhost_vdpa_process_iotlb_update', () => {
  for (const [name, existing, region, expected] of MAP_CASES) {
    test(name, () => {
      const table = new IovaTable();
      for (const e of existing) table.map(e);
      if (expected === 'ok') {
        table.map(region);
        assert.equal(table.count, existing.length + 1);
        return;
      }
      const err = (() => {
        try {
          table.map(region);
        } catch (e) {
          return e;
        }
        assert.fail('map should have been refused');
      })();
      assert.ok(err instanceof IotlbError);
      assert.equal(err.violation.reason, expected.reason);
      assert.equal(err.violation.errno, expected.errno);
      assert.equal(err.violation.field, expected.field);
      assert.equal(table.count, existing.length, 'a refused map changes nothing');
    });
  }

  test('an overlap names the live entry it hits', () => {
    const table = new IovaTable(0);
    table.map(R(0x4000n, 0x2000n, { memory: 'ram1', offset: 0x1000n }));
    const v = table.checkMap(R(0x5000n, 0x1000n));
    assert.equal(v?.reason, 'OVERLAP');
    assert.deepEqual(v?.conflict, {
      asid: 0,
      iova: 0x4000n,
      size: 0x2000n,
      memory: 'ram1',
      offset: 0x1000n,
      perm: 'rw',
    });
    assert.match(v?.message ?? '', /\[0x4000, 0x6000\)/);
  });

  test('the device IOVA range is inclusive at both ends', () => {
    const table = new IovaTable(0, { first: 0x1000n, last: 0xffffn });
    assert.equal(table.checkMap(R(0xfffn, 0x10n))?.reason, 'OUT_OF_RANGE');
    assert.equal(table.checkMap(R(0xf000n, 0x1001n))?.reason, 'OUT_OF_RANGE');
    assert.equal(table.checkMap(R(0x1000n, 0xf000n)), undefined);
  });
});

describe('IovaTable.invalidate follows vhost_vdpa_iotlb_unmap', () => {
  test('4 KiB inside a 4 MiB entry removes the whole entry', () => {
    const table = new IovaTable();
    table.map(R(0x400000n, 4n * MiB));
    const removed = table.invalidate(0x401000n, 0x1000n);
    assert.deepEqual(removed, [R(0x400000n, 4n * MiB)]);
    assert.equal(table.count, 0);
    assert.equal(table.bytes, 0n);
  });

  test('every entry the range touches goes, the others stay', () => {
    const table = new IovaTable();
    for (const iova of [0x1000n, 0x3000n, 0x5000n, 0x7000n]) table.map(R(iova, 0x1000n));
    const removed = table.invalidate(0x3fffn, 0x1002n);
    assert.deepEqual(
      removed.map((r) => r.iova),
      [0x3000n, 0x5000n],
    );
    assert.deepEqual(
      [...table.entries()].map((r) => r.iova),
      [0x1000n, 0x7000n],
    );
  });

  test('an empty range is not an error', () => {
    const table = new IovaTable();
    table.map(R(0x1000n, 0x1000n));
    assert.deepEqual(table.invalidate(0x8000n, 0x1000n), []);
    assert.equal(table.count, 1);
  });

  test('iova 0, size 0 wraps to the whole space; size 0 elsewhere matches nothing', () => {
    const table = new IovaTable();
    table.map(R(0x1000n, 0x1000n));
    table.map(R(U64 - 0x1000n, 0x1000n));
    assert.deepEqual(table.invalidate(0x1000n, 0n), []);
    assert.equal(table.invalidate(0n, 0n).length, 2);
    assert.equal(table.count, 0);
  });
});

test('lookup and translate find the entry that holds an address', () => {
  const table = new IovaTable();
  table.map(R(0x10000n, 0x4000n, { memory: 'ram3', offset: 0x100000n, perm: 'ro' }));
  assert.equal(table.lookup(0xffffn), undefined);
  assert.equal(table.lookup(0x14000n), undefined);
  assert.equal(table.lookup(0x13fffn)?.memory, 'ram3');
  const t = table.translate(0x12345n);
  assert.equal(t?.memoryOffset, 0x102345n);
  assert.equal(t?.bytesToEnd, 0x1cbbn);
});

test('AddressSpaces refuses an asid the device does not have (vhost_vdpa_find_alloc_as)', () => {
  const spaces = new AddressSpaces(2);
  const op = { type: 'update' as const, asid: 2, ...R(0n, 0x1000n) };
  assert.equal(spaces.check(op)?.reason, 'BAD_ASID');
  assert.throws(() => spaces.apply(op), IotlbError);
  spaces.apply({ ...op, asid: 1 });
  spaces.apply({ ...op, asid: 0 });
  assert.equal(spaces.count, 2, 'address spaces are independent: the same IOVA in each');
  assert.deepEqual(
    spaces.mappings().map((m) => m.asid),
    [0, 1],
  );
});

// ---- property test against a reference model: a plain array of ranges ----

type ModelOp = { kind: 'map'; region: Region } | { kind: 'invalidate'; iova: bigint; size: bigint };
const UNIT = 0x1000n;

/** The last byte of `[iova, iova + size)` in u64 arithmetic (vhost_vdpa_iotlb_unmap). */
const lastByte = (iova: bigint, size: bigint): bigint => (((iova + size - 1n) % U64) + U64) % U64;

class ModelTable {
  entries: Region[] = [];
  constructor(readonly range = { first: 0n, last: U64 - 1n }) {}
  map(r: Region): string {
    if (r.size <= 0n) return 'ZERO_SIZE';
    if (r.iova + r.size > U64) return 'OVERFLOW';
    if (r.iova < this.range.first || r.iova + r.size - 1n > this.range.last) return 'OUT_OF_RANGE';
    if (this.entries.some((e) => e.iova < r.iova + r.size && r.iova < e.iova + e.size)) return 'OVERLAP';
    this.entries.push(r);
    return 'ok';
  }
  invalidate(iova: bigint, size: bigint): Region[] {
    const removed = this.touched(iova, size);
    this.entries = this.entries.filter((e) => !removed.includes(e));
    return removed;
  }
  /** The lowest entry an INVALIDATE would remove without covering it whole. */
  firstPartlyInvalidated(iova: bigint, size: bigint): Region | undefined {
    const last = lastByte(iova, size);
    return this.touched(iova, size).find((e) => e.iova < iova || e.iova + e.size - 1n > last);
  }
  private touched(iova: bigint, size: bigint): Region[] {
    const last = lastByte(iova, size);
    if (last < iova) return [];
    const hit = (e: Region) => e.iova <= last && e.iova + e.size - 1n >= iova;
    return this.entries.filter(hit).sort((a, b) => (a.iova < b.iova ? -1 : 1));
  }
}

const opArb: fc.Arbitrary<ModelOp> = fc.oneof(
  fc
    .record({
      unit: fc.integer({ min: 0, max: 40 }),
      units: fc.integer({ min: 0, max: 8 }),
      nudge: fc.constantFrom(0n, 1n, -1n),
      perm: fc.constantFrom<Perm>('ro', 'wo', 'rw'),
    })
    .map(({ unit, units, nudge, perm }) => ({
      kind: 'map' as const,
      region: R(BigInt(unit) * UNIT, BigInt(units) * UNIT + (units > 0 ? nudge : 0n), { perm }),
    })),
  fc
    .record({ unit: fc.integer({ min: 0, max: 40 }), units: fc.integer({ min: 0, max: 10 }) })
    .map(({ unit, units }) => ({
      kind: 'invalidate' as const,
      iova: BigInt(unit) * UNIT,
      size: BigInt(units) * UNIT,
    })),
  fc.constant<ModelOp>({ kind: 'map', region: R(U64 - UNIT, 2n * UNIT) }),
  fc.constant<ModelOp>({ kind: 'invalidate', iova: 0n, size: 0n }),
);

test('property: IovaTable agrees with the reference model over random op sequences', () => {
  const range = { first: UNIT, last: 36n * UNIT - 1n };
  fc.assert(
    fc.property(fc.array(opArb, { maxLength: 60 }), fc.boolean(), (ops, limited) => {
      const table = limited ? new IovaTable(0, range) : new IovaTable();
      const model = limited ? new ModelTable(range) : new ModelTable();
      for (const op of ops) {
        if (op.kind === 'map') {
          const expected = model.map(op.region);
          const got = table.checkMap(op.region)?.reason ?? 'ok';
          assert.equal(got, expected);
          if (got === 'ok') table.map(op.region);
        } else {
          assert.deepEqual(
            table.firstPartlyInvalidated(op.iova, op.size),
            model.firstPartlyInvalidated(op.iova, op.size),
          );
          assert.deepEqual(table.invalidate(op.iova, op.size), model.invalidate(op.iova, op.size));
        }
        const sorted = [...model.entries].sort((a, b) => (a.iova < b.iova ? -1 : 1));
        assert.deepEqual([...table.entries()], sorted);
        assert.equal(table.count, sorted.length);
        assert.equal(
          table.bytes,
          sorted.reduce((n, e) => n + e.size, 0n),
        );
      }
      for (let unit = 0n; unit < 50n; unit++) {
        const addr = unit * UNIT + 7n;
        const expected = model.entries.find((e) => e.iova <= addr && addr < e.iova + e.size);
        assert.deepEqual(table.lookup(addr), expected);
      }
    }),
    { numRuns: 400 },
  );
});
