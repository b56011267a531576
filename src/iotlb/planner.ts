/**
 * The planner: the ordered IOTLB ops that turn what is mapped into what is wanted.
 *
 * Rules it keeps (see kernel-iotlb.md):
 * - an INVALIDATE covers exactly one existing entry, so the plan never relies on partial
 *   invalidation (which splits nothing in VA mode but drops only touched chunks in PA mode);
 * - entries identical in both tables are not touched;
 * - all INVALIDATEs come before all UPDATEs: after them only entries also in the target remain,
 *   and the target does not overlap itself, so no UPDATE can hit EEXIST.
 * The op count is minimal under whole-entry semantics: every entry not in the target must go and
 * every target entry not already there must be written.
 */
import type { IovaTable } from './table.ts';
import { checkRegionShape, compareBigint } from './table.ts';
import { runWhole } from '../sys/next-turn.ts';
import { describeRange, FULL_IOVA_RANGE, hex, type IotlbOp, type IovaRange, type Region } from './types.ts';

export interface Plan {
  ops: IotlbOp[];
  /** Entries removed whole (one INVALIDATE each). */
  invalidated: Region[];
  /** Entries written (one UPDATE each). */
  mapped: Region[];
  /** Entries left as they are. */
  unchanged: number;
}

export type PlanErrorCode = 'INVALID_REGION' | 'TARGET_OVERLAP' | 'SPLIT_REFUSED' | 'UNALIGNED_SPLIT';

export class PlanError extends Error {
  constructor(
    readonly code: PlanErrorCode,
    message: string,
    /** The request field at fault, e.g. `regions[3].size`. */
    readonly field: string,
    /** For INVALID_REGION: the errno the kernel would give (EINVAL). */
    readonly errno?: string,
  ) {
    super(message);
    this.name = 'PlanError';
  }
}

export function sameRegion(a: Region, b: Region): boolean {
  return (
    a.iova === b.iova &&
    a.size === b.size &&
    a.memory === b.memory &&
    a.offset === b.offset &&
    a.perm === b.perm
  );
}

/** Items between two points where a sliced run may pause (runInTimeSlices). */
const PAUSE_EVERY = 64;

/**
 * Diffs two IOVA-sorted, non-overlapping lists of one address space. O(n + m).
 */
export function diffSorted(current: readonly Region[], target: readonly Region[], asid: number): Plan {
  return runWhole(diffSteps(current, target, asid));
}

/** diffSorted as steps, for a caller that runs it inside its own sliced computation. */
export function* diffSteps(
  current: readonly Region[],
  target: readonly Region[],
  asid: number,
): Generator<void, Plan> {
  const invalidated: Region[] = [];
  const mapped: Region[] = [];
  let unchanged = 0;
  let i = 0;
  let j = 0;
  while (i < current.length && j < target.length) {
    if ((i + j) % PAUSE_EVERY === 0) yield;
    const cur = current[i]!;
    const tgt = target[j]!;
    if (cur.iova < tgt.iova) {
      invalidated.push(cur);
      i++;
    } else if (cur.iova > tgt.iova) {
      mapped.push(tgt);
      j++;
    } else {
      if (sameRegion(cur, tgt)) unchanged++;
      else {
        invalidated.push(cur);
        mapped.push(tgt);
      }
      i++;
      j++;
    }
  }
  for (; i < current.length; i++) {
    if (i % PAUSE_EVERY === 0) yield;
    invalidated.push(current[i]!);
  }
  for (; j < target.length; j++) {
    if (j % PAUSE_EVERY === 0) yield;
    mapped.push(target[j]!);
  }
  const ops: IotlbOp[] = [];
  for (const r of invalidated) {
    if (ops.length % PAUSE_EVERY === 0) yield;
    ops.push({ type: 'invalidate', asid, iova: r.iova, size: r.size });
  }
  for (const r of mapped) {
    if (ops.length % PAUSE_EVERY === 0) yield;
    ops.push({
      type: 'update',
      asid,
      iova: r.iova,
      size: r.size,
      memory: r.memory,
      offset: r.offset,
      perm: r.perm,
    });
  }
  return { ops, invalidated, mapped, unchanged };
}

/**
 * Validates a whole target table (shape of each region, no overlap between them) and returns it
 * sorted by IOVA (a new array; a target that arrives sorted is not sorted again). Errors name the
 * region by its index in the request: shape errors first, in index order, then the first overlap
 * in IOVA order. `pinPageSize`: see checkRegionShape. O(n), plus the sort of an unsorted target.
 */
export function validateTarget(
  target: readonly Region[],
  range: IovaRange = FULL_IOVA_RANGE,
  pinPageSize?: bigint,
): Region[] {
  return runWhole(validateTargetSteps(target, range, pinPageSize));
}

/** validateTarget as steps, for a caller that runs it inside its own sliced computation. */
export function* validateTargetSteps(
  target: readonly Region[],
  range: IovaRange,
  pinPageSize: bigint | undefined,
): Generator<void, Region[]> {
  let sorted = true;
  for (let index = 0; index < target.length; index++) {
    if (index % PAUSE_EVERY === 0) yield;
    const r = target[index]!;
    const bad = checkRegionShape(r, range, pinPageSize);
    if (bad)
      throw new PlanError(
        'INVALID_REGION',
        `regions[${index}]: ${bad.message}`,
        `regions[${index}].${bad.field}`,
        bad.errno,
      );
    if (index > 0 && r.iova < target[index - 1]!.iova) sorted = false;
  }
  const order = sorted ? undefined : iovaOrder(target);
  const out = order ? Array.from(order, (index) => target[index]!) : target.slice();
  for (let k = 1; k < out.length; k++) {
    if (k % PAUSE_EVERY === 0) yield;
    const prev = out[k - 1]!;
    const next = out[k]!;
    if (prev.iova + prev.size > next.iova) {
      const prevIndex = order ? order[k - 1]! : k - 1;
      const nextIndex = order ? order[k]! : k;
      throw new PlanError(
        'TARGET_OVERLAP',
        `regions[${nextIndex}] ${describeRange(next.iova, next.size)} overlaps regions[${prevIndex}] ${describeRange(prev.iova, prev.size)}`,
        `regions[${nextIndex}].iova`,
      );
    }
  }
  return out;
}

