/**
 * ioctl request numbers of vhost and vhost-vdpa, computed from the `_IOC` encoding of
 * include/uapi/asm-generic/ioctl.h (x86_64 / arm64 layout: nr 8 bits, type 8, size 14, dir 2).
 */

const IOC_NRSHIFT = 0;
const IOC_TYPESHIFT = 8;
const IOC_SIZESHIFT = 16;
const IOC_DIRSHIFT = 30;

const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;

/** The vhost ioctl type byte (VHOST_VIRTIO). */
export const VHOST_VIRTIO = 0xaf;

function ioc(dir: number, type: number, nr: number, size: number): number {
  // `>>> 0` keeps the result an unsigned 32-bit value (dir READ sets bit 31).
  return (
    ((dir << IOC_DIRSHIFT) | (size << IOC_SIZESHIFT) | (type << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT)) >>> 0
  );
}
const io = (nr: number) => ioc(IOC_NONE, VHOST_VIRTIO, nr, 0);
const ior = (nr: number, size: number) => ioc(IOC_READ, VHOST_VIRTIO, nr, size);
const iow = (nr: number, size: number) => ioc(IOC_WRITE, VHOST_VIRTIO, nr, size);
const iowr = (nr: number, size: number) => ioc(IOC_READ | IOC_WRITE, VHOST_VIRTIO, nr, size);

/** sizeof of the ioctl argument types. */
const U8 = 1;
const U16 = 2;
const U32 = 4;
const U64 = 8;
const INT = 4;
/** struct vhost_vring_state { unsigned int index; unsigned int num; } */
const VRING_STATE = 8;
/** struct vhost_vring_addr { unsigned int index, flags; __u64 desc, used, avail, log; } */
const VRING_ADDR = 40;
/** struct vhost_vring_file { unsigned int index; int fd; } */
const VRING_FILE = 8;
/** struct vhost_vdpa_config { __u32 off; __u32 len; __u8 buf[]; } */
const VDPA_CONFIG = 8;
/** struct vhost_vdpa_iova_range { __u64 first; __u64 last; } */
const IOVA_RANGE = 16;

export const Ioctl = {
  VHOST_GET_FEATURES: ior(0x00, U64),
  VHOST_SET_FEATURES: iow(0x00, U64),
  VHOST_SET_OWNER: io(0x01),
  VHOST_RESET_OWNER: io(0x02),
  VHOST_SET_VRING_NUM: iow(0x10, VRING_STATE),
  VHOST_SET_VRING_ADDR: iow(0x11, VRING_ADDR),
  VHOST_SET_VRING_BASE: iow(0x12, VRING_STATE),
  VHOST_GET_VRING_BASE: iowr(0x12, VRING_STATE),
  VHOST_SET_VRING_KICK: iow(0x20, VRING_FILE),
  VHOST_SET_VRING_CALL: iow(0x21, VRING_FILE),
  VHOST_SET_BACKEND_FEATURES: iow(0x25, U64),
  VHOST_GET_BACKEND_FEATURES: ior(0x26, U64),
  VHOST_VDPA_GET_DEVICE_ID: ior(0x70, U32),
  VHOST_VDPA_GET_STATUS: ior(0x71, U8),
  VHOST_VDPA_SET_STATUS: iow(0x72, U8),
  VHOST_VDPA_GET_CONFIG: ior(0x73, VDPA_CONFIG),
  VHOST_VDPA_SET_CONFIG: iow(0x74, VDPA_CONFIG),
  VHOST_VDPA_SET_VRING_ENABLE: iow(0x75, VRING_STATE),
  VHOST_VDPA_GET_VRING_NUM: ior(0x76, U16),
  VHOST_VDPA_SET_CONFIG_CALL: iow(0x77, INT),
  VHOST_VDPA_GET_IOVA_RANGE: ior(0x78, IOVA_RANGE),
  VHOST_VDPA_GET_CONFIG_SIZE: ior(0x79, U32),
  VHOST_VDPA_GET_AS_NUM: ior(0x7a, U32),
  VHOST_VDPA_GET_VRING_GROUP: iowr(0x7b, VRING_STATE),
  VHOST_VDPA_SET_GROUP_ASID: iow(0x7c, VRING_STATE),
  VHOST_VDPA_SUSPEND: io(0x7d),
  VHOST_VDPA_RESUME: io(0x7e),
  VHOST_VDPA_GET_VRING_DESC_GROUP: iowr(0x7f, VRING_STATE),
  VHOST_VDPA_GET_VQS_COUNT: ior(0x80, U32),
  VHOST_VDPA_GET_GROUP_NUM: ior(0x81, U32),
} as const;
