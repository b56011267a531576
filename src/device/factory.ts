/**
 * Device specs (the agent's `--device` flags) and opening them:
 *   sim:<name>[,iommu=platform|onchip][,onchipMap=set_map|dma_map][,useVa=0|1][,asnum=N]
 *            [,range=FIRST-LAST][,features=A|B|0xMASK][,pushDelayMs=N][,deviceId=N][,vqs=N]
 *            [,configSize=N][,failIova=ADDR][,memlock=BYTES][,pageSize=BYTES]
 *            [,contiguousPages=N][,keepsMapOnReset=0|1][,deviceId=blk|net|N][,disk=/PATH]
 *   kernel:auto                         every /dev/vhost-vdpa-* found
 *   kernel:/dev/vhost-vdpa-N[,name=NAME]
 * Keys are case-insensitive; numbers are decimal or 0x hex; each sim key is the
 * SimulatedDeviceOptions field of the same name (see there for meanings and defaults). The
 * parent kinds, e.g.: vp_vdpa behind intel-iommu `sim:n,range=0-0x7fffffffff` (platform, PA);
 * vdpa_sim batch_mapping=B use_va=U `sim:n,iommu=onchip,onchipMap=set_map|dma_map,useVa=U`; VDUSE
 * `sim:n,iommu=onchip,useVa=1,keepsMapOnReset=1,asnum=1`. vdpa_sim_blk with a data path (a VMM
 * can attach to it over vhost-user): `sim:n,iommu=onchip,disk=/PATH` (disk implies deviceId=blk;
 * the file is the disk, opened read-write).
 * `failIova` is a fault-injection knob for tests and drills: every UPDATE message for IOVA ADDR
 * fails with EFAULT, as a failed pin would. `memlock` is the simulated RLIMIT_MEMLOCK; the
 * simulated devices of one agent pin for one process, so every pinning (PA-mode) one is charged
 * to one account (the kernel's pinned_vm, and the agent's pre-write check): memlock and pageSize
 * must be the same wherever given.
 */
import path from 'node:path';
import { ID_RULE, isValidId } from '../id.ts';
import type { IovaRange } from '../iotlb/types.ts';
import type { MemoryRegistry } from '../memory/types.ts';
import {
  BackendFeature,
  type BackendFeatureName,
  backendFeatureMask,
  IotlbMsgType,
  VirtioDeviceId,
} from '../uapi/constants.ts';
import { type DiscoveredNode, type DiscoveryRoots, describeNode, discoverVhostVdpa } from './discovery.ts';
import { DeviceError } from './errors.ts';
import { KernelDevice } from './kernel.ts';
import { RLIM_INFINITY } from '../sys/libc.ts';
import { PAGE_SIZE, PinnedMemory } from './memlock.ts';
import { probePinning } from './pin-probe.ts';
import { SimulatedDevice, type SimulatedDeviceOptions } from './simulated.ts';
import type { VhostTransport } from './transport.ts';
import type { Device, DeviceLogger } from './types.ts';
import { openVhostVdpaFd } from './vhost-vdpa-fd.ts';
import { U32_MAX, u64FromText } from '../u64.ts';

export type DeviceSpec =
  | { kind: 'simulated'; options: SimulatedDeviceOptions }
  /** `node` 'auto': every vhost-vdpa node discovery finds. */
  | { kind: 'kernel'; node: string; name?: string };

const SIM_KEYS = [
  'iommu',
  'asnum',
  'range',
  'features',
  'pushdelayms',
  'deviceid',
  'vqs',
  'failiova',
  'memlock',
  'onchipmap',
  'useva',
  'configsize',
  'pagesize',
  'contiguouspages',
  'keepsmaponreset',
  'disk',
] as const;

/** deviceId= by name (virtio_ids.h). */
const DEVICE_ID_NAMES: Record<string, number> = { net: VirtioDeviceId.NET, blk: VirtioDeviceId.BLOCK };

