/**
 * The pre-write check both device kinds share. The kernel answers EFAULT for almost every refusal
 * (vhost_chr_write_iter), so before a message is written the guard decides, against its mirror of
 * the kernel's tables, the negotiated features and the memory registry, whether the kernel would
 * accept it, and if not gives the precise reason. It also keeps the registry's per-memory entry
 * counts in step with the mirror, and, for a device that pins (PA mode), the pages charged to
 * RLIMIT_MEMLOCK.
 */
import { AddressSpaces } from '../iotlb/address-spaces.ts';
import { violation } from '../iotlb/table.ts';
import {
  describeRange,
  hex,
  type IotlbOp,
  type IotlbViolation,
  type IovaRange,
  type Mapping,
} from '../iotlb/types.ts';
import { U64_LIMIT } from '../u64.ts';
import { MemoryError, type MemoryRegistry } from '../memory/types.ts';
import { hasBackendFeature } from '../uapi/constants.ts';
import type { PinnedMemory } from './memlock.ts';
import type { OpResult } from './types.ts';

export type OpFailure = Extract<OpResult, { ok: false }>;

export type GuardDecision =
  /** Write the message, to address space `asid`; `uaddr` is the agent address of an UPDATE. */
  | { action: 'write'; asid: number; uaddr: bigint }
  /** Nothing to do and nothing to write: see {@link IotlbGuard.admit}. */
  | { action: 'skip'; asid: number }
  | { action: 'refuse'; result: OpFailure };

export class IotlbGuard {
  private readonly spaces: AddressSpaces;
  /** Address spaces the kernel has allocated since the open (see `admit`). */
  private readonly allocated = new Set<number>();
  private readonly asidHonoured: boolean;

  constructor(
    asNum: number,
    range: IovaRange,
    features: bigint,
    private readonly memory: MemoryRegistry,
    /** The process's pinned pages, for a device in PA mode; undefined in VA mode. */
    private readonly pins?: PinnedMemory,
    /** PA mode: the page size every mapping must be aligned to (see checkPageAligned). */
    pinPageSize?: bigint,
  ) {
    this.spaces = new AddressSpaces(asNum, range, pinPageSize);
    // vhost_chr_write_iter reads the asid of a v2 message only with IOTLB_ASID; v1 messages carry
    // none. Otherwise every message lands in address space 0, whatever asid it names.
    this.asidHonoured =
      hasBackendFeature(features, 'IOTLB_MSG_V2') && hasBackendFeature(features, 'IOTLB_ASID');
  }

  /** The address space the kernel will apply an op to: `asid`, or 0 when the asid is not honoured. */
  effectiveAsid(asid: number): number {
    return this.asidHonoured ? asid : 0;
  }

  /**
   * Decides one op. Checks in the kernel's order: asid (vhost_vdpa_find_alloc_as /
   * asid_to_iotlb), size 0 (vhost_chr_write_iter), overflow and IOVA range, then overlap
   * (vhost_vdpa_process_iotlb_update), RLIMIT_MEMLOCK in PA mode (vhost_vdpa_pa_map); then what
   * the kernel does not check: perm and the memory.
   *
   * An INVALIDATE of an address space the kernel has not allocated yet is skipped: the kernel
   * allocates one only on an UPDATE or BATCH_BEGIN naming it and refuses an INVALIDATE without
   * one (asid_to_iotlb returns NULL: EINVAL), yet there is nothing to remove.
   *
   * A 'write' decision for an UPDATE holds a reference on its memory until `commit` or `abort`.
   */
  admit(op: IotlbOp): GuardDecision {
    const asid = this.effectiveAsid(op.asid);
    const bad =
      op.type === 'update'
        ? this.spaces.check(asid === op.asid ? op : { ...op, asid })
        : checkInvalidate(this.spaces, asid, op);
    if (bad) return { action: 'refuse', result: violationResult(bad) };
    if (op.type === 'invalidate') {
      return this.allocated.has(asid) ? { action: 'write', asid, uaddr: 0n } : { action: 'skip', asid };
    }
    const overLimit = this.pins?.refusal(op.iova, op.size);
    if (overLimit !== undefined) {
      return {
        action: 'refuse',
        result: {
          ok: false,
          errno: 'ENOMEM',
          code: 'MEMLOCK',
          field: 'size',
          message: `${overLimit}: not written (the kernel would answer ENOMEM, reported to userspace as EFAULT)`,
        },
      };
    }
    // translate checks the bounds as check does, and throws what check would return.
    let uaddr: bigint;
    try {
      uaddr = this.memory.translate(op.memory, op.offset, op.size);
    } catch (err) {
      if (!(err instanceof MemoryError)) throw err;
      return {
        action: 'refuse',
        result: {
          ok: false,
          errno: 'EFAULT',
          code: err.code,
          field: err.code === 'NOT_FOUND' ? 'memory' : (err.field ?? 'memory'),
          message: `${err.message}: not written (a VA-mode parent would silently leave a hole, a PA-mode one fail to pin)`,
        },
      };
    }
    this.memory.retain(op.memory);
    return { action: 'write', asid, uaddr };
  }

