/**
 * The vring ioctl arguments of vhost (include/uapi/linux/vhost_types.h), as the bytes the kernel
 * copies in and out (native endian: little-endian on x86_64 and arm64):
 *
 *   struct vhost_vring_state { unsigned int index; unsigned int num; }                  (8 bytes)
 *   struct vhost_vring_file  { unsigned int index; int fd; }       (fd -1: VHOST_FILE_UNBIND)
 *   struct vhost_vring_addr  { unsigned int index; unsigned int flags;
 *                              __u64 desc_user_addr, used_user_addr, avail_user_addr,
 *                              log_guest_addr; }                                       (40 bytes)
 *   struct vhost_vdpa_config { __u32 off; __u32 len; __u8 buf[len]; }
 *
 * On vhost-vdpa the "user" addresses of a vring are IOVAs (what the device DMAs to).
 */

export const VRING_STATE_SIZE = 8;
export const VRING_FILE_SIZE = 8;
export const VRING_ADDR_SIZE = 40;
export const VDPA_CONFIG_HEADER_SIZE = 8;
/** vhost_vring_file.fd that unbinds the eventfd. */
export const VHOST_FILE_UNBIND = -1;
/** vhost_vring_addr.flags bit VHOST_VRING_F_LOG: the only flag the kernel takes. */
export const VHOST_VRING_F_LOG = 0;

export interface VringState {
  index: number;
  num: number;
}

export interface VringFile {
  index: number;
  /** An eventfd, or VHOST_FILE_UNBIND. */
  fd: number;
}

export interface VringAddr {
  index: number;
  flags: number;
  desc: bigint;
  used: bigint;
  avail: bigint;
  log: bigint;
}

export function encodeVringState(s: VringState): Buffer {
  const b = Buffer.alloc(VRING_STATE_SIZE);
  b.writeUInt32LE(s.index, 0);
  b.writeUInt32LE(s.num, 4);
  return b;
}

export function decodeVringState(b: Uint8Array): VringState {
  const v = view(b, VRING_STATE_SIZE);
  return { index: v.readUInt32LE(0), num: v.readUInt32LE(4) };
}

export function encodeVringFile(f: VringFile): Buffer {
  const b = Buffer.alloc(VRING_FILE_SIZE);
  b.writeUInt32LE(f.index, 0);
  b.writeInt32LE(f.fd, 4);
  return b;
}

export function decodeVringFile(b: Uint8Array): VringFile {
  const v = view(b, VRING_FILE_SIZE);
  return { index: v.readUInt32LE(0), fd: v.readInt32LE(4) };
}

export function encodeVringAddr(a: VringAddr): Buffer {
  const b = Buffer.alloc(VRING_ADDR_SIZE);
  b.writeUInt32LE(a.index, 0);
  b.writeUInt32LE(a.flags, 4);
  b.writeBigUInt64LE(a.desc, 8);
  b.writeBigUInt64LE(a.used, 16);
  b.writeBigUInt64LE(a.avail, 24);
  b.writeBigUInt64LE(a.log, 32);
  return b;
}

export function decodeVringAddr(b: Uint8Array): VringAddr {
  const v = view(b, VRING_ADDR_SIZE);
  return {
    index: v.readUInt32LE(0),
    flags: v.readUInt32LE(4),
    desc: v.readBigUInt64LE(8),
    used: v.readBigUInt64LE(16),
    avail: v.readBigUInt64LE(24),
    log: v.readBigUInt64LE(32),
  };
}

/** A vhost_vdpa_config of `len` bytes from `off`; for SET_CONFIG, `data` is its buf. */
export function encodeVdpaConfig(off: number, len: number, data?: Uint8Array): Buffer {
  const b = Buffer.alloc(VDPA_CONFIG_HEADER_SIZE + len);
  b.writeUInt32LE(off, 0);
  b.writeUInt32LE(len, 4);
  if (data) b.set(data.subarray(0, len), VDPA_CONFIG_HEADER_SIZE);
  return b;
}

export function decodeVdpaConfigHeader(b: Uint8Array): { off: number; len: number } {
  const v = view(b, VDPA_CONFIG_HEADER_SIZE);
  return { off: v.readUInt32LE(0), len: v.readUInt32LE(4) };
}

/** The buf of a vhost_vdpa_config argument (the bytes after its header). */
export function vdpaConfigBuf(b: Uint8Array): Buffer {
  const v = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  return v.subarray(VDPA_CONFIG_HEADER_SIZE);
}

function view(b: Uint8Array, size: number): Buffer {
  if (b.byteLength < size) throw new RangeError(`a ${size}-byte argument, got ${b.byteLength} bytes`);
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}