export function parseDeviceSpec(spec: string): DeviceSpec {
  const fail = (message: string, field: string): never => {
    throw new DeviceError('INVALID_SPEC', `device spec "${spec}": ${message}`, { field });
  };
  const colon = spec.indexOf(':');
  if (colon < 0) fail('expected sim:<name>[,key=value...] or kernel:auto|kernel:<node>', 'kind');
  const kind = spec.slice(0, colon);
  const [target = '', ...rest] = spec.slice(colon + 1).split(',');
  const opts = new Map<string, string>();
  for (const part of rest) {
    const eq = part.indexOf('=');
    if (eq <= 0) fail(`"${part}" is not key=value`, part);
    const key = part.slice(0, eq).toLowerCase();
    if (opts.has(key)) fail(`${key} given twice`, key);
    opts.set(key, part.slice(eq + 1));
  }

  if (kind === 'kernel') {
    if (target === 'auto') {
      if (opts.size > 0) fail('kernel:auto takes no options', [...opts.keys()][0]!);
      return { kind: 'kernel', node: 'auto' };
    }
    if (!target.startsWith('/')) fail(`"${target}" is neither auto nor an absolute device path`, 'node');
    const { name, ...others } = Object.fromEntries(opts);
    const unknown = Object.keys(others)[0];
    if (unknown !== undefined) fail(`unknown key "${unknown}" (kernel devices take name=)`, unknown);
    if (name !== undefined && !isValidId(name)) fail(`name "${name}" ${ID_RULE}`, 'name');
    return name === undefined ? { kind: 'kernel', node: target } : { kind: 'kernel', node: target, name };
  }
  if (kind !== 'sim') fail(`unknown kind "${kind}" (sim or kernel)`, 'kind');

  if (!isValidId(target)) fail(`name "${target}" ${ID_RULE}`, 'name');
  const options: SimulatedDeviceOptions = { name: target };
  for (const [key, value] of opts) {
    const field = SIM_KEYS.find((k) => k === key);
    if (field === undefined) fail(`unknown key "${key}" (one of ${SIM_KEYS.join(', ')})`, key);
    const bad = (what: string): never => fail(`${key}=${value}: ${what}`, key);
    switch (field) {
      case 'iommu':
        if (value !== 'platform' && value !== 'onchip') bad('must be platform or onchip');
        options.iommu = value as 'platform' | 'onchip';
        break;
      case 'asnum':
        options.asNum = parseInteger(value, 1, 0xffff) ?? bad('must be an integer in 1..65535');
        break;
      case 'range':
        options.iovaRange = parseRange(value) ?? bad('must be FIRST-LAST, two u64 with FIRST <= LAST');
        break;
      case 'features':
        options.features = parseFeatures(value, bad);
        break;
      case 'pushdelayms':
        options.pushDelayMs = parseInteger(value, 0, 3_600_000) ?? bad('must be an integer number of ms');
        break;
      case 'deviceid':
        options.deviceId =
          DEVICE_ID_NAMES[value.toLowerCase()] ??
          parseInteger(value, 0, U32_MAX) ??
          bad('must be blk, net or a u32');
        break;
      case 'disk':
        if (!path.isAbsolute(value)) bad('must be an absolute path');
        options.disk = value;
        break;
      case 'vqs':
        options.vqCount = parseInteger(value, 0, 0xffff) ?? bad('must be an integer in 0..65535');
        break;
      case 'failiova': {
        const iova = u64FromText(value) ?? bad('must be a u64');
        options.failOn = (msg) => msg.iotlb.type === IotlbMsgType.UPDATE && msg.iotlb.iova === iova;
        break;
      }
      case 'memlock':
        options.memlock = u64FromText(value) ?? bad('must be a number of bytes (a u64)');
        break;
      case 'onchipmap':
        if (value !== 'set_map' && value !== 'dma_map') bad('must be set_map or dma_map');
        options.onchipMap = value as 'set_map' | 'dma_map';
        break;
      case 'useva':
        options.useVa = parseFlag(value) ?? bad('must be 0 or 1');
        break;
      case 'configsize':
        options.configSize = parseInteger(value, 0, U32_MAX) ?? bad('must be a u32');
        break;
      case 'pagesize': {
        const size = u64FromText(value);
        if (size === undefined || size < 4096n || size > 1n << 30n || (size & (size - 1n)) !== 0n)
          bad('must be a power of two from 4096 to 2^30');
        options.pageSize = size;
        break;
      }
      case 'contiguouspages':
        options.contiguousPages = parseInteger(value, 1, 1 << 30) ?? bad('must be an integer >= 1');
        break;
      case 'keepsmaponreset':
        options.keepsMapOnReset = parseFlag(value) ?? bad('must be 0 or 1');
        break;
    }
  }
  if (options.useVa && (options.iommu ?? 'platform') === 'platform')
    fail('useVa=1 needs iommu=onchip: a platform IOMMU maps only in PA mode', 'useva');
  if (options.disk !== undefined && (options.deviceId ?? VirtioDeviceId.BLOCK) !== VirtioDeviceId.BLOCK)
    fail('disk needs deviceId=blk: only a virtio-blk device serves a disk', 'disk');
  if (options.onchipMap !== undefined && options.iommu !== 'onchip')
    fail('onchipMap needs iommu=onchip', 'onchipmap');
  return { kind: 'simulated', options };
}

