/** Shared fixtures of the device tests: a real shared-memory registry, a recording transport, raw messages. */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import assert from 'node:assert/strict';
import type { SimulatedVdpaConfig } from '../../src/device/sim-kernel.ts';
import { TransportError, type VhostTransport } from '../../src/device/transport.ts';
import { FULL_IOVA_RANGE } from '../../src/iotlb/types.ts';
import { SharedMemoryRegistry } from '../../src/memory/registry.ts';
import {
  ftruncate,
  MFD_CLOEXEC,
  memfdCreate,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
} from '../../src/sys/libc.ts';

export const PAGE = 0x1000n;
const MAP_PRIVATE = 0x02;

export interface TmpRegistry {
  registry: SharedMemoryRegistry;
  stateDir: string;
  cleanup(): void;
}

/** A real SharedMemoryRegistry (memfd / file + mmap MAP_SHARED) in a fresh state directory. */
export function tmpRegistry(): TmpRegistry {
  const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-device-'));
  const registry = new SharedMemoryRegistry({ allowedRoots: [], stateDir });
  return {
    registry,
    stateDir,
    cleanup() {
      registry.closeAll();
      fs.rmSync(stateDir, { recursive: true, force: true });
    },
  };
}

export interface IoctlCall {
  request: number;
  /** The argument's bytes as they were when the call returned (null for `_IO` requests). */
  arg: Buffer | null;
}

/**
 * Records every call to a transport: either answering from `answers` (request -> fill the
 * argument or throw), or passing through to `inner` (e.g. a simulated kernel).
 */
export class RecordingTransport implements VhostTransport {
  readonly ioctls: IoctlCall[] = [];
  readonly writes: Buffer[] = [];
  closed = 0;
  /** Makes the next writes fail: each call pops one errno (undefined = accept). */
  readonly writeErrors: (string | undefined)[] = [];

  constructor(
    private readonly answers: Map<number, (arg: Buffer | null) => void> = new Map(),
    private readonly inner?: VhostTransport,
  ) {}

  ioctl(request: number, arg?: Uint8Array): void {
    const buf = arg ? Buffer.from(arg.buffer, arg.byteOffset, arg.byteLength) : null;
    try {
      if (this.inner) this.inner.ioctl(request, arg);
      else {
        const answer = this.answers.get(request);
        if (!answer) throw new TransportError('ENOTTY', `no answer for 0x${request.toString(16)}`);
        answer(buf);
      }
    } finally {
      this.ioctls.push({ request, arg: buf ? Buffer.from(buf) : null });
    }
  }

  write(msg: Uint8Array): void | Promise<void> {
    this.writes.push(Buffer.from(msg));
    const errno = this.writeErrors.shift();
    if (errno) throw new TransportError(errno, `refused (${errno})`);
    return this.inner?.write(msg);
  }

  close(): void {
    this.closed++;
    this.inner?.close();
  }
}

/** A 72-byte message built by hand from the layout in the uapi headers (not with src/uapi). */
export function rawMsg(
  version: 1 | 2,
  asid: number,
  type: number,
  iova = 0n,
  size = 0n,
  uaddr = 0n,
  perm = 0,
): Buffer {
  const b = Buffer.alloc(72);
  b.writeUInt32LE(version, 0);
  if (version === 2) b.writeUInt32LE(asid, 4);
  b.writeBigUInt64LE(iova, 8);
  b.writeBigUInt64LE(size, 16);
  b.writeBigUInt64LE(uaddr, 24);
  b.writeUInt8(perm, 32);
  b.writeUInt8(type, 33);
  return b;
}

/**
 * Private memory the registry does not know (a MAP_PRIVATE mapping of a memfd: pages of its own
 * once written, like anonymous memory) of `pages` pages, with the pages in `holes` unmapped again.
 */
export function privateMemory(pages: bigint, holes: bigint[] = [], prot = PROT_READ | PROT_WRITE) {
  const fd = memfdCreate('private', MFD_CLOEXEC);
  ftruncate(fd, pages * PAGE);
  const addr = mmap(pages * PAGE, prot, MAP_PRIVATE, fd);
  fs.closeSync(fd);
  for (const h of holes) munmap(addr + h * PAGE, PAGE);
  return {
    addr,
    free() {
      for (let p = 0n; p < pages; p++) if (!holes.includes(p)) munmap(addr + p * PAGE, PAGE);
    },
  };
}

/** The simulated kernel configured as vp_vdpa (a platform IOMMU, PA mode), with `over` on top. */
export function vpVdpaConfig(over: Partial<SimulatedVdpaConfig> = {}): SimulatedVdpaConfig {
  return {
    deviceId: 1,
    iommu: 'platform',
    iovaRange: FULL_IOVA_RANGE,
    asNum: 1,
    groupNum: 1,
    vqCount: 3,
    configSize: 4096,
    offeredFeatures: 0x10en,
    pushDelayMs: 0,
    ...over,
  };
}

/** The errno of the TransportError `fn` throws, or undefined when it returns. */
export function errnoOf(fn: () => unknown): string | undefined {
  try {
    fn();
    return undefined;
  } catch (e) {
    assert.ok(e instanceof TransportError, String(e));
    return e.errno;
  }
}
