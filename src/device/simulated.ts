/**
 * A simulated vhost-vdpa device: the shared backend (vhost-vdpa.ts) driving the in-memory kernel
 * of sim-kernel.ts through the same ioctls and 72-byte messages a real device gets. Its DMA goes
 * through the parent's own IOTLB into the real shared memory, so translation can be verified.
 */
import fs from 'node:fs';
import { FULL_IOVA_RANGE, hex, type IovaRange } from '../iotlb/types.ts';
import { U64_LIMIT } from '../u64.ts';
import type { MemoryRegistry } from '../memory/types.ts';
import { RLIM_INFINITY } from '../sys/libc.ts';
import { backendFeatureMask, VirtioDeviceId } from '../uapi/constants.ts';
import { DmaError } from './errors.ts';
import { PinnedMemory } from './memlock.ts';
import { type FaultInjection, type SimIommu, type SimOnchipMap, SimulatedVdpa } from './sim-kernel.ts';
import type { DeviceCounters, DeviceLogger, DmaCapable } from './types.ts';
import { VhostVdpaDevice } from './vhost-vdpa.ts';

/** sizeof(struct virtio_blk_config). */
const BLK_CONFIG_SIZE = 60;

/** What a simulated onchip device offers unless told otherwise. */
export const DEFAULT_SIM_FEATURES: bigint = backendFeatureMask(
  'IOTLB_MSG_V2',
  'IOTLB_BATCH',
  'IOTLB_ASID',
  'SUSPEND',
  'RESUME',
  'IOTLB_PERSIST',
);

/**
 * What vp_vdpa offered behind a platform IOMMU (Debian 6.12, measured under QEMU; docs/kernel-notes.md):
 * MSG_V2, BATCH, ASID and IOTLB_PERSIST (0x10e), one address space, 3 vqs, 4096 config bytes.
 */
export const VP_VDPA_FACTS = {
  features: backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID', 'IOTLB_PERSIST'),
  asNum: 1,
  vqCount: 3,
  configSize: 4096,
} as const;

/** vp_vdpa's IOVA range behind QEMU's intel-iommu (aw-bits 39): `[0, 0x7fffffffff]`. */
export const IOVA_RANGE_39_BITS: IovaRange = { first: 0n, last: (1n << 39n) - 1n };

/**
 * The kinds of parent the simulator can be, and how (defaults in brackets):
 * - vp_vdpa behind a platform IOMMU, PA mode: `{ iommu: 'platform' }` [the default; facts of
 *   {@link VP_VDPA_FACTS}; add `iovaRange: IOVA_RANGE_39_BITS` for intel-iommu's aperture and
 *   `lacksVqState: true` for its vrings' state];
 * - vdpa_sim batch_mapping=1 (set_map): `{ iommu: 'onchip', useVa: false | true }`;
 * - vdpa_sim batch_mapping=0 (dma_map): `{ iommu: 'onchip', onchipMap: 'dma_map', useVa }`;
 * - VDUSE: `{ iommu: 'onchip', useVa: true, keepsMapOnReset: true, asNum: 1 }`.
 */
