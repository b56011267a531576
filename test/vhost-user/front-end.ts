/**
 * A scripted vhost-user front-end (the VMM's end) for tests: sends requests with fds, reads whole
 * replies, and tells when the backend closed the connection. Plus memfds to share and a count of
 * the fds a test passed (by what they are), to prove none leaks.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import {
  connectUnix,
  FdSocketBuffer,
  ftruncate,
  MFD_CLOEXEC,
  memfdCreate,
  SysError,
  unixSocket,
  watchReadable,
} from '../../src/sys/libc.ts';
import { decodeReply, encodeRequest, type MemoryRegion } from '../../src/vhost-user/wire.ts';

/** The name every test memfd carries, so {@link passedFds} can find them. */
const MEMFD_NAME = 'vu-test';

/** The front-end's end of a connection (a socketpair's, or one connected to a listening path). */
export class FrontEnd {
  readonly io = new FdSocketBuffer();
  constructor(readonly fd: number) {}
  /** Connects to a backend listening on `socketPath`. */
  static connect(socketPath: string): FrontEnd {
    const fd = unixSocket();
    try {
      if (!connectUnix(fd, socketPath)) throw new Error(`${socketPath}: no backend is accepting`);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
    return new FrontEnd(fd);
  }
  send(request: number, payload: Buffer, fds: number[] = [], needReply = false): void {
    this.io.send(this.fd, encodeRequest(request, payload, needReply), fds);
  }
  raw(frame: Buffer, fds: number[] = []): void {
    this.io.send(this.fd, frame, fds);
  }
  /** The next reply (whole frame); null when the backend closed the connection instead. */
  async reply(request: number): Promise<Buffer | null> {
    const header = await this.read(12);
    if (header === null) return null;
    const size = header.readUInt32LE(8);
    const payload = size === 0 ? Buffer.alloc(0) : await this.read(size);
    assert.ok(payload, 'a whole reply');
    return decodeReply(Buffer.concat([header, payload]), request);
  }
  /** Bytes, or null at EOF (a reset counts: the backend closed with our data unread). */
  private receive(length: number): { data: Buffer; eof: boolean } | null {
    try {
      return this.io.receive(this.fd, length);
    } catch (e) {
      if (e instanceof SysError && e.errno === 'ECONNRESET') return { data: Buffer.alloc(0), eof: true };
      throw e;
    }
  }
  private read(length: number): Promise<Buffer | null> {
    const now = this.receive(length);
    if (now !== null) return Promise.resolve(now.eof ? null : now.data);
    return new Promise((resolve, reject) => {
      const w = watchReadable(
        this.fd,
        () => {
          const got = this.receive(length);
          if (got === null) return;
          w.stop();
          resolve(got.eof ? null : got.data);
        },
        reject,
      );
    });
  }
  async u64(request: number): Promise<bigint> {
    const r = await this.reply(request);
    assert.ok(r, `a reply to ${request}`);
    return r.readBigUInt64LE(0);
  }
  /** Resolves when the backend has closed its end. */
  async eof(): Promise<void> {
    assert.equal(await this.reply(0), null);
  }
  private closed = false;
  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
    this.io.free();
  }
}

export function memfd(size: bigint): number {
  const fd = memfdCreate(MEMFD_NAME, MFD_CLOEXEC);
  ftruncate(fd, size);
  return fd;
}

/**
 * The fds a test passes to a backend, by what they are: received copies of our memfds and
 * eventfds. Counting every fd of the process would also count what the runtime opens and closes
 * on its own (libuv, the test runner), which is not the backend's doing.
 */
export function passedFds(): number {
  let n = 0;
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    let target: string;
    try {
      target = fs.readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      continue; // closed while we looked (the directory's own fd, a runtime fd)
    }
    if (target.startsWith(`/memfd:${MEMFD_NAME}`) || target === 'anon_inode:[eventfd]') n++;
  }
  return n;
}

const MiB = 1n << 20n;

/** Guest RAM as QEMU describes it: low memory at guest address 0, the rest above 4 GiB, one file. */
export const lowRam: MemoryRegion = {
  guestAddr: 0n,
  size: 8n * MiB,
  userAddr: 0x7f00_0000_0000n,
  mmapOffset: 0n,
};
export const highRam: MemoryRegion = {
  guestAddr: 0x1_0000_0000n,
  size: 8n * MiB,
  userAddr: 0x7f00_4000_0000n,
  mmapOffset: 8n * MiB,
};
