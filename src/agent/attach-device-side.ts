/**
 * The device side of an attached device's vhost-user backend: what relays the VMM's vrings to the
 * device. The one place that picks it, so the agent knows only the VhostUserDeviceSide interface.
 */
import { status } from '@grpc/grpc-js';
import type { Device } from '../device/types.ts';
import type { VhostUserDeviceSide } from '../vhost-user/backend.ts';
import type { AttachMemory } from './attach.ts';
import { AgentError } from './errors.ts';

/** The vring relay for `device`; `memory` is where it hands the VMM's memory changes. */
export function deviceSideFor(device: Device, _memory: AttachMemory): VhostUserDeviceSide {
  throw new AgentError(
    status.FAILED_PRECONDITION,
    'UNSUPPORTED',
    `device ${device.name}: no vring relay is available to serve a VMM yet`,
    'device',
  );
}
