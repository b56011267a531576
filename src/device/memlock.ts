/**
 * Pinned memory and RLIMIT_MEMLOCK. A parent in PA mode pins every page it maps, and
 * vhost_vdpa_pa_map refuses an UPDATE (ENOMEM, which userspace sees as EFAULT) when
 *   npages + mm->pinned_vm > PFN_DOWN(rlimit(RLIMIT_MEMLOCK)),  npages = PFN_UP(size + (iova & ~PAGE_MASK)).
 * pinned_vm belongs to the owner's mm: it sums every PA-mode device the process owns, so one
 * PinnedMemory is shared by all of them. Pages are charged per entry, at the kernel's rounding;
 * an entry is released at the rounding it was charged with.
 */
import { hex } from '../iotlb/types.ts';
import { getrlimit, RLIM_INFINITY, RLIMIT_MEMLOCK, systemPageSize } from '../sys/libc.ts';

/** x86_64's PAGE_SIZE: the simulator's default. */
export const PAGE_SIZE = 4096n;

/** PFN_UP(size + (iova & ~PAGE_MASK)): the pages [iova, iova + size) touches. */
export function pagesOf(iova: bigint, size: bigint, pageSize = PAGE_SIZE): bigint {
  return (size + (iova % pageSize) + pageSize - 1n) / pageSize;
}

export class PinnedMemory {
  private pages = 0n;

  constructor(
    /** The soft RLIMIT_MEMLOCK in bytes (read at every check, as the kernel does). */
    private readonly limit: () => bigint,
    /** The kernel's PAGE_SIZE. */
    readonly pageSize: bigint = PAGE_SIZE,
  ) {}

  get pinnedBytes(): bigint {
    return this.pages * this.pageSize;
  }

  /** Why pinning [iova, +size) would pass RLIMIT_MEMLOCK, or undefined when it fits. */
  refusal(iova: bigint, size: bigint): string | undefined {
    const limit = this.limit();
    if (limit === RLIM_INFINITY) return undefined;
    const needed = pagesOf(iova, size, this.pageSize);
    if (needed + this.pages <= limit / this.pageSize) return undefined;
    return `pinning ${hex(needed * this.pageSize)} bytes more would pass RLIMIT_MEMLOCK (${hex(limit)} bytes; ${hex(this.pinnedBytes)} already pinned by this process's PA-mode devices)`;
  }

  pin(iova: bigint, size: bigint): void {
    this.pages += pagesOf(iova, size, this.pageSize);
  }

  unpin(iova: bigint, size: bigint): void {
    this.pages -= pagesOf(iova, size, this.pageSize);
  }
}

let processPins: PinnedMemory | undefined;

/** The agent process's own account, against its real RLIMIT_MEMLOCK (for kernel devices). */
export function processPinnedMemory(): PinnedMemory {
  processPins ??= new PinnedMemory(() => getrlimit(RLIMIT_MEMLOCK).cur, systemPageSize());
  return processPins;
}
