/**
 * A vhost-user device side that relays the front-end's vrings to a vhost-vdpa device (kernel or
 * simulated alike): the device does the I/O itself, by DMA through the IOTLB, to the guest
 * physical addresses the backend hands over (IOVA = guest physical).
 *
 * - Features: the device's, without VIRTIO_F_ACCESS_PLATFORM, which the relay always sets on the
 *   device itself: to the guest there is no IOMMU, to the device the IOTLB is one (holding the
 *   memory table), and vhost-vdpa devices require it (vdpasim_set_driver_features refuses
 *   without).
 * - Start (the first vring the front-end starts): ACKNOWLEDGE | DRIVER, the negotiated features,
 *   FEATURES_OK; then per vring size, base, addresses, kick and call eventfds (the device takes
 *   its own references), enable; then DRIVER_OK.
 * - Stop: the vring is disabled and its base read from the device; when the last one stops the
 *   device is reset, so the next start negotiates again. That reset must keep the mappings, which
 *   IOTLB_PERSIST guarantees, and so does a parent that keeps them anyway (VDUSE:
 *   VhostVdpaDevice.parentKeepsMapOnReset); any other device is refused.
 * - A device that cannot tell a vring's base (vp_vdpa: VHOST_GET_VRING_BASE is EOPNOTSUPP) is
 *   answered for as QEMU's vhost_virtqueue_stop() does when vhost_get_vring_base fails
 *   (virtio_queue_restore_last_avail_idx): with the used ring's idx, read from the VMM's memory
 *   where the relay mapped it, after the device was disabled (and reset, for the last ring) so
 *   it moves no more. Every request the device took is then one it completed; logged and counted.
 * - The memory table goes to `memory`, which applies it wherever the device's mappings are kept
 *   (the agent's device queue); the relay never maps anything itself.
 */
import { DeviceError } from '../device/errors.ts';
import type { VhostVdpaDevice } from '../device/vhost-vdpa.ts';
import { DeviceStatus, hasBackendFeature, VIRTIO_F_ACCESS_PLATFORM } from '../uapi/constants.ts';
import type { BackendLogger, VhostUserDeviceSide, VringConfig } from './backend.ts';
import type { MemoryDiff } from './memory-table.ts';

const ACCESS_PLATFORM = 1n << BigInt(VIRTIO_F_ACCESS_PLATFORM);
/** struct vring_used: u16 flags, then u16 idx. */
const USED_IDX_OFFSET = 2n;

/** What the relay had to make up for. */
export interface VdpaRelayStats {
  /** GET_VRING_BASE answered with the used index: the device could not tell (EOPNOTSUPP). */
  basesFromUsedIndex: number;
}

export class VdpaRelay implements VhostUserDeviceSide {
  readonly features: bigint;
  readonly queueCount: number;
  readonly maxQueueSize: number;
  private readonly configSize: number;
  readonly stats: VdpaRelayStats = { basesFromUsedIndex: 0 };
  private negotiated = 0n;
  /** The running vrings, with their used ring's address (an IOVA of asid 0). */
  private readonly running = new Map<number, bigint>();

  constructor(
    private readonly device: VhostVdpaDevice,
    private readonly memory: (diff: MemoryDiff) => Promise<void>,
    private readonly logger?: BackendLogger,
  ) {
    const facts = device.facts();
    const persists = hasBackendFeature(facts.negotiatedFeatures, 'IOTLB_PERSIST');
    if (!persists && !device.parentKeepsMapOnReset) {
      throw new DeviceError(
        'UNSUPPORTED',
        `${device.name}: relaying vrings needs IOTLB_PERSIST (a reset at stop must keep the guest's memory mapped)`,
        { errno: 'EOPNOTSUPP' },
      );
    }
    const v = device.vrings;
    this.features = v.features() & ~ACCESS_PLATFORM;
    this.queueCount = facts.vqCount;
    this.maxQueueSize = v.maxSize();
    this.configSize = facts.configSize;
  }

  config(): Buffer {
    return this.configSize === 0 ? Buffer.alloc(0) : this.device.vrings.config(0, this.configSize);
  }

  memoryChanged(diff: MemoryDiff): Promise<void> {
    return this.memory(diff);
  }

  featuresNegotiated(features: bigint): void {
    this.negotiated = features;
  }

  startVring(vring: VringConfig): void {
    const v = this.device.vrings;
    if ((v.status() & DeviceStatus.FEATURES_OK) === 0) {
      v.addStatus(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER);
      v.setFeatures(this.negotiated | ACCESS_PLATFORM);
      v.addStatus(DeviceStatus.FEATURES_OK);
      // The device clears FEATURES_OK when it does not accept the features (virtio 1.x, 3.1.1).
      if ((v.status() & DeviceStatus.FEATURES_OK) === 0) {
        throw new DeviceError('KERNEL', `${this.device.name}: the device did not accept the features`);
      }
    }
    const { index } = vring;
    v.setSize(index, vring.size);
    v.setBase(index, vring.lastAvail);
    v.setAddresses(index, vring);
    v.setKick(index, vring.kickFd);
    v.setCall(index, vring.callFd());
    v.enable(index, true);
    this.running.set(index, vring.used);
    if ((v.status() & DeviceStatus.DRIVER_OK) === 0) v.addStatus(DeviceStatus.DRIVER_OK);
    this.logger?.info(
      { device: this.device.name, vring: index, size: vring.size },
      'vring relayed to the device',
    );
  }

  callChanged(index: number, fd: number | null): void {
    this.device.vrings.setCall(index, fd);
  }

  stopVring(index: number): number {
    const v = this.device.vrings;
    v.enable(index, false);
    const base = this.deviceBase(index);
    const used = this.running.get(index);
    this.running.delete(index);
    if (this.running.size === 0) v.resetKeepingMappings();
    if (base !== undefined) return base;
    if (used === undefined) {
      throw new DeviceError('KERNEL', `${this.device.name}: vring ${index} was not started by the relay`);
    }
    const idx = this.device.readMapped(0, used + USED_IDX_OFFSET, 2).readUInt16LE(0);
    this.stats.basesFromUsedIndex++;
    this.logger?.warn(
      { device: this.device.name, vring: index, base: idx },
      'the device cannot tell the vring base (EOPNOTSUPP): answered with the used index',
    );
    return idx;
  }

  /** VHOST_GET_VRING_BASE; undefined when the parent cannot tell (vp_vdpa_get_vq_state). */
  private deviceBase(index: number): number | undefined {
    try {
      return this.device.vrings.base(index);
    } catch (e) {
      if (e instanceof DeviceError && e.errno === 'EOPNOTSUPP') return undefined;
      throw e;
    }
  }
}
