/**
 * The IOVA table of one address space, with the rules of drivers/vhost/vdpa.c and vhost/iotlb.c:
 * entries never overlap, UPDATE never replaces, INVALIDATE drops every entry it touches in full.
 *
 * Entries are kept sorted by their first IOVA (sorted-entries.ts). Because entries never overlap,
 * the only entry that can contain an address is the one with the greatest start <= that address,
 * so every lookup, overlap check and removal is O(log n).
 */
import { SortedEntries } from './sorted-entries.ts';
import {
  describeRange,
  FULL_IOVA_RANGE,
  hex,
  type IotlbViolation,
  type IotlbViolationReason,
  type IovaRange,
  type Mapping,
  PERMS,
  type Region,
  VIOLATION_ERRNO,
  VIOLATION_FIELD,
  IotlbError,
} from './types.ts';
import { U64_LIMIT, U64_MAX } from '../u64.ts';

export const compareBigint = (a: bigint, b: bigint): number => (a < b ? -1 : a > b ? 1 : 0);

/**
 * The last byte of `[iova, iova + size)` as vhost_vdpa_iotlb_unmap computes it, in u64 arithmetic:
 * iova 0 / size 0 wraps to U64_MAX (everything), and a range past 2^64 wraps below `iova`.
 */
export function lastByte(iova: bigint, size: bigint): bigint {
  const last = iova + size - 1n;
  return last >= 0n && last <= U64_MAX ? last : last & U64_MAX;
}

export function violation(
  reason: IotlbViolationReason,
  message: string,
  conflict?: Mapping,
  field: string = VIOLATION_FIELD[reason],
): IotlbViolation {
  return {
    reason,
    errno: VIOLATION_ERRNO[reason],
    field,
    message,
    ...(conflict ? { conflict } : {}),
  };
}

/**
 * Checks a region on its own (no table): size, overflow, IOVA range, permission. Mirrors the
 * order of vhost_vdpa_process_iotlb_msg / vhost_vdpa_process_iotlb_update. With `pinPageSize`
 * (a pinning, PA-mode parent) iova, size and the memory offset must also be whole pages: see
 * {@link checkPageAligned}.
 */
export function checkRegionShape(
  r: Region,
  range: IovaRange = FULL_IOVA_RANGE,
  pinPageSize?: bigint,
): IotlbViolation | undefined {
  if (!PERMS.includes(r.perm)) {
    return violation('BAD_PERM', `perm must be one of ${PERMS.join(', ')}, got ${String(r.perm)}`);
  }
  if (r.size <= 0n) return violation('ZERO_SIZE', `size must be greater than 0, got ${r.size}`);
  if (r.iova < 0n || r.iova > U64_MAX) return violation('OUT_OF_RANGE', `iova ${r.iova} is not a u64`);
  const end = r.iova + r.size;
  if (end > U64_LIMIT) {
    return violation('OVERFLOW', `iova ${hex(r.iova)} + size ${hex(r.size)} overflows 2^64`);
  }
  if (r.iova < range.first || end - 1n > range.last) {
    return violation(
      'OUT_OF_RANGE',
      `${describeRange(r.iova, r.size)} is outside the device's IOVA range [${hex(range.first)}, ${hex(range.last)}]`,
    );
  }
  return pinPageSize === undefined ? undefined : checkPageAligned(r, pinPageSize);
}

/**
 * A pinning (PA-mode) parent maps whole pages: vhost_vdpa_pa_map pins from `uaddr & PAGE_MASK`
 * and adds entries from `iova & PAGE_MASK` for PFN_UP(size + (iova & ~PAGE_MASK)) pages. An
 * unaligned UPDATE would map bytes nobody asked for (and the first page of its memory at the
 * wrong offset when iova and uaddr are misaligned differently), and a later UPDATE of a
 * neighbour in the same page would fail (EEXIST). uaddr is the memory's page-aligned mmap base
 * plus the offset, so the offset is what must be aligned.
 */
