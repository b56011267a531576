/**
 * The agent's backing memory: shared files (created sparse under the state directory, memfds, or
 * existing files under an allowed root) mmap'd whole, PROT_READ|PROT_WRITE, MAP_SHARED. The
 * kernel's uaddrs point into these mappings; VA-mode parents skip anything that is not shared and
 * file-backed, so nothing else is ever handed out.
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  copyFromAddress,
  copyToAddress,
  ftruncate,
  MAP_SHARED,
  MFD_CLOEXEC,
  memfdCreate,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
  SysError,
} from '../sys/libc.ts';
import { ID_RULE, isValidId } from '../id.ts';
import { memoryDir, PathAllowlist } from './allowlist.ts';
import {
  type AdoptMemoryRequest,
  type CreateMemoryRequest,
  MemoryError,
  type MemoryInfo,
  type MemoryRegistry,
  type OpenMemoryRequest,
} from './types.ts';
import { U64_MAX } from '../u64.ts';

export interface SharedMemoryRegistryOptions {
  /** Roots for `open` by path; `<stateDir>/memory` is always added. */
  allowedRoots: string[];
  stateDir: string;
}

const PAGE_SIZE = 4096n;
/** off_t is signed 64-bit: the largest page multiple ftruncate accepts. */
const MAX_SIZE = (1n << 63n) - PAGE_SIZE;
const MAX_COPY = 2 ** 31;

interface Entry {
  info: MemoryInfo;
  fd: number;
}

export class SharedMemoryRegistry implements MemoryRegistry {
  private readonly entries = new Map<string, Entry>();
  private readonly allowlist: PathAllowlist;
  private readonly memoryDir: string;

  constructor(opts: SharedMemoryRegistryOptions) {
    this.memoryDir = memoryDir(opts.stateDir);
    this.allowlist = new PathAllowlist([...opts.allowedRoots, this.memoryDir]);
  }

