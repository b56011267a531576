/**
 * The virtqueues, driver features and config space of a simulated vDPA parent (the vdpa_config_ops
 * side of drivers/vdpa/vdpa_sim/vdpa_sim.c), and its data path: a parent whose device id is
 * virtio-blk and that was given a disk serves its ready vrings with the virtio-blk model once the
 * driver sets DRIVER_OK, as vdpa_sim_blk does, every access by DMA through the parent's IOTLB.
 *
 * State kept as the kernel keeps it: the kick eventfd belongs to vhost (vq->kick) and survives a
 * virtio reset; the call eventfd is the parent's vq callback (set_vq_cb), which vdpasim_do_reset
 * clears, so a driver sets it again after a reset. Eventfds are dup'ed: the kernel holds its own
 * reference (eventfd_fget), whatever userspace closes afterwards.
 */
import fs from 'node:fs';
import { dupCloexec } from '../sys/libc.ts';
import { DeviceStatus, VIRTIO_F_ACCESS_PLATFORM, VirtioDeviceId } from '../uapi/constants.ts';
import type { DeviceLogger, DmaCapable } from './types.ts';
import { VirtioBlk } from './virtio-blk.ts';

/** vdpa_sim's VDPASIM_QUEUE_MAX: what get_vq_num_max answers. */
export const SIM_QUEUE_MAX = 256;
const ACCESS_PLATFORM = 1n << BigInt(VIRTIO_F_ACCESS_PLATFORM);
const VERSION_1 = 1n << 32n;

/** The disk a simulated blk parent serves. */
export interface SimDisk {
  /** An open read-write fd of the disk file; the caller keeps and closes it. */
  fd: number;
  /** GET_ID answer (at most 20 bytes). */
  serial: string;
}

interface SimVq {
  num: number;
  desc: bigint;
  avail: bigint;
  used: bigint;
  ready: boolean;
  /** The next avail index, while the data path does not run the ring. */
  lastAvail: number;
  kickFd: number | null;
  callFd: number | null;
}

function newVq(kickFd: number | null = null): SimVq {
  return { num: 0, desc: 0n, avail: 0n, used: 0n, ready: false, lastAvail: 0, kickFd, callFd: null };
}

export class SimVrings {
  /** The virtio-blk model, when the parent has a disk. */
  readonly blk: VirtioBlk | undefined;
  /** Every feature bit the device supports (dev_attr.supported_features). */
  readonly supportedFeatures: bigint;
  private vqs: SimVq[];
  private driverFeatures = 0n;
  private config: Buffer;
  private dma: DmaCapable | undefined;
  private suspended = false;

  constructor(
    deviceId: number,
    vqCount: number,
    private readonly configSize: number,
    disk: SimDisk | undefined,
    private readonly logger: DeviceLogger | undefined,
  ) {
    if (disk !== undefined && deviceId !== VirtioDeviceId.BLOCK) {
      throw new RangeError(`a disk needs device id ${VirtioDeviceId.BLOCK} (virtio-blk), not ${deviceId}`);
    }
    this.vqs = Array.from({ length: vqCount }, () => newVq());
    this.blk =
      disk === undefined
        ? undefined
        : new VirtioBlk({
            diskFd: disk.fd,
            serial: disk.serial,
            maxQueueSize: SIM_QUEUE_MAX,
            dma: {
              dmaRead: (asid, iova, length) => this.requireDma().dmaRead(asid, iova, length),
              dmaWrite: (asid, iova, data) => this.requireDma().dmaWrite(asid, iova, data),
            },
            ...(logger ? { logger } : {}),
          });
    // VDPASIM_FEATURES: every simulated device has VERSION_1 and ACCESS_PLATFORM.
    this.supportedFeatures = (this.blk?.features ?? 0n) | VERSION_1 | ACCESS_PLATFORM;
    this.config = this.initialConfig();
  }

  /** The DMA the data path goes through (the simulated device's, translating by the parent's IOTLB). */
  attachDma(dma: DmaCapable): void {
    this.dma = dma;
  }

  get features(): bigint {
    return this.driverFeatures;
  }

  /**
   * set_driver_features: vdpasim refuses a driver that does not take ACCESS_PLATFORM ("DMA
   * mapping must be done by driver") and keeps only the bits it supports.
   */
  setDriverFeatures(features: bigint): boolean {
    if ((features & ACCESS_PLATFORM) === 0n) return false;
    this.driverFeatures = features & this.supportedFeatures;
    this.blk?.setFeatures(this.driverFeatures & this.blk.features);
    return true;
  }

  setNum(index: number, num: number): void {
    this.vqs[index]!.num = num;
  }