/**
 * The simulated devices of one agent pin for one process: one RLIMIT_MEMLOCK and one page size
 * (which every spec giving them must agree on), one pinned_vm for the simulated kernel (`vmPin`)
 * and one for the agent's pre-write check (`pins`). VA-mode devices do not use them (whether a
 * device is in PA mode still follows its own spec: see SimulatedDeviceOptions.useVa).
 */
function sharedSimAccounts(
  specs: readonly DeviceSpec[],
): Pick<SimulatedDeviceOptions, 'pageSize' | 'pins' | 'vmPin'> {
  let memlock: { value: bigint; from: string } | undefined;
  let pageSize: { value: bigint; from: string } | undefined;
  for (const spec of specs) {
    if (spec.kind !== 'simulated') continue;
    const { name, memlock: limit, pageSize: page } = spec.options;
    for (const [key, given, seen] of [
      ['memlock', limit, memlock],
      ['pageSize', page, pageSize],
    ] as const) {
      if (given === undefined) continue;
      if (seen !== undefined && seen.value !== given) {
        throw new DeviceError(
          'INVALID_SPEC',
          `device spec of ${name}: ${key}=${given} differs from ${seen.value} given for ${seen.from} (the simulated devices of one agent share one process)`,
          { field: key.toLowerCase() },
        );
      }
      if (key === 'memlock') memlock = { value: given, from: name };
      else pageSize = { value: given, from: name };
    }
  }
  const limit = memlock?.value ?? RLIM_INFINITY;
  const page = pageSize?.value ?? PAGE_SIZE;
  return {
    ...(pageSize ? { pageSize: page } : {}),
    pins: new PinnedMemory(() => limit, page),
    vmPin: new PinnedMemory(() => limit, page),
  };
}

export interface OpenDevicesOptions {
  /** Where kernel:auto looks (default /dev and /sys/bus/vdpa/devices). */
  discovery?: DiscoveryRoots;
  /** Opens kernel device nodes (default the real fd; tests inject a recorder). */
  openTransport?: (node: string) => VhostTransport;
  /** This process's pinned bytes, for the pinning probe (default VmPin of /proc/self/status). */
  readVmPin?: () => bigint | undefined;
}

/**
 * Parses every spec, then opens the devices in order. Names must be unique and a node may be
 * named only once; if any device fails to open, those already open are closed again.
 */
