/**
 * The vDPA parent kinds the tier boots (init.sh sets the one named by VDPA_MAPD_KIND up as
 * /dev/vhost-vdpa-0): what the kernel answered for each (docs/kernel-notes.md, "Parent kinds"),
 * and the simulator (src/device/sim-kernel.ts) configured as that kind.
 */
import fs from 'node:fs';
import { SimulatedVdpa, type SimulatedVdpaConfig } from '../../../src/device/sim-kernel.ts';
import { FULL_IOVA_RANGE, type IovaRange } from '../../../src/iotlb/types.ts';
import type { MemoryRegistry } from '../../../src/memory/types.ts';
import { getrlimit, RLIMIT_MEMLOCK } from '../../../src/sys/libc.ts';
import { ownVmPin } from '../../../src/sys/proc-self.ts';
import { backendFeatureMask } from '../../../src/uapi/index.ts';

export type KindName = 'vduse' | 'vp-vdpa' | 'sim-dma-pa' | 'sim-dma-va' | 'sim-setmap-pa' | 'sim-setmap-va';

export interface KindFacts {
  name: KindName;
  /** What the parent is, for messages. */
  what: string;
  deviceId: number;
  /** The simulator's parent: a platform IOMMU (vp_vdpa) or onchip with set_map or dma_map. */
  simIommu: SimulatedVdpaConfig['iommu'];
  onchipMap?: SimulatedVdpaConfig['onchipMap'];
  /** What discovery must say (the agent's `iommu` fact). */
  iommu: 'platform' | 'onchip';
  /** PA mode: the kernel pins every mapped page (VmPin). */
  pinned: boolean;
  offeredFeatures: bigint;
  asNum: number;
  groupNum: number;
  vqCount: number;
  configSize: number;
  iovaRange: IovaRange;
  /** VDUSE keeps its table across reset and release (docs/kernel-notes.md R1, R7). */
  keepsMapOnReset: boolean;
  /** vp_vdpa cannot tell or set a vring's state (docs/kernel-notes.md B3). */
  lacksVqState: boolean;
}

const VDPA_SIM_FEATURES = backendFeatureMask(
  'IOTLB_MSG_V2',
  'IOTLB_BATCH',
  'IOTLB_ASID',
  'SUSPEND',
  'RESUME',
  'ENABLE_AFTER_DRIVER_OK',
  'IOTLB_PERSIST',
); // 0x17e
const vdpaSim = (name: KindName, batchMapping: boolean, useVa: boolean): KindFacts => ({
  name,
  what: `vdpa_sim_net batch_mapping=${batchMapping ? 1 : 0} use_va=${useVa ? 1 : 0}`,
  deviceId: 1,
  simIommu: 'onchip',
  onchipMap: batchMapping ? 'set_map' : 'dma_map',
  iommu: 'onchip',
  pinned: !useVa,
  offeredFeatures: VDPA_SIM_FEATURES,
  asNum: 2,
  groupNum: 2,
  vqCount: 3,
  configSize: 24,
  iovaRange: FULL_IOVA_RANGE,
  keepsMapOnReset: false,
  lacksVqState: false,
});

export const KIND_FACTS: Record<KindName, KindFacts> = {
  vduse: {
    name: 'vduse',
    what: 'VDUSE virtio-blk (vduse-daemon)',
    deviceId: 2,
    simIommu: 'onchip',
    onchipMap: 'set_map',
    iommu: 'onchip',
    pinned: false,
    offeredFeatures: backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID'),
    asNum: 1,
    groupNum: 1,
    vqCount: 1,
    configSize: 72,
    iovaRange: FULL_IOVA_RANGE,
    keepsMapOnReset: true,
    lacksVqState: false,
  },
  'vp-vdpa': {
    name: 'vp-vdpa',
    what: 'vp_vdpa on virtio-net-pci behind intel-iommu',
    deviceId: 1,
    simIommu: 'platform',
    iommu: 'platform',
    pinned: true,
    offeredFeatures: backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID', 'IOTLB_PERSIST'), // 0x10e
    asNum: 1,
    groupNum: 1,
    vqCount: 3,
    configSize: 4096,
    // QEMU's intel-iommu with aw-bits 39: the domain's aperture.
    iovaRange: { first: 0n, last: (1n << 39n) - 1n },
    keepsMapOnReset: false,
    lacksVqState: true,
  },
  'sim-dma-pa': vdpaSim('sim-dma-pa', false, false),
  'sim-dma-va': vdpaSim('sim-dma-va', false, true),
  'sim-setmap-pa': vdpaSim('sim-setmap-pa', true, false),
  'sim-setmap-va': vdpaSim('sim-setmap-va', true, true),
};

/** The kind init.sh set up for this step. */
export function currentKind(): KindFacts {
  const name = process.env.VDPA_MAPD_KIND as KindName | undefined;
  const facts = name === undefined ? undefined : KIND_FACTS[name];
  if (!facts) throw new Error(`VDPA_MAPD_KIND=${name}: not a kind (${Object.keys(KIND_FACTS).join(' ')})`);
  return facts;
}

/** The simulated parent configured as `kind`, pinning under this process's RLIMIT_MEMLOCK in PA mode. */
export function simulatorFor(kind: KindFacts, memory: MemoryRegistry): SimulatedVdpa {
  return new SimulatedVdpa(
    {
      deviceId: kind.deviceId,
      iommu: kind.simIommu,
      iovaRange: kind.iovaRange,
      asNum: kind.asNum,
      groupNum: kind.groupNum,
      vqCount: kind.vqCount,
      configSize: kind.configSize,
      offeredFeatures: kind.offeredFeatures,
      pushDelayMs: 0,
      keepsMapOnReset: kind.keepsMapOnReset,
      lacksVqState: kind.lacksVqState,
      useVa: !kind.pinned,
      ...(kind.onchipMap ? { onchipMap: kind.onchipMap } : {}),
      ...(kind.pinned ? { memlock: getrlimit(RLIMIT_MEMLOCK).cur } : {}),
    },
    memory,
  );
}

/** `VmPin` of a process (mm->pinned_vm) in bytes: what the kernel pins for it. */
export function vmPinOf(pid: number | 'self' = 'self'): bigint {
  const pinned = ownVmPin(`/proc/${pid}/status`);
  if (pinned === undefined) throw new Error(`/proc/${pid}/status has no VmPin line`);
  return pinned;
}

/**
 * The page frame numbers behind `pages` pages of this process from `uaddr` (/proc/self/pagemap,
 * root only; 0n for a page not present). PA mode makes one kernel entry per run of ascending
 * consecutive frames (vhost_vdpa_pa_map), so these tell where the kernel's entries end.
 */
export function pageFrames(uaddr: bigint, pages: number): bigint[] {
  const fd = fs.openSync('/proc/self/pagemap', 'r');
  try {
    const buf = Buffer.alloc(8 * pages);
    fs.readSync(fd, buf, 0, buf.length, Number((uaddr / 4096n) * 8n));
    return Array.from({ length: pages }, (_, i) => {
      const entry = buf.readBigUInt64LE(8 * i);
      const present = (entry >> 63n) & 1n;
      return present ? entry & ((1n << 55n) - 1n) : 0n;
    });
  } finally {
    fs.closeSync(fd);
  }
}