  setAddress(index: number, desc: bigint, avail: bigint, used: bigint): void {
    Object.assign(this.vqs[index]!, { desc, avail, used });
  }

  setLastAvail(index: number, lastAvail: number): void {
    this.vqs[index]!.lastAvail = lastAvail;
  }

  /** get_vq_state: where the device is in the avail ring (live while the data path runs it). */
  lastAvail(index: number): number {
    return this.blk?.lastAvail(index) ?? this.vqs[index]!.lastAvail;
  }

  /** Replaces the kick (or call) eventfd with a dup of `fd` (null: unbind). */
  setEventfd(index: number, which: 'kickFd' | 'callFd', fd: number | null, status: number): void {
    const vq = this.vqs[index]!;
    this.stopRing(index);
    const old = vq[which];
    vq[which] = fd === null ? null : dupCloexec(fd);
    if (old !== null) fs.closeSync(old);
    this.sync(index, status);
  }

  /** Whether the vring is enabled (set_vq_ready). */
  isReady(index: number): boolean {
    return this.vqs[index]!.ready;
  }

  setReady(index: number, ready: boolean, status: number): void {
    const vq = this.vqs[index]!;
    if (!ready) this.stopRing(index);
    vq.ready = ready;
    this.sync(index, status);
  }

  getConfig(offset: number, length: number): Buffer {
    return Buffer.from(this.config.subarray(offset, offset + length));
  }

  setConfig(offset: number, data: Uint8Array): void {
    this.config.set(data, offset);
  }

  /** The driver set a new status: DRIVER_OK starts the data path of every ready vring. */
  statusChanged(status: number): void {
    this.vqs.forEach((_, i) => {
      this.sync(i, status);
    });
  }

  /** vdpasim_suspend / vdpasim_resume: a suspended device serves nothing and keeps its ring state. */
  setSuspended(suspended: boolean, status: number): void {
    this.suspended = suspended;
    if (!suspended) this.statusChanged(status);
    else for (let i = 0; i < this.vqs.length; i++) this.stopRing(i);
  }

  /** vdpasim_do_reset: rings, features and call callbacks go; the vhost kick eventfds stay. */
  reset(): void {
    this.vqs.forEach((vq, i) => {
      this.stopRing(i);
      if (vq.callFd !== null) fs.closeSync(vq.callFd);
      this.vqs[i] = newVq(vq.kickFd);
    });
    this.driverFeatures = 0n;
    this.suspended = false;
    this.blk?.setFeatures(0n);
    this.config = this.initialConfig();
  }

  /** The file is released: every eventfd is closed. */
  release(): void {
    this.reset();
    for (const vq of this.vqs) {
      if (vq.kickFd !== null) fs.closeSync(vq.kickFd);
      vq.kickFd = null;
    }
  }

  private initialConfig(): Buffer {
    const c = Buffer.alloc(this.configSize);
    this.blk?.config().copy(c, 0, 0, this.configSize);
    return c;
  }

  /** Runs the ring in the model when the device is DRIVER_OK and the ring ready and kickable. */
  private sync(index: number, status: number): void {
    const vq = this.vqs[index]!;
    if (this.blk === undefined || this.suspended || this.blk.lastAvail(index) !== undefined) return;
    if ((status & DeviceStatus.DRIVER_OK) === 0 || !vq.ready || vq.kickFd === null || vq.num === 0) return;
    const call = (): void => {
      if (vq.callFd !== null) signalEventfd(vq.callFd);
    };
    try {
      this.blk.start({
        index,
        size: vq.num,
        desc: vq.desc,
        avail: vq.avail,
        used: vq.used,
        lastAvail: vq.lastAvail,
        kickFd: vq.kickFd,
        notify: call,
      });
    } catch (e) {
      // The device cannot run the ring (a queue it lacks, VERSION_1 not negotiated): like a
      // parent that ignores it, the driver sees no progress.
      this.logger?.warn(
        { queue: index, reason: (e as Error).message },
        'simulated device: vring not started',
      );
    }
  }

  private stopRing(index: number): void {
    if (this.blk?.lastAvail(index) === undefined) return;
    this.vqs[index]!.lastAvail = this.blk.stop(index);
  }

  private requireDma(): DmaCapable {
    if (this.dma === undefined) throw new Error('the simulated parent has no DMA attached');
    return this.dma;
  }
}

const ONE = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);

/** eventfd_signal: add 1; a full counter (EAGAIN) is signalled already. */
export function signalEventfd(fd: number): void {
  try {
    fs.writeSync(fd, ONE);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
  }
}
