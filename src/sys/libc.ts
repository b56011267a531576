/**
 * The project's only door to libc (through koffi): ioctl, mmap/munmap, memfd_create, ftruncate,
 * getrlimit, sysconf(_SC_PAGESIZE), and raw memory copies. Node cannot ioctl or mmap by itself.
 *
 * Linux, 64-bit, glibc only: off_t, size_t, rlim_t and pointers are all 64 bits wide, so every
 * address, size and offset crosses this boundary as a bigint. koffi does not range-check bigint
 * arguments (a negative size_t becomes 2^64-1), so every helper here does.
 */
import util from 'node:util';
import koffi from 'koffi';

if (process.platform !== 'linux' || koffi.sizeof('void *') !== 8) {
  throw new Error('src/sys/libc: only 64-bit Linux is supported');
}

const lib = koffi.load('libc.so.6');

const c = {
  // The third argument of ioctl is variadic: each call passes its C type then its value.
  ioctl: lib.func('int ioctl(int fd, unsigned long request, ...)'),
  mmap: lib.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)'),
  munmap: lib.func('int munmap(void *addr, size_t length)'),
  memfdCreate: lib.func('int memfd_create(const char *name, unsigned int flags)'),
  ftruncate: lib.func('int ftruncate(int fd, int64_t length)'),
  getrlimit: lib.func('int getrlimit(int resource, void *rlim)'),
  memcpy: lib.func('void *memcpy(void *dest, const void *src, size_t n)'),
  strerror: lib.func('const char *strerror(int errnum)'),
  sysconf: lib.func('long sysconf(int name)'),
};

export const PROT_READ = 0x1;
export const PROT_WRITE = 0x2;
export const MAP_SHARED = 0x01;
export const MFD_CLOEXEC = 0x1;
export const RLIMIT_MEMLOCK = 8;
export const RLIM_INFINITY = (1n << 64n) - 1n;

const U64_MAX = (1n << 64n) - 1n;
const I64_MAX = (1n << 63n) - 1n;
/** (void *)-1 */
const MAP_FAILED = U64_MAX;
/** Largest Buffer length the copy helpers accept. */
const MAX_COPY = 2 ** 31;

/** A failed libc call: `errno` is the symbolic name (EBUSY, EFAULT, ...), `errnum` its value. */
export class SysError extends Error {
  readonly errno: string;
  constructor(
    readonly syscall: string,
    readonly errnum: number,
    detail?: string,
  ) {
    const name = errnoName(errnum);
    super(`${syscall}${detail === undefined ? '' : `(${detail})`}: ${name} (${c.strerror(errnum)})`);
    this.name = 'SysError';
    this.errno = name;
  }
}

/** The symbolic name of an errno value (libuv's table); `ERRNO_<n>` when it has none. */
export function errnoName(errnum: number): string {
  const name = Number.isInteger(errnum) && errnum > 0 ? util.getSystemErrorName(-errnum) : '';
  return name.startsWith('E') ? name : `ERRNO_${errnum}`;
}

/** Reads errno right after a failed call (nothing else can run in between: all calls are sync). */
function fail(syscall: string, detail?: string): never {
  throw new SysError(syscall, koffi.errno(), detail);
}

function checkRange(value: bigint, max: bigint, what: string): void {
  if (value < 0n || value > max) throw new RangeError(`${what} out of range: ${value}`);
}

function checkInt(value: number, min: number, max: number, what: string): void {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(`${what} out of range: ${value}`);
  }
}

// ---------------------------------------------------------------------------------------------
// ioctl

function ioctlCall(fd: number, request: number, argType: string, arg: unknown): number {
  checkInt(fd, 0, 0x7fffffff, 'fd');
  checkInt(request, 0, 0xffffffff, 'ioctl request');
  const ret: number = c.ioctl(fd, request, argType, arg);
  if (ret < 0) fail('ioctl', `0x${request.toString(16)}`);
  return ret;
}

/** ioctl with no argument (e.g. VHOST_SET_OWNER); returns the (non-negative) result. */
export function ioctlNoArg(fd: number, request: number): number {
  return ioctlCall(fd, request, 'unsigned long', 0);
}

// Typed arrays are native-endian, exactly like the kernel's put_user of a __u64/__u32/...
export function ioctlReadU64(fd: number, request: number): bigint {
  const out = new BigUint64Array(1);
  ioctlCall(fd, request, 'void *', out);
  return out[0]!;
}

export function ioctlReadU32(fd: number, request: number): number {
  const out = new Uint32Array(1);
  ioctlCall(fd, request, 'void *', out);
  return out[0]!;
}

