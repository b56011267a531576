/**
 * Scenario 3: set-mem-table planning (validateTarget + diffSorted over the live table, as the
 * queue's applySetMemTable runs it) beside its floor: Array.prototype.sort by IOVA (bigint keys)
 * of the same target in an arbitrary order, the sort a planner that always sorts would pay.
 *
 * Cases: 100,000 regions of 2 MiB with 1% changed, arriving sorted and shuffled; a 1 TiB guest as
 * 512 and as 65,536 regions, from empty and with 1% changed. A changed region keeps its IOVA and
 * moves to another memory offset, so the minimal plan is one INVALIDATE + one UPDATE per change.
 */
import { diffSorted, IovaTable, type Plan, type Region, validateTarget } from '../../src/iotlb/index.ts';
import { type BenchContext, compare, scaled, seconds } from '../harness.ts';

const TIB = 1n << 40n;
const ROUNDS = 7;

/** A fixed permutation of 0..n-1 (callers may send tables in any order). */
function permutation(n: number): number[] {
  const out = Array.from({ length: n }, (_, i) => i);
  let seed = 12345;
  for (let i = out.length - 1; i > 0; i--) {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    const j = seed % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

/**
 * `regions` in the order `at`, each a new object with new bigints, allocated in that order, as a
 * request decoded off the wire is (reusing the sorted objects would make a shuffled walk a walk
 * through scattered memory, which no real request is).
 */
const decoded = (regions: readonly Region[], at: readonly number[]): Region[] =>
  at.map((i) => {
    const r = regions[i]!;
    return {
      iova: BigInt(r.iova.toString()),
      size: BigInt(r.size.toString()),
      memory: r.memory,
      offset: BigInt(r.offset.toString()),
      perm: r.perm,
    };
  });

const byIova = (a: Region, b: Region): number => (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0);

/** What applySetMemTable plans for one address space. */
function planSetMemTable(table: IovaTable, target: readonly Region[]): Plan {
  return diffSorted([...table.entries()], validateTarget(target, table.range, table.pinPageSize), table.asid);
}

/** Best of ROUNDS, the two sides alternating so that drift on a shared machine hits both alike. */
function bestOfAlternating(a: () => void, b: () => void): [number, number] {
  let bestA = Number.POSITIVE_INFINITY;
  let bestB = Number.POSITIVE_INFINITY;
  for (let round = 0; round < ROUNDS; round++) {
    if (round % 2 === 0) {
      bestA = Math.min(bestA, seconds(a));
      bestB = Math.min(bestB, seconds(b));
    } else {
      bestB = Math.min(bestB, seconds(b));
      bestA = Math.min(bestA, seconds(a));
    }
  }
  return [bestA, bestB];
}

interface Case {
  regions: number;
  regionSize: bigint;
  /** Fraction of the live table changed in the target; 'empty' plans into an empty table. */
  from: 'empty' | 0.01;
  arrival: 'sorted' | 'shuffled';
}

function runCase(ctx: BenchContext, c: Case): void {
  const n = scaled(ctx, c.regions, 64);
  const live: Region[] = Array.from({ length: n }, (_, i) => ({
    iova: BigInt(i) * c.regionSize,
    size: c.regionSize,
    memory: 'ram0',
    offset: BigInt(i) * c.regionSize,
    perm: 'rw',
  }));
  const table = new IovaTable();
  let wantedSorted = live;
  let minimal = n;
  if (c.from !== 'empty') {
    for (const r of live) table.map(r);
    const every = Math.round(1 / c.from);
    wantedSorted = live.map((r, i) => (i % every === 0 ? { ...r, offset: r.offset + 0x1000n } : r));
    minimal = 2 * Math.ceil(n / every);
  }
  const shuffledTarget = decoded(wantedSorted, permutation(n));
  const target =
    c.arrival === 'sorted'
      ? decoded(
          wantedSorted,
          wantedSorted.map((_, i) => i),
        )
      : shuffledTarget;

  let plan: Plan | undefined;
  const [planSeconds, sortSeconds] = bestOfAlternating(
    () => {
      plan = planSetMemTable(table, target);
    },
    () => [...shuffledTarget].sort(byIova),
  );
  if (!plan || plan.ops.length !== minimal || plan.unchanged !== (c.from === 'empty' ? 0 : n - minimal / 2))
    throw new Error(`planner bench: ${plan?.ops.length} ops, expected the minimal ${minimal}`);
  const sortedInputSort = Math.min(...[1, 2, 3].map(() => seconds(() => [...wantedSorted].sort(byIova))));
  const guest = c.regionSize * BigInt(n) === TIB ? ', 1 TiB guest' : '';
  compare(
    ctx,
    {
      scenario: 'planner',
      case: `${n.toLocaleString('en-US')} regions${guest}, ${c.from === 'empty' ? 'from empty' : '1% changed'}, ${c.arrival}`,
      metric: 'plan time',
      value: planSeconds * 1000,
      unit: 'ms',
      note: `ops ${plan.ops.length} (minimal ${minimal}); sort of the sorted target ${(sortedInputSort * 1000).toPrecision(3)} ms`,
    },
    'sort of the target (shuffled)',
    sortSeconds * 1000,
  );
}

export function benchPlanner(ctx: BenchContext): void {
  runCase(ctx, { regions: 100_000, regionSize: 0x20_0000n, from: 0.01, arrival: 'sorted' });
  runCase(ctx, { regions: 100_000, regionSize: 0x20_0000n, from: 0.01, arrival: 'shuffled' });
  for (const regions of [512, 65_536]) {
    for (const from of ['empty', 0.01] as const) {
      runCase(ctx, { regions, regionSize: TIB / BigInt(regions), from, arrival: 'sorted' });
    }
  }
}
