/**
 * The device side of an attached device's vhost-user backend: what relays the VMM's vrings to the
 * device. The one place that picks it, so the agent knows only the VhostUserDeviceSide interface.
 */
import { status } from '@grpc/grpc-js';
import type { Device } from '../device/types.ts';
import { VhostVdpaDevice } from '../device/vhost-vdpa.ts';
import type { BackendLogger, VhostUserDeviceSide } from '../vhost-user/backend.ts';
import { VdpaRelay } from '../vhost-user/vdpa-relay.ts';
import type { AttachMemory } from './attach.ts';
import { AgentError } from './errors.ts';

/**
 * The vring relay for `device` (kernel or simulated vhost-vdpa alike); `memory` is where it hands
 * the VMM's memory changes. Which parents it takes is the relay's rule (IOTLB_PERSIST, or a parent
 * that keeps its mappings at reset: VhostVdpaDevice.parentKeepsMapOnReset, from sysfs).
 */
export function deviceSideFor(
  device: Device,
  memory: AttachMemory,
  logger?: BackendLogger,
): VhostUserDeviceSide {
  if (!(device instanceof VhostVdpaDevice)) {
    throw new AgentError(
      status.FAILED_PRECONDITION,
      'UNSUPPORTED',
      `device ${device.name}: only a vhost-vdpa device can serve a VMM`,
      'device',
    );
  }
  return new VdpaRelay(device, memory, logger);
}
