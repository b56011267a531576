/**
 * The project's only door to libc (through koffi): ioctl, mmap/munmap, memfd_create, ftruncate,
 * getrlimit, sysconf(_SC_PAGESIZE), raw memory copies, and unix sockets that pass fds (SCM_RIGHTS)
 * with an fd watcher on Node's event loop. Node cannot ioctl, mmap or receive fds by itself.
 *
 * Linux, 64-bit, glibc only: off_t, size_t, rlim_t and pointers are all 64 bits wide, so every
 * address, size and offset crosses this boundary as a bigint. koffi does not range-check bigint
 * arguments (a negative size_t becomes 2^64-1), so every helper here does.
 */
import util from 'node:util';
import koffi from 'koffi';
import { U32_MAX, U64_MAX } from '../u64.ts';

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
  socket: lib.func('int socket(int domain, int type, int protocol)'),
  socketpair: lib.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)'),
  bind: lib.func('int bind(int fd, const void *addr, uint32_t addrlen)'),
  listen: lib.func('int listen(int fd, int backlog)'),
  accept4: lib.func('int accept4(int fd, void *addr, void *addrlen, int flags)'),
  recvmsg: lib.func('intptr_t recvmsg(int fd, void *msg, int flags)'),
  sendmsg: lib.func('intptr_t sendmsg(int fd, void *msg, int flags)'),
  fcntl: lib.func('int fcntl(int fd, int cmd, ...)'),
  eventfd: lib.func('int eventfd(unsigned int initval, int flags)'),
};

export const PROT_READ = 0x1;
export const PROT_WRITE = 0x2;
export const MAP_SHARED = 0x01;
export const MFD_CLOEXEC = 0x1;
export const RLIMIT_MEMLOCK = 8;
export const RLIM_INFINITY = U64_MAX;

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
  checkInt(request, 0, U32_MAX, 'ioctl request');
  const ret: number = c.ioctl(fd, request, argType, arg);
  if (ret < 0) fail('ioctl', `0x${request.toString(16)}`);
  return ret;
}

/** ioctl with no argument (e.g. VHOST_SET_OWNER); returns the (non-negative) result. */
export function ioctlNoArg(fd: number, request: number): number {
  return ioctlCall(fd, request, 'unsigned long', 0);
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

// ---------------------------------------------------------------------------------------------
// unix sockets with fd passing, eventfds, fd watching

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const MSG_DONTWAIT = 0x40;
const MSG_NOSIGNAL = 0x4000;
const MSG_CTRUNC = 0x8;
const MSG_CMSG_CLOEXEC = 0x40000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const F_DUPFD_CLOEXEC = 1030;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;
/** sizeof(sun_path) */
const UNIX_PATH_MAX = 108;
/** Most fds one message may carry (the control buffer holds exactly this many). */
export const MAX_PASSED_FDS = 8;
/** Most fds one send may attach (more than a receiver takes, to test its truncation). */
const MAX_SEND_FDS = 2 * MAX_PASSED_FDS;
/** Largest single send or receive through {@link FdSocketBuffer}. */
export const MAX_FD_MESSAGE = 4096;

const EAGAIN = 11;
const EINTR = 4;

/** A non-blocking, close-on-exec AF_UNIX stream socket. */
export function unixSocket(): number {
  const fd: number = c.socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) fail('socket');
  return fd;
}

/** A connected pair of non-blocking, close-on-exec AF_UNIX stream sockets. */
export function unixSocketPair(): [number, number] {
  const sv = new Int32Array(2);
  if (c.socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) fail('socketpair');
  return [sv[0]!, sv[1]!];
}

/** bind() to a filesystem path (struct sockaddr_un), then listen(). */
export function bindListenUnix(fd: number, socketPath: string, backlog: number): void {
  const { addr, length } = unixAddress(socketPath);
  if (c.bind(fd, addr, length) < 0) fail('bind', socketPath);
  if (c.listen(fd, backlog) < 0) fail('listen', socketPath);
}