export interface SimulatedDeviceOptions extends FaultInjection {
  name: string;
  /** virtio device id; default 1 (net). */
  deviceId?: number;
  /** default 'platform' (PA mode, like vp_vdpa). */
  iommu?: SimIommu;
  /** onchip only: set_map (default) or dma_map; see SimulatedVdpaConfig.onchipMap. */
  onchipMap?: SimOnchipMap;
  /**
   * VA mode (use_va: nothing pinned, any byte range). Default: PA mode for a platform IOMMU (which
   * has no VA mode) or when `memlock` is given, else VA mode.
   */
  useVa?: boolean;
  /** default the full 64-bit range. */
  iovaRange?: IovaRange;
  /** Address spaces; default 1 for platform, 2 for onchip (like mlx5 with its control vq). */
  asNum?: number;
  /** Virtqueue groups; default asNum. */
  groupNum?: number;
  /** default 3 for platform (vp_vdpa), 2 for onchip (one rx/tx pair). */
  vqCount?: number;
  /** default 4096 bytes for platform (vp_vdpa), 64 for onchip. */
  configSize?: number;
  /** Offered backend features; default 0x10e for platform (vp_vdpa), {@link DEFAULT_SIM_FEATURES} for onchip. */
  features?: bigint;
  /** Time each set_map push takes (set_map only); default 0. */
  pushDelayMs?: number;
  /** PA mode: the simulated RLIMIT_MEMLOCK in bytes, for the kernel and the guard alike; default unlimited. */
  memlock?: bigint;
  /** The guard's pinned-pages account (to share one across devices, as one agent process); default its own. */
  pins?: PinnedMemory;
  /**
   * The simulated kernel's pinned_vm (VmPin), to share one across simulated parents as one owner
   * process; default its own. Read it as `simulator.pins.pinnedBytes`.
   */
  vmPin?: PinnedMemory;
  /** The kernel's PAGE_SIZE; default 4096. PA mode requires mappings aligned to it. */
  pageSize?: bigint;
  /** PA mode: pages per physically contiguous run (one kernel entry each); default 1 (shmem), 512 for THP. */
  contiguousPages?: number;
  /** The parent keeps its table across reset and close, as VDUSE does; default false. */
  keepsMapOnReset?: boolean;
  /** GET_VRING_BASE is EOPNOTSUPP, as on vp_vdpa (SimulatedVdpaConfig.lacksVqState); default false. */
  lacksVqState?: boolean;
  /**
   * virtio-blk (deviceId 2, which it implies) with a data path: the disk file it serves, opened
   * read-write for the device's life; GET_ID answers `vdpa-mapd-<name>` (cut to 20 bytes).
   */
  disk?: string;
}

interface DmaPiece {
  memory: string;
  offset: bigint;
  length: number;
}

export class SimulatedDevice extends VhostVdpaDevice implements DmaCapable {
  /** The simulated parent and kernel, for inspection (its own tables, counters, status). */
  readonly simulator: SimulatedVdpa;
  private readonly memory: MemoryRegistry;
  private diskFd: number | undefined;

  constructor(options: SimulatedDeviceOptions, memory: MemoryRegistry, logger?: DeviceLogger) {
    const iommu = options.iommu ?? 'platform';
    const platform = iommu === 'platform';
    const asNum = options.asNum ?? (platform ? VP_VDPA_FACTS.asNum : 2);
    const deviceId =
      options.deviceId ?? (options.disk === undefined ? VirtioDeviceId.NET : VirtioDeviceId.BLOCK);
    const blk = deviceId === VirtioDeviceId.BLOCK;
    const diskFd = options.disk === undefined ? undefined : fs.openSync(options.disk, 'r+');
    const simulator = new SimulatedVdpa(
      {
        deviceId,
        iommu,
        iovaRange: options.iovaRange ?? FULL_IOVA_RANGE,
        asNum,
        groupNum: options.groupNum ?? asNum,
        // vdpa_sim_blk: one request queue and the 60-byte struct virtio_blk_config.
        vqCount: options.vqCount ?? (blk ? 1 : platform ? VP_VDPA_FACTS.vqCount : 2),
        configSize: options.configSize ?? (blk ? BLK_CONFIG_SIZE : platform ? VP_VDPA_FACTS.configSize : 64),
        offeredFeatures: options.features ?? (platform ? VP_VDPA_FACTS.features : DEFAULT_SIM_FEATURES),
        pushDelayMs: options.pushDelayMs ?? 0,
        ...pick(options, [
          'onchipMap',
          'useVa',
          'memlock',
          'vmPin',
          'pageSize',
          'contiguousPages',
          'keepsMapOnReset',
          'lacksVqState',
          'failAfter',
          'failOn',
        ]),
        ...(diskFd === undefined
          ? {}
          : { disk: { fd: diskFd, serial: `vdpa-mapd-${options.name}`.slice(0, 20) } }),
        ...(logger ? { logger } : {}),
      },
      memory,
    );
    const pinned = !simulator.useVa;
    const limit = options.memlock ?? RLIM_INFINITY;
    super({
      name: options.name,
      kind: 'simulated',
      node: null,
      iommu,
      pinned,
      parentKeepsMapOnReset: simulator.config.keepsMapOnReset ?? false,
      pageSize: simulator.pageSize,
      transport: simulator.open(),
      memory,
      ...(pinned ? { pins: options.pins ?? new PinnedMemory(() => limit, simulator.pageSize) } : {}),
      ...(logger ? { logger } : {}),
    });
    this.simulator = simulator;
    this.memory = memory;
    this.diskFd = diskFd;
    simulator.vrings.attachDma(this);
  }

