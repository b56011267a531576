/**
 * The agent protocol served on the unix socket in frames (src/agent/frames.ts): each request frame
 * runs its handler (server.ts) and is answered with an `answer` or an `error` frame carrying the
 * call's id; calls on one connection run concurrently and are answered as they finish.
 * WatchAttachments answers with `event` frames until the subscription ends (`end`) or the client
 * sends `cancel`. A `cancel` of a unary call drops its answer. Bytes that are no frames close the
 * connection, with the reason logged.
 */
import net from 'node:net';
import { status } from '@grpc/grpc-js';
import type { Logger } from 'pino';
import type { Attachments } from '../../src/agent/attach.ts';
import { AgentError, callFailed, errorToWire, toAgentError } from '../../src/agent/errors.ts';
import { type Frame, FrameError, FrameKind, FrameWriter, readFrames } from '../../src/agent/frames.ts';
import { type AgentMethod, agentService, callErrorCoding } from '../../src/agent/proto.ts';
import { decodeMessage, encodeMessage } from '../../src/agent/sliced-codec.ts';
import { attachmentEventToWire } from '../../src/agent/wire.ts';
import { MemoryError } from '../../src/memory/types.ts';
import { requestArrived } from '../../src/sys/next-turn.ts';
import type { AgentHandlers } from './server.ts';

export interface FrameServer {
  /**
   * Stops accepting connections and calls; the calls in flight get `graceMs` to be answered, then
   * every connection is closed. Resolves once they all are.
   */
  close(graceMs: number): Promise<void>;
}

const EMPTY = Buffer.alloc(0);

/** One client connection: its unary calls in flight and its subscriptions. */
class Connection {
  readonly inFlight = new Set<number>();
  readonly watches = new Map<number, () => void>();
  private readonly writer: FrameWriter;

  constructor(
    readonly socket: net.Socket,
    private readonly serving: Serving,
  ) {
    this.writer = new FrameWriter(socket);
    readFrames(
      socket,
      (frame) => this.received(frame),
      (reason) =>
        serving.logger.warn({ reason }, 'closed a connection that sent bytes that are no agent frames'),
    );
    socket.on('error', (err) => serving.logger.debug({ err }, 'agent connection failed'));
    socket.on('close', () => {
      this.inFlight.clear();
      for (const unwatch of this.watches.values()) unwatch();
      this.watches.clear();
      serving.connections.delete(this);
    });
  }

  /** At shutdown: ends the subscriptions now, and the connection once no call is in flight. */
  endWhenIdle(): void {
    for (const [id, unwatch] of this.watches) {
      unwatch();
      this.send({ id, kind: FrameKind.end, method: '', payload: EMPTY });
    }
    this.watches.clear();
    if (this.inFlight.size === 0) this.socket.end();
  }

  private received(frame: Frame): void {
    const { id, kind } = frame;
    if (kind === FrameKind.cancel) {
      this.inFlight.delete(id);
      this.watches.get(id)?.();
      this.watches.delete(id);
      this.idle();
      return;
    }
    if (kind !== FrameKind.request) {
      this.serving.logger.warn({ kind }, 'closed a connection that sent a frame only the agent sends');
      this.socket.destroy();
      return;
    }
    const method = agentService[frame.method];
    if (this.serving.stopping) {
      this.refuse(id, callFailed(status.UNAVAILABLE, 'the agent is stopping'));
    } else if (method === undefined) {
      this.refuse(id, callFailed(status.UNIMPLEMENTED, `the agent protocol has no method ${frame.method}`));
    } else if (method.responseStream) {
      this.watch(id, method);
    } else {
      this.inFlight.add(id);
      requestArrived(frame.payload.length);
      this.serving.run(method, frame.payload).then(
        (answer) => this.answer(id, method.name, answer),
        (err: unknown) => this.failed(id, method.name, err),
      );
    }
  }

