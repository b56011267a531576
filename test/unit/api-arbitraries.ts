/** fast-check arbitraries of the API's results, shared by the tests of their codings. */
import fc from 'fast-check';
import type { SetMemTableResult } from '../../src/core/types.ts';
import type { IotlbOp, Mapping } from '../../src/iotlb/types.ts';

const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
export const mapping: fc.Arbitrary<Mapping> = fc.record({
  asid: fc.nat(),
  iova: u64,
  size: u64,
  memory: fc.string({ unit: 'binary', maxLength: 8 }),
  offset: u64,
  perm: fc.constantFrom('ro' as const, 'wo' as const, 'rw' as const),
});
export const op: fc.Arbitrary<IotlbOp> = fc.oneof(
  mapping.map((m) => ({ type: 'update' as const, ...m })),
  fc.record({ type: fc.constant('invalidate' as const), asid: fc.nat(), iova: u64, size: u64 }),
);

/** Short lists mostly, and now and then a long one of `long` elements. */
export function setMemTableResult(long: {
  minLength: number;
  maxLength: number;
}): fc.Arbitrary<SetMemTableResult> {
  const list = <T>(item: fc.Arbitrary<T>) =>
    fc.oneof(
      { weight: 4, arbitrary: fc.array(item, { maxLength: 8 }) },
      { weight: 1, arbitrary: fc.array(item, long) },
    );
  return fc.record({
    dryRun: fc.boolean(),
    ops: list(op),
    invalidated: list(mapping),
    mapped: list(mapping),
    unchanged: fc.nat(),
  });
}
