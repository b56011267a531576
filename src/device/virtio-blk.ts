/**
 * A virtio-blk device model for simulated devices: a file-backed disk served over split
 * virtqueues, every descriptor, ring entry and data buffer read and written by DMA through the
 * device's IOTLB (DmaCapable), as the kernel's vdpa_sim_blk does through vringh's IOTLB accessors
 * (drivers/vdpa/vdpa_sim/vdpa_sim_blk.c, vdpasim_blk_handle_req).
 *
 * As there: the device-readable descriptors carry the 16-byte request header and, for a write,
 * the data; the device-writable ones take the data of a read and, in their very last byte, the
 * status. A data DMA that fails (unmapped IOVA, wrong permission) completes the request with
 * VIRTIO_BLK_S_IOERR; a request whose descriptors or status byte cannot be reached is dropped
 * (consumed, never completed), as vringh leaves it. Either way it is counted and logged, never
 * thrown.
 *
 * Runs on the main thread: each kick (an eventfd) drains the avail ring; completions are
 * signalled on the call eventfd. Requests are served synchronously, in order.
 */
import fs from 'node:fs';
import { hex } from '../iotlb/types.ts';
import { type FdWatch, watchReadable } from '../sys/libc.ts';
import { DmaError } from './errors.ts';
import type { DeviceLogger, DmaCapable } from './types.ts';
import type { SplitVirtqueue } from './virtqueue.ts';

export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;
export const SECTOR = 512;
const ID_BYTES = 20;
const OUTHDR = 16;
const CONFIG_SIZE = 60;
/** size_max: the largest segment the driver may use. */
const SIZE_MAX = 128 * 1024;

const VRING_DESC_F_NEXT = 1;
const VRING_DESC_F_WRITE = 2;
const VRING_DESC_F_INDIRECT = 4;
const VRING_AVAIL_F_NO_INTERRUPT = 1;

/** Feature bits the model offers (virtio spec 5.2.3). */
const VirtioBlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  BLK_SIZE: 6,
  FLUSH: 9,
  VERSION_1: 32,
} as const;
const OFFERED =
  (1n << BigInt(VirtioBlkFeature.SIZE_MAX)) |
  (1n << BigInt(VirtioBlkFeature.SEG_MAX)) |
  (1n << BigInt(VirtioBlkFeature.BLK_SIZE)) |
  (1n << BigInt(VirtioBlkFeature.FLUSH)) |
  (1n << BigInt(VirtioBlkFeature.VERSION_1));

/** A queue to serve: the ring, and how to signal the driver. */
export interface BlkQueue extends SplitVirtqueue {
  /** Signals the driver (the call eventfd); called after each batch of completions. */
  notify(): void;
}

export interface VirtioBlkCounters {
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  /** Requests completed with VIRTIO_BLK_S_IOERR or UNSUPP. */
  errors: number;
  /** DMAs the IOTLB refused (each also an error or a drop). */
  dmaFaults: number;
  /** Requests consumed but never completed: descriptors or status unreachable, or malformed. */
  dropped: number;
}

export interface VirtioBlkOptions {
  /** An open read-write fd of the disk file (the model does not close it). */
  diskFd: number;
  /** The device's DMA, through its IOTLB. */
  dma: DmaCapable;
  /** Address space of the vrings and buffers; default 0. */
  asid?: number;
  /** GET_ID answer (at most 20 bytes). */
  serial: string;
  /** Largest queue size accepted; default 256. */
  maxQueueSize?: number;
  logger?: DeviceLogger;
}

interface Segment {
  addr: bigint;
  len: number;
}

/** A request the model cannot even complete with an error status. */
class Dropped extends Error {}

interface Running {
  q: BlkQueue;
  watch: FdWatch;
  lastAvail: number;
  usedIdx: number;
  broken: boolean;
}

