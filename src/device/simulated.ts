/**
 * A simulated vhost-vdpa device: the shared backend (vhost-vdpa.ts) driving the in-memory kernel
 * of sim-kernel.ts through the same ioctls and 72-byte messages a real device gets. Its DMA goes
 * through the parent's own IOTLB into the real shared memory, so translation can be verified.
 */
import { FULL_IOVA_RANGE, hex, type IovaRange, U64_LIMIT } from '../iotlb/types.ts';
import type { MemoryRegistry } from '../memory/types.ts';
import { backendFeatureMask, VirtioDeviceId } from '../uapi/constants.ts';
import { DmaError } from './errors.ts';
import { PinnedMemory } from './memlock.ts';
import { type FaultInjection, type SimIommu, SimulatedVdpa } from './sim-kernel.ts';
import type { DeviceCounters, DeviceLogger, DmaCapable } from './types.ts';
import { VhostVdpaDevice } from './vhost-vdpa.ts';

/** What a simulated device offers unless told otherwise. */
export const DEFAULT_SIM_FEATURES: bigint = backendFeatureMask(
  'IOTLB_MSG_V2',
  'IOTLB_BATCH',
  'IOTLB_ASID',
  'SUSPEND',
  'RESUME',
  'IOTLB_PERSIST',
);

export interface SimulatedDeviceOptions extends FaultInjection {
  name: string;
  /** virtio device id; default 1 (net). */
  deviceId?: number;
  /** default 'platform'. */
  iommu?: SimIommu;
  /** default the full 64-bit range. */
  iovaRange?: IovaRange;
  /** Address spaces; default 1 for platform, 2 for onchip (like mlx5 with its control vq). */
  asNum?: number;
  /** Virtqueue groups; default asNum. */
  groupNum?: number;
  /** default 2 (one rx/tx pair). */
  vqCount?: number;
  /** default 64 bytes. */
  configSize?: number;
  /** Offered backend features; default {@link DEFAULT_SIM_FEATURES}. */
  features?: bigint;
  /** Time each set_map push takes (onchip only); default 0. */
  pushDelayMs?: number;
  /**
   * Simulate a parent in PA mode (pinned pages) under this RLIMIT_MEMLOCK, in bytes; default VA
   * mode (nothing pinned).
   */
  memlock?: bigint;
  /** The pinned-pages account the guard charges (to share one across devices); default its own. */
  pins?: PinnedMemory;
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

  constructor(options: SimulatedDeviceOptions, memory: MemoryRegistry, logger?: DeviceLogger) {
    const iommu = options.iommu ?? 'platform';
    const asNum = options.asNum ?? (iommu === 'onchip' ? 2 : 1);
    const simulator = new SimulatedVdpa(
      {
        deviceId: options.deviceId ?? VirtioDeviceId.NET,
        iommu,
        iovaRange: options.iovaRange ?? FULL_IOVA_RANGE,
        asNum,
        groupNum: options.groupNum ?? asNum,
        vqCount: options.vqCount ?? 2,
        configSize: options.configSize ?? 64,
        offeredFeatures: options.features ?? DEFAULT_SIM_FEATURES,
        pushDelayMs: options.pushDelayMs ?? 0,
        ...(options.memlock !== undefined ? { memlock: options.memlock } : {}),
        ...(options.failAfter !== undefined ? { failAfter: options.failAfter } : {}),
        ...(options.failOn !== undefined ? { failOn: options.failOn } : {}),
      },
      memory,
    );
    super({
      name: options.name,
      kind: 'simulated',
      node: null,
      iommu,
      pinned: options.memlock !== undefined,
      transport: simulator.open(),
      memory,
      ...(options.memlock !== undefined
        ? { pins: options.pins ?? new PinnedMemory(() => options.memlock!) }
        : {}),
      ...(logger ? { logger } : {}),
    });
    this.simulator = simulator;
    this.memory = memory;
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