  /** The kernel allocated address space `asid` (an UPDATE or BATCH_BEGIN naming it was written). */
  noteAllocated(asid: number): void {
    this.allocated.add(asid);
  }

  /**
   * The kernel accepted the op: apply it to the mirror (an INVALIDATE may remove several entries).
   * An UPDATE is added as `admit` checked it: the device's calls run one at a time, so the table
   * has not changed since.
   */
  commit(op: IotlbOp, asid: number): void {
    const table = this.spaces.table(asid);
    if (op.type === 'update') {
      table.add(op);
      this.pins?.pin(op.iova, op.size);
      return;
    }
    const removed = table.invalidate(op.iova, op.size);
    for (let i = 0; i < removed.length; i++) this.release(removed[i]!);
  }

  /** The kernel refused an admitted op: drop the reference `admit` took for an UPDATE. */
  abort(op: IotlbOp): void {
    if (op.type === 'update') this.memory.unretain(op.memory);
  }

  mappings(): Mapping[] {
    return this.spaces.mappings();
  }

  /** An entry is gone from the kernel: its memory reference and its pinned pages. */
  private release(entry: { memory: string; iova: bigint; size: bigint }): void {
    this.memory.unretain(entry.memory);
    this.pins?.unpin(entry.iova, entry.size);
  }

  /** The fd was closed: the kernel dropped every entry and address space. */
  clear(): Mapping[] {
    const all = this.spaces.clear();
    for (const m of all) this.release(m);
    this.allocated.clear();
    return all;
  }
}

/**
 * An INVALIDATE needs only an address space and u64 fields: any range, even size 0, is fine; on a
 * pinning device it must also cover every mapping it touches whole. There the kernel holds each
 * mapping as one entry per physically contiguous run (vhost_vdpa_pa_map) and drops only the runs
 * the range touches (vhost_vdpa_pa_unmap), which the agent cannot know: the rest would stay
 * pinned and mapped while this table said the mapping was gone.
 */
function checkInvalidate(spaces: AddressSpaces, asid: number, op: IotlbOp): IotlbViolation | undefined {
  const bad = spaces.checkAsid(asid);
  if (bad) return bad;
  if (op.iova < 0n || op.iova >= U64_LIMIT) return violation('OUT_OF_RANGE', `iova ${op.iova} is not a u64`);
  if (op.size < 0n || op.size >= U64_LIMIT) return violation('OVERFLOW', `size ${op.size} is not a u64`);
  if (spaces.pinPageSize === undefined) return undefined;
  const partly = spaces.table(asid).firstPartlyInvalidated(op.iova, op.size);
  if (!partly) return undefined;
  return violation(
    'PARTIAL_UNMAP',
    `INVALIDATE ${describeRange(op.iova, op.size)} covers only part of the mapping ${describeRange(partly.iova, partly.size)} in asid ${asid}: a pinning (PA-mode) parent would drop only the physically contiguous runs the range touches and keep the rest of it pinned and mapped; invalidate whole mappings`,
    { ...partly, asid },
  );
}

/**
 * The result for a refused op. `errno` is the handler's own errno; the kernel reports all but
 * the framing checks to userspace as EFAULT, which the message says.
 */
function violationResult(v: IotlbViolation): OpFailure {
  let message = v.message;
  if (v.conflict) {
    const c = v.conflict;
    message += ` (memory ${c.memory} at offset ${hex(c.offset)}, perm ${c.perm})`;
  }
  if (v.reason === 'BAD_PERM') message += '; the kernel does not check perm, vdpa-mapd does';
  else if (v.reason === 'UNALIGNED' || v.reason === 'PARTIAL_UNMAP') {
    message += '; the kernel would not refuse it, vdpa-mapd does';
  } else if (v.reason !== 'ZERO_SIZE') {
    message += `; the kernel's handler returns ${v.errno}, which a real kernel reports to userspace as EFAULT`;
  }
  return { ok: false, errno: v.errno, code: v.reason, message, field: v.field };
}
