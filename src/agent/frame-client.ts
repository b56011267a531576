/**
 * The client end of the agent's framed protocol (frames.ts) on its unix socket: one connection,
 * any number of calls in flight on it, answers matched to calls by id in whatever order they come.
 * Payloads are bytes here; AgentClient (client.ts) codes the messages.
 *
 * - A call made with no connection tries to connect once and fails with UNAVAILABLE if the agent
 *   is not there; with `waitForReady` it tries again, paced by the reconnect backoff and at once
 *   when the socket's name changes (a new agent bound it), until its deadline (then DEADLINE_EXCEEDED).
 * - Every call has a deadline: past it the call fails with DEADLINE_EXCEEDED, the agent is told to
 *   drop it (a `cancel` frame), and an answer that still comes is dropped.
 * - When the connection goes, every call on it fails with UNAVAILABLE, and `lost` is emitted.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { status } from '@grpc/grpc-js';
import { type AgentError, callFailed, errorFromWire } from './errors.ts';
import { type Frame, FrameError, FrameKind, FrameWriter, readFrames } from './frames.ts';
import { callErrorCoding } from './proto.ts';
import { SocketWatch } from './socket-watch.ts';

/**
 * The pacing of a waiting call's attempts to reach the socket while the agent is away. An attempt
 * at a unix socket that nobody serves is one failed connect(2), so the cap is short: where the
 * socket's directory cannot be watched, a new agent is still found within 200 ms of serving.
 */
export interface ReconnectOptions {
  /** First delay after a failed attempt, ms (default 50); doubled after every failed attempt. */
  initialDelayMs?: number;
  /** Cap of the delay, ms (default 200). */
  maxDelayMs?: number;
}

export interface FrameCallOptions {
  /** Epoch ms. */
  deadline: number;
  /** Wait for the agent (retrying the socket) until the deadline, rather than fail at once. */
  waitForReady?: boolean;
}

export interface FrameStream {
  cancel(): void;
}

export interface FrameClientEvents {
  /** The connection went (UNAVAILABLE, with the reason). */
  lost: [error: AgentError];
}

interface PendingCall {
  resolve(payload: Buffer): void;
  reject(error: AgentError): void;
  timer: NodeJS.Timeout;
}

interface OpenStream {
  event(payload: Buffer): void;
  end(error: AgentError | undefined): void;
}

/** One connection and what is in flight on it. */
interface Connection {
  socket: net.Socket;
  writer: FrameWriter;
  /** Why it is going, when we know better than the socket. */
  reason?: string;
}

/** The longest delay setTimeout takes (a longer one fires at once). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** The largest id before wrapping round (ids are u32 on the wire; 0 is never used). */
const MAX_ID = 0xffff_ffff;

export class FrameClient extends EventEmitter<FrameClientEvents> {
  private connection: Connection | undefined;
  private connecting: Promise<Connection> | undefined;
  private closed = false;
  private lastId = 0;
  private readonly calls = new Map<number, PendingCall>();
  private readonly streams = new Map<number, OpenStream>();
  private readonly backoff: Required<ReconnectOptions>;

  constructor(
    private readonly socketPath: string,
    reconnect: ReconnectOptions = {},
  ) {
    super();
    this.backoff = {
      initialDelayMs: reconnect.initialDelayMs ?? 50,
      maxDelayMs: reconnect.maxDelayMs ?? 200,
    };
  }

  get connected(): boolean {
    return this.connection !== undefined;
  }

