/**
 * The vhost-user protocol state machine of one front-end connection (QEMU docs/interop/vhost-user.rst),
 * for a device that a {@link VhostUserDeviceSide} runs: feature and protocol-feature negotiation,
 * ownership, the memory table (diffed, see memory-table.ts), vring state with addresses translated to
 * guest physical (= IOVA), config space, and replies.
 *
 * Rules it keeps:
 * - A frame the protocol does not allow (wire.ts's checks, fds that cannot back their region, a
 *   feature never offered, a vring out of range) closes the connection; everything is unmapped.
 * - The device side is awaited before the reply: the front-end learns of a memory change only once
 *   the device has applied it. A refusal is an error reply (REPLY_ACK), never a silent success;
 *   when the front-end asked for no reply there is no way to refuse, so the connection closes.
 * - Every fd received is either kept (vring kick/call/err, until replaced or the end) or closed
 *   once its message is handled; region fds are only lent to the device side for the call.
 */
import type { SplitVirtqueue } from '../device/virtqueue.ts';
import { hex } from '../iotlb/types.ts';
import {
  type AddedRegion,
  describeRegion,
  type MemoryDiff,
  MemoryTable,
  RegionError,
  type TableRegion,
} from './memory-table.ts';
import { closeFds, type Frame, type VhostUserConnection } from './transport.ts';
import {
  configPayload,
  decodeMessage,
  encodeReply,
  F_PROTOCOL_FEATURES,
  MAX_CONFIG_SIZE,
  type Message,
  type ProtocolFeature,
  protocolFeatureMask,
  Request,
  u64Payload,
  type MemoryRegion,
  vringStatePayload,
} from './wire.ts';

/** A vring as the device runs it: addresses are guest physical, i.e. IOVAs. */
export interface VringConfig extends SplitVirtqueue {
  /** The current call eventfd (it may be replaced while the ring runs); null: do not notify. */
  callFd(): number | null;
}

/** The device a backend serves; where the agent's device queue plugs in. */
export interface VhostUserDeviceSide {
  /** Virtio feature bits the device offers (F_PROTOCOL_FEATURES is the backend's own). */
  readonly features: bigint;
  readonly queueCount: number;
  /** Largest vring size the device accepts (a power of two). */
  readonly maxQueueSize: number;
  /** The device's config space. */
  config(): Buffer;
  /**
   * The memory table changed: unmap `removed` first, then map `added` (IOVA = guestAddr). The fds
   * of added regions are valid only during the call (dup what must stay open). A rejection is
   * reported to the front-end as a failure, and the table is left as it was.
   */
  memoryChanged(diff: MemoryDiff): Promise<void>;
  /** The front-end negotiated these features (before the device is started). */
  featuresNegotiated(features: bigint): void;
  startVring(vring: VringConfig): void;
  /** A running vring got another call eventfd (null: none); the fd stays the backend's. */
  callChanged?(index: number, fd: number | null): void;
  /** Stops a running vring; returns the next avail index the device would have processed. */
  stopVring(index: number): number;
}

export interface BackendLogger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

export interface VhostUserBackendOptions {
  /** Offer CONFIGURE_MEM_SLOTS (ADD_MEM_REG/REM_MEM_REG); default true. */
  memSlots?: boolean;
  /** GET_MAX_MEM_SLOTS answer; default 32. */
  maxMemSlots?: number;
  logger?: BackendLogger;
}

/** One vring as the front-end set it up: addresses are guest physical (= IOVA), absent until set. */
export interface VringView {
  index: number;
  size: number;
  lastAvail: number;
  desc?: bigint;
  avail?: bigint;
  used?: bigint;
  enabled: boolean;
  running: boolean;
}

/** What the backend has seen, for tests and the attachment view. */
export interface BackendStats {
  messages: Record<string, number>;
  memoryUpdates: number;
  regionsAdded: number;
  regionsRemoved: number;
  refusals: number;
}

/** The front-end broke the protocol: the connection is closed. */
export class ProtocolError extends Error {
  constructor(
    message: string,
    readonly field?: string,
  ) {
    super(message);
    this.name = 'ProtocolError';
  }
}