export async function openDevices(
  specs: readonly string[],
  registry: MemoryRegistry,
  logger?: DeviceLogger,
  opts: OpenDevicesOptions = {},
): Promise<Device[]> {
  type Plan = { name: string; open: () => Device | Promise<Device> };
  const plans: Plan[] = [];
  const nodes = new Set<string>();
  const kernel = (node: string, name: string, sysfs: DiscoveredNode): Plan => {
    const real = path.resolve(node);
    if (nodes.has(real))
      throw new DeviceError('DUPLICATE_NAME', `device node ${node} is given twice`, { field: node });
    nodes.add(real);
    return {
      name,
      open: async () =>
        new KernelDevice({
          node,
          name,
          pinned: await pinsMemory(node, sysfs.pinned),
          iommu: sysfs.iommu,
          parentKeepsMapOnReset: sysfs.keepsMapOnReset,
          memory: registry,
          ...(logger ? { logger } : {}),
          ...(opts.openTransport ? { openTransport: opts.openTransport } : {}),
        }),
    };
  };
  /** What the kernel does (pin-probe.ts); sysfs's guess where the probe cannot tell. */
  const pinsMemory = async (node: string, guess: boolean): Promise<boolean> => {
    const open = () => (opts.openTransport ?? openVhostVdpaFd)(node);
    try {
      const pinned = await probePinning({ open, ...(opts.readVmPin ? { readVmPin: opts.readVmPin } : {}) });
      if (pinned !== undefined) return pinned;
      logger?.warn({ node }, 'the kernel shows no VmPin: whether the device pins is guessed from sysfs');
    } catch (err) {
      // Opening the device again reports the same trouble, if it stays.
      logger?.warn({ node, err }, 'the pinning probe failed: whether the device pins is guessed from sysfs');
    }
    return guess;
  };
  const parsed = specs.map(parseDeviceSpec);
  const simAccounts = sharedSimAccounts(parsed);
  for (const spec of parsed) {
    if (spec.kind === 'simulated') {
      const options: SimulatedDeviceOptions = { ...spec.options, ...simAccounts };
      plans.push({
        name: spec.options.name,
        open: () => new SimulatedDevice(options, registry, logger),
      });
    } else if (spec.node === 'auto') {
      const found = discoverVhostVdpa(opts.discovery);
      if (found.length === 0) logger?.warn({}, 'kernel:auto found no /dev/vhost-vdpa-* device');
      for (const d of found) plans.push(kernel(d.node, d.name, d));
    } else {
      const d = describeNode(spec.node, opts.discovery);
      plans.push(kernel(spec.node, spec.name ?? path.basename(spec.node), d));
    }
  }
  const seen = new Set<string>();
  for (const p of plans) {
    if (seen.has(p.name))
      throw new DeviceError('DUPLICATE_NAME', `two devices are named ${p.name}`, { field: p.name });
    seen.add(p.name);
  }

  const devices: Device[] = [];
  try {
    for (const p of plans) {
      const device = await p.open();
      devices.push(device);
      logger?.info({ device: device.name, ...summary(device) }, 'device opened');
    }
  } catch (e) {
    await Promise.allSettled(devices.map((d) => d.close()));
    throw e;
  }
  return devices;
}

function summary(device: Device): Record<string, string | number> {
  const f = device.facts();
  return {
    kind: f.kind,
    deviceId: f.deviceId,
    negotiatedFeatures: `0x${f.negotiatedFeatures.toString(16)}`,
    asNum: f.asNum,
    iommu: f.iommu,
  };
}

function parseFlag(text: string): boolean | undefined {
  if (text === '1' || text.toLowerCase() === 'true') return true;
  if (text === '0' || text.toLowerCase() === 'false') return false;
  return undefined;
}

function parseInteger(text: string, min: number, max: number): number | undefined {
  const value = u64FromText(text);
  return value !== undefined && value >= BigInt(min) && value <= BigInt(max) ? Number(value) : undefined;
}

function parseRange(text: string): IovaRange | undefined {
  const dash = text.indexOf('-');
  const first = u64FromText(text.slice(0, dash));
  const last = u64FromText(text.slice(dash + 1));
  if (dash < 0 || first === undefined || last === undefined || first > last) return undefined;
  return { first, last };
}

/** `A|B|...` (or `+`): feature names with or without IOTLB_, masks, or `none`. */
function parseFeatures(text: string, bad: (what: string) => never): bigint {
  if (text.toLowerCase() === 'none') return 0n;
  let mask = 0n;
  for (const token of text.split(/[|+]/)) {
    const number = u64FromText(token);
    if (number !== undefined) {
      mask |= number;
      continue;
    }
    const upper = token.toUpperCase();
    const name = [upper, `IOTLB_${upper}`].find((n): n is BackendFeatureName => n in BackendFeature);
    if (name === undefined)
      bad(`unknown feature "${token}" (one of ${Object.keys(BackendFeature).join(', ')})`);
    mask |= backendFeatureMask(name as BackendFeatureName);
  }
  return mask;
}
