/**
 * The virtio side of a vhost-vdpa device, as its owner drives it (include/uapi/linux/vhost.h):
 * device features, vring size / base / addresses (IOVAs) / eventfds / enable, config space and
 * status. The same ioctls reach a kernel device and the simulated one; every refusal keeps its
 * errno (a DeviceError, see toDeviceError). The vq count (VHOST_VDPA_GET_VQS_COUNT) is one of the
 * device's facts, read when it is opened.
 */
import { Ioctl } from '../uapi/ioctl.ts';
import {
  decodeVringState,
  encodeVdpaConfig,
  encodeVringAddr,
  encodeVringFile,
  encodeVringState,
  VDPA_CONFIG_HEADER_SIZE,
  VHOST_FILE_UNBIND,
} from '../uapi/vring.ts';
import { ioctlReadU8, ioctlReadU64, ioctlWriteU8, ioctlWriteU64, type VhostTransport } from './transport.ts';

/** A vring's addresses as the device DMAs to them: IOVAs. */
export interface VringAddresses {
  desc: bigint;
  avail: bigint;
  used: bigint;
}

export class VdpaVrings {
  constructor(
    private readonly transport: VhostTransport,
    /** Runs one ioctl, turning a refusal into a DeviceError naming `what`. */
    private readonly call: <T>(what: string, fn: () => T) => T,
  ) {}

  /** VHOST_GET_FEATURES: the virtio features the device offers. */
  features(): bigint {
    return this.call('GET_FEATURES', () => ioctlReadU64(this.transport, Ioctl.VHOST_GET_FEATURES));
  }

  /** VHOST_SET_FEATURES: EBUSY once FEATURES_OK is set. */
  setFeatures(features: bigint): void {
    this.call('SET_FEATURES', () => ioctlWriteU64(this.transport, Ioctl.VHOST_SET_FEATURES, features));
  }

  /** VHOST_VDPA_GET_VRING_NUM: the largest vring size the device takes. */
  maxSize(): number {
    return this.call('GET_VRING_NUM', () => {
      const buf = Buffer.alloc(2);
      this.transport.ioctl(Ioctl.VHOST_VDPA_GET_VRING_NUM, buf);
      return buf.readUInt16LE(0);
    });
  }

  setSize(index: number, size: number): void {
    this.state('SET_VRING_NUM', Ioctl.VHOST_SET_VRING_NUM, index, size);
  }

  setBase(index: number, lastAvail: number): void {
    this.state('SET_VRING_BASE', Ioctl.VHOST_SET_VRING_BASE, index, lastAvail);
  }

  /** VHOST_GET_VRING_BASE: the next avail index the device would serve. */
  base(index: number): number {
    return this.call('GET_VRING_BASE', () => {
      const buf = encodeVringState({ index, num: 0 });
      this.transport.ioctl(Ioctl.VHOST_GET_VRING_BASE, buf);
      return decodeVringState(buf).num;
    });
  }

  setAddresses(index: number, a: VringAddresses): void {
    const arg = encodeVringAddr({ index, flags: 0, desc: a.desc, used: a.used, avail: a.avail, log: 0n });
    this.call('SET_VRING_ADDR', () => this.transport.ioctl(Ioctl.VHOST_SET_VRING_ADDR, arg));
  }

  /** VHOST_SET_VRING_KICK: the device takes its own reference; null unbinds. */
  setKick(index: number, fd: number | null): void {
    this.file('SET_VRING_KICK', Ioctl.VHOST_SET_VRING_KICK, index, fd);
  }

  /** VHOST_SET_VRING_CALL: the device takes its own reference; null unbinds. */
  setCall(index: number, fd: number | null): void {
    this.file('SET_VRING_CALL', Ioctl.VHOST_SET_VRING_CALL, index, fd);
  }

  /** VHOST_VDPA_SET_VRING_ENABLE */
  enable(index: number, enabled: boolean): void {
    this.state('SET_VRING_ENABLE', Ioctl.VHOST_VDPA_SET_VRING_ENABLE, index, enabled ? 1 : 0);
  }

  /** VHOST_VDPA_GET_CONFIG of `length` bytes from `offset`. */
  config(offset: number, length: number): Buffer {
    return this.call('GET_CONFIG', () => {
      const arg = encodeVdpaConfig(offset, length);
      this.transport.ioctl(Ioctl.VHOST_VDPA_GET_CONFIG, arg);
      return arg.subarray(VDPA_CONFIG_HEADER_SIZE);
    });
  }

  setConfig(offset: number, data: Uint8Array): void {
    const arg = encodeVdpaConfig(offset, data.byteLength, data);
    this.call('SET_CONFIG', () => this.transport.ioctl(Ioctl.VHOST_VDPA_SET_CONFIG, arg));
  }

  status(): number {
    return this.call('GET_STATUS', () => ioctlReadU8(this.transport, Ioctl.VHOST_VDPA_GET_STATUS));
  }

  /**
   * VHOST_VDPA_SET_STATUS with the bits to add (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK): the
   * kernel refuses to clear a bit (EINVAL) other than by a reset, which is the device's reset().
   */
  addStatus(bits: number): void {
    if (bits === 0) throw new RangeError('status 0 is a reset: use the device reset()');
    const status = this.status() | bits;
    this.call('SET_STATUS', () => ioctlWriteU8(this.transport, Ioctl.VHOST_VDPA_SET_STATUS, status));
  }

  /**
   * VHOST_VDPA_SET_STATUS 0: the virtio reset, which keeps the IOTLB only when IOTLB_PERSIST was
   * negotiated (without it the parent drops its table while the kernel keeps it: use the device's
   * reset(), which invalidates everything). The vrings and driver features go with it.
   */
  resetKeepingMappings(): void {
    this.call('SET_STATUS', () => ioctlWriteU8(this.transport, Ioctl.VHOST_VDPA_SET_STATUS, 0));
  }

  private state(what: string, request: number, index: number, num: number): void {
    const arg = encodeVringState({ index, num });
    this.call(what, () => this.transport.ioctl(request, arg));
  }

  private file(what: string, request: number, index: number, fd: number | null): void {
    const arg = encodeVringFile({ index, fd: fd ?? VHOST_FILE_UNBIND });
    this.call(what, () => this.transport.ioctl(request, arg));
  }
}
