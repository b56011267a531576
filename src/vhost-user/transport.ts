/**
 * vhost-user over a unix stream socket, with the fds that travel as SCM_RIGHTS (Node's net reads
 * with read(), which drops them). Everything runs on the main thread: non-blocking recvmsg/sendmsg
 * through koffi, woken by koffi's poll on Node's own event loop (no thread, no libuv pool slot).
 *
 * Framing: exactly the 12-byte header is read first, then exactly `size` payload bytes, so the fds
 * the kernel attached to a message's first byte always arrive with that message and never with the
 * next. A frame is handed on only when complete; reading pauses until its handler has finished, so
 * messages are handled strictly one after the other.
 */
import fs from 'node:fs';
import {
  acceptUnix,
  bindListenUnix,
  FdSocketBuffer,
  type FdWatch,
  unixSocket,
  watchReadable,
} from '../sys/libc.ts';
import { decodeHeader, HEADER_SIZE, type Header } from './wire.ts';

/** One complete frame: its header (already checked), payload and the fds that came with it. */
export interface Frame {
  header: Header;
  payload: Buffer;
  /** Owned by the handler from now on: it must keep or close every one. */
  fds: number[];
}

export interface ConnectionHandler {
  /** Handles one frame; the next is read only after the returned promise settles. */
  frame(frame: Frame): Promise<void>;
  /** The connection closed: EOF (error undefined), a framing error, or a close() call. */
  closed(error: Error | undefined): void;
}

/** Closes fds and ignores EBADF-style failures: used on paths that are already failing. */
export function closeFds(fds: Iterable<number>): void {
  for (const fd of fds) {
    try {
      fs.closeSync(fd);
    } catch {
      // already closed
    }
  }
}

export class VhostUserConnection {
  private readonly io = new FdSocketBuffer();
  private readonly watch: FdWatch;
  private handler: ConnectionHandler | null = null;
  private header: Header | null = null;
  private chunks: Buffer[] = [];
  private have = 0;
  private fds: number[] = [];
  private busy = false;
  private open = true;

  /** Takes ownership of the connected socket `fd`. Nothing is read until {@link start}. */
  constructor(readonly fd: number) {
    this.watch = watchReadable(
      fd,
      () => this.readable(),
      (e) => this.close(e instanceof Error ? e : new Error(String(e))),
    );
    this.watch.pause();
  }

  get isOpen(): boolean {
    return this.open;
  }

  start(handler: ConnectionHandler): void {
    this.handler = handler;
    this.watch.resume();
  }

  /** Sends one whole frame; a peer that cannot take a small reply at once is a broken peer. */
  send(frame: Buffer, fds: readonly number[] = []): void {
    if (!this.open) throw new Error('vhost-user connection is closed');
    const n = this.io.send(this.fd, frame, fds);
    if (n !== frame.byteLength) {
      throw new Error(`vhost-user peer took ${n} of ${frame.byteLength} bytes of a reply`);
    }
  }

  /** Closes the socket, every fd of a frame still being read, and tells the handler once. */
  close(error?: Error): void {
    if (!this.open) return;
    this.open = false;
    this.watch.stop();
    closeFds(this.fds);
    this.fds = [];
    closeFds([this.fd]);
    this.io.free();
    this.handler?.closed(error);
  }

  private readable(): void {
    // Bounded: at most one complete frame per wake-up, then reading pauses for its handler.
    while (this.open && !this.busy) {
      const want = this.header === null ? HEADER_SIZE - this.have : this.header.size - this.have;
      if (want > 0) {
        const got = this.io.receive(this.fd, want);
        if (got === null) return;
        this.fds.push(...got.fds);
        if (got.fdsTruncated) {
          this.close(new Error('the peer sent more fds than one vhost-user message may carry'));
          return;
        }
        if (got.eof) {
          this.close(this.have === 0 && this.header === null ? undefined : new Error('EOF inside a message'));
          return;
        }
        this.chunks.push(got.data);
        this.have += got.data.byteLength;
        if (got.data.byteLength < want) continue;
      }
      if (this.header === null) {
        this.header = decodeHeader(Buffer.concat(this.chunks));
        this.chunks = [];
        this.have = 0;
        if (this.header.size > 0) continue;
      }
      const frame: Frame = { header: this.header, payload: Buffer.concat(this.chunks), fds: this.fds };
      this.header = null;
      this.chunks = [];
      this.have = 0;
      this.fds = [];
      this.dispatch(frame);
      return;
    }
  }

  private dispatch(frame: Frame): void {
    const handler = this.handler;
    if (handler === null) {
      closeFds(frame.fds);
      return;
    }
    this.busy = true;
    this.watch.pause();
    handler.frame(frame).then(
      () => {
        this.busy = false;
        if (!this.open) return;
        this.watch.resume();
        try {
          this.readable();
        } catch (e) {
          this.close(e instanceof Error ? e : new Error(String(e)));
        }
      },
      (e: unknown) => {
        this.busy = false;
        this.close(e instanceof Error ? e : new Error(String(e)));
      },
    );
  }
}

export interface ListenerOptions {
  path: string;
  /** Socket file mode; default 0600 (only the owner may connect). */
  mode?: number;
  onConnection(conn: VhostUserConnection): void;
  onError(error: Error): void;
}

/** A listening vhost-user socket; a stale socket file at the path is replaced, anything else refused. */
export class VhostUserListener {
  private readonly watch: FdWatch;
  private readonly fd: number;
  private open = true;

  constructor(readonly options: ListenerOptions) {
    removeStaleSocket(options.path);
    const fd = unixSocket();
    try {
      // The umask makes bind() create the socket file with the final mode: no window in which
      // another user could connect. Sync, so nothing else in this process sees the umask.
      const mode = options.mode ?? 0o600;
      const old = process.umask(0o777 & ~mode);
      try {
        bindListenUnix(fd, options.path, 4);
      } finally {
        process.umask(old);
      }
      fs.chmodSync(options.path, mode);
    } catch (e) {
      closeFds([fd]);
      throw e;
    }
    this.fd = fd;
    this.watch = watchReadable(
      fd,
      () => {
        // Bounded by the backlog: accept what is pending, then wait for the next wake-up.
        for (let i = 0; i < 16 && this.open; i++) {
          const conn = acceptUnix(this.fd);
          if (conn === null) return;
          options.onConnection(new VhostUserConnection(conn));
        }
      },
      (e) => options.onError(e instanceof Error ? e : new Error(String(e))),
    );
  }

  close(): void {
    if (!this.open) return;
    this.open = false;
    this.watch.stop();
    closeFds([this.fd]);
    fs.rmSync(this.options.path, { force: true });
  }
}

function removeStaleSocket(socketPath: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(socketPath);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new Error(`${socketPath} exists and is not a socket`);
  fs.rmSync(socketPath);
}