export function ioctlReadU16(fd: number, request: number): number {
  const out = new Uint16Array(1);
  ioctlCall(fd, request, 'void *', out);
  return out[0]!;
}

export function ioctlReadU8(fd: number, request: number): number {
  const out = new Uint8Array(1);
  ioctlCall(fd, request, 'void *', out);
  return out[0]!;
}

/** The vhost "write" ioctls take a pointer to the value, not the value itself. */
export function ioctlWriteU64(fd: number, request: number, value: bigint): void {
  checkRange(value, U64_MAX, 'u64 value');
  ioctlCall(fd, request, 'void *', BigUint64Array.of(value));
}

export function ioctlWriteU8(fd: number, request: number, value: number): void {
  checkInt(value, 0, 0xff, 'u8 value');
  ioctlCall(fd, request, 'void *', Uint8Array.of(value));
}

/**
 * ioctl with a pointer to `buf` (a struct the caller encodes/decodes, e.g. the 16-byte
 * vhost_vdpa_iova_range); the kernel reads and/or writes it in place. Returns the result.
 */
export function ioctlBuffer(fd: number, request: number, buf: Uint8Array): number {
  if (buf.byteLength === 0) throw new RangeError('ioctl buffer is empty');
  return ioctlCall(fd, request, 'void *', buf);
}

// ---------------------------------------------------------------------------------------------
// memory

/** mmap(NULL, length, prot, flags, fd, offset); returns the mapping's address. */
export function mmap(length: bigint, prot: number, flags: number, fd: number, offset = 0n): bigint {
  checkRange(length, U64_MAX, 'mmap length');
  checkRange(offset, I64_MAX, 'mmap offset');
  checkInt(fd, 0, 0x7fffffff, 'fd');
  const addr: bigint = c.mmap(null, length, prot, flags, fd, offset);
  if (addr === MAP_FAILED) fail('mmap');
  return addr;
}

export function munmap(addr: bigint, length: bigint): void {
  checkRange(addr, U64_MAX, 'munmap address');
  checkRange(length, U64_MAX, 'munmap length');
  if (c.munmap(addr, length) < 0) fail('munmap');
}

/** An anonymous shared-memory file; the name only shows up in /proc/<pid>/fd links. */
export function memfdCreate(name: string, flags: number): number {
  const fd: number = c.memfdCreate(name, flags);
  if (fd < 0) fail('memfd_create');
  return fd;
}

export function ftruncate(fd: number, length: bigint): void {
  checkRange(length, I64_MAX, 'ftruncate length');
  if (c.ftruncate(fd, length) < 0) fail('ftruncate');
}

export interface Rlimit {
  /** Soft limit (rlim_cur); RLIM_INFINITY when unlimited. */
  cur: bigint;
  /** Hard limit (rlim_max). */
  max: bigint;
}

export function getrlimit(resource: number): Rlimit {
  // struct rlimit { rlim_t rlim_cur; rlim_t rlim_max; }, rlim_t being 64-bit.
  const out = new BigUint64Array(2);
  if (c.getrlimit(resource, out) < 0) fail('getrlimit');
  return { cur: out[0]!, max: out[1]! };
}

/** glibc's _SC_PAGESIZE. */
const SC_PAGESIZE = 30;

/** The kernel's PAGE_SIZE in bytes (4096 on x86_64; 4, 16 or 64 KiB on arm64). */
export function systemPageSize(): bigint {
  const size = Number(c.sysconf(SC_PAGESIZE));
  if (size <= 0) fail('sysconf(_SC_PAGESIZE)');
  return BigInt(size);
}

/**
 * Copies `length` bytes starting at address `addr` into a new Buffer. The caller guarantees that
 * `[addr, addr+length)` is mapped (an unmapped address crashes the process).
 */
export function copyFromAddress(addr: bigint, length: number): Buffer {
  checkInt(length, 0, MAX_COPY - 1, 'copy length');
  checkRange(addr, U64_MAX - BigInt(length), 'copy address');
  const out = Buffer.alloc(length);
  if (length > 0) c.memcpy(out, addr, BigInt(length));
  return out;
}

/** Copies `data` to address `addr`; the same caller guarantee as copyFromAddress. */
export function copyToAddress(addr: bigint, data: Uint8Array): void {
  checkInt(data.byteLength, 0, MAX_COPY - 1, 'copy length');
  checkRange(addr, U64_MAX - BigInt(data.byteLength), 'copy address');
  if (data.byteLength > 0) c.memcpy(addr, data, BigInt(data.byteLength));
}