/** The device side refused a request that the protocol allowed. */
class Refusal extends Error {}

interface VringState {
  size: number;
  lastAvail: number;
  addr: { desc: bigint; avail: bigint; used: bigint } | null;
  kickFd: number | null;
  callFd: number | null;
  errFd: number | null;
  enabled: boolean;
  running: boolean;
}

function newVring(): VringState {
  return {
    size: 0,
    lastAvail: 0,
    addr: null,
    kickFd: null,
    callFd: null,
    errFd: null,
    enabled: false,
    running: false,
  };
}

/** Bits of a message's fds the decoded message keeps; the rest are closed after decoding. */
function keptFds(msg: Message): number[] {
  switch (msg.request) {
    case 'SET_MEM_TABLE':
      return msg.fds;
    case 'ADD_MEM_REG':
      return [msg.fd];
    case 'SET_VRING_KICK':
    case 'SET_VRING_CALL':
    case 'SET_VRING_ERR':
      return msg.fd === null ? [] : [msg.fd];
    default:
      return [];
  }
}

export class VhostUserBackend {
  readonly stats: BackendStats = {
    messages: {},
    memoryUpdates: 0,
    regionsAdded: 0,
    regionsRemoved: 0,
    refusals: 0,
  };
  private readonly table = new MemoryTable();
  private readonly vrings: VringState[];
  private readonly offeredProtocol: bigint;
  private readonly maxMemSlots: number;
  private readonly logger: BackendLogger | undefined;
  private features = 0n;
  private protocol = 0n;
  private owned = false;
  private closeError: Error | undefined;
  private isClosed = false;
  /** Settles when the connection is closed and everything the device side had is released. */
  readonly done: Promise<void>;
  private resolveDone!: () => void;

