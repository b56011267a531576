/**
 * A vhost-user-blk backend for tests: the vhost-user backend glued to a simulated vDPA blk device
 * whose IOTLB holds the front-end's memory table (IOVA = guest physical address, each region
 * mapped from the file its fd names), and the virtio-blk model serving a disk file by DMA through
 * that IOTLB. The memory goes straight to the device here; in the agent it will go through the
 * device queue.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import { VirtioBlk } from '../../src/device/virtio-blk.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { SharedMemoryRegistry } from '../../src/memory/registry.ts';
import { dupCloexec } from '../../src/sys/libc.ts';
import { VirtioDeviceId } from '../../src/uapi/constants.ts';
import {
  type BackendLogger,
  VhostUserBackend,
  type VhostUserBackendOptions,
  type VhostUserDeviceSide,
  type VringConfig,
} from '../../src/vhost-user/backend.ts';
import { fileKeyId, type MemoryDiff, type TableRegion } from '../../src/vhost-user/memory-table.ts';
import { VhostUserListener } from '../../src/vhost-user/transport.ts';

export interface SimBlkOptions {
  socketPath: string;
  diskPath: string;
  /** Deliberately wrong mapping (for the negative test): IOVA = guest physical + this. */
  iovaSkew?: bigint;
  backend?: Omit<VhostUserBackendOptions, 'logger'>;
  logger?: BackendLogger;
}

/** Every IOTLB op the device was sent, in order, for assertions on what a change cost. */
export type OpLog = IotlbOp[];

export class SimBlkBackend {
  readonly registry: SharedMemoryRegistry;
  readonly device: SimulatedDevice;
  readonly blk: VirtioBlk;
  readonly ops: OpLog = [];
  readonly backends: VhostUserBackend[] = [];
  private readonly listener: VhostUserListener;
  private readonly diskFd: number;
  private readonly stateDir: string;
  /** Registered memory per file, with the number of table regions that use it. */
  private readonly files = new Map<string, { id: string; regions: number }>();
  private readonly errors: Error[] = [];

  constructor(readonly options: SimBlkOptions) {
    this.stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-vu-'));
    this.registry = new SharedMemoryRegistry({ allowedRoots: [], stateDir: this.stateDir });
    this.device = new SimulatedDevice(
      // vdpa_sim_blk with batch_mapping=0 and use_va=1: one dma_map per UPDATE, nothing pinned.
      {
        name: 'vublk0',
        deviceId: VirtioDeviceId.BLOCK,
        vqCount: 1,
        configSize: 60,
        iommu: 'onchip',
        onchipMap: 'dma_map',
        useVa: true,
      },
      this.registry,
    );
    this.diskFd = fs.openSync(options.diskPath, 'r+');
    this.blk = new VirtioBlk({
      diskFd: this.diskFd,
      dma: this.device,
      serial: 'vdpa-mapd-vublk0',
      ...(options.logger ? { logger: options.logger } : {}),
    });
    const side = this.deviceSide();
    this.listener = new VhostUserListener({
      path: options.socketPath,
      onConnection: (conn) => {
        if (this.backends.some((b) => b.error === undefined && !b.closed)) {
          conn.close(new Error('a front-end is already attached'));
          return;
        }
        this.backends.push(
          new VhostUserBackend(conn, side, {
            ...options.backend,
            ...(options.logger ? { logger: options.logger } : {}),
          }),
        );
      },
      onError: (e) => this.errors.push(e),
    });
  }

  get listenerErrors(): Error[] {
    return this.errors;
  }

  /** The device's live IOTLB entries. */
  mappings() {
    return this.device.mappings();
  }

  async close(): Promise<void> {
    this.listener.close();
    await Promise.all(this.backends.map((b) => b.done));
    this.blk.stopAll();
    await this.device.close();
    fs.closeSync(this.diskFd);
    this.registry.closeAll();
    fs.rmSync(this.stateDir, { recursive: true, force: true });
  }

  private deviceSide(): VhostUserDeviceSide {
    const skew = this.options.iovaSkew ?? 0n;
    return blkDeviceSide(this.blk, async (diff: MemoryDiff) => {
      const ops: IotlbOp[] = [];
      for (const r of diff.removed) {
        ops.push({ type: 'invalidate', asid: 0, iova: r.guestAddr + skew, size: r.size });
      }
      for (const r of diff.added) {
        ops.push({
          type: 'update',
          asid: 0,
          iova: r.guestAddr + skew,
          size: r.size,
          memory: this.retain(r, r.fd),
          offset: r.mmapOffset,
          perm: 'rw',
        });
      }
      this.ops.push(...ops);
      const results = await this.device.apply(ops);
      diff.removed.forEach((r) => {
        this.release(r);
      });
      const failed = results.find((x) => !x.ok);
      if (failed && !failed.ok) throw new Error(`${failed.errno}: ${failed.message}`);
    });
  }

  /** The registry memory of a region's file, adopting a dup of the fd the first time. */
  private retain(r: TableRegion, fd: number): string {
    const key = fileKeyId(r.file);
    let entry = this.files.get(key);
    if (entry === undefined) {
      entry = { id: `vu-${key.replace(':', '-')}`, regions: 0 };
      this.registry.adopt({ id: entry.id, fd: dupCloexec(fd) });
      this.files.set(key, entry);
    }
    entry.regions++;
    return entry.id;
  }

  private release(r: TableRegion): void {
    const key = fileKeyId(r.file);
    const entry = this.files.get(key);
    if (entry === undefined) return;
    if (--entry.regions === 0) {
      this.registry.release(entry.id);
      this.files.delete(key);
    }
  }
}

/** The virtio-blk model as a backend's device side; its memory changes go to `memoryChanged`. */
export function blkDeviceSide(
  blk: VirtioBlk,
  memoryChanged: (diff: MemoryDiff) => Promise<void>,
): VhostUserDeviceSide {
  return {
    features: blk.features,
    queueCount: blk.queueCount,
    maxQueueSize: blk.maxQueueSize,
    config: () => blk.config(),
    featuresNegotiated: (features) => blk.setFeatures(features),
    startVring: (v: VringConfig) =>
      blk.start({
        ...v,
        notify: () => {
          const fd = v.callFd();
          if (fd !== null) signal(fd);
        },
      }),
    stopVring: (index) => blk.stop(index),
    memoryChanged,
  };
}

const ONE = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);

/** eventfd_write(fd, 1); a full counter (EAGAIN) already means "signalled". */
function signal(fd: number): void {
  try {
    fs.writeSync(fd, ONE);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
  }
}
