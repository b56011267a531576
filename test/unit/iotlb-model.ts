/**
 * An independent reference model of a device's IOTLB for the planner's and reconciliation's
 * property tests, written without the production table or planner: each address space is a plain
 * list of entries under the kernel's rules (vhost_vdpa_process_iotlb_update refuses an UPDATE
 * sharing any byte with a live entry; vhost_vdpa_iotlb_unmap drops every entry an INVALIDATE
 * touches, whole), and `addressMap` is what the device reaches at each address of a small range.
 */
import type { IotlbOp, Mapping, Region } from '../../src/iotlb/types.ts';

const LIMIT = 1n << 64n;

export const sharesByte = (a: { iova: bigint; size: bigint }, b: { iova: bigint; size: bigint }): boolean =>
  a.iova < b.iova + b.size && b.iova < a.iova + a.size;

export const identical = (a: Region, b: Region): boolean =>
  a.iova === b.iova &&
  a.size === b.size &&
  a.memory === b.memory &&
  a.offset === b.offset &&
  a.perm === b.perm;

/** Entries as plain, comparable values, ordered by asid then iova. */
export function canonical(mappings: readonly Mapping[]): Mapping[] {
  return mappings
    .map(({ asid, iova, size, memory, offset, perm }) => ({ asid, iova, size, memory, offset, perm }))
    .sort((a, b) => a.asid - b.asid || (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0));
}

/**
 * What a device reaches at every `grain`-th address covered by `mappings`: "asid:address" ->
 * "memory@offset perm". Every mapping must start and end on a multiple of `grain` (a byte map
 * when 1).
 */
export function addressMap(mappings: readonly Mapping[], grain = 1n): Map<string, string> {
  const out = new Map<string, string>();
  for (const m of mappings) {
    if (m.iova % grain !== 0n || m.size % grain !== 0n) throw new Error('mapping off the grain');
    for (let d = 0n; d < m.size; d += grain) {
      const key = `${m.asid}:${m.iova + d}`;
      if (out.has(key)) throw new Error(`two mappings reach ${key}`);
      out.set(key, `${m.memory}@${m.offset + d} ${m.perm}`);
    }
  }
  return out;
}

export class IotlbModel {
  entries: Mapping[];

  constructor(initial: readonly Mapping[] = []) {
    this.entries = canonical(initial);
  }

  /** Applies one op; throws on what the kernel refuses (EEXIST). Returns the entries it removed. */
  apply(op: IotlbOp): Mapping[] {
    if (op.type === 'update') {
      const { type: _, ...m } = op;
      const clash = this.entries.find((e) => e.asid === m.asid && sharesByte(e, m));
      if (clash) throw new Error(`EEXIST: UPDATE ${m.iova}+${m.size} overlaps ${clash.iova}+${clash.size}`);
      this.entries.push(m);
      return [];
    }
    const last = (op.iova + op.size - 1n + LIMIT) % LIMIT;
    if (last < op.iova) return [];
    const hit = (e: Mapping) => e.asid === op.asid && e.iova <= last && op.iova <= e.iova + e.size - 1n;
    const removed = this.entries.filter(hit);
    this.entries = this.entries.filter((e) => !hit(e));
    return removed;
  }

  /**
   * Applies `ops` in order, also refusing an INVALIDATE that does not remove exactly one whole
   * entry: the planner never relies on partial invalidation (see src/iotlb/planner.ts).
   */
  applyWholeEntryOps(ops: readonly IotlbOp[]): void {
    for (const op of ops) {
      const removed = this.apply(op);
      if (op.type !== 'invalidate') continue;
      const [only, ...more] = removed;
      if (!only || more.length > 0 || only.iova !== op.iova || only.size !== op.size)
        throw new Error(
          `INVALIDATE ${op.iova}+${op.size} removed ${removed.length} entries, not one whole entry`,
        );
    }
  }

  mappings(): Mapping[] {
    return canonical(this.entries);
  }
}

export const withAsid = (regions: readonly Region[], asid: number): Mapping[] =>
  regions.map((r) => ({ ...r, asid }));
