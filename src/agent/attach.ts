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
import type { VhostUserConnection, VhostUserListener } from '../vhost-user/transport.ts';
import { AgentError } from './errors.ts';
import { type AttachSocket, listenAttachSocket } from './attach-socket.ts';
import type { AttachmentEvent, AttachmentInfo, AttachRequest, MemoryTableAnswer } from './wire.ts';

/** How the device side of a backend hands the VMM's memory changes on (its `memoryChanged`). */
export type AttachMemory = (diff: MemoryDiff) => Promise<void>;

/** Makes the device side of one VMM connection: what relays the vrings to `device`. */
export type DeviceSideFactory = (device: Device, memory: AttachMemory) => VhostUserDeviceSide;

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

interface Attachment {
  device: Device;
  socket: AttachSocket;
  listener: VhostUserListener;
  conn: VhostUserConnection | null;
  backend: VhostUserBackend | null;
  connections: number;
  /** The table the API server last accepted. */
  table: Entry[];
  /** A table waiting for the API server's answer: its memory must not be released meanwhile. */
  proposed: Entry[] | null;
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
  /** Detached, their VMM connection still closing: their memory stays referenced until done. */
  private readonly draining = new Set<Attachment>();
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
      listener: socket.listener,
      conn: null,
      backend: null,
      connections: 0,
      table: [],
      proposed: null,
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
    a.listener.close();
    if (a.backend !== null && !a.backend.closed) {
      this.draining.add(a);
      void a.backend.done.then(() => {
        this.draining.delete(a);
        this.releaseUnused();
      });
    }
    a.conn?.close();
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
    for (const a of [...this.attached.values(), ...this.draining]) {
      for (const e of [...a.table, ...(a.proposed ?? [])]) used.add(e.memory);
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
    await Promise.all(closing.map((a) => a.backend?.done));
    for (const w of this.watchers) w.end();
    this.watchers.clear();
  }

  private info(a: Attachment): AttachmentInfo {
    const b = a.backend;
    return {
      device: a.device.name,
      socketPath: a.socket.path,
      mode: a.socket.mode,
      ...(a.socket.group === undefined ? {} : { group: a.socket.group }),
      vmmConnected: b !== null && !b.closed,
      negotiatedFeatures: b?.negotiatedFeatures ?? 0n,
      protocolFeatures: b?.negotiatedProtocolFeatures ?? 0n,
      vrings: b?.vringState() ?? [],
      memoryTable: a.table.map(toMapping),
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
    if (a.backend !== null && !a.backend.closed) {
      logger.warn({ device }, 'refused a second VMM connection: one is attached');
      conn.close(new Error('a VMM is already connected'));
      return;
    }
    let backend: VhostUserBackend | undefined;
    let side: VhostUserDeviceSide;
    try {
      side = this.options.deviceSide(a.device, (diff) => this.memoryChanged(a, backend!, diff));
    } catch (e) {
      logger.error({ device, reason: (e as Error).message }, 'cannot serve the VMM: no device side');
      conn.close(e as Error);
      return;
    }
    backend = new VhostUserBackend(conn, side, {
      logger: { info: logger.info.bind(logger), warn: logger.warn.bind(logger) },
    });
    a.conn = conn;
    a.backend = backend;
    a.connections++;
    logger.info({ device }, 'VMM connected');
    this.emit({ type: 'connected', device });
    void backend.done.then(() => {
      const reason = backend.error?.message ?? '';
      logger.info({ device, reason }, 'VMM disconnected');
      this.emit({ type: 'disconnected', device, reason });
      this.releaseUnused();
    });
  }

  /** The device side's memory: registers added files, asks the API server, settles the table. */
  private async memoryChanged(a: Attachment, backend: VhostUserBackend, diff: MemoryDiff): Promise<void> {
    // The connection closing: the backend has already forgotten its table, whatever the answer.
    const closing = backend.closed;
    try {
      const removed = new Set(diff.removed.map(regionIdentity));
      const next = [
        ...a.table.filter((e) => !removed.has(regionIdentity(e.region))),
        ...diff.added.map(({ fd, ...region }) => ({ region, memory: this.adopt(region, fd) })),
      ].sort((x, y) => (x.region.guestAddr < y.region.guestAddr ? -1 : 1));
      a.proposed = next;
      await this.request(a.device.name, next.map(toMapping));
      a.table = next;
    } finally {
      a.proposed = null;
      if (closing) a.table = [];
      this.releaseUnused();
    }
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