  override async close(): Promise<void> {
    await super.close();
    if (this.diskFd === undefined) return;
    fs.closeSync(this.diskFd);
    this.diskFd = undefined;
  }

  override counters(): DeviceCounters {
    return { ...super.counters(), ...this.simulator.counters };
  }

  /** The device reads `length` bytes at `iova`: every byte must be mapped with RO or RW. */
  dmaRead(asid: number, iova: bigint, length: number): Buffer {
    const pieces = this.translate(asid, iova, length, 'read');
    return Buffer.concat(pieces.map((p) => this.memory.read(p.memory, p.offset, p.length)));
  }

  /** The device writes `data` at `iova`: every byte must be mapped WO or RW; nothing is written otherwise. */
  dmaWrite(asid: number, iova: bigint, data: Uint8Array): void {
    let at = 0;
    for (const p of this.translate(asid, iova, data.byteLength, 'write')) {
      this.memory.write(p.memory, p.offset, data.subarray(at, at + p.length));
      at += p.length;
    }
  }

  /** Walks the parent's table: a range may span several entries; every byte must be allowed. */
  private translate(asid: number, iova: bigint, length: number, access: 'read' | 'write'): DmaPiece[] {
    const what = `${this.name}: DMA ${access} of ${length} bytes at IOVA ${hex(iova)} in asid ${asid}`;
    if (!Number.isInteger(length) || length <= 0)
      throw new DmaError('BAD_LENGTH', `${what}: bad length`, asid, iova);
    if (iova < 0n || iova + BigInt(length) > U64_LIMIT) {
      throw new DmaError('BAD_LENGTH', `${what}: runs past the end of the IOVA space`, asid, iova);
    }
    const table = this.simulator.deviceTable(asid);
    if (!table)
      throw new DmaError('BAD_ASID', `${what}: the device has no address space ${asid}`, asid, iova);
    const allowed = access === 'read' ? ['ro', 'rw'] : ['wo', 'rw'];
    const pieces: DmaPiece[] = [];
    let cur = iova;
    let left = BigInt(length);
    while (left > 0n) {
      const hit = table.translate(cur);
      if (!hit) throw new DmaError('UNMAPPED', `${what}: IOVA ${hex(cur)} is not mapped`, asid, cur);
      if (!allowed.includes(hit.region.perm)) {
        throw new DmaError(
          'PERMISSION',
          `${what}: IOVA ${hex(cur)} is mapped ${hit.region.perm}, which does not allow a device ${access}`,
          asid,
          cur,
        );
      }
      const n = left < hit.bytesToEnd ? left : hit.bytesToEnd;
      pieces.push({ memory: hit.region.memory, offset: hit.memoryOffset, length: Number(n) });
      cur += n;
      left -= n;
    }
    return pieces;
  }
}

/** The options of `keys` that are set (exactOptionalPropertyTypes: absent, never undefined). */
function pick<T extends object, K extends keyof T>(from: T, keys: readonly K[]): Partial<Pick<T, K>> {
  const out: Partial<Pick<T, K>> = {};
  for (const k of keys) if (from[k] !== undefined) out[k] = from[k];
  return out;
}