  constructor(
    private readonly conn: VhostUserConnection,
    private readonly device: VhostUserDeviceSide,
    options: VhostUserBackendOptions = {},
  ) {
    this.vrings = Array.from({ length: device.queueCount }, newVring);
    this.offeredProtocol =
      protocolFeatureMask('REPLY_ACK', 'CONFIG', 'MQ') |
      (options.memSlots === false ? 0n : protocolFeatureMask('CONFIGURE_MEM_SLOTS'));
    this.maxMemSlots = options.maxMemSlots ?? 32;
    this.logger = options.logger;
    this.done = new Promise((resolve) => {
      this.resolveDone = resolve;
    });
    conn.start({ frame: (f) => this.frame(f), closed: (e) => this.onClosed(e) });
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /** Why the connection closed (undefined: the front-end hung up, or still open). */
  get error(): Error | undefined {
    return this.closeError;
  }

  get negotiatedFeatures(): bigint {
    return this.features;
  }

  get negotiatedProtocolFeatures(): bigint {
    return this.protocol;
  }

  memoryTable(): TableRegion[] {
    return this.table.list();
  }

  /** Each vring's state: size, next avail index, guest physical addresses, enabled, running. */
  vringState(): VringView[] {
    return this.vrings.map((v, index) => ({
      index,
      size: v.size,
      lastAvail: v.lastAvail,
      ...(v.addr ?? {}),
      enabled: v.enabled,
      running: v.running,
    }));
  }

  private async frame(frame: Frame): Promise<void> {
    let msg: Message;
    try {
      msg = decodeMessage(frame.header, frame.payload, frame.fds);
    } catch (e) {
      closeFds(frame.fds);
      throw e;
    }
    const kept = new Set(keptFds(msg));
    closeFds(frame.fds.filter((fd) => !kept.has(fd)));
    this.stats.messages[msg.request] = (this.stats.messages[msg.request] ?? 0) + 1;
    try {
      await this.handle(msg);
    } catch (e) {
      if (!(e instanceof Refusal)) throw e;
      this.stats.refusals++;
      this.logger?.warn({ request: msg.request, reason: e.message }, 'vhost-user request refused');
      if (!(msg.needReply && this.has('REPLY_ACK'))) {
        throw new ProtocolError(`${msg.request} refused and the front-end asked for no reply: ${e.message}`);
      }
      this.reply(msg, u64Payload(1n));
      return;
    }
  }

  private has(feature: keyof typeof ProtocolFeature): boolean {
    return (this.protocol & protocolFeatureMask(feature)) !== 0n;
  }

  private reply(msg: Message, payload: Buffer): void {
    this.conn.send(encodeReply(Request[msg.request], payload));
  }

  /** The REPLY_ACK success reply of a message with no reply of its own, when asked for. */
  private ack(msg: Message): void {
    if (msg.needReply && this.has('REPLY_ACK')) this.reply(msg, u64Payload(0n));
  }

  private vring(index: number): VringState {
    const v = this.vrings[index];
    if (v === undefined) {
      throw new ProtocolError(
        `vring ${index} does not exist (the device has ${this.vrings.length})`,
        'index',
      );
    }
    return v;
  }

  private async handle(msg: Message): Promise<void> {
    switch (msg.request) {
      case 'GET_FEATURES':
        return this.reply(msg, u64Payload(this.device.features | F_PROTOCOL_FEATURES));
      case 'SET_FEATURES': {
        const unknown = msg.value & ~(this.device.features | F_PROTOCOL_FEATURES);
        if (unknown !== 0n) throw new ProtocolError(`SET_FEATURES: bits ${hex(unknown)} were never offered`);
        if (this.vrings.some((v) => v.running) && msg.value !== this.features) {
          throw new ProtocolError('SET_FEATURES: features changed while a vring runs');
        }
        this.features = msg.value;
        this.device.featuresNegotiated(msg.value & ~F_PROTOCOL_FEATURES);
        return this.ack(msg);
      }
      case 'GET_PROTOCOL_FEATURES':
        return this.reply(msg, u64Payload(this.offeredProtocol));
      case 'SET_PROTOCOL_FEATURES': {
        const unknown = msg.value & ~this.offeredProtocol;
        if (unknown !== 0n) {
          throw new ProtocolError(`SET_PROTOCOL_FEATURES: bits ${hex(unknown)} were never offered`);
        }
        this.protocol = msg.value;
        return this.ack(msg);
      }
      case 'SET_OWNER':
        this.owned = true;
        return this.ack(msg);
      case 'RESET_OWNER':
        this.stopAll();
        this.owned = false;
        this.features = 0n;
        return this.ack(msg);
      case 'GET_QUEUE_NUM':
        return this.reply(msg, u64Payload(BigInt(this.vrings.length)));
      case 'GET_MAX_MEM_SLOTS':
        return this.reply(msg, u64Payload(BigInt(this.maxMemSlots)));
      case 'SET_MEM_TABLE':
        return this.setMemTable(msg);
      case 'ADD_MEM_REG':
        return this.addMemReg(msg);
      case 'REM_MEM_REG': {
        this.requireMemSlots(msg.request);
        const region = this.table.find(msg.region);
        if (region === undefined) {
          throw new Refusal(`REM_MEM_REG: no region at guest address ${hex(msg.region.guestAddr)}`);
        }
        await this.applyDiff({ added: [], removed: [region] });
        this.table.remove(region);
        return this.ack(msg);
      }
      case 'SET_VRING_NUM': {
        const v = this.vring(msg.index);
        const n = msg.num;
        if (n === 0 || n > this.device.maxQueueSize || (n & (n - 1)) !== 0) {
          throw new ProtocolError(
            `SET_VRING_NUM: size ${n} of vring ${msg.index} must be a power of two up to ${this.device.maxQueueSize}`,
            'num',
          );
        }
        this.requireStopped(v, msg.index, msg.request);
        v.size = n;
        return this.ack(msg);
      }
      case 'SET_VRING_BASE': {
        const v = this.vring(msg.index);
        if (msg.num > 0xffff) throw new ProtocolError(`SET_VRING_BASE: ${msg.num} is not a u16`, 'num');
        this.requireStopped(v, msg.index, msg.request);
        v.lastAvail = msg.num;
        return this.ack(msg);
      }
      case 'SET_VRING_ADDR': {
        const { index } = msg.addr;
        const v = this.vring(index);
        this.requireStopped(v, index, msg.request);
        // The addresses are the front-end's virtual addresses: the device speaks guest physical.
        const gpa = (what: 'desc' | 'avail' | 'used') => {
          const va = msg.addr[what];
          const pa = this.table.toGuestPhysical(va);
          if (pa === undefined) {
            throw new ProtocolError(
              `SET_VRING_ADDR: vring ${index} ${what} address ${hex(va)} is in no memory region`,
              what,
            );
          }
          return pa;
        };
        v.addr = { desc: gpa('desc'), avail: gpa('avail'), used: gpa('used') };
        this.maybeStart(index);
        return this.ack(msg);
      }
      case 'GET_VRING_BASE': {
        const v = this.vring(msg.index);
        this.stop(v, msg.index);
        // The ring stays stopped until its next SET_VRING_KICK (vhost-user.rst "Starting and
        // stopping rings").
        closeFds(v.kickFd === null ? [] : [v.kickFd]);
        v.kickFd = null;
        return this.reply(msg, vringStatePayload(msg.index, v.lastAvail));
      }
      case 'SET_VRING_KICK': {
        const v = this.vring(msg.index);
        this.stop(v, msg.index);
        this.replaceFd(v, 'kickFd', msg.fd);
        if (msg.fd === null) throw new Refusal('SET_VRING_KICK: polling mode (no fd) is not supported');
        // Without F_PROTOCOL_FEATURES a ring is enabled as soon as it is started.
        if ((this.features & F_PROTOCOL_FEATURES) === 0n) v.enabled = true;
        this.maybeStart(msg.index);
        return this.ack(msg);
      }
      case 'SET_VRING_CALL': {
        const v = this.vring(msg.index);
        this.replaceFd(v, 'callFd', msg.fd);
        if (v.running) this.device.callChanged?.(msg.index, msg.fd);
        return this.ack(msg);
      }
      case 'SET_VRING_ERR':
        this.replaceFd(this.vring(msg.index), 'errFd', msg.fd);
        return this.ack(msg);
      case 'SET_VRING_ENABLE': {
        const v = this.vring(msg.index);
        if (msg.num > 1) throw new ProtocolError(`SET_VRING_ENABLE: ${msg.num} is neither 0 nor 1`, 'num');
        v.enabled = msg.num === 1;
        if (v.enabled) this.maybeStart(msg.index);
        else this.stop(v, msg.index);
        return this.ack(msg);
      }
      case 'GET_CONFIG': {
        if (!this.has('CONFIG')) throw new ProtocolError('GET_CONFIG without the CONFIG protocol feature');
        const config = Buffer.alloc(MAX_CONFIG_SIZE);
        this.device.config().copy(config, 0, 0, MAX_CONFIG_SIZE);
        return this.reply(
          msg,
          configPayload(msg.offset, msg.flags, config.subarray(msg.offset, msg.offset + msg.size)),
        );
      }
      case 'SET_CONFIG':
        if (!this.has('CONFIG')) throw new ProtocolError('SET_CONFIG without the CONFIG protocol feature');
        throw new Refusal('SET_CONFIG: the device config space is read-only');
    }
  }

  private requireMemSlots(request: string): void {
    if (!this.has('CONFIGURE_MEM_SLOTS')) {
      throw new ProtocolError(`${request} without the CONFIGURE_MEM_SLOTS protocol feature`);
    }
  }

  private requireStopped(v: VringState, index: number, request: string): void {
    if (v.running) throw new ProtocolError(`${request}: vring ${index} is running`);
  }

  private async setMemTable(msg: Extract<Message, { request: 'SET_MEM_TABLE' }>): Promise<void> {
    try {
      const next = this.describe(
        msg.regions.map((r, i) => ({ region: r, fd: msg.fds[i]!, field: `regions[${i}]` })),
      );
      const diff = this.table.diffReplace(next);
      await this.applyDiff(diff);
      this.table.replace(next);
      return this.ack(msg);
    } finally {
      closeFds(msg.fds);
    }
  }

  private async addMemReg(msg: Extract<Message, { request: 'ADD_MEM_REG' }>): Promise<void> {
    try {
      this.requireMemSlots(msg.request);
      if (this.table.size >= this.maxMemSlots) {
        throw new Refusal(`ADD_MEM_REG: all ${this.maxMemSlots} memory slots are in use`);
      }
      const [region] = this.describe([{ region: msg.region, fd: msg.fd, field: 'region' }]);
      this.wrapRegionError(() => this.table.checkAdd(msg.region, 'region'));
      await this.applyDiff({ added: [region!], removed: [] });
      this.table.add(region!);
      return this.ack(msg);
    } finally {
      closeFds([msg.fd]);
    }
  }

  private describe(items: { region: MemoryRegion; fd: number; field: string }[]): AddedRegion[] {
    return this.wrapRegionError(() => items.map((x) => describeRegion(x.region, x.fd, x.field)));
  }

  private wrapRegionError<T>(fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      if (e instanceof RegionError) throw new ProtocolError(e.message, e.field);
      throw e;
    }
  }

