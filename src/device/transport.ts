/**
 * The transport of a vhost-vdpa device: what an open `/dev/vhost-vdpa-N` file offers userspace.
 * The real one (vhost-vdpa-fd.ts) makes syscalls; the simulator (sim-kernel.ts) answers the same
 * requests in memory; tests record them. Every argument crosses as the bytes the kernel would
 * copy_from_user / copy_to_user (native endian: little-endian on x86_64 and arm64).
 */
import type { IovaRange } from '../iotlb/types.ts';
import type { IotlbMsg } from '../uapi/message.ts';

export interface VhostTransport {
  /** One ioctl; `arg` is the in/out argument (absent for `_IO` requests). Throws TransportError. */
  ioctl(request: number, arg?: Uint8Array): void;
  /**
   * Writes one 72-byte vhost message. Throws (or rejects with) TransportError carrying the errno
   * userspace sees (EFAULT for almost every refusal, see vhost_chr_write_iter).
   */
  write(msg: Uint8Array): void | Promise<void>;
  /**
   * The same write, handed over as the fields the 72 bytes would carry (`asid` is 0 for v1), for
   * a transport that would only decode them again: the simulator, which then runs the very checks
   * `write(encode(...))` runs, on the same values. A real fd has none, and gets the bytes.
   */
  writeFields?(version: 1 | 2, asid: number, iotlb: IotlbMsg): void | Promise<void>;
  /** Closes the file; the kernel resets the device and drops every mapping (vhost_vdpa_release). */
  close(): void;
}

/**
 * A refused ioctl or write. `errno` is the symbolic name userspace sees; `code` is KERNEL for a
 * kernel refusal and INJECTED for a simulator's injected fault.
 */
export class TransportError extends Error {
  constructor(
    readonly errno: string,
    message: string,
    readonly code: 'KERNEL' | 'INJECTED' = 'KERNEL',
  ) {
    super(message);
    this.name = 'TransportError';
  }
}

export function isErrno(e: unknown, ...names: string[]): e is TransportError {
  return e instanceof TransportError && names.includes(e.errno);
}

export function ioctlReadU64(t: VhostTransport, request: number): bigint {
  const buf = Buffer.alloc(8);
  t.ioctl(request, buf);
  return buf.readBigUInt64LE(0);
}

export function ioctlWriteU64(t: VhostTransport, request: number, value: bigint): void {
  const buf = Buffer.alloc(8);
  buf.writeBigUInt64LE(value, 0);
  t.ioctl(request, buf);
}

export function ioctlReadU32(t: VhostTransport, request: number): number {
  const buf = Buffer.alloc(4);
  t.ioctl(request, buf);
  return buf.readUInt32LE(0);
}

export function ioctlReadU8(t: VhostTransport, request: number): number {
  const buf = Buffer.alloc(1);
  t.ioctl(request, buf);
  return buf.readUInt8(0);
}

export function ioctlWriteU8(t: VhostTransport, request: number, value: number): void {
  t.ioctl(request, Uint8Array.of(value));
}

/** `struct vhost_vdpa_iova_range { __u64 first; __u64 last; }` */
export function ioctlReadIovaRange(t: VhostTransport, request: number): IovaRange {
  const buf = Buffer.alloc(16);
  t.ioctl(request, buf);
  return { first: buf.readBigUInt64LE(0), last: buf.readBigUInt64LE(8) };
}