  /** Sends `payload` to `method`; resolves with the answer's payload, rejects with an AgentError. */
  async call(method: string, payload: Buffer, opts: FrameCallOptions): Promise<Buffer> {
    const conn = await this.reach(opts);
    return new Promise((resolve, reject) => {
      if (this.connection !== conn) {
        reject(callFailed(status.UNAVAILABLE, 'lost the connection to the agent'));
        return;
      }
      const id = this.nextId();
      const timer = setTimeout(
        () => {
          if (!this.calls.delete(id)) return;
          this.sendQuietly(conn, { id, kind: FrameKind.cancel, method: '', payload: EMPTY });
          reject(
            callFailed(status.DEADLINE_EXCEEDED, `${method}: no answer from the agent within its deadline`),
          );
        },
        Math.min(Math.max(0, opts.deadline - Date.now()), MAX_TIMER_MS),
      );
      this.calls.set(id, { resolve, reject, timer });
      try {
        conn.writer.write({ id, kind: FrameKind.request, method, payload });
      } catch (e) {
        this.calls.delete(id);
        clearTimeout(timer);
        if (!(e instanceof FrameError)) throw e;
        reject(callFailed(status.RESOURCE_EXHAUSTED, `${method}: ${e.message}`));
      }
    });
  }

  /**
   * Opens a stream of `method`: `event` for each payload, then `ended` once, with the error when it
   * failed, undefined when the agent ended it or it was cancelled.
   */
  stream(
    method: string,
    payload: Buffer,
    opts: FrameCallOptions,
    event: (payload: Buffer) => void,
    ended: (error: AgentError | undefined) => void,
  ): FrameStream {
    let done = false;
    let sent: { id: number; conn: Connection } | undefined;
    const end = (error: AgentError | undefined) => {
      if (done) return;
      done = true;
      if (sent !== undefined) this.streams.delete(sent.id);
      ended(error);
    };
    this.reach(opts).then(
      (conn) => {
        if (done) return;
        const id = this.nextId();
        sent = { id, conn };
        this.streams.set(id, { event, end });
        conn.writer.write({ id, kind: FrameKind.request, method, payload });
      },
      (error: AgentError) => end(error),
    );
    return {
      cancel: () => {
        if (done) return;
        if (sent !== undefined)
          this.sendQuietly(sent.conn, { id: sent.id, kind: FrameKind.cancel, method: '', payload: EMPTY });
        process.nextTick(() => end(undefined));
      },
    };
  }

  /** Closes the connection; calls in flight fail with CANCELLED, streams end, nothing more is sent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    const conn = this.connection;
    this.connection = undefined;
    this.failAll(callFailed(status.CANCELLED, 'the agent client is closed'), true);
    conn?.socket.destroy();
  }

  /**
   * The connection, made now if there is none (and again until the deadline with waitForReady:
   * after each backoff delay, or at once when the socket's name changes, socket-watch.ts).
   */
  private async reach(opts: FrameCallOptions): Promise<Connection> {
    let delay = this.backoff.initialDelayMs;
    let watch: SocketWatch | undefined;
    try {
      for (;;) {
        if (this.closed) throw callFailed(status.CANCELLED, 'the agent client is closed');
        if (this.connection !== undefined) return this.connection;
        // Watched from before the first attempt: a socket bound meanwhile is not missed.
        if (opts.waitForReady) watch ??= new SocketWatch(this.socketPath);
        const left = opts.deadline - Date.now();
        let why: string;
        try {
          return await withinMs(this.connectOnce(), left);
        } catch (e) {
          why = e === TOO_LATE ? 'no connection' : ((e as NodeJS.ErrnoException).code ?? String(e));
        }
        const unreached = `the agent is not reachable at ${this.socketPath} (${why})`;
        if (!opts.waitForReady) throw callFailed(status.UNAVAILABLE, unreached);
        const wait = Math.min(delay, opts.deadline - Date.now());
        if (wait <= 0) throw callFailed(status.DEADLINE_EXCEEDED, `${unreached}, and its deadline passed`);
        await watch!.wait(wait);
        delay = Math.min(delay * 2, this.backoff.maxDelayMs);
      }
    } finally {
      watch?.close();
    }
  }