  private async applyDiff(diff: MemoryDiff): Promise<void> {
    if (diff.added.length === 0 && diff.removed.length === 0) return;
    try {
      await this.device.memoryChanged(diff);
    } catch (e) {
      throw new Refusal(`the device refused the memory change: ${(e as Error).message}`);
    }
    this.stats.memoryUpdates++;
    this.stats.regionsAdded += diff.added.length;
    this.stats.regionsRemoved += diff.removed.length;
    this.logger?.info(
      {
        added: diff.added.map((r) => ({ guestAddr: hex(r.guestAddr), size: hex(r.size) })),
        removed: diff.removed.map((r) => ({ guestAddr: hex(r.guestAddr), size: hex(r.size) })),
      },
      'vhost-user memory table changed',
    );
  }

  private replaceFd(v: VringState, which: 'kickFd' | 'callFd' | 'errFd', fd: number | null): void {
    const old = v[which];
    v[which] = fd;
    if (old !== null && old !== fd) closeFds([old]);
  }

  /** A ring runs once it has a size, addresses, a kick fd, and is enabled. */
  private maybeStart(index: number): void {
    const v = this.vrings[index]!;
    if (v.running || !v.enabled || v.kickFd === null || v.addr === null || v.size === 0) return;
    if (!this.owned) throw new ProtocolError(`vring ${index} started before SET_OWNER`);
    this.device.startVring({
      index,
      size: v.size,
      ...v.addr,
      lastAvail: v.lastAvail,
      kickFd: v.kickFd,
      callFd: () => v.callFd,
    });
    v.running = true;
  }

  private stop(v: VringState, index: number): void {
    if (!v.running) return;
    v.lastAvail = this.device.stopVring(index);
    v.running = false;
  }

  private stopAll(): void {
    this.vrings.forEach((v, i) => {
      this.stop(v, i);
    });
  }

  /** The connection is gone: stop the rings, unmap everything, close every fd kept. */
  private onClosed(error: Error | undefined): void {
    this.isClosed = true;
    this.closeError = error;
    if (error) this.logger?.warn({ reason: error.message }, 'vhost-user connection closed on error');
    try {
      this.stopAll();
    } catch (e) {
      this.logger?.warn({ reason: (e as Error).message }, 'stopping a vring failed');
    }
    for (const v of this.vrings) {
      closeFds([v.kickFd, v.callFd, v.errFd].filter((fd): fd is number => fd !== null));
      v.kickFd = v.callFd = v.errFd = null;
    }
    const removed = this.table.clear();
    const release =
      removed.length === 0 ? Promise.resolve() : this.device.memoryChanged({ added: [], removed });
    release
      .catch((e: unknown) => {
        this.logger?.warn({ reason: (e as Error).message }, 'unmapping the memory table failed');
      })
      .finally(() => this.resolveDone());
  }
}
