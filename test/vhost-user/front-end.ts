/** A scripted vhost-user front-end over one end of a socketpair, for tests of the backend side. */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { FdSocketBuffer, SysError, watchReadable } from '../../src/sys/libc.ts';
import { decodeReply, encodeRequest } from '../../src/vhost-user/wire.ts';

/** The front-end's end of the socketpair. */
export class FrontEnd {
  readonly io = new FdSocketBuffer();
  constructor(readonly fd: number) {}
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