  create(req: CreateMemoryRequest): MemoryInfo {
    this.checkNewId(req.id);
    checkSize(req.size, 'size');
    const kind = req.kind ?? 'file';
    if (kind === 'memfd') {
      const fd = sys(() => memfdCreate(`vdpa-mapd:${req.id}`, MFD_CLOEXEC), 'memfd_create', 'id');
      return this.mapAndAdd({ id: req.id, path: `memfd:${req.id}`, kind, created: true }, fd, req.size, true);
    }
    if (kind !== 'file') throw new TypeError(`unknown memory kind: ${String(kind)}`);

    const dir = this.ensureMemoryDir();
    const file = path.join(dir, req.id);
    let fd: number;
    try {
      const { O_RDWR, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
      fd = fs.openSync(file, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') {
        // It may hold guest data from an earlier agent: never clobber it, open it by path instead.
        throw new MemoryError('ALREADY_EXISTS', `backing file ${file} already exists; open it by path`, 'id');
      }
      throw systemError(e, `cannot create ${file}`, 'id');
    }
    try {
      return this.mapAndAdd({ id: req.id, path: file, kind, created: true }, fd, req.size, true);
    } catch (e) {
      // Nothing can be in the file yet: do not leave a half-made one behind.
      fs.rmSync(file, { force: true });
      throw e;
    }
  }

  open(req: OpenMemoryRequest): MemoryInfo {
    this.checkNewId(req.id);
    const file = this.allowlist.open(req.path);
    try {
      checkSize(file.size, 'path');
    } catch (e) {
      fs.closeSync(file.fd);
      throw e;
    }
    return this.mapAndAdd(
      { id: req.id, path: file.path, kind: 'file', created: false },
      file.fd,
      file.size,
      false,
    );
  }

  /**
   * Registers memory another process shares by fd (a vhost-user front-end's guest RAM): takes
   * ownership of `fd` (closed on failure too) and maps the whole file. It is never resized.
   */
  adopt(req: AdoptMemoryRequest): MemoryInfo {
    try {
      this.checkNewId(req.id);
    } catch (e) {
      fs.closeSync(req.fd);
      throw e;
    }
    let size: bigint;
    let link: string;
    try {
      const st = fs.fstatSync(req.fd, { bigint: true });
      if (!st.isFile()) throw new MemoryError('PATH_REFUSED', `fd of ${req.id} is not a regular file`, 'fd');
      size = st.size;
      checkSize(size, 'fd');
      link = fs.readlinkSync(`/proc/self/fd/${req.fd}`);
    } catch (e) {
      fs.closeSync(req.fd);
      throw e instanceof MemoryError ? e : systemError(e, `cannot inspect the fd of ${req.id}`, 'fd');
    }
    const memfd = link.startsWith('/memfd:');
    return this.mapAndAdd(
      { id: req.id, path: memfd ? `memfd:${req.id}` : link, kind: memfd ? 'memfd' : 'file', created: false },
      req.fd,
      size,
      false,
    );
  }

  get(id: string): MemoryInfo | undefined {
    const entry = this.entries.get(id);
    return entry === undefined ? undefined : { ...entry.info };
  }

  list(): MemoryInfo[] {
    return [...this.entries.values()].map((e) => ({ ...e.info }));
  }

  release(id: string): void {
    const entry = this.entry(id);
    if (entry.info.mappedEntries > 0) {
      throw new MemoryError(
        'IN_USE',
        `memory ${id} is still mapped by ${entry.info.mappedEntries} IOTLB entries`,
        'id',
      );
    }
    // A created file is kept: it may hold guest data and a restarted agent re-opens it by path.
    this.entries.delete(id);
    unmapAndClose(entry);
  }

  translate(id: string, offset: bigint, size: bigint): bigint {
    const err = this.check(id, offset, size);
    if (err !== undefined) throw err;
    return this.entry(id).info.uaddr + offset;
  }

  check(id: string, offset: bigint, size: bigint): MemoryError | undefined {
    const entry = this.entries.get(id);
    if (entry === undefined) return notFound(id);
    const memSize = entry.info.size;
    if (offset < 0n || offset > U64_MAX)
      return new MemoryError('OUT_OF_BOUNDS', `offset ${offset} is not a u64`, 'offset');
    if (size <= 0n || size > U64_MAX)
      return new MemoryError('OUT_OF_BOUNDS', `size ${size} must be 1..2^64-1`, 'size');
    if (offset >= memSize) {
      return new MemoryError(
        'OUT_OF_BOUNDS',
        `offset 0x${offset.toString(16)} is past the end of ${id} (size 0x${memSize.toString(16)})`,
        'offset',
      );
    }
    // bigint arithmetic cannot wrap, so offset+size is exact.
    if (offset + size > memSize) {
      return new MemoryError(
        'OUT_OF_BOUNDS',
        `[0x${offset.toString(16)}, +0x${size.toString(16)}) runs past the end of ${id} (size 0x${memSize.toString(16)})`,
        'size',
      );
    }
    return undefined;
  }

  retain(id: string): void {
    this.entry(id).info.mappedEntries++;
  }

  unretain(id: string): void {
    const info = this.entry(id).info;
    if (info.mappedEntries === 0) throw new Error(`unretain of memory ${id} with no mapped entries`);
    info.mappedEntries--;
  }

  read(id: string, offset: bigint, length: number): Buffer {
    return copyFromAddress(this.translate(id, offset, copyLength(length)), length);
  }

  write(id: string, offset: bigint, data: Uint8Array): void {
    copyToAddress(this.translate(id, offset, copyLength(data.byteLength)), data);
  }

  closeAll(): void {
    const errors: unknown[] = [];
    for (const entry of this.entries.values()) {
      try {
        unmapAndClose(entry);
      } catch (e) {
        errors.push(e);
      }
    }
    this.entries.clear();
    if (errors.length > 0) throw new AggregateError(errors, 'closing backing memory failed');
  }

  private entry(id: string): Entry {
    const entry = this.entries.get(id);
    if (entry === undefined) throw notFound(id);
    return entry;
  }

  private checkNewId(id: string): void {
    if (!isValidId(id)) throw new MemoryError('INVALID_ID', `id ${ID_RULE}`, 'id');
    if (this.entries.has(id)) throw new MemoryError('ALREADY_EXISTS', `memory ${id} already exists`, 'id');
  }

  /** `<stateDir>/memory`, mode 0700, and a real directory (not a symlink planted elsewhere). */
  private ensureMemoryDir(): string {
    try {
      fs.mkdirSync(this.memoryDir, { recursive: true, mode: 0o700 });
      if (!fs.lstatSync(this.memoryDir).isDirectory()) {
        throw new MemoryError('PATH_REFUSED', `${this.memoryDir} is not a directory`, 'id');
      }
      fs.chmodSync(this.memoryDir, 0o700);
      return fs.realpathSync(this.memoryDir);
    } catch (e) {
      if (e instanceof MemoryError) throw e;
      throw systemError(e, `cannot prepare ${this.memoryDir}`, 'id');
    }
  }

  /** Sizes (when `resize`) and maps the whole of `fd`, then registers it; closes `fd` on failure. */
  private mapAndAdd(
    base: Pick<MemoryInfo, 'id' | 'path' | 'kind' | 'created'>,
    fd: number,
    size: bigint,
    resize: boolean,
  ): MemoryInfo {
    try {
      if (resize) sys(() => ftruncate(fd, size), 'ftruncate', 'size');
      const uaddr = sys(() => mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd), 'mmap', 'size');
      const info: MemoryInfo = { ...base, size, uaddr, mappedEntries: 0 };
      this.entries.set(info.id, { info, fd });
      return { ...info };
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }
}

function unmapAndClose(entry: Entry): void {
  try {
    sys(() => munmap(entry.info.uaddr, entry.info.size), 'munmap', 'id');
  } finally {
    fs.closeSync(entry.fd);
  }
}

function notFound(id: string): MemoryError {
  return new MemoryError('NOT_FOUND', `no memory ${id}`, 'id');
}

function checkSize(size: bigint, field: string): void {
  if (size <= 0n || size % PAGE_SIZE !== 0n || size > MAX_SIZE) {
    throw new MemoryError(
      'INVALID_SIZE',
      `size ${size} must be a positive multiple of ${PAGE_SIZE} and at most 2^63-${PAGE_SIZE}`,
      field,
    );
  }
}

/** A Buffer length as a bigint for the bounds check; lengths are plain JS numbers below 2^31. */
function copyLength(length: number): bigint {
  if (!Number.isInteger(length) || length <= 0 || length >= MAX_COPY) {
    throw new MemoryError('OUT_OF_BOUNDS', `length ${length} must be an integer in 1..2^31-1`, 'size');
  }
  return BigInt(length);
}

/** Runs a libc call, turning a SysError into MemoryError SYSTEM. */
function sys<T>(call: () => T, what: string, field: string): T {
  try {
    return call();
  } catch (e) {
    throw systemError(e, `${what} failed`, field);
  }
}

function systemError(e: unknown, what: string, field: string): unknown {
  if (e instanceof SysError) return new MemoryError('SYSTEM', `${what}: ${e.message}`, field, e.errno);
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (typeof code === 'string') return new MemoryError('SYSTEM', `${what}: ${code}`, field, code);
  return e;
}
