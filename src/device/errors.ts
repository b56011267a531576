/** Errors thrown by devices (opening, lifecycle calls, specs) and by simulated DMA. */

export type DeviceErrorCode =
  | 'BUSY' // the vhost-vdpa node is open in another process (EBUSY)
  | 'NOT_FOUND' // no such node, or kernel:auto found nothing usable
  | 'PERMISSION_DENIED' // EACCES / EPERM opening or owning the node
  | 'UNSUPPORTED' // the device did not offer the feature the call needs (EOPNOTSUPP)
  | 'CLOSED' // the device was closed
  | 'KERNEL' // an ioctl failed; `errno` names it
  | 'INVALID_SPEC' // a device spec (agent flag) is malformed; `field` names the bad part
  | 'DUPLICATE_NAME'; // two specs give devices the same name

export class DeviceError extends Error {
  constructor(
    readonly code: DeviceErrorCode,
    message: string,
    readonly details: { errno?: string; field?: string } = {},
  ) {
    super(message);
    this.name = 'DeviceError';
  }

  get errno(): string | undefined {
    return this.details.errno;
  }

  get field(): string | undefined {
    return this.details.field;
  }
}

export type DmaErrorCode = 'UNMAPPED' | 'PERMISSION' | 'BAD_ASID' | 'BAD_LENGTH';

/** A simulated device access the IOTLB does not allow; `iova` is the first byte at fault. */
export class DmaError extends Error {
  constructor(
    readonly code: DmaErrorCode,
    message: string,
    readonly asid: number,
    readonly iova: bigint,
  ) {
    super(message);
    this.name = 'DmaError';
  }
}
