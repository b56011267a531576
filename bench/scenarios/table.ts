/** Scenario 2: IovaTable map / lookup / invalidate at 1k, 100k, 1M entries vs a plain Map. */
import { IovaTable } from '../../src/iotlb/index.ts';
import { type BenchContext, compare, heapUsed, rate, scaled } from '../harness.ts';

const UNIT = 0x1000n;
/** Below this many entries the heap's own noise (a GC's leftovers) outweighs what the table holds. */
const HEAP_SAMPLE_MIN = 50_000;

/** Heap bytes per entry of a table filled with `n` entries (at least HEAP_SAMPLE_MIN), kept alive. */
function heapPerEntry(n: number): number {
  const count = Math.max(n, HEAP_SAMPLE_MIN);
  const before = heapUsed();
  const table = new IovaTable();
  for (let i = 0; i < count; i++) {
    const iova = BigInt(i) * 2n * UNIT;
    table.map({ iova, size: UNIT, memory: 'ram0', offset: BigInt(i) * UNIT, perm: 'rw' });
  }
  const used = heapUsed() - before;
  if (table.count !== count) throw new Error('heap sample did not fill its table');
  return used / count;
}

export function benchTable(ctx: BenchContext): void {
  for (const target of [1_000, 100_000, 1_000_000]) {
    const n = scaled(ctx, target, 100);
    const iovas = Array.from({ length: n }, (_, i) => BigInt(i) * 2n * UNIT);
    const table = new IovaTable();
    const mapRate = rate(
      n,
      (i) => table.map({ iova: iovas[i]!, size: UNIT, memory: 'ram0', offset: BigInt(i) * UNIT, perm: 'rw' }),
      1,
    );
    const map = new Map<bigint, object>();
    const mapBaseline = rate(n, (i) => map.set(iovas[i]!, { iova: iovas[i]!, size: UNIT }), 1);
    const probes = Math.min(n, 200_000);
    let hits = 0;
    const lookupRate = rate(probes, (i) => {
      if (table.lookup(iovas[(i * 7919) % n]! + 5n)) hits++;
    });
    const lookupBaseline = rate(probes, (i) => {
      if (map.get(iovas[(i * 7919) % n]!)) hits++;
    });
    const invalidateRate = rate(n, (i) => table.invalidate(iovas[i]!, UNIT), 1);
    const deleteBaseline = rate(n, (i) => map.delete(iovas[i]!), 1);
    if (hits === 0 || table.count !== 0) throw new Error('table benchmark did not do its work');
    const label = `${n.toLocaleString('en-US')} entries`;
    compare(
      ctx,
      { scenario: 'table', case: label, metric: 'map/s', value: mapRate, unit: 'op/s' },
      'Map.set',
      mapBaseline,
    );
    compare(
      ctx,
      { scenario: 'table', case: label, metric: 'lookup/s', value: lookupRate, unit: 'op/s' },
      'Map.get (exact key)',
      lookupBaseline,
    );
    compare(
      ctx,
      { scenario: 'table', case: label, metric: 'invalidate/s', value: invalidateRate, unit: 'op/s' },
      'Map.delete',
      deleteBaseline,
    );
    ctx.rows.push({
      scenario: 'table',
      case: label,
      metric: 'heap/entry',
      value: heapPerEntry(n),
      unit: 'bytes',
    });
  }
}
