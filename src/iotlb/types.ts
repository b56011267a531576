/** Shared vocabulary of IOVA mappings, used by the table, the planner, devices and both services. */
import { formatU64 as hex, U64_MAX } from '../u64.ts';

/** Access a device gets to a mapping. The kernel only looks at the WO bit; we accept only these. */
export type Perm = 'ro' | 'wo' | 'rw';
export const PERMS: readonly Perm[] = ['ro', 'wo', 'rw'];

/** One mapping inside one address space: `[iova, iova + size)` → `memory` at `offset`. */
export interface Region {
  iova: bigint;
  size: bigint;
  memory: string;
  offset: bigint;
  perm: Perm;
}

/** A region together with the address space (asid) it lives in. */
export interface Mapping extends Region {
  asid: number;
}

/** Region `r` (or the region fields of anything that has them) as a mapping of `asid`. */
export function mappingOf(asid: number, r: Region): Mapping {
  return { asid, iova: r.iova, size: r.size, memory: r.memory, offset: r.offset, perm: r.perm };
}

/** The device's usable IOVA window, inclusive on both ends (`struct vhost_vdpa_iova_range`). */
export interface IovaRange {
  first: bigint;
  last: bigint;
}

export const FULL_IOVA_RANGE: IovaRange = { first: 0n, last: U64_MAX };

/** One IOTLB change: UPDATE (map) or INVALIDATE (unmap every entry the range touches, whole). */
export type IotlbOp =
  | ({ type: 'update' } & Mapping)
  | { type: 'invalidate'; asid: number; iova: bigint; size: bigint };

/** Why a change is refused; each mirrors a check of drivers/vhost/vdpa.c. */
export type IotlbViolationReason =
  | 'ZERO_SIZE' // UPDATE with size 0 (vhost_chr_write_iter / vhost_vdpa_process_iotlb_msg)
  | 'OVERFLOW' // iova + size > 2^64 (vhost_vdpa_process_iotlb_update)
  | 'OUT_OF_RANGE' // outside the device's IOVA range (vhost_vdpa_process_iotlb_update)
  | 'OVERLAP' // any byte already mapped in that address space (vhost_iotlb_itree_first)
  | 'BAD_ASID' // asid >= number of address spaces (vhost_vdpa_find_alloc_as)
  | 'BAD_PERM' // not RO/WO/RW: the kernel does not check; we refuse
  // A pinning (PA-mode) parent maps whole pages: vhost_vdpa_pa_map rounds the entry out to pages,
  // so an unaligned UPDATE maps bytes nobody asked for and a neighbour in the same page then fails.
  | 'UNALIGNED'
  // A pinning parent holds one entry per physically contiguous run (vhost_vdpa_pa_map), and an
  // INVALIDATE drops only the runs it touches: covering part of a mapping would leave the rest of
  // it pinned and mapped where no table of ours can say which part. We refuse it.
  | 'PARTIAL_UNMAP';

/** errno the kernel's own handler returns for each reason (userspace sees EFAULT for most). */
export const VIOLATION_ERRNO: Record<IotlbViolationReason, 'EINVAL' | 'EEXIST'> = {
  ZERO_SIZE: 'EINVAL',
  OVERFLOW: 'EINVAL',
  OUT_OF_RANGE: 'EINVAL',
  OVERLAP: 'EEXIST',
  BAD_ASID: 'EINVAL',
  BAD_PERM: 'EINVAL',
  UNALIGNED: 'EINVAL',
  PARTIAL_UNMAP: 'EINVAL',
};

/** The field of the request a reason is about, for error messages that name it. */
export const VIOLATION_FIELD: Record<IotlbViolationReason, string> = {
  ZERO_SIZE: 'size',
  OVERFLOW: 'size',
  OUT_OF_RANGE: 'iova',
  OVERLAP: 'iova',
  BAD_ASID: 'asid',
  BAD_PERM: 'perm',
  UNALIGNED: 'iova',
  PARTIAL_UNMAP: 'iova',
};

export interface IotlbViolation {
  reason: IotlbViolationReason;
  errno: 'EINVAL' | 'EEXIST';
  field: string;
  message: string;
  /** For OVERLAP and PARTIAL_UNMAP: the live entry the request collides with. */
  conflict?: Mapping;
}

/** A refused change as an exception, carrying the same facts as {@link IotlbViolation}. */
export class IotlbError extends Error {
  constructor(readonly violation: IotlbViolation) {
    super(violation.message);
    this.name = 'IotlbError';
  }
}

/** A u64 as `0x` hex (src/u64.ts), under the short name the IOVA code uses. */
export { hex };

export function describeRange(iova: bigint, size: bigint): string {
  return `[${hex(iova)}, ${hex(iova + size)})`;
}
