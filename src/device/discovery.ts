/**
 * Finds vhost-vdpa devices: the `/dev/vhost-vdpa-N` nodes and the vdpa bus
 * (`/sys/bus/vdpa/devices/<name>`, whose `vhost-vdpa-N` child is the node vhost_vdpa_probe made
 * for it). Plain directory reads; a missing directory means none.
 *
 * What the IOMMU is, from where the vdpa device sits in /sys/devices:
 * - its parent device has an `iommu_group`: the parent DMAs through the platform IOMMU, the path
 *   vhost_vdpa_alloc_domain takes for a parent without set_map / dma_map (vp_vdpa, ifcvf);
 * - it has no parent device (vdpa_sim: vdpa_alloc_device(..., NULL, ...)) or is under
 *   /sys/devices/virtual/vduse: nothing can DMA for it but its own set_map / dma_map;
 * - otherwise (an auxiliary device, as mlx5 and pds have) it cannot be told: unknown.
 * Whether it pins is not read here but asked of the kernel (pin-probe.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import type { IommuKind } from './types.ts';

export interface DiscoveryRoots {
  /** default `/dev` */
  devDir?: string;
  /** default `/sys/bus/vdpa/devices` */
  sysDir?: string;
}

export interface VdpaDeviceInfo {
  /** The vdpa device's name (`vdpa dev add name <name>`). */
  name: string;
  /** Its vhost-vdpa node when bound to vhost_vdpa, else null. */
  node: string | null;
  /** The bound driver (vhost_vdpa, virtio_vdpa), or null. */
  driver: string | null;
  /**
   * Whether its parent is VDUSE (the device lives under /sys/devices/virtual/vduse/<name>/). VDUSE
   * allocates its vdpa device with use_va (vduse_dev_init_vdpa), so vhost_vdpa_map takes the VA
   * path and pins nothing; other parents (hardware) pin every mapped page (vhost_vdpa_pa_map).
   */
  vduse: boolean;
  /** What maps for it: see the file's header. */
  iommu: IommuKind;
}

export interface DiscoveredNode {
  node: string;
  /** The vdpa device's name when sysfs knows it, else the node's basename. */
  name: string;
  /**
   * Whether mapping pins memory (PA mode), as far as sysfs can tell: false only for a parent known
   * to use VA mode (VDUSE). openDevices asks the kernel instead where it can (pin-probe.ts).
   */
  pinned: boolean;
  iommu: IommuKind;
  /**
   * Whether the parent keeps its mappings at a reset without IOTLB_PERSIST: a VDUSE parent does
   * (vduse_vdpa_reset ignores VDPA_RESET_F_CLEAN_MAP); false where sysfs cannot tell.
   */
  keepsMapOnReset: boolean;
}

const NODE_RE = /^vhost-vdpa-(\d+)$/;

/** `/dev/vhost-vdpa-*`, in numeric order. */
export function listVhostVdpaNodes(devDir = '/dev'): string[] {
  return readDir(devDir)
    .filter((n) => NODE_RE.test(n))
    .sort((a, b) => nodeIndex(a) - nodeIndex(b))
    .map((n) => path.join(devDir, n));
}

/** The devices on the vdpa bus, by name. */
export function listVdpaDevices(roots: DiscoveryRoots = {}): VdpaDeviceInfo[] {
  const sysDir = roots.sysDir ?? '/sys/bus/vdpa/devices';
  const devDir = roots.devDir ?? '/dev';
  return readDir(sysDir)
    .sort()
    .map((name) => {
      const dir = path.join(sysDir, name);
      const child = readDir(dir).find((n) => NODE_RE.test(n));
      return {
        name,
        node: child ? path.join(devDir, child) : null,
        driver: driverOf(dir),
        vduse: underVduse(dir),
        iommu: iommuOf(dir),
      };
    });
}

/** Every vhost-vdpa node, named after its vdpa device where sysfs says which one it is. */
export function discoverVhostVdpa(roots: DiscoveryRoots = {}): DiscoveredNode[] {
  return listVhostVdpaNodes(roots.devDir).map((node) => describeNode(node, roots));
}

/** What sysfs says about one node; a node sysfs does not know keeps its basename and pins. */
export function describeNode(node: string, roots: DiscoveryRoots = {}): DiscoveredNode {
  const real = path.resolve(node);
  const d = listVdpaDevices(roots).find((v) => v.node !== null && path.resolve(v.node) === real);
  const vduse = d?.vduse ?? false;
  return {
    node,
    name: d?.name ?? path.basename(node),
    pinned: !vduse,
    iommu: d?.iommu ?? 'unknown',
    keepsMapOnReset: vduse,
  };
}

function iommuOf(dir: string): IommuKind {
  let real: string;
  try {
    real = fs.realpathSync(dir);
  } catch (e) {
    if (isAbsent(e)) return 'unknown';
    throw e;
  }
  if (real.split(path.sep).includes('vduse')) return 'onchip';
  const parent = path.dirname(real);
  if (path.basename(parent) === 'devices') return 'onchip';
  return hasEntry(path.join(parent, 'iommu_group')) ? 'platform' : 'unknown';
}

/** The entry is there (a link to /sys/kernel/iommu_groups/N counts, wherever it points). */
function hasEntry(file: string): boolean {
  try {
    fs.lstatSync(file);
    return true;
  } catch (e) {
    if (isAbsent(e)) return false;
    throw e;
  }
}

function nodeIndex(name: string): number {
  return Number(NODE_RE.exec(name)?.[1] ?? 0);
}

function readDir(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch (e) {
    if (isAbsent(e)) return [];
    throw e;
  }
}

function driverOf(dir: string): string | null {
  try {
    return path.basename(fs.readlinkSync(path.join(dir, 'driver')));
  } catch (e) {
    if (isAbsent(e)) return null;
    throw e;
  }
}

function underVduse(dir: string): boolean {
  try {
    return fs.realpathSync(dir).split(path.sep).includes('vduse');
  } catch (e) {
    if (isAbsent(e)) return false;
    throw e;
  }
}

function isAbsent(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOENT' || code === 'ENOTDIR' || code === 'EINVAL';
}
