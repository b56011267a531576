/**
 * Attached VMMs: one vhost-user socket per attached device, one VMM connection at a time on it.
 * The agent holds no policy, so the VMM's memory does not go straight to the device: each region's
 * file becomes registered memory (one id per file, shared by every device that gets it), and the
 * whole new asid-0 table goes to the API server as a request on WatchAttachments. The backend
 * replies to the VMM only once the API server answers (it owns the desired state and puts the
 * table through the device's queue); no watcher, an error answer or no answer in time is a refusal.
 * Memory no attached device uses any more is released once the change is settled.
 */
import { randomUUID } from 'node:crypto';
import { status } from '@grpc/grpc-js';
import type { Device } from '../device/types.ts';
import type { Mapping } from '../iotlb/types.ts';
import type { AdoptMemoryRequest, MemoryInfo, MemoryRegistry } from '../memory/types.ts';
import { dupCloexec } from '../sys/libc.ts';
import { type BackendLogger, VhostUserBackend, type VhostUserDeviceSide } from '../vhost-user/backend.ts';
import { fileKeyId, type MemoryDiff, regionIdentity, type TableRegion } from '../vhost-user/memory-table.ts';
import type { VhostUserConnection } from '../vhost-user/transport.ts';
import { AgentError } from './errors.ts';
import { type AttachSocket, listenAttachSocket } from './attach-socket.ts';
import type { AttachmentEvent, AttachmentInfo, AttachRequest, MemoryTableAnswer } from './wire.ts';

/** How the device side of a backend hands the VMM's memory changes on (its `memoryChanged`). */
export type AttachMemory = (diff: MemoryDiff) => Promise<void>;

/** Makes the device side of one VMM connection: what relays the vrings to `device`. */
export type DeviceSideFactory = (
  device: Device,
  memory: AttachMemory,
  logger: BackendLogger,
) => VhostUserDeviceSide;

/** The registry, with the adoption of memory a VMM shares by fd. */
export type AdoptingRegistry = MemoryRegistry & { adopt(req: AdoptMemoryRequest): MemoryInfo };

export interface AttachmentsLogger extends BackendLogger {
  error(obj: object, msg: string): void;
  debug(obj: object, msg: string): void;
}

export interface AttachmentsOptions {
  /** Sockets may only be made under this directory (it must exist). */
  attachDir: string;
  registry: AdoptingRegistry;
  deviceSide: DeviceSideFactory;
  /** How long a memory-table request waits for the API server's answer (default 30 s). */
  answerTimeoutMs?: number;
  logger: AttachmentsLogger;
}

/** A subscriber of WatchAttachments. */
export interface AttachmentWatcher {
  event(e: AttachmentEvent): void;
  /** The agent is stopping: no more events. */
  end(): void;
}

const DEFAULT_ANSWER_TIMEOUT_MS = 30_000;

/** A region of an accepted (or proposed) table, with the registered memory behind its file. */
interface Entry {
  region: TableRegion;
  memory: string;
}

/** One VMM connection and the memory table it has. */
interface Session {
  conn: VhostUserConnection;
  backend: VhostUserBackend;
  /** The table the API server last accepted for this connection. */
  table: Entry[];
  /** Tables waiting for the API server's answer: their memory must not be released meanwhile. */
  proposed: Set<Entry[]>;
}

interface Attachment {
  device: Device;
  socket: AttachSocket;
  /** The current (or last) VMM connection. */
  session: Session | null;
  connections: number;
}

interface Pending {
  /** The request, re-sent to a watcher that subscribes while it waits. */
  event: AttachmentEvent;
  settle(answer: MemoryTableAnswer | Error): void;
}

function toMapping(e: Entry): Mapping {
  return {
    asid: 0,
    iova: e.region.guestAddr,
    size: e.region.size,
    memory: e.memory,
    offset: e.region.mmapOffset,
    perm: 'rw',
  };
}

