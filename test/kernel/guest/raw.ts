/**
 * One open vhost-vdpa file, real (/dev/vhost-vdpa-0 through libc) or simulated
 * (src/device/sim-kernel.ts), driven by raw ioctls and writes, and the answer of a call as the
 * guest scripts compare it: write's return value, 'ok', or the errno name.
 */
import fs from 'node:fs';
import koffi from 'koffi';
import { TransportError, type VhostTransport } from '../../../src/device/transport.ts';
import { ioctlBuffer, ioctlNoArg, SysError } from '../../../src/sys/libc.ts';

const rawWrite = koffi.load('libc.so.6').func('long write(int fd, const void *buf, unsigned long count)');

export interface RawFile {
  ioctl(request: number, arg?: Uint8Array): void;
  /** Returns what write() returned (the kernel answers 72 for a message it took). */
  write(bytes: Uint8Array): Promise<number>;
  close(): void;
}

/** libuv names errno 95 ENOTSUP; the kernel and the simulator call it EOPNOTSUPP. */
export function errnoName(e: unknown): string {
  if (e instanceof SysError) return e.errno === 'ENOTSUP' ? 'EOPNOTSUPP' : e.errno;
  if (e instanceof TransportError) return e.errno;
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (typeof code === 'string') return code;
  throw e;
}

/** What a call answered: its number (write's return), 'ok', or the errno. */
export async function answer(fn: () => unknown): Promise<string> {
  try {
    const r = await fn();
    return typeof r === 'number' ? String(r) : 'ok';
  } catch (e) {
    return errnoName(e);
  }
}

export class RealFile implements RawFile {
  constructor(readonly fd: number) {}

  static open(node: string): RealFile {
    return new RealFile(fs.openSync(node, fs.constants.O_RDWR));
  }

  ioctl(request: number, arg?: Uint8Array): void {
    if (arg === undefined) ioctlNoArg(this.fd, request);
    else ioctlBuffer(this.fd, request, arg);
  }

  /**
   * write(2) itself: the kernel answers 72 even for a 40-byte write (R4), more than was asked,
   * which libuv's write loop (fs.writeSync) does not expect: it reported 0 or 72 depending on the
   * probes run before (most likely reading past its one buffer). A probe must see the kernel's own
   * answer.
   */
  async write(bytes: Uint8Array): Promise<number> {
    const n = Number(rawWrite(this.fd, bytes, bytes.length));
    if (n < 0) throw new SysError('write', koffi.errno());
    return n;
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}

export class SimFile implements RawFile {
  constructor(private readonly t: VhostTransport) {}
  ioctl(request: number, arg?: Uint8Array): void {
    this.t.ioctl(request, arg);
  }
  async write(bytes: Uint8Array): Promise<number> {
    await this.t.write(bytes);
    return 72; // the simulator takes a message whole or refuses it
  }
  close(): void {
    this.t.close();
  }
}
