/**
 * Named constants of the vhost / vhost-vdpa UAPI (include/uapi/linux/vhost_types.h, vhost.h,
 * virtio_config.h, virtio_ids.h). Nothing outside src/uapi should spell these numbers.
 */

/** `vhost_msg.type` / `vhost_msg_v2.type`. */
export const VHOST_IOTLB_MSG = 1;
export const VHOST_IOTLB_MSG_V2 = 2;

/** `vhost_iotlb_msg.type`. */
export const IotlbMsgType = {
  MISS: 1,
  UPDATE: 2,
  INVALIDATE: 3,
  ACCESS_FAIL: 4,
  BATCH_BEGIN: 5,
  BATCH_END: 6,
} as const;
export type IotlbMsgType = (typeof IotlbMsgType)[keyof typeof IotlbMsgType];

/** `vhost_iotlb_msg.perm` (VHOST_ACCESS_*). */
export const VHOST_ACCESS_RO = 0x1;
export const VHOST_ACCESS_WO = 0x2;
export const VHOST_ACCESS_RW = 0x3;

/** Bit numbers of the vhost backend features (VHOST_BACKEND_F_*); the mask bit is `1n << bit`. */
export const BackendFeature = {
  IOTLB_MSG_V2: 1,
  IOTLB_BATCH: 2,
  IOTLB_ASID: 3,
  SUSPEND: 4,
  RESUME: 5,
  ENABLE_AFTER_DRIVER_OK: 6,
  DESC_ASID: 7,
  IOTLB_PERSIST: 8,
} as const;
export type BackendFeatureName = keyof typeof BackendFeature;

/** Every backend feature bit the kernel knows; VHOST_SET_BACKEND_FEATURES rejects any other bit. */
export const KNOWN_BACKEND_FEATURES: bigint = Object.values(BackendFeature).reduce(
  (mask, bit) => mask | (1n << BigInt(bit)),
  0n,
);

export function backendFeatureMask(...names: BackendFeatureName[]): bigint {
  return names.reduce((mask, name) => mask | (1n << BigInt(BackendFeature[name])), 0n);
}

export function hasBackendFeature(mask: bigint, name: BackendFeatureName): boolean {
  return (mask & (1n << BigInt(BackendFeature[name]))) !== 0n;
}

/** Names of the feature bits set in `mask`, lowest bit first; unknown bits as `bit<N>`. */
export function backendFeatureNames(mask: bigint): string[] {
  const names: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if ((mask & (1n << BigInt(bit))) === 0n) continue;
    const name = Object.entries(BackendFeature).find(([, b]) => b === bit)?.[0];
    names.push(name ?? `bit${bit}`);
  }
  return names;
}

/** Virtio device status bits (VIRTIO_CONFIG_S_*). */
export const DeviceStatus = {
  ACKNOWLEDGE: 0x01,
  DRIVER: 0x02,
  DRIVER_OK: 0x04,
  FEATURES_OK: 0x08,
  NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const;

/** Virtio device ids that vDPA parents expose (virtio_ids.h). */
export const VirtioDeviceId = {
  NET: 1,
  BLOCK: 2,
} as const;

/** VIRTIO_F_ACCESS_PLATFORM: the device's DMA goes through an IOMMU (required by vhost-vdpa). */
export const VIRTIO_F_ACCESS_PLATFORM = 33;