export class Attachments {
  private readonly attached = new Map<string, Attachment>();
  /** Every connection whose memory may still be in use: until closed with nothing in flight. */
  private readonly sessions = new Set<Session>();
  /** Registered memory per file (fileKeyId). */
  private readonly files = new Map<string, string>();
  private readonly watchers = new Set<AttachmentWatcher>();
  private readonly pending = new Map<string, Pending>();
  /** Devices and socket paths of Attach calls still under way. */
  private readonly claimedDevices = new Set<string>();
  private readonly claimedPaths = new Set<string>();
  private readonly answerTimeoutMs: number;
  private stopping = false;

  constructor(private readonly options: AttachmentsOptions) {
    this.answerTimeoutMs = options.answerTimeoutMs ?? DEFAULT_ANSWER_TIMEOUT_MS;
  }

  async attach(device: Device, req: Omit<AttachRequest, 'device'>): Promise<AttachmentInfo> {
    if (this.stopping) throw new AgentError(status.UNAVAILABLE, 'UNAVAILABLE', 'the agent is stopping');
    if (this.attached.has(device.name)) {
      const at = this.attached.get(device.name)!.socket.path;
      throw new AgentError(
        status.ALREADY_EXISTS,
        'ALREADY_ATTACHED',
        `device ${device.name} is already attached at ${at}; detach it first`,
        'device',
      );
    }
    const taken = [...this.attached.values()].find((a) => a.socket.path === req.socketPath);
    if (
      taken !== undefined ||
      this.claimedPaths.has(req.socketPath) ||
      this.claimedDevices.has(device.name)
    ) {
      throw new AgentError(
        status.ALREADY_EXISTS,
        taken === undefined ? 'ALREADY_ATTACHED' : 'PATH_IN_USE',
        taken === undefined
          ? `device ${device.name} or ${req.socketPath} is being attached right now`
          : `${req.socketPath} is the socket of device ${taken.device.name}`,
        taken === undefined ? 'device' : 'socketPath',
      );
    }
    // Claimed while the path is checked and probed: a second Attach must not replace the socket.
    this.claimedPaths.add(req.socketPath);
    this.claimedDevices.add(device.name);
    let attachment: Attachment | undefined;
    let socket: AttachSocket;
    try {
      socket = await listenAttachSocket(
        { attachDir: this.options.attachDir, socketPath: req.socketPath, group: req.group },
        {
          onConnection: (conn) => (attachment ? this.connected(attachment, conn) : conn.close()),
          onError: (e) =>
            this.options.logger.error(
              { device: device.name, reason: e.message },
              'vhost-user listener failed',
            ),
        },
      );
    } finally {
      this.claimedPaths.delete(req.socketPath);
      this.claimedDevices.delete(device.name);
    }
    if (this.stopping) {
      socket.listener.close();
      throw new AgentError(status.UNAVAILABLE, 'UNAVAILABLE', 'the agent is stopping');
    }
    attachment = {
      device,
      socket,
      session: null,
      connections: 0,
    };
    this.attached.set(device.name, attachment);
    this.options.logger.info(
      { device: device.name, socket: socket.path, mode: socket.mode.toString(8), group: socket.group },
      'serving vhost-user',
    );
    return this.info(attachment);
  }

  /** Closes the socket and the VMM connection; the VMM's memory goes once the API server unmapped it. */
  detach(deviceName: string): void {
    const a = this.attached.get(deviceName);
    if (a === undefined) {
      throw new AgentError(
        status.FAILED_PRECONDITION,
        'NOT_ATTACHED',
        `device ${deviceName} is not attached`,
        'device',
      );
    }
    this.attached.delete(deviceName);
    a.socket.listener.close();
    a.session?.conn.close();
    this.options.logger.info({ device: deviceName, socket: a.socket.path }, 'detached vhost-user');
  }