export class VirtioBlk {
  readonly counters: VirtioBlkCounters = {
    requests: 0,
    bytesRead: 0,
    bytesWritten: 0,
    errors: 0,
    dmaFaults: 0,
    dropped: 0,
  };
  readonly features = OFFERED;
  readonly queueCount = 1;
  readonly maxQueueSize: number;
  private readonly capacity: bigint;
  /** seg_max: room for the header and status descriptors in the largest ring. */
  private readonly segMax: number;
  /** The most data one request may move (seg_max * size_max, as vdpasim_blk_check_range). */
  private readonly maxData: number;
  private readonly asid: number;
  private readonly queues = new Map<number, Running>();
  private negotiated = 0n;

  constructor(private readonly options: VirtioBlkOptions) {
    const size = fs.fstatSync(options.diskFd, { bigint: true }).size;
    this.capacity = size / BigInt(SECTOR);
    this.asid = options.asid ?? 0;
    this.maxQueueSize = options.maxQueueSize ?? 256;
    this.segMax = this.maxQueueSize - 2;
    this.maxData = this.segMax * SIZE_MAX;
    if (Buffer.byteLength(options.serial) > ID_BYTES) {
      throw new RangeError(`serial must be at most ${ID_BYTES} bytes`);
    }
  }

  setFeatures(features: bigint): void {
    if ((features & ~OFFERED) !== 0n) {
      throw new RangeError(`features ${hex(features & ~OFFERED)} were not offered`);
    }
    this.negotiated = features;
  }

  /** struct virtio_blk_config (60 bytes, little-endian). */
  config(): Buffer {
    const c = Buffer.alloc(CONFIG_SIZE);
    c.writeBigUInt64LE(this.capacity, 0);
    c.writeUInt32LE(SIZE_MAX, 8);
    c.writeUInt32LE(this.segMax, 12);
    c.writeUInt32LE(SECTOR, 20); // blk_size
    c.writeUInt16LE(1, 34); // num_queues
    return c;
  }

  start(q: BlkQueue): void {
    if (q.index !== 0) throw new RangeError(`virtio-blk has 1 queue, not ${q.index + 1}`);
    if ((this.negotiated & (1n << 32n)) === 0n) throw new Error('VIRTIO_F_VERSION_1 was not negotiated');
    this.stop(q.index);
    const run: Running = {
      q,
      lastAvail: q.lastAvail,
      // Resumes from the used index in the ring itself, as vhost_vq_init_access does.
      usedIdx: 0,
      broken: false,
      watch: watchReadable(
        q.kickFd,
        () => this.kicked(run),
        (e) => this.options.logger?.warn({ queue: q.index, reason: String(e) }, 'virtio-blk kick failed'),
      ),
    };
    this.queues.set(q.index, run);
    try {
      run.usedIdx = this.read(q.used + 2n, 2).readUInt16LE(0);
    } catch (e) {
      this.breakQueue(run, e);
      return;
    }
    // Requests queued before the ring (re)started are served now.
    this.serve(run);
  }

  /** Stops the queue; returns the next avail index it would have served. */
  stop(index: number): number {
    const run = this.queues.get(index);
    if (run === undefined) return 0;
    run.watch.stop();
    this.queues.delete(index);
    return run.lastAvail;
  }

  /** The next avail index a running queue would serve; undefined when it does not run. */
  lastAvail(index: number): number | undefined {
    return this.queues.get(index)?.lastAvail;
  }

  stopAll(): void {
    for (const index of [...this.queues.keys()]) this.stop(index);
  }

  private kicked(run: Running): void {
    const buf = Buffer.alloc(8);
    try {
      fs.readSync(run.q.kickFd, buf);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
    }
    this.serve(run);
  }