/**
 * The indices of `regions` (valid u64 IOVAs) in IOVA order, equal IOVAs in index order: a stable
 * LSD radix sort, 16 bits a pass, of Number(iova), which rounds monotonically, so only IOVAs that
 * round to the same double (possible above 2^53) are then compared as bigints. O(n), no bigint
 * arithmetic and no comparator calls in the common case; a small table is simply sorted.
 */
function iovaOrder(regions: readonly Region[]): Uint32Array {
  const n = regions.length;
  const byIova = (a: number, b: number) => compareBigint(regions[a]!.iova, regions[b]!.iova) || a - b;
  // Below this, sorting costs less than the radix passes' 64 Ki counters.
  if (n < 4096) return Uint32Array.from(regions.keys()).sort(byIova);
  const high = new Uint32Array(n);
  const low = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const key = Number(regions[i]!.iova);
    if (key >= 2 ** 64) {
      // Only IOVAs near 2^64 - 1 round up to 2^64: keep them the greatest.
      high[i] = 0xffff_ffff;
      low[i] = 0xffff_ffff;
    } else {
      high[i] = Math.floor(key / 2 ** 32);
      low[i] = key % 2 ** 32;
    }
  }
  let order = new Uint32Array(n);
  let spare = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  const counts = new Uint32Array(1 << 16);
  for (const [word, shift] of [
    [low, 0],
    [low, 16],
    [high, 0],
    [high, 16],
  ] as const) {
    counts.fill(0);
    for (let i = 0; i < n; i++) counts[(word[i]! >>> shift) & 0xffff]!++;
    if (counts[(word[0]! >>> shift) & 0xffff] === n) continue; // one digit for all: order stays
    for (let d = 0, sum = 0; d < counts.length; d++) {
      const c = counts[d]!;
      counts[d] = sum;
      sum += c;
    }
    for (let i = 0; i < n; i++) {
      const k = order[i]!;
      spare[counts[(word[k]! >>> shift) & 0xffff]!++] = k;
    }
    [order, spare] = [spare, order];
  }
  // Equal doubles now sit together in index order; put each such run in bigint order.
  for (let start = 0, end = 1; start < n; start = end, end = start + 1) {
    const k = order[start]!;
    while (end < n && high[order[end]!] === high[k] && low[order[end]!] === low[k]) end++;
    if (end - start > 1) order.subarray(start, end).sort(byIova);
  }
  return order;
}

/**
 * Unmap of `[iova, iova + size)`: every entry the range touches is invalidated whole; the parts of
 * partly covered entries outside the range are re-mapped (same memory, offset moved along), in the
 * same plan. With `exact`, a partly covered entry is refused instead.
 *
 * This is also right for a pinning (PA-mode) parent, whose kernel table holds one entry per
 * physically contiguous run: each INVALIDATE covers a whole mapping, so it drops (and unpins)
 * every run of it (vhost_vdpa_pa_unmap), and the re-mapped parts are pinned again. There a split
 * point must be a page boundary (the remainders are whole pages, see checkPageAligned).
 */
export function planUnmap(table: IovaTable, iova: bigint, size: bigint, exact = false): Plan {
  const shape = checkRegionShape({ iova, size, memory: '', offset: 0n, perm: 'rw' }, FULL_IOVA_RANGE);
  if (shape) throw new PlanError('INVALID_REGION', shape.message, shape.field, shape.errno);
  const end = iova + size;
  const touched = table.overlapping(iova, size);
  const remainders: Region[] = [];
  for (const r of touched) {
    const rEnd = r.iova + r.size;
    if (r.iova >= iova && rEnd <= end) continue;
    if (exact) {
      throw new PlanError(
        'SPLIT_REFUSED',
        `${describeRange(iova, size)} covers only part of the mapping ${describeRange(r.iova, r.size)} and exact was requested`,
        'iova',
      );
    }
    if (r.iova < iova) checkSplitPoint(table, r, iova, size, iova, 'iova');
    if (rEnd > end) checkSplitPoint(table, r, iova, size, end, 'size');
    if (r.iova < iova) remainders.push({ ...r, size: iova - r.iova });
    if (rEnd > end) remainders.push({ ...r, iova: end, size: rEnd - end, offset: r.offset + (end - r.iova) });
  }
  return diffSorted(touched, remainders, table.asid);
}

/** A pinning parent's mappings are whole pages, so may only be split at a page boundary. */
function checkSplitPoint(
  table: IovaTable,
  r: Region,
  iova: bigint,
  size: bigint,
  at: bigint,
  field: string,
): void {
  const page = table.pinPageSize;
  if (page === undefined || at % page === 0n) return;
  throw new PlanError(
    'UNALIGNED_SPLIT',
    `${describeRange(iova, size)} would split the mapping ${describeRange(r.iova, r.size)} at ${hex(at)}, which is not page aligned: a pinning (PA-mode) parent maps whole pages of ${hex(page)} bytes`,
    field,
    'EINVAL',
  );
}