  describe(deviceName: string): AttachmentInfo | undefined {
    const a = this.attached.get(deviceName);
    return a === undefined ? undefined : this.info(a);
  }

  /**
   * `watching` at once, then the requests still waiting for an answer, then events as they
   * happen; returns the unsubscribe (true the first time).
   */
  watch(watcher: AttachmentWatcher): () => boolean {
    watcher.event({ type: 'watching', attached: [...this.attached.keys()] });
    for (const p of this.pending.values()) watcher.event(p.event);
    this.watchers.add(watcher);
    return () => this.watchers.delete(watcher);
  }

  answer(answer: MemoryTableAnswer): void {
    const p = this.pending.get(answer.requestId);
    if (p === undefined) {
      throw new AgentError(
        status.NOT_FOUND,
        'REQUEST_NOT_FOUND',
        `no memory-table request ${answer.requestId} is waiting (answered already, or expired)`,
        'requestId',
      );
    }
    p.settle(answer);
  }

  /**
   * Releases registered memory of VMMs that no attached device uses any more. Memory a device
   * still maps stays (the registry refuses): it goes at a later call, once the API server has
   * unmapped it; the agent calls this after every Apply.
   */
  releaseUnused(): void {
    const used = new Set<string>();
    for (const session of this.sessions) {
      for (const table of [session.table, ...session.proposed]) {
        for (const e of table) used.add(e.memory);
      }
    }
    const { registry, logger } = this.options;
    for (const [key, id] of this.files) {
      if (used.has(id)) continue;
      const m = registry.get(id);
      if (m !== undefined && m.mappedEntries > 0) continue;
      try {
        if (m !== undefined) registry.release(id);
      } catch (e) {
        logger.error({ memory: id, reason: (e as Error).message }, 'releasing memory of a VMM failed');
        continue;
      }
      this.files.delete(key);
      logger.info({ memory: id }, 'released memory no attached VMM uses');
    }
  }

  /** Detaches everything (the agent is stopping): pending requests are refused, connections closed. */
  async close(): Promise<void> {
    this.stopping = true;
    for (const p of [...this.pending.values()]) p.settle(new Error('the agent is stopping'));
    const closing = [...this.attached.values()];
    for (const a of closing) this.detach(a.device.name);
    await Promise.all(closing.map((a) => a.session?.backend.done));
    for (const w of this.watchers) w.end();
    this.watchers.clear();
  }

  private info(a: Attachment): AttachmentInfo {
    const b = a.session?.backend ?? null;
    return {
      device: a.device.name,
      socketPath: a.socket.path,
      mode: a.socket.mode,
      ...(a.socket.group === undefined ? {} : { group: a.socket.group }),
      vmmConnected: b !== null && !b.closed,
      negotiatedFeatures: b?.negotiatedFeatures ?? 0n,
      protocolFeatures: b?.negotiatedProtocolFeatures ?? 0n,
      vrings: b?.vringState() ?? [],
      memoryTable: (a.session?.table ?? []).map(toMapping),
      stats:
        b === null
          ? { messages: {}, memoryUpdates: 0, regionsAdded: 0, regionsRemoved: 0, refusals: 0 }
          : {
              ...b.stats,
              messages: { ...b.stats.messages },
            },
      connections: a.connections,
    };
  }

  private emit(e: AttachmentEvent): void {
    for (const w of this.watchers) {
      try {
        w.event(e);
      } catch (err) {
        this.options.logger.warn({ reason: (err as Error).message }, 'an attachment watcher failed');
      }
    }
  }

