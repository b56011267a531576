/**
 * The block I/O the guest step test/kernel/guest/blk-io.ts drives through our mappings on the
 * blk kinds, and what the host then finds in each kind's disk image: imported by the guest step
 * (which writes and reads back) and by the host (run-vm.ts, kernel-tier.test.ts), which checks
 * every byte of the image after QEMU exited. Imports nothing but node:crypto.
 */
import crypto from 'node:crypto';

/**
 * The kinds whose device is a real virtio-blk that nobody here wrote: QEMU's VDUSE export
 * (qemu-storage-daemon, VA mode) and QEMU's virtio-blk-pci under vp_vdpa behind intel-iommu (PA).
 */
export const BLK_KINDS = ['vduse-blk', 'vp-vdpa-blk'] as const;
export type BlkKind = (typeof BLK_KINDS)[number];

export const SECTOR_BYTES = 512;
/** Each kind's image: zeros before the run. */
export const BLK_IMAGE_BYTES = 16 << 20;

export interface BlkWrite {
  sector: bigint;
  bytes: number;
}

/** One page at 0, one odd sector, 64 KiB (16 pages in one descriptor), the last page. */
export const BLK_WRITES: readonly BlkWrite[] = [
  { sector: 0n, bytes: 4096 },
  { sector: 9n, bytes: SECTOR_BYTES },
  { sector: 2048n, bytes: 64 << 10 },
  { sector: BigInt(BLK_IMAGE_BYTES / SECTOR_BYTES - 8), bytes: 4096 },
];

/** Written through an owner that is then killed; read back through the next owner. */
export const BLK_BEFORE_KILL: BlkWrite = { sector: 8192n, bytes: 64 << 10 };
/**
 * In flight when the owner is killed (it may or may not land), then written again through the
 * next owner: the image holds it either way. 1 MiB in one descriptor, so that it takes a while.
 */
export const BLK_IN_FLIGHT: BlkWrite = { sector: 16384n, bytes: 1 << 20 };

const ALL_WRITES = [...BLK_WRITES, BLK_BEFORE_KILL, BLK_IN_FLIGHT];

/** Bytes the plan writes (and the guest reads back, and the host finds). */
export const BLK_PLAN_BYTES = ALL_WRITES.reduce((n, w) => n + w.bytes, 0);

export const blkImageName = (kind: BlkKind): string => `${kind}.img`;

/** The bytes of write `w` on `kind`: SHA-256 in counter mode, different per kind and sector. */
export function blkPattern(kind: BlkKind, w: BlkWrite): Buffer {
  const out = Buffer.alloc(w.bytes);
  for (let at = 0; at < w.bytes; at += 32) {
    crypto.createHash('sha256').update(`${kind}:${w.sector}:${at}`).digest().copy(out, at);
  }
  return out;
}

/**
 * Checks the whole image against the plan (the writes, zeros elsewhere); returns what was checked
 * or throws naming the first byte that differs.
 */
export function checkBlkImage(kind: BlkKind, image: Buffer): string {
  if (image.length !== BLK_IMAGE_BYTES) throw new Error(`${kind}: image of ${image.length} bytes`);
  const want = Buffer.alloc(BLK_IMAGE_BYTES);
  for (const w of ALL_WRITES) blkPattern(kind, w).copy(want, Number(w.sector) * SECTOR_BYTES);
  if (!image.equals(want)) {
    let at = 0;
    while (image[at] === want[at]) at++;
    const w = ALL_WRITES.find(
      (x) => at >= Number(x.sector) * SECTOR_BYTES && at < Number(x.sector) * SECTOR_BYTES + x.bytes,
    );
    throw new Error(
      `${kind}: image byte 0x${at.toString(16)} is 0x${image[at]!.toString(16)}, expected 0x${want[at]!.toString(16)} (${w ? `write at sector ${w.sector}` : 'outside every write'})`,
    );
  }
  return `${BLK_PLAN_BYTES} bytes written at ${ALL_WRITES.length} places found, the other ${BLK_IMAGE_BYTES - BLK_PLAN_BYTES} bytes still zero`;
}
