/**
 * A small vhost-user virtio-blk front-end for tests: it plays the VMM. Its "guest memory" is a
 * memfd mapped into this process (guest physical 0.., userspace_addr = the mapping), handed to the
 * back-end with SET_MEM_TABLE; it lays out one split virtqueue in that memory and drives block
 * requests through it as 3-descriptor chains (virtio_blk_outhdr, data, status), one at a time.
 *
 * Every wait is bounded. A request whose used entry never comes (VDUSE drops a request it cannot
 * translate, without a used entry or a call) is an error naming the request; the ring is then
 * considered wedged and every later request is refused.
 */
import fs from 'node:fs';
import {
  SECTOR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from '../../src/device/virtio-blk.ts';
import { EFD_CLOEXEC, EFD_NONBLOCK, eventfd } from '../../src/sys/libc.ts';
import { closeFds } from '../../src/vhost-user/transport.ts';
import {
  configPayload,
  F_PROTOCOL_FEATURES,
  memRegPayload,
  memTablePayload,
  protocolFeatureMask,
  Request,
  u64Payload,
  vringAddrPayload,
  vringFdPayload,
  vringStatePayload,
} from '../../src/vhost-user/wire.ts';
import { FdWaiter } from './fd-wait.ts';
import { GuestMemory, type GuestRegion } from './guest-memory.ts';
import { type ChainBuffer, SplitRing, type UsedEntry } from './split-ring.ts';
import { VhostUserChannel } from './vhost-user-channel.ts';

/** virtio-blk feature bits (virtio 5.2.3) the front-end understands. */
export const BlkFeature = {
  SIZE_MAX: 1n << 1n,
  SEG_MAX: 1n << 2n,
  RO: 1n << 5n,
  BLK_SIZE: 1n << 6n,
  FLUSH: 1n << 9n,
  VERSION_1: 1n << 32n,
} as const;
/** Acked when offered; VERSION_1 is required. */
const WANTED_FEATURES =
  BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX | BlkFeature.RO | BlkFeature.BLK_SIZE | BlkFeature.FLUSH;
const WANTED_PROTOCOL = protocolFeatureMask('REPLY_ACK', 'CONFIG', 'MQ', 'CONFIGURE_MEM_SLOTS');
const REQUIRED_PROTOCOL = protocolFeatureMask('REPLY_ACK', 'CONFIG');
/** struct virtio_blk_config up to write_zeroes_may_unmap and its padding. */
const CONFIG_SIZE = 60;
const OUTHDR = 16;
const ID_BYTES = 20;
const PAGE = 4096n;
const QUEUE = 0;
/** How often a request's wait looks whether the back-end has gone. */
const PEER_CHECK_MS = 1000;

export interface FrontendOptions {
  /** Size of the guest memory (region 0 at `memoryBase`); a multiple of 4 KiB. */
  memoryBytes: bigint;
  /**
   * Guest physical address of region 0, where the ring starts; a multiple of 4 KiB, default 0.
   * QEMU's virtio devices take a queue whose descriptor table is at address 0 for one not set up
   * (virtio_queue_notify_vq ignores it): a real device behind vp_vdpa needs the ring elsewhere.
   */
  memoryBase?: bigint;
  /** Entries of the virtqueue, a power of two; default 128. */
  queueSize?: number;
  /** Bound on each request's wait for its used entry; default 60 s (a loaded machine is slow). */
  requestWaitMs?: number;
  /** Bound on each vhost-user reply and on connecting; default 30 s. */
  replyWaitMs?: number;
}

/** What the back-end offered and what was negotiated. */
export interface Negotiated {
  /** GET_FEATURES */
  offeredFeatures: bigint;
  /** SET_FEATURES */
  features: bigint;
  /** GET_PROTOCOL_FEATURES */
  offeredProtocolFeatures: bigint;
  /** SET_PROTOCOL_FEATURES */
  protocolFeatures: bigint;
  /** GET_QUEUE_NUM, when MQ was negotiated. */
  queueCount: bigint | null;
  /** GET_MAX_MEM_SLOTS, when CONFIGURE_MEM_SLOTS was negotiated. */
  maxMemSlots: bigint | null;
  /** The raw virtio_blk_config from GET_CONFIG. */
  config: Buffer;
  /** Capacity in 512-byte sectors. */
  capacity: bigint;
  /** size_max (VIRTIO_BLK_F_SIZE_MAX) or null. */
  sizeMax: number | null;
  /** seg_max (VIRTIO_BLK_F_SEG_MAX) or null. */
  segMax: number | null;
  /** blk_size (VIRTIO_BLK_F_BLK_SIZE) or null. */
  blkSize: number | null;
  /** num_queues from the config (meaningful with VIRTIO_BLK_F_MQ). */
  configNumQueues: number;
}

export interface BufferPlacement {
  /** Guest physical address of the data buffer; default the start of the data area. */
  guestAddr?: bigint;
}

function hex(v: bigint): string {
  return `0x${v.toString(16)}`;
}

export class VhostUserBlkFrontend {
  private readonly kickFd: number;
  private readonly callFd: number;
  private readonly called: FdWaiter;
  private tail: Promise<unknown> = Promise.resolve();
  private wedged: string | null = null;
  private closed = false;
  /** Guest physical: request header, status byte, data area. */
  private readonly outhdr: bigint;
  private readonly status: bigint;
  /** Where data buffers go unless a request says otherwise. */
  readonly dataArea: bigint;

  private constructor(
    private readonly channel: VhostUserChannel,
    readonly memory: GuestMemory,
    private readonly ring: SplitRing,
    readonly negotiated: Negotiated,
    private readonly requestWaitMs: number,
  ) {
    this.outhdr = ring.end;
    this.status = ring.end + BigInt(OUTHDR);
    this.dataArea = ring.end + PAGE;
    this.kickFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    this.callFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    this.called = new FdWaiter(this.callFd);
  }

  /**
   * Connects to a vhost-user-blk back-end and starts queue 0: negotiation, memory table, config,
   * the vring. On any failure everything opened so far is closed again.
   */
  static async connect(socketPath: string, options: FrontendOptions): Promise<VhostUserBlkFrontend> {
    const queueSize = options.queueSize ?? 128;
    if (options.memoryBytes <= 0n || options.memoryBytes % PAGE !== 0n) {
      throw new RangeError(`memoryBytes must be a positive multiple of 4 KiB, not ${options.memoryBytes}`);
    }
    const channel = await VhostUserChannel.connect(socketPath, options.replyWaitMs ?? 30_000);
    const memory = new GuestMemory();
    let frontend: VhostUserBlkFrontend | null = null;
    try {
      const base = options.memoryBase ?? 0n;
      if (base < 0n || base % PAGE !== 0n)
        throw new RangeError(`memoryBase must be a multiple of 4 KiB, not ${base}`);
      memory.add(base, options.memoryBytes, 'vhost-user-frontend-ram');
      const ring = new SplitRing(memory, base, queueSize);
      if (ring.end + 2n * PAGE > base + options.memoryBytes) {
        throw new RangeError(`memoryBytes ${options.memoryBytes} leaves no room for data after the ring`);
      }
      const negotiated = await negotiate(channel, memory);
      frontend = new VhostUserBlkFrontend(channel, memory, ring, negotiated, options.requestWaitMs ?? 60_000);
      await frontend.startQueue();
      return frontend;
    } catch (e) {
      if (frontend) frontend.release();
      else {
        channel.close();
        memory.free();
      }
      throw e;
    }
  }

  /** Writes `data` (whole sectors) at `sector`. */
  write(sector: bigint, data: Uint8Array, at: BufferPlacement = {}): Promise<void> {
    const what = `WRITE of ${data.byteLength} bytes at sector ${sector}`;
    return this.serialised(async () => {
      const addr = this.dataBuffer(what, data.byteLength, at);
      this.memory.write(addr, data);
      await this.request(what, VIRTIO_BLK_T_OUT, sector, this.segments(addr, data.byteLength, false));
    });
  }

  /** Reads `length` bytes (whole sectors) from `sector`. */
  read(sector: bigint, length: number, at: BufferPlacement = {}): Promise<Buffer> {
    const what = `READ of ${length} bytes at sector ${sector}`;
    return this.serialised(async () => {
      const addr = this.dataBuffer(what, length, at);
      // Poison the buffer so bytes the device did not write cannot pass for data.
      this.memory.write(addr, Buffer.alloc(length, 0xa5));
      await this.request(what, VIRTIO_BLK_T_IN, sector, this.segments(addr, length, true));
      return this.memory.read(addr, length);
    });
  }

  flush(): Promise<void> {
    return this.serialised(() => this.request('FLUSH', VIRTIO_BLK_T_FLUSH, 0n, []));
  }

  /** VIRTIO_BLK_T_GET_ID: the device's serial, up to its first NUL. */
  getId(): Promise<string> {
    return this.serialised(async () => {
      const addr = this.dataArea;
      this.memory.write(addr, Buffer.alloc(ID_BYTES));
      await this.request('GET_ID', VIRTIO_BLK_T_GET_ID, 0n, [{ addr, length: ID_BYTES, deviceWrites: true }]);
      const id = this.memory.read(addr, ID_BYTES);
      const nul = id.indexOf(0);
      return id.subarray(0, nul < 0 ? ID_BYTES : nul).toString('latin1');
    });
  }

  /**
   * Hotplug: a new memfd region of `size` bytes just above the highest one, announced with
   * ADD_MEM_REG (needs CONFIGURE_MEM_SLOTS). Returns it; data buffers may then be placed in it.
   */
  addMemory(size: bigint): Promise<GuestRegion> {
    return this.serialised(async () => {
      if (!(this.negotiated.protocolFeatures & protocolFeatureMask('CONFIGURE_MEM_SLOTS'))) {
        throw new Error('the back-end did not offer CONFIGURE_MEM_SLOTS: no ADD_MEM_REG');
      }
      const region = this.memory.add(
        this.memory.top,
        size,
        `vhost-user-frontend-ram${this.memory.regions.length}`,
      );
      try {
        await this.channel.tell(Request.ADD_MEM_REG, memRegPayload(region), [region.fd]);
      } catch (e) {
        this.memory.remove(region); // never announced: no buffer may be placed in it
        throw e;
      }
      return region;
    });
  }

  /**
   * Hot-unplug with REM_MEM_REG (needs CONFIGURE_MEM_SLOTS), once the back-end acknowledged it.
   * The region stays mapped in this process, so a buffer may still be placed in it: a guest that
   * points the device at memory its VMM took away, which only the IOMMU can refuse.
   */
  unplugMemory(region: GuestRegion): Promise<void> {
    return this.serialised(() => this.channel.tell(Request.REM_MEM_REG, memRegPayload(region)));
  }

  /**
   * Stops the ring (SET_VRING_ENABLE 0, GET_VRING_BASE) and closes every fd and mapping. Returns the
   * avail index the back-end reported, or null when the back-end could not be asked (gone, or a
   * request was wedged). Never throws: the fds are closed whatever the back-end does.
   */
  async close(): Promise<number | null> {
    if (this.closed) return null;
    let base: number | null = null;
    try {
      await this.tail.catch(() => {});
      if (this.wedged === null) {
        await this.channel.tell(Request.SET_VRING_ENABLE, vringStatePayload(QUEUE, 0));
        const state = await this.channel.call(Request.GET_VRING_BASE, vringStatePayload(QUEUE, 0));
        base = state.readUInt32LE(4);
      }
    } catch {
      base = null;
    } finally {
      this.release();
    }
    return base;
  }

  private release(): void {
    if (this.closed) return;
    this.closed = true;
    this.called.stop();
    closeFds([this.kickFd, this.callFd]);
    this.channel.close();
    this.memory.free();
  }

  private async startQueue(): Promise<void> {
    const ch = this.channel;
    const ring = this.ring;
    await ch.tell(Request.SET_VRING_NUM, vringStatePayload(QUEUE, ring.size));
    await ch.tell(Request.SET_VRING_BASE, vringStatePayload(QUEUE, 0));
    await ch.tell(
      Request.SET_VRING_ADDR,
      vringAddrPayload({
        index: QUEUE,
        log: false,
        desc: this.memory.address(ring.desc, 1),
        used: this.memory.address(ring.used, 1),
        avail: this.memory.address(ring.avail, 1),
        logAddr: ring.used,
      }),
    );
    await ch.tell(Request.SET_VRING_CALL, vringFdPayload(QUEUE, true), [this.callFd]);
    await ch.tell(Request.SET_VRING_KICK, vringFdPayload(QUEUE, true), [this.kickFd]);
    await ch.tell(Request.SET_VRING_ENABLE, vringStatePayload(QUEUE, 1));
  }

  /** Requests one after the other: the ring holds one chain at a time. */
  private serialised<T>(run: () => Promise<T>): Promise<T> {
    const next = this.tail.then(() => {
      if (this.closed) throw new Error('the front-end is closed');
      if (this.wedged !== null) throw new Error(`the virtqueue is wedged: ${this.wedged}`);
      return run();
    });
    this.tail = next.catch(() => {});
    return next;
  }

  private dataBuffer(what: string, length: number, at: BufferPlacement): bigint {
    if (!Number.isInteger(length) || length <= 0 || length % SECTOR !== 0) {
      throw new RangeError(`${what}: the length must be a positive multiple of ${SECTOR}`);
    }
    const addr = at.guestAddr ?? this.dataArea;
    if (addr < this.dataArea) throw new RangeError(`${what}: the buffer would overlap the ring`);
    this.memory.pieces(addr, length); // throws when outside guest memory
    return addr;
  }

  /** The data as descriptors of at most size_max bytes (when the device limits them). */
  private segments(addr: bigint, length: number, deviceWrites: boolean): ChainBuffer[] {
    // qemu-storage-daemon 7.2 offers SIZE_MAX with size_max 0: read as "no limit".
    const max = this.negotiated.sizeMax || length;
    const out: ChainBuffer[] = [];
    for (let done = 0; done < length; done += max) {
      out.push({ addr: addr + BigInt(done), length: Math.min(max, length - done), deviceWrites });
    }
    const segMax = this.negotiated.segMax;
    if (segMax !== null && out.length > segMax) {
      throw new RangeError(`${length} bytes need ${out.length} segments; the device takes ${segMax}`);
    }
    return out;
  }

  /** One chain: header, data, status; kick; wait (bounded) for its used entry; check the status. */
  private async request(what: string, type: number, sector: bigint, data: ChainBuffer[]): Promise<void> {
    const hdr = Buffer.alloc(OUTHDR);
    hdr.writeUInt32LE(type, 0);
    hdr.writeBigUInt64LE(sector, 8);
    this.memory.write(this.outhdr, hdr);
    this.memory.write(this.status, Buffer.of(0xff));
    const availIdx = this.ring.publish([
      { addr: this.outhdr, length: OUTHDR, deviceWrites: false },
      ...data,
      { addr: this.status, length: 1, deviceWrites: true },
    ]);
    fs.writeSync(this.kickFd, u64Payload(1n));
    const used = await this.waitUsed();
    if (used === 'closed') {
      this.wedged = `the back-end closed the connection during ${what} (avail index ${availIdx})`;
      throw new Error(
        `virtio-blk ${what} (avail index ${availIdx}): the vhost-user back-end closed the connection`,
      );
    }
    if (used === null) {
      this.wedged = `${what} (avail index ${availIdx}) got no used entry within ${this.requestWaitMs} ms`;
      throw new Error(
        `virtio-blk ${what} (avail index ${availIdx}): no used entry within ${this.requestWaitMs} ms; ` +
          'the device dropped the request (e.g. a buffer it could not translate) or is stuck',
      );
    }
    if (used.head !== 0) throw new Error(`virtio-blk ${what}: used entry for descriptor ${used.head}, not 0`);
    const status = this.memory.read(this.status, 1)[0]!;
    if (status !== VIRTIO_BLK_S_OK) {
      throw new Error(`virtio-blk ${what}: status ${status === 0xff ? 'never written' : status}`);
    }
  }

  /**
   * The next used entry, woken by the call eventfd; null after the request wait, 'closed' as soon
   * as the back-end is seen gone (looked at every second, so a dead back-end is not waited out).
   */
  private async waitUsed(): Promise<UsedEntry | null | 'closed'> {
    const deadline = Date.now() + this.requestWaitMs;
    for (;;) {
      drainEventfd(this.callFd);
      const used = this.ring.takeUsed();
      if (used !== null) return used;
      if (this.channel.peerClosed()) return 'closed';
      const left = deadline - Date.now();
      if (left <= 0) return null;
      await this.called.wait(Math.min(left, PEER_CHECK_MS));
    }
  }
}

function drainEventfd(fd: number): void {
  try {
    fs.readSync(fd, Buffer.alloc(8));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
  }
}

/** GET_FEATURES .. SET_MEM_TABLE, in the order QEMU sends them. */
async function negotiate(ch: VhostUserChannel, memory: GuestMemory): Promise<Negotiated> {
  const offeredFeatures = (await ch.call(Request.GET_FEATURES)).readBigUInt64LE(0);
  if (!(offeredFeatures & BlkFeature.VERSION_1)) {
    throw new Error(`the back-end does not offer VIRTIO_F_VERSION_1 (features ${hex(offeredFeatures)})`);
  }
  if (!(offeredFeatures & F_PROTOCOL_FEATURES)) {
    throw new Error(`the back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES (${hex(offeredFeatures)})`);
  }
  const offeredProtocolFeatures = (await ch.call(Request.GET_PROTOCOL_FEATURES)).readBigUInt64LE(0);
  const protocolFeatures = offeredProtocolFeatures & WANTED_PROTOCOL;
  if ((protocolFeatures & REQUIRED_PROTOCOL) !== REQUIRED_PROTOCOL) {
    throw new Error(
      `the back-end lacks REPLY_ACK or CONFIG (protocol features ${hex(offeredProtocolFeatures)})`,
    );
  }
  await ch.tell(Request.SET_PROTOCOL_FEATURES, u64Payload(protocolFeatures));
  ch.replyAck = true;
  const has = (name: 'MQ' | 'CONFIGURE_MEM_SLOTS') => (protocolFeatures & protocolFeatureMask(name)) !== 0n;
  const queueCount = has('MQ') ? (await ch.call(Request.GET_QUEUE_NUM)).readBigUInt64LE(0) : null;
  const maxMemSlots = has('CONFIGURE_MEM_SLOTS')
    ? (await ch.call(Request.GET_MAX_MEM_SLOTS)).readBigUInt64LE(0)
    : null;
  await ch.tell(Request.SET_OWNER);
  const reply = await ch.call(Request.GET_CONFIG, configPayload(0, 0, Buffer.alloc(CONFIG_SIZE)));
  if (reply.byteLength !== 12 + CONFIG_SIZE) {
    throw new Error(`GET_CONFIG: the back-end answered ${reply.byteLength} bytes, not ${12 + CONFIG_SIZE}`);
  }
  const config = Buffer.from(reply.subarray(12));
  const features = BlkFeature.VERSION_1 | F_PROTOCOL_FEATURES | (offeredFeatures & WANTED_FEATURES);
  await ch.tell(Request.SET_FEATURES, u64Payload(features));
  const region = memory.regions[0]!;
  await ch.tell(Request.SET_MEM_TABLE, memTablePayload([region]), [region.fd]);
  const field = (bit: bigint, read: () => number) => ((features & bit) !== 0n ? read() : null);
  return {
    offeredFeatures,
    features,
    offeredProtocolFeatures,
    protocolFeatures,
    queueCount,
    maxMemSlots,
    config,
    capacity: config.readBigUInt64LE(0),
    sizeMax: field(BlkFeature.SIZE_MAX, () => config.readUInt32LE(8)),
    segMax: field(BlkFeature.SEG_MAX, () => config.readUInt32LE(12)),
    blkSize: field(BlkFeature.BLK_SIZE, () => config.readUInt32LE(20)),
    configNumQueues: config.readUInt16LE(34),
  };
}
