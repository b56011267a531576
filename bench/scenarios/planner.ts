/** Scenario 3: set-mem-table planning at 1k / 10k / 100k regions with 1% / 50% changed. */
import { IovaTable, planMemTable, type Region } from '../../src/iotlb/index.ts';
import { type BenchContext, compare, scaled, seconds } from '../harness.ts';

const UNIT = 0x200000n;

/** A fixed permutation (callers send tables in any order; a sorted input would flatter the sort). */
function shuffled<T>(xs: T[]): T[] {
  const out = [...xs];
  let seed = 12345;
  for (let i = out.length - 1; i > 0; i--) {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    const j = seed % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

export function benchPlanner(ctx: BenchContext): void {
  for (const target of [1_000, 10_000, 100_000]) {
    const n = scaled(ctx, target, 50);
    const current: Region[] = Array.from({ length: n }, (_, i) => ({
      iova: BigInt(i) * UNIT,
      size: UNIT,
      memory: 'ram0',
      offset: BigInt(i) * UNIT,
      perm: 'rw',
    }));
    const table = new IovaTable();
    for (const r of current) table.map(r);
    for (const changed of [0.01, 0.5]) {
      const every = Math.round(1 / changed);
      // Changed regions keep their IOVA but move to another memory offset: one INVALIDATE + one UPDATE each.
      const wanted = shuffled(
        current.map((r, i) => (i % every === 0 ? { ...r, offset: r.offset + 0x1000n } : r)),
      );
      const minimal = 2 * current.filter((_, i) => i % every === 0).length;
      let opCount = 0;
      const planSeconds = Math.min(
        ...[1, 2, 3].map(() =>
          seconds(() => {
            opCount = planMemTable(table, wanted).ops.length;
          }),
        ),
      );
      const sortSeconds = Math.min(
        ...[1, 2, 3].map(() => seconds(() => [...wanted].sort((a, b) => (a.iova < b.iova ? -1 : 1)))),
      );
      compare(
        ctx,
        {
          scenario: 'planner',
          case: `${n.toLocaleString('en-US')} regions, ${changed * 100}% changed`,
          metric: 'plan time',
          value: planSeconds * 1000,
          unit: 'ms',
          note: `ops ${opCount} vs minimal ${minimal}`,
        },
        'sort of the target',
        sortSeconds * 1000,
      );
    }
  }
}