export function checkPageAligned(r: Region, pageSize: bigint): IotlbViolation | undefined {
  if (r.iova % pageSize === 0n && r.size % pageSize === 0n && r.offset % pageSize === 0n) return undefined;
  const why = `a pinning (PA-mode) parent maps whole pages of ${hex(pageSize)} bytes`;
  if (r.iova % pageSize !== 0n) {
    return violation('UNALIGNED', `iova ${hex(r.iova)} is not page aligned: ${why}`, undefined, 'iova');
  }
  if (r.size % pageSize !== 0n) {
    return violation(
      'UNALIGNED',
      `size ${hex(r.size)} is not a whole number of pages: ${why}`,
      undefined,
      'size',
    );
  }
  if (r.offset % pageSize !== 0n) {
    return violation(
      'UNALIGNED',
      `offset ${hex(r.offset)} into memory ${r.memory} is not page aligned: ${why}`,
      undefined,
      'offset',
    );
  }
  return undefined;
}

export class IovaTable {
  private tree = new SortedEntries<Region>();
  private mappedBytes = 0n;

  constructor(
    readonly asid = 0,
    readonly range: IovaRange = FULL_IOVA_RANGE,
    /**
     * The page size of a pinning (PA-mode) parent, whose entries are whole pages; undefined for a
     * VA-mode parent, which maps any byte range.
     */
    readonly pinPageSize?: bigint,
  ) {}

  get count(): number {
    return this.tree.size;
  }

  get bytes(): bigint {
    return this.mappedBytes;
  }

  /** What `map(r)` would refuse, or undefined. */
  checkMap(r: Region): IotlbViolation | undefined {
    const bad = checkRegionShape(r, this.range, this.pinPageSize);
    if (bad) return bad;
    const conflict = this.firstOverlap(r.iova, r.size);
    if (conflict) {
      return violation(
        'OVERLAP',
        `${describeRange(r.iova, r.size)} overlaps the mapping ${describeRange(conflict.iova, conflict.size)} in asid ${this.asid}`,
        { ...conflict, asid: this.asid },
      );
    }
    return undefined;
  }

  /** Adds an entry; throws IotlbError with the kernel's reason when it would refuse it. */
  map(r: Region): void {
    const bad = this.checkMap(r);
    if (bad) throw new IotlbError(bad);
    this.add(r);
  }

  /**
   * Adds an entry the caller has checked already (checkMap, or it lies inside a range that was
   * checked), as vhost_iotlb_add_range does: the kernel tests overlap once per UPDATE, not per
   * entry it adds for it.
   */
  add(r: Region): void {
    this.tree.set({ iova: r.iova, size: r.size, memory: r.memory, offset: r.offset, perm: r.perm });
    this.mappedBytes += r.size;
  }

  /** An independent copy (copy-on-write: cheap until either side changes). */
  clone(): IovaTable {
    const copy = new IovaTable(this.asid, this.range, this.pinPageSize);
    copy.tree = this.tree.clone();
    copy.mappedBytes = this.mappedBytes;
    return copy;
  }

  /**
   * Removes every entry overlapping `[iova, iova + size - 1]`, each in full, and returns them in
   * IOVA order. Mirrors vhost_vdpa_iotlb_unmap: `last` is computed in u64 arithmetic, so
   * iova 0 / size 0 wraps to "everything" and a range whose last byte wraps matches nothing.
   */
  invalidate(iova: bigint, size: bigint): Region[] {
    return this.invalidateThrough(iova, lastByte(iova, size));
  }

  /** {@link invalidate} of `[first, last]` (inclusive; a last below first matches nothing). */
  invalidateThrough(first: bigint, last: bigint): Region[] {
    if (last < first) return [];
    const removed = this.overlappingInclusive(first, last);
    for (let i = 0; i < removed.length; i++) {
      const r = removed[i]!;
      this.tree.delete(r.iova);
      this.mappedBytes -= r.size;
    }
    return removed;
  }

  /** Removes the entry `entry` names (the same start and size) if the table holds it: one walk of the tree. */
  remove(entry: Region): boolean {
    if (this.tree.delete(entry.iova, (held) => held.size !== entry.size) === undefined) return false;
    this.mappedBytes -= entry.size;
    return true;
  }

