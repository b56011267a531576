/** A split virtqueue as its driver laid it out (virtio 1.x, 2.7). Addresses are IOVAs. */
export interface SplitVirtqueue {
  index: number;
  /** Entries, a power of two. */
  size: number;
  desc: bigint;
  avail: bigint;
  used: bigint;
  /** The next avail ring entry the device serves. */
  lastAvail: number;
  /** The eventfd the driver writes to say "look at the avail ring". */
  kickFd: number;
}