/** accept4 (non-blocking, close-on-exec); null when no connection is pending. */
export function acceptUnix(fd: number): number | null {
  const conn: number = c.accept4(fd, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (conn >= 0) return conn;
  const errnum = koffi.errno();
  if (errnum === EAGAIN || errnum === EINTR) return null;
  throw new SysError('accept4', errnum);
}

/** A new close-on-exec fd for the same open file (fcntl F_DUPFD_CLOEXEC). */
export function dupCloexec(fd: number): number {
  checkInt(fd, 0, 0x7fffffff, 'fd');
  const copy: number = c.fcntl(fd, F_DUPFD_CLOEXEC, 'int', 0);
  if (copy < 0) fail('fcntl', 'F_DUPFD_CLOEXEC');
  return copy;
}

export function eventfd(initval: number, flags: number): number {
  checkInt(initval, 0, U32_MAX, 'eventfd initval');
  const fd: number = c.eventfd(initval, flags);
  if (fd < 0) fail('eventfd');
  return fd;
}

/** What one recvmsg delivered: the bytes, the fds that came with them (now ours), EOF. */
export interface FdReceive {
  data: Buffer;
  fds: number[];
  /** The peer sent more fds than {@link MAX_PASSED_FDS} (MSG_CTRUNC); the extra ones were dropped. */
  fdsTruncated: boolean;
  eof: boolean;
}

/**
 * One socket's native scratch memory for sendmsg/recvmsg: struct msghdr, one iovec, a control
 * buffer for {@link MAX_PASSED_FDS} fds and the data. Free it with {@link FdSocketBuffer.free}.
 */
export class FdSocketBuffer {
  private static readonly MSGHDR = 0; // struct msghdr: 56 bytes
  private static readonly IOV = 64; // struct iovec: 16 bytes
  private static readonly CONTROL = 128; // up to CMSG_SPACE(4 * MAX_SEND_FDS) = 16 + 64
  private static readonly CONTROL_SIZE = 16 + 4 * MAX_PASSED_FDS;
  private static readonly DATA = 256;
  private ptr: unknown;
  private readonly base: bigint;
  private readonly view: Buffer;

  constructor() {
    const total = FdSocketBuffer.DATA + MAX_FD_MESSAGE;
    this.ptr = koffi.alloc('uint8_t', total);
    this.base = koffi.address(this.ptr);
    this.view = Buffer.from(koffi.view(this.ptr, total));
  }

  /**
   * Non-blocking recvmsg of at most `length` bytes with MSG_CMSG_CLOEXEC; null when nothing is
   * there (EAGAIN). Every fd received is returned, even when the call reports truncation.
   */
  receive(fd: number, length: number): FdReceive | null {
    checkInt(length, 1, MAX_FD_MESSAGE, 'receive length');
    this.prepare(length, FdSocketBuffer.CONTROL_SIZE);
    const n = Number(c.recvmsg(fd, this.base, MSG_DONTWAIT | MSG_CMSG_CLOEXEC));
    if (n < 0) {
      const errnum = koffi.errno();
      if (errnum === EAGAIN || errnum === EINTR) return null;
      throw new SysError('recvmsg', errnum);
    }
    const v = this.view;
    const msgFlags = v.readInt32LE(FdSocketBuffer.MSGHDR + 48);
    const controlLen = Number(v.readBigUInt64LE(FdSocketBuffer.MSGHDR + 40));
    const fds: number[] = [];
    let foreign = false;
    // CMSG_FIRSTHDR / CMSG_NXTHDR: each cmsghdr is { size_t len; int level; int type; data }.
    let at = 0;
    while (at + 16 <= controlLen) {
      const off = FdSocketBuffer.CONTROL + at;
      const len = Number(v.readBigUInt64LE(off));
      if (len < 16 || at + len > controlLen) break;
      if (v.readInt32LE(off + 8) === SOL_SOCKET && v.readInt32LE(off + 12) === SCM_RIGHTS) {
        for (let i = 16; i + 4 <= len; i += 4) fds.push(v.readInt32LE(off + i));
      } else foreign = true;
      at += (len + 7) & ~7;
    }
    return {
      data: Buffer.from(v.subarray(FdSocketBuffer.DATA, FdSocketBuffer.DATA + n)),
      fds,
      fdsTruncated: (msgFlags & MSG_CTRUNC) !== 0 || foreign,
      eof: n === 0,
    };
  }

  /**
   * Non-blocking sendmsg of `data` with `fds` attached (MSG_NOSIGNAL: a closed peer is EPIPE, not
   * SIGPIPE). Returns the bytes sent, 0 when the socket buffer is full (EAGAIN).
   */
  send(fd: number, data: Uint8Array, fds: readonly number[] = []): number {
    checkInt(data.byteLength, 1, MAX_FD_MESSAGE, 'send length');
    checkInt(fds.length, 0, MAX_SEND_FDS, 'fd count');
    const controlLen = fds.length === 0 ? 0 : 16 + ((4 * fds.length + 7) & ~7);
    this.prepare(data.byteLength, controlLen);
    const v = this.view;
    v.set(data, FdSocketBuffer.DATA);
    if (fds.length > 0) {
      v.fill(0, FdSocketBuffer.CONTROL, FdSocketBuffer.CONTROL + controlLen);
      v.writeBigUInt64LE(BigInt(16 + 4 * fds.length), FdSocketBuffer.CONTROL);
      v.writeInt32LE(SOL_SOCKET, FdSocketBuffer.CONTROL + 8);
      v.writeInt32LE(SCM_RIGHTS, FdSocketBuffer.CONTROL + 12);
      fds.forEach((f, i) => {
        checkInt(f, 0, 0x7fffffff, 'fd');
        v.writeInt32LE(f, FdSocketBuffer.CONTROL + 16 + 4 * i);
      });
    }
    const n = Number(c.sendmsg(fd, this.base, MSG_DONTWAIT | MSG_NOSIGNAL));
    if (n >= 0) return n;
    const errnum = koffi.errno();
    if (errnum === EAGAIN || errnum === EINTR) return 0;
    throw new SysError('sendmsg', errnum);
  }

  free(): void {
    if (this.ptr !== null) koffi.free(this.ptr);
    this.ptr = null;
  }

  private prepare(dataLen: number, controlLen: number): void {
    if (this.ptr === null) throw new Error('FdSocketBuffer used after free');
    const v = this.view;
    const M = FdSocketBuffer.MSGHDR;
    v.fill(0, M, M + 56);
    // struct msghdr { name; namelen(+pad); iov; iovlen; control; controllen; flags }
    v.writeBigUInt64LE(this.base + BigInt(FdSocketBuffer.IOV), M + 16);
    v.writeBigUInt64LE(1n, M + 24);
    if (controlLen > 0) {
      v.writeBigUInt64LE(this.base + BigInt(FdSocketBuffer.CONTROL), M + 32);
      v.writeBigUInt64LE(BigInt(controlLen), M + 40);
    }
    v.writeBigUInt64LE(this.base + BigInt(FdSocketBuffer.DATA), FdSocketBuffer.IOV);
    v.writeBigUInt64LE(BigInt(dataLen), FdSocketBuffer.IOV + 8);
  }
}

/** A watch on one fd; stop it before closing the fd. */
export interface FdWatch {
  /** Stops callbacks until {@link FdWatch.resume}. */
  pause(): void;
  resume(): void;
  /** Ends the watch for good. */
  stop(): void;
}

interface PollHandle {
  start(opts: { readable: boolean; disconnect: boolean }, cb: () => void): void;
  stop(): void;
  close(): void;
}

/**
 * Calls `onReadable` on Node's main thread whenever `fd` is readable or hung up, through koffi's
 * poll (libuv uv_poll on the event loop; koffi 3, pinned: its changelog says the API may change).
 * koffi swallows an exception thrown in the callback and the watch wedges, so every exception is
 * caught here and handed to `onError`, which must not throw.
 */
export function watchReadable(fd: number, onReadable: () => void, onError: (e: unknown) => void): FdWatch {
  checkInt(fd, 0, 0x7fffffff, 'fd');
  const opts = { readable: true, disconnect: true };
  const callback = () => {
    try {
      onReadable();
    } catch (e) {
      try {
        onError(e);
      } catch {
        // nothing may escape into koffi
      }
    }
  };
  let handle: PollHandle | null = koffi.node.poll(fd, opts, callback) as unknown as PollHandle;
  let paused = false;
  return {
    pause() {
      if (handle && !paused) handle.stop();
      paused = true;
    },
    resume() {
      if (handle && paused) handle.start(opts, callback);
      paused = false;
    },
    stop() {
      handle?.close();
      handle = null;
    },
  };
}

// ---- groups ----

const GroupEntry = koffi.struct('vdpa_mapd_group', {
  gr_name: 'char *',
  gr_passwd: 'char *',
  gr_gid: 'uint32_t',
  gr_mem: 'void *',
});
const getgrnam = lib.func('vdpa_mapd_group *getgrnam(const char *name)');

/** The gid of a group by name (through NSS, like `chgrp`); null when there is no such group. */
export function groupId(name: string): number | null {
  if (name === '' || name.includes('\0')) return null;
  const entry = getgrnam(name);
  return entry === null ? null : (koffi.decode(entry, GroupEntry) as { gr_gid: number }).gr_gid;
}

const cConnect = lib.func('int connect(int fd, const void *addr, uint32_t addrlen)');
const ECONNREFUSED = 111;
const ENOENT = 2;

/** struct sockaddr_un for a filesystem path, and the length to pass with it. */
function unixAddress(socketPath: string): { addr: Buffer; length: number } {
  const name = Buffer.from(socketPath, 'utf8');
  if (name.byteLength === 0 || name.byteLength >= UNIX_PATH_MAX || name.includes(0)) {
    throw new RangeError(`socket path must be 1..${UNIX_PATH_MAX - 1} bytes without NUL: ${socketPath}`);
  }
  const addr = Buffer.alloc(2 + UNIX_PATH_MAX);
  addr.writeUInt16LE(AF_UNIX, 0);
  name.copy(addr, 2);
  return { addr, length: 2 + name.byteLength + 1 };
}

/**
 * connect() a socket from {@link unixSocket} to a filesystem path (the client side of
 * {@link bindListenUnix}). Returns false when the peer is not accepting yet (a non-blocking unix
 * connect is EAGAIN when the listener's backlog is full, ECONNREFUSED/ENOENT before it listens);
 * any other failure throws. On false the socket stays unconnected and may be tried again.
 */
export function connectUnix(fd: number, socketPath: string): boolean {
  checkInt(fd, 0, 0x7fffffff, 'fd');
  const { addr, length } = unixAddress(socketPath);
  if (cConnect(fd, addr, length) === 0) return true;
  const errnum = koffi.errno();
  if (errnum === EAGAIN || errnum === ECONNREFUSED || errnum === ENOENT) return false;
  throw new SysError('connect', errnum, socketPath);
}