  /** One attempt at the socket, shared by every call waiting for it. */
  private connectOnce(): Promise<Connection> {
    if (this.connecting !== undefined) return this.connecting;
    const attempt = new Promise<Connection>((resolve, reject) => {
      const socket = net.connect(this.socketPath);
      const failed = (err: Error) => {
        socket.destroy();
        reject(err);
      };
      socket.once('error', failed);
      socket.once('connect', () => {
        socket.off('error', failed);
        if (this.closed) {
          socket.destroy();
          reject(new Error('closed'));
          return;
        }
        resolve(this.adopt(socket));
      });
    });
    this.connecting = attempt;
    const settled = () => {
      if (this.connecting === attempt) this.connecting = undefined;
    };
    attempt.then(settled, settled);
    return attempt;
  }

  private adopt(socket: net.Socket): Connection {
    const conn: Connection = { socket, writer: new FrameWriter(socket) };
    this.connection = conn;
    readFrames(
      socket,
      (frame) => this.dispatch(conn, frame),
      (reason) => {
        conn.reason = `the agent sent bytes that are no frames (${reason})`;
      },
    );
    socket.on('error', (err) => {
      conn.reason ??= err.message;
    });
    socket.on('close', () => this.dropped(conn));
    return conn;
  }

  private dispatch(conn: Connection, frame: Frame): void {
    const { id, kind, payload } = frame;
    switch (kind) {
      case FrameKind.answer: {
        const call = this.takeCall(id);
        call?.resolve(payload);
        return;
      }
      case FrameKind.error: {
        const call = this.takeCall(id);
        const stream = call === undefined ? this.streams.get(id) : undefined;
        if (call === undefined && stream === undefined) return; // too late: its caller gave up
        let error: AgentError;
        try {
          error = errorFromWire(callErrorCoding.deserialize(payload));
        } catch (e) {
          error = callFailed(
            status.INTERNAL,
            `the agent's error could not be decoded: ${(e as Error).message}`,
          );
        }
        call?.reject(error);
        stream?.end(error);
        return;
      }
      case FrameKind.event:
        this.streams.get(id)?.event(payload);
        return;
      case FrameKind.end:
        this.streams.get(id)?.end(undefined);
        return;
      default:
        conn.reason = `the agent sent a frame of kind ${kind}, which only a client sends`;
        conn.socket.destroy();
    }
  }

  private takeCall(id: number): PendingCall | undefined {
    const call = this.calls.get(id);
    if (call === undefined) return undefined;
    this.calls.delete(id);
    clearTimeout(call.timer);
    return call;
  }

  private dropped(conn: Connection): void {
    if (this.connection !== conn) return;
    this.connection = undefined;
    const why = conn.reason === undefined ? '' : `: ${conn.reason}`;
    const error = callFailed(status.UNAVAILABLE, `lost the connection to the agent${why}`);
    this.failAll(error, false);
    this.emit('lost', error);
  }

  /** Every call in flight fails with `error`; streams end, with it unless `quietly`. */
  private failAll(error: AgentError, quietly: boolean): void {
    const calls = [...this.calls.values()];
    const streams = [...this.streams.values()];
    this.calls.clear();
    this.streams.clear();
    for (const call of calls) {
      clearTimeout(call.timer);
      call.reject(error);
    }
    for (const stream of streams) stream.end(quietly ? undefined : error);
  }

  private sendQuietly(conn: Connection, frame: Frame): void {
    if (this.connection === conn) conn.writer.write(frame);
  }

  private nextId(): number {
    do {
      this.lastId = this.lastId === MAX_ID ? 1 : this.lastId + 1;
    } while (this.calls.has(this.lastId) || this.streams.has(this.lastId));
    return this.lastId;
  }
}

const EMPTY = Buffer.alloc(0);
const TOO_LATE = Symbol('too late');

/** `promise`, or a rejection with TOO_LATE after `ms`. */
function withinMs<T>(promise: Promise<T>, ms: number): Promise<T> {
  if (ms <= 0) return Promise.reject(TOO_LATE);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(TOO_LATE), Math.min(ms, MAX_TIMER_MS));
    promise.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}