  private connected(a: Attachment, conn: VhostUserConnection): void {
    const { logger } = this.options;
    const device = a.device.name;
    if (this.attached.get(device) !== a) {
      conn.close();
      return;
    }
    if (a.session !== null && !a.session.backend.closed) {
      logger.warn({ device }, 'refused a second VMM connection: one is attached');
      conn.close(new Error('a VMM is already connected'));
      return;
    }
    let session: Session | undefined;
    let side: VhostUserDeviceSide;
    try {
      side = this.options.deviceSide(a.device, (diff) => this.memoryChanged(device, session!, diff), logger);
    } catch (e) {
      logger.error({ device, reason: (e as Error).message }, 'cannot serve the VMM: no device side');
      conn.close(e as Error);
      return;
    }
    const backend = new VhostUserBackend(conn, side, {
      logger: { info: logger.info.bind(logger), warn: logger.warn.bind(logger) },
    });
    session = { conn, backend, table: [], proposed: new Set() };
    this.sessions.add(session);
    a.session = session;
    a.connections++;
    logger.info({ device }, 'VMM connected');
    this.emit({ type: 'connected', device });
    void backend.done.then(() => {
      const reason = backend.error?.message ?? '';
      logger.info({ device, reason }, 'VMM disconnected');
      this.emit({ type: 'disconnected', device, reason });
      this.settled(session);
    });
  }

  /** The device side's memory: registers added files, asks the API server, settles the table. */
  private async memoryChanged(device: string, session: Session, diff: MemoryDiff): Promise<void> {
    const removed = new Set(diff.removed.map(regionIdentity));
    const next: Entry[] = session.table.filter((e) => !removed.has(regionIdentity(e.region)));
    session.proposed.add(next);
    try {
      for (const { fd, ...region } of diff.added) next.push({ region, memory: this.adopt(region, fd) });
      next.sort((x, y) => (x.region.guestAddr < y.region.guestAddr ? -1 : 1));
      await this.request(device, next.map(toMapping));
      session.table = next;
      if (session.backend.closed && next.length > 0) {
        // The VMM left while the API server applied this table: it must take it back.
        await this.request(device, []).catch((e: unknown) =>
          this.options.logger.warn(
            { device, reason: (e as Error).message },
            'the empty table was not applied',
          ),
        );
      }
    } finally {
      session.proposed.delete(next);
      this.settled(session);
    }
  }

  /**
   * After a change or the end of a connection: a closed connection has no table any more (the
   * backend forgot it, whatever the API server answered), and is forgotten once nothing is in
   * flight; then memory nothing uses is released.
   */
  private settled(session: Session): void {
    if (session.backend.closed) {
      session.table = [];
      if (session.proposed.size === 0) this.sessions.delete(session);
    }
    this.releaseUnused();
  }

  /** The registered memory of a region's file, adopting a dup of the VMM's fd the first time. */
  private adopt(region: TableRegion, fd: number): string {
    const key = fileKeyId(region.file);
    const known = this.files.get(key);
    if (known !== undefined && this.options.registry.get(known) !== undefined) return known;
    // One id per file: the same file reaching several devices is registered once.
    const id = `vhost-user-${region.file.dev}-${region.file.ino}`;
    this.options.registry.adopt({ id, fd: dupCloexec(fd) });
    this.files.set(key, id);
    return id;
  }

  private request(device: string, entries: Mapping[]): Promise<void> {
    if (this.stopping) return Promise.reject(new Error('the agent is stopping'));
    if (this.watchers.size === 0) {
      return Promise.reject(
        new Error('no API server watches attachments: the memory table cannot be applied'),
      );
    }
    const requestId = randomUUID();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => settle(new Error(`the API server did not answer within ${this.answerTimeoutMs} ms`)),
        this.answerTimeoutMs,
      );
      const settle = (outcome: MemoryTableAnswer | Error) => {
        clearTimeout(timer);
        this.pending.delete(requestId);
        if (outcome instanceof Error) reject(outcome);
        else if (outcome.ok) resolve();
        else reject(new Error(`${outcome.code}: ${outcome.message}`));
      };
      const event: AttachmentEvent = { type: 'memoryTable', device, requestId, entries };
      this.pending.set(requestId, { event, settle });
      this.emit(event);
    });
  }
}