  /** Serves every available request (at most one ring's worth per call: bounded). */
  private serve(run: Running): void {
    if (run.broken || this.queues.get(run.q.index) !== run) return;
    const { q } = run;
    let availIdx: number;
    let availFlags: number;
    try {
      const head = this.read(q.avail, 4);
      availFlags = head.readUInt16LE(0);
      availIdx = head.readUInt16LE(2);
    } catch (e) {
      this.breakQueue(run, e);
      return;
    }
    const pending = (availIdx - run.lastAvail) & 0xffff;
    if (pending > q.size) {
      this.breakQueue(run, new Error(`avail index ${availIdx} is ${pending} ahead of ${run.lastAvail}`));
      return;
    }
    let completed = 0;
    for (let i = 0; i < pending; i++) {
      let headIdx: number;
      try {
        headIdx = this.read(q.avail + 4n + BigInt(2 * (run.lastAvail % q.size)), 2).readUInt16LE(0);
      } catch (e) {
        this.breakQueue(run, e);
        return;
      }
      run.lastAvail = (run.lastAvail + 1) & 0xffff;
      this.counters.requests++;
      let written: number;
      try {
        written = this.handle(q, headIdx);
      } catch (e) {
        this.counters.dropped++;
        this.log(e, `virtio-blk: request at descriptor ${headIdx} dropped`);
        continue;
      }
      try {
        const elem = Buffer.alloc(8);
        elem.writeUInt32LE(headIdx, 0);
        elem.writeUInt32LE(written, 4);
        this.write(q.used + 4n + BigInt(8 * (run.usedIdx % q.size)), elem);
        run.usedIdx = (run.usedIdx + 1) & 0xffff;
        const idx = Buffer.alloc(2);
        idx.writeUInt16LE(run.usedIdx);
        this.write(q.used + 2n, idx);
        completed++;
      } catch (e) {
        this.breakQueue(run, e);
        return;
      }
    }
    if (completed > 0 && (availFlags & VRING_AVAIL_F_NO_INTERRUPT) === 0) q.notify();
  }

  /** Serves one request; returns the bytes written into its device-writable buffers. */
  private handle(q: BlkQueue, head: number): number {
    const { out, into } = this.chain(q, head);
    if (into.length === 0 || into[into.length - 1]!.len < 1) throw new Dropped('no status byte');
    const toPush = into.reduce((n, s) => n + s.len, 0) - 1;
    const outLen = out.reduce((n, s) => n + s.len, 0);
    if (outLen < OUTHDR) throw new Dropped(`request header is ${outLen} bytes`);
    // The header must be readable for the request to mean anything.
    const hdr = this.gather(out, 0, OUTHDR);
    const type = hdr.readUInt32LE(0);
    const sector = hdr.readBigUInt64LE(8);
    let status = VIRTIO_BLK_S_OK;
    let pushed = 0;
    try {
      switch (type) {
        case VIRTIO_BLK_T_IN: {
          if (!this.inRange(sector, toPush)) {
            status = VIRTIO_BLK_S_IOERR;
            break;
          }
          const data = Buffer.alloc(toPush);
          fs.readSync(this.options.diskFd, data, 0, toPush, Number(sector) * SECTOR);
          pushed = this.scatter(into, data);
          this.counters.bytesRead += toPush;
          break;
        }
        case VIRTIO_BLK_T_OUT: {
          const toPull = outLen - OUTHDR;
          if (!this.inRange(sector, toPull)) {
            status = VIRTIO_BLK_S_IOERR;
            break;
          }
          const data = this.gather(out, OUTHDR, toPull);
          fs.writeSync(this.options.diskFd, data, 0, toPull, Number(sector) * SECTOR);
          this.counters.bytesWritten += toPull;
          break;
        }
        case VIRTIO_BLK_T_FLUSH:
          fs.fdatasyncSync(this.options.diskFd);
          break;
        case VIRTIO_BLK_T_GET_ID: {
          const id = Buffer.alloc(ID_BYTES);
          id.write(this.options.serial);
          pushed = this.scatter(into, id.subarray(0, Math.min(ID_BYTES, toPush)));
          break;
        }
        default:
          status = VIRTIO_BLK_S_UNSUPP;
      }
    } catch (e) {
      if (!(e instanceof DmaError) && (e as NodeJS.ErrnoException).code === undefined) throw e;
      this.log(e, `virtio-blk: request type ${type} at sector ${sector} failed`);
      status = VIRTIO_BLK_S_IOERR;
    }
    if (status !== VIRTIO_BLK_S_OK) this.counters.errors++;
    // The status is the very last byte of the device-writable buffers.
    const last = into[into.length - 1]!;
    this.write(last.addr + BigInt(last.len - 1), Uint8Array.of(status));
    return pushed + 1;
  }

