/**
 * The front-end's end of a vhost-user socket: one request at a time, each reply awaited with a
 * bounded wait. The frames are the project's own (src/vhost-user/wire.ts); fds travel as SCM_RIGHTS
 * through FdSocketBuffer. With REPLY_ACK negotiated every request that has no reply of its own is
 * sent with NEED_REPLY, so a refusal is an error here, never a silent success.
 */
import { closeFds } from '../../src/vhost-user/transport.ts';
import {
  decodeReply,
  encodeRequest,
  HEADER_SIZE,
  MAX_PAYLOAD,
  Request,
  WireError,
} from '../../src/vhost-user/wire.ts';
import { FdWaiter } from './fd-wait.ts';
import { connectUnix, FdSocketBuffer, SysError, unixSocket } from '../../src/sys/libc.ts';

const REQUEST_NAMES = new Map<number, string>(Object.entries(Request).map(([name, code]) => [code, name]));

export function requestName(request: number): string {
  return REQUEST_NAMES.get(request) ?? `request ${request}`;
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class VhostUserChannel {
  private readonly io = new FdSocketBuffer();
  private readonly readable: FdWaiter;
  private open = true;
  /** Set once REPLY_ACK is negotiated: requests without a reply then ask for an ack. */
  replyAck = false;

  private constructor(
    private readonly fd: number,
    /** Bound on every wait for a reply, in ms. */
    private readonly replyWaitMs: number,
  ) {
    this.readable = new FdWaiter(fd);
  }

  /** Connects to a listening back-end, retrying (bounded) while it is not accepting yet. */
  static async connect(socketPath: string, replyWaitMs: number): Promise<VhostUserChannel> {
    const fd = unixSocket();
    try {
      const deadline = Date.now() + replyWaitMs;
      while (!connectUnix(fd, socketPath)) {
        if (Date.now() > deadline)
          throw new Error(`${socketPath}: no vhost-user back-end accepted within ${replyWaitMs} ms`);
        await delay(20);
      }
    } catch (e) {
      closeFds([fd]);
      throw e;
    }
    return new VhostUserChannel(fd, replyWaitMs);
  }

  /** Sends a request that has a reply of its own (GET_*) and returns the reply's payload. */
  async call(
    request: number,
    payload: Buffer = Buffer.alloc(0),
    fds: readonly number[] = [],
  ): Promise<Buffer> {
    this.send(encodeRequest(request, payload), fds);
    return this.reply(request);
  }

  /**
   * Sends a request that has no reply of its own (SET_*, ADD_MEM_REG, ...). With REPLY_ACK it
   * waits for the ack and throws when the back-end refused (a non-zero u64).
   */
  async tell(request: number, payload: Buffer = Buffer.alloc(0), fds: readonly number[] = []): Promise<void> {
    this.send(encodeRequest(request, payload, this.replyAck), fds);
    if (!this.replyAck) return;
    const ack = await this.reply(request);
    if (ack.byteLength !== 8)
      throw new WireError(`${requestName(request)}: ack of ${ack.byteLength} bytes`, 'ack');
    const status = ack.readBigUInt64LE(0);
    if (status !== 0n)
      throw new Error(`the vhost-user back-end refused ${requestName(request)} (ack ${status})`);
  }

  /**
   * Whether the back-end has closed the connection, checked without waiting while no request is
   * outstanding (nothing may arrive then: a message is a protocol error).
   */
  peerClosed(): boolean {
    if (!this.open) return true;
    let got: ReturnType<FdSocketBuffer['receive']>;
    try {
      got = this.io.receive(this.fd, 1);
    } catch (e) {
      if (e instanceof SysError && e.errno === 'ECONNRESET') return true;
      throw e;
    }
    if (got === null) return false;
    closeFds(got.fds);
    if (got.eof) return true;
    throw new WireError('the vhost-user back-end sent a message nobody asked for', 'header');
  }

  close(): void {
    if (!this.open) return;
    this.open = false;
    this.readable.stop();
    closeFds([this.fd]);
    this.io.free();
  }

  private send(frame: Buffer, fds: readonly number[]): void {
    if (!this.open) throw new Error('vhost-user channel is closed');
    const n = this.io.send(this.fd, frame, fds);
    if (n !== frame.byteLength) {
      throw new Error(
        `vhost-user back-end took ${n} of ${frame.byteLength} bytes of ${requestName(frame.readUInt32LE(0))}`,
      );
    }
  }

  private async reply(request: number): Promise<Buffer> {
    const what = `reply to ${requestName(request)}`;
    const header = await this.read(HEADER_SIZE, what);
    const size = header.readUInt32LE(8);
    if (size > MAX_PAYLOAD) throw new WireError(`${what}: payload of ${size} bytes`, 'header.size');
    const payload = size === 0 ? Buffer.alloc(0) : await this.read(size, what);
    return decodeReply(Buffer.concat([header, payload]), request);
  }

  /** Exactly `length` bytes, within the reply wait; EOF or an fd in a reply is an error. */
  private async read(length: number, what: string): Promise<Buffer> {
    const chunks: Buffer[] = [];
    let have = 0;
    const deadline = Date.now() + this.replyWaitMs;
    while (have < length) {
      if (!this.open) throw new Error(`vhost-user channel closed while waiting for a ${what}`);
      const got = this.io.receive(this.fd, length - have);
      if (got === null) {
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`no ${what} within ${this.replyWaitMs} ms`);
        await this.readable.wait(left);
        continue;
      }
      if (got.fds.length > 0) {
        closeFds(got.fds);
        throw new WireError(`${what} carried ${got.fds.length} fds`, 'fds');
      }
      if (got.eof)
        throw new Error(`the vhost-user back-end closed the connection instead of sending a ${what}`);
      chunks.push(got.data);
      have += got.data.byteLength;
    }
    return Buffer.concat(chunks);
  }
}
