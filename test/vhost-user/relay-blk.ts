/**
 * A vhost-user-blk backend for tests: the vhost-user backend with the vdpa relay over a simulated
 * vhost-vdpa blk device (vdpa_sim_blk-like: its own data path serves a disk file by DMA through
 * its IOTLB), or over any vhost-vdpa blk device `openDevice` gives (the kernel tier's). The relay hands the memory table to `memory`, which here maps it straight into the
 * device (IOVA = guest physical address, each region mapped from the file its fd names); in the
 * agent it goes through the device queue.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import type { VhostVdpaDevice } from '../../src/device/vhost-vdpa.ts';
import type { VirtioBlk } from '../../src/device/virtio-blk.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { SharedMemoryRegistry } from '../../src/memory/registry.ts';
import { dupCloexec } from '../../src/sys/libc.ts';
import {
  type BackendLogger,
  VhostUserBackend,
  type VhostUserBackendOptions,
} from '../../src/vhost-user/backend.ts';
import { fileKeyId, type MemoryDiff, type TableRegion } from '../../src/vhost-user/memory-table.ts';
import { type VhostUserConnection, VhostUserListener } from '../../src/vhost-user/transport.ts';
import { VdpaRelay } from '../../src/vhost-user/vdpa-relay.ts';

export interface RelayBlkOptions<D extends VhostVdpaDevice> {
  /** Serve this socket; without it, connections are handed to serve(). */
  socketPath?: string;
  /** The simulated device's disk (when there is no `openDevice`). */
  diskPath?: string;
  /** Opens the device to relay to, its memory in the backend's registry; default the simulated one. */
  openDevice?: (registry: SharedMemoryRegistry) => D;
  /** Deliberately wrong mapping (for the negative test): IOVA = guest physical + this. */
  iovaSkew?: bigint;
  backend?: Omit<VhostUserBackendOptions, 'logger'>;
  logger?: BackendLogger;
}

export class RelayBlkBackend<D extends VhostVdpaDevice = SimulatedDevice> {
  readonly registry: SharedMemoryRegistry;
  readonly device: D;
  readonly relay: VdpaRelay;
  /** Every IOTLB op the device was sent, in order, for assertions on what a change cost. */
  readonly ops: IotlbOp[] = [];
  readonly backends: VhostUserBackend[] = [];
  private readonly listener: VhostUserListener | undefined;
  private readonly stateDir: string;
  /** Registered memory per file, with the number of table regions that use it. */
  private readonly files = new Map<string, { id: string; regions: number }>();
  private readonly errors: Error[] = [];

  constructor(readonly options: RelayBlkOptions<D>) {
    this.stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-vu-'));
    this.registry = new SharedMemoryRegistry({ allowedRoots: [], stateDir: this.stateDir });
    // Without openDevice, D is its default, SimulatedDevice.
    this.device = options.openDevice?.(this.registry) ?? (this.simulatedDevice() as unknown as D);
    this.relay = new VdpaRelay(this.device, (diff) => this.memory(diff), options.logger);
    const { socketPath } = options;
    this.listener =
      socketPath === undefined
        ? undefined
        : new VhostUserListener({
            path: socketPath,
            onConnection: (conn) => {
              if (this.backends.some((b) => !b.closed)) {
                conn.close(new Error('a front-end is already attached'));
                return;
              }
              this.serve(conn);
            },
            onError: (e) => this.errors.push(e),
          });
  }

  /** The simulated device's data path (its counters show the I/O and every fault). */
  get blk(): VirtioBlk {
    if (!(this.device instanceof SimulatedDevice)) throw new Error(`${this.device.name} is not simulated`);
    return this.device.simulator.vrings.blk!;
  }

  get listenerErrors(): Error[] {
    return this.errors;
  }

  serve(conn: VhostUserConnection): VhostUserBackend {
    const backend = new VhostUserBackend(conn, this.relay, {
      ...this.options.backend,
      ...(this.options.logger ? { logger: this.options.logger } : {}),
    });
    this.backends.push(backend);
    return backend;
  }

  /** The device's live IOTLB entries. */
  mappings() {
    return this.device.mappings();
  }

  async close(): Promise<void> {
    this.listener?.close();
    await Promise.all(this.backends.map((b) => b.done));
    await this.device.close();
    this.registry.closeAll();
    fs.rmSync(this.stateDir, { recursive: true, force: true });
  }

  /** vdpa_sim_blk with batch_mapping=0 and use_va=1: one dma_map per UPDATE, nothing pinned. */
  private simulatedDevice(): SimulatedDevice {
    const disk = this.options.diskPath;
    if (disk === undefined) throw new Error('RelayBlkBackend: diskPath or openDevice is needed');
    const spec = { name: 'vublk0', disk, iommu: 'onchip', onchipMap: 'dma_map', useVa: true } as const;
    return new SimulatedDevice(spec, this.registry, this.options.logger);
  }

  /** The relay's memory callback: the diff as IOTLB ops, applied to the device in one call. */
  private async memory(diff: MemoryDiff): Promise<void> {
    const skew = this.options.iovaSkew ?? 0n;
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
    for (const r of diff.removed) this.release(r);
    const failed = results.find((x) => !x.ok);
    if (failed && !failed.ok) throw new Error(`${failed.errno}: ${failed.message}`);
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