  private inRange(sector: bigint, bytes: number): boolean {
    return (
      bytes <= this.maxData &&
      bytes % SECTOR === 0 &&
      sector <= this.capacity &&
      BigInt(bytes / SECTOR) <= this.capacity - sector
    );
  }

  /** Walks a descriptor chain: device-readable segments first, then device-writable ones. */
  private chain(q: BlkQueue, head: number): { out: Segment[]; into: Segment[] } {
    const out: Segment[] = [];
    const into: Segment[] = [];
    let idx = head;
    for (let n = 0; ; n++) {
      if (n >= q.size) throw new Dropped(`descriptor chain from ${head} loops`);
      if (idx >= q.size) throw new Dropped(`descriptor index ${idx} is past the table (${q.size})`);
      const d = this.read(q.desc + BigInt(16 * idx), 16);
      const seg = { addr: d.readBigUInt64LE(0), len: d.readUInt32LE(8) };
      const flags = d.readUInt16LE(12);
      if (flags & VRING_DESC_F_INDIRECT) throw new Dropped('indirect descriptors were not negotiated');
      if (flags & VRING_DESC_F_WRITE) into.push(seg);
      else if (into.length > 0) throw new Dropped('a device-readable descriptor after a writable one');
      else out.push(seg);
      if ((flags & VRING_DESC_F_NEXT) === 0) return { out, into };
      idx = d.readUInt16LE(14);
    }
  }

  /** `length` bytes of the segments' concatenation, from byte `skip` on. */
  private gather(segs: Segment[], skip: number, length: number): Buffer {
    const parts: Buffer[] = [];
    let left = length;
    let at = skip;
    for (const s of segs) {
      if (left === 0) break;
      if (at >= s.len) {
        at -= s.len;
        continue;
      }
      const n = Math.min(s.len - at, left);
      parts.push(this.read(s.addr + BigInt(at), n));
      left -= n;
      at = 0;
    }
    return Buffer.concat(parts);
  }

  /** Writes `data` over the segments in order (never into the status byte); returns bytes written. */
  private scatter(segs: Segment[], data: Buffer): number {
    let done = 0;
    for (const s of segs) {
      if (done === data.byteLength) break;
      const n = Math.min(s.len, data.byteLength - done);
      this.write(s.addr, data.subarray(done, done + n));
      done += n;
    }
    return done;
  }

  private read(iova: bigint, length: number): Buffer {
    try {
      return this.options.dma.dmaRead(this.asid, iova, length);
    } catch (e) {
      if (e instanceof DmaError) this.counters.dmaFaults++;
      throw e;
    }
  }

  private write(iova: bigint, data: Uint8Array): void {
    try {
      this.options.dma.dmaWrite(this.asid, iova, data);
    } catch (e) {
      if (e instanceof DmaError) this.counters.dmaFaults++;
      throw e;
    }
  }

  /** The rings themselves are unreachable: stop serving until the queue is started again. */
  private breakQueue(run: Running, e: unknown): void {
    run.broken = true;
    this.log(e, `virtio-blk: queue ${run.q.index} stopped: its rings are unreachable`);
  }

  private log(e: unknown, msg: string): void {
    this.options.logger?.warn({ reason: e instanceof Error ? e.message : String(e) }, msg);
  }
}