  /**
   * The first entry that an INVALIDATE of `[iova, iova + size - 1]` (u64 arithmetic, as in
   * {@link invalidate}) touches but does not cover whole.
   */
  firstPartlyInvalidated(iova: bigint, size: bigint): Region | undefined {
    const last = lastByte(iova, size);
    if (last < iova) return undefined;
    // Entries never overlap, so only two can be cut: the one holding the first byte, if it starts
    // before it, and the one holding the last byte, if it ends past it. Every other entry the
    // range touches lies inside it.
    const first = this.tree.atOrBelow(iova);
    const firstEnd = first === undefined ? 0n : first.iova + first.size;
    if (first !== undefined && firstEnd > iova) {
      if (first.iova < iova) return first;
      // It ends at the last byte (not cut) or past it (cut); either way no other entry is touched.
      if (firstEnd > last) return firstEnd - 1n > last ? first : undefined;
    }
    const end = this.tree.atOrBelow(last);
    return end !== undefined && end.iova + end.size - 1n > last ? end : undefined;
  }

  /** Every entry that shares at least one byte with `[iova, iova + size)`, in IOVA order. */
  overlapping(iova: bigint, size: bigint): Region[] {
    if (size <= 0n) return [];
    return this.overlappingInclusive(iova, iova + size - 1n);
  }

  /** The first entry (lowest IOVA) sharing a byte with `[iova, iova + size)`. */
  firstOverlap(iova: bigint, size: bigint): Region | undefined {
    return size <= 0n ? undefined : this.firstOverlapThrough(iova, iova + size - 1n);
  }

  /** The first entry (lowest IOVA) sharing a byte with `[first, last]` (inclusive, first <= last). */
  firstOverlapThrough(first: bigint, last: bigint): Region | undefined {
    // Entries never overlap, so the last one starting at or before the range's last byte is the
    // only one that can tell: if it ends before the range, every earlier one does too. One lookup
    // decides; only an overlap needs the first of them.
    const atLast = this.tree.atOrBelow(last);
    if (atLast === undefined || atLast.iova + atLast.size <= first) return undefined;
    if (atLast.iova <= first) return atLast;
    const before = this.tree.atOrBelow(first);
    if (before && before.iova + before.size > first) return before;
    return this.tree.above(first)!;
  }

  /** The entry containing `iova`, if any. */
  lookup(iova: bigint): Region | undefined {
    const entry = this.tree.atOrBelow(iova);
    return entry && iova < entry.iova + entry.size ? entry : undefined;
  }

  /** Translates one IOVA: the entry, and the offset into its memory that the IOVA stands for. */
  translate(iova: bigint): { region: Region; memoryOffset: bigint; bytesToEnd: bigint } | undefined {
    const region = this.lookup(iova);
    if (!region) return undefined;
    const delta = iova - region.iova;
    return { region, memoryOffset: region.offset + delta, bytesToEnd: region.size - delta };
  }

  /** Entries in IOVA order, a snapshot: the table may change while it is iterated. */
  entries(): IterableIterator<Region> {
    return this.tree.values().values();
  }

  /**
   * Entries in IOVA order in a new array, copied a few dozen at a time between pauses (a
   * runInTimeSlices caller: 65,536 entries copied in one piece held every other device up).
   * The table must not change until it returns.
   */
  entriesInSteps(): Generator<void, Region[]> {
    return this.tree.valuesInSteps();
  }

  /** Removes everything (device close / reset without IOTLB_PERSIST); returns what was there. */
  clear(): Region[] {
    const all = [...this.entries()];
    this.tree.clear();
    this.mappedBytes = 0n;
    return all;
  }

  private overlappingInclusive(first: bigint, last: bigint): Region[] {
    const found: Region[] = [];
    const before = this.tree.atOrBelow(first);
    if (before) {
      const end = before.iova + before.size;
      if (end > first) {
        found.push(before);
        if (end > last) return found;
      }
    }
    // Most ranges touch one entry or none: step to the next one, and walk a range only past it.
    const next = this.tree.above(first);
    if (next === undefined || next.iova > last) return found;
    found.push(next);
    if (next.iova + next.size > last) return found;
    for (const region of this.tree.between(next.iova + 1n, last)) found.push(region);
    return found;
  }
}