  private answer(id: number, method: string, payload: Buffer): void {
    if (!this.inFlight.delete(id)) return; // cancelled, or the connection is gone
    try {
      this.send({ id, kind: FrameKind.answer, method: '', payload });
    } catch (e) {
      if (!(e instanceof FrameError)) throw e;
      this.refuse(id, callFailed(status.RESOURCE_EXHAUSTED, `the answer to ${method}: ${e.message}`));
    }
    this.idle();
  }

  private failed(id: number, method: string, err: unknown): void {
    const e = toAgentError(err);
    this.serving.logFailure(method, e, err);
    if (!this.inFlight.delete(id)) return;
    this.refuse(id, e);
    this.idle();
  }

  private refuse(id: number, e: AgentError): void {
    this.send({ id, kind: FrameKind.error, method: '', payload: callErrorCoding.serialize(errorToWire(e)) });
  }

  private idle(): void {
    if (this.serving.stopping && this.inFlight.size === 0) this.socket.end();
  }

  /** WatchAttachments: every event from the subscription on, until the client cancels or the agent stops. */
  private watch(id: number, method: AgentMethod): void {
    const attachments = this.serving.attachments;
    if (attachments === undefined) {
      this.refuse(id, callFailed(status.UNIMPLEMENTED, 'this agent serves no vhost-user sockets'));
      return;
    }
    const unwatch = attachments.watch({
      event: (e) =>
        this.send({
          id,
          kind: FrameKind.event,
          method: '',
          payload: method.responseSerialize(attachmentEventToWire(e)),
        }),
      end: () => {
        if (this.watches.delete(id)) this.send({ id, kind: FrameKind.end, method: '', payload: EMPTY });
      },
    });
    this.watches.set(id, () => {
      if (unwatch()) this.serving.logger.debug('an attachment watcher left');
    });
    this.serving.logger.debug('an attachment watcher subscribed');
  }

  private send(frame: Frame): void {
    this.writer.write(frame);
  }
}

/** What every connection shares. */
class Serving {
  readonly connections = new Set<Connection>();
  stopping = false;

  constructor(
    readonly handlers: AgentHandlers,
    readonly logger: Logger,
    readonly attachments: Attachments | undefined,
  ) {}

  /** A unary call: the request decoded, handled, and the answer encoded (Apply's in slices). */
  async run(method: AgentMethod, payload: Buffer): Promise<Buffer> {
    let request: object;
    try {
      request = await decodeMessage(method, 'request', payload);
    } catch (e) {
      if (e instanceof AgentError) throw e; // a bad field, named (mapping-codec.ts)
      const why = `the ${method.name} request could not be decoded: ${(e as Error).message}`;
      throw new AgentError(status.INVALID_ARGUMENT, 'BAD_REQUEST', why);
    }
    const handler = this.handlers[method.name as keyof AgentHandlers] as (req: object) => Promise<object>;
    return encodeMessage(method, 'response', await handler(request));
  }

  logFailure(rpc: string, e: AgentError, err: unknown): void {
    const log = { rpc, code: e.code, status: e.statusName, field: e.field, errno: e.errno };
    if (e.status === status.INTERNAL) this.logger.error({ ...log, err }, e.message);
    // The caller was told less than this (src/memory/allowlist.ts): the log keeps the whole story.
    else if (err instanceof MemoryError && err.detail !== undefined)
      this.logger.warn({ ...log, detail: err.detail }, e.message);
    else this.logger.debug(log, e.message);
  }
}

/** Serves `handlers` on `socketPath` (which must not exist). */
export function serveFrames(
  socketPath: string,
  handlers: AgentHandlers,
  logger: Logger,
  attachments?: Attachments,
): Promise<FrameServer> {
  const serving = new Serving(handlers, logger, attachments);
  const server = net.createServer((socket) => {
    if (serving.stopping) {
      socket.destroy();
      return;
    }
    serving.connections.add(new Connection(socket, serving));
  });
  const close = async (graceMs: number) => {
    serving.stopping = true;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    for (const c of serving.connections) c.endWhenIdle();
    const cut = setTimeout(() => {
      for (const c of serving.connections) c.socket.destroy();
    }, graceMs);
    await closed;
    clearTimeout(cut);
  };
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => {
      server.off('error', reject);
      resolve({ close });
    });
  });
}
