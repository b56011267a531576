/**
 * A real vhost-vdpa device: `/dev/vhost-vdpa-N` opened O_RDWR, driven by the shared backend.
 * Its cost counters other than messages and batches stay 0: userspace cannot see the parent's
 * dma_map / set_map calls.
 */
import path from 'node:path';
import type { MemoryRegistry } from '../memory/types.ts';
import type { VhostTransport } from './transport.ts';
import type { DeviceLogger, IommuKind } from './types.ts';
import { openVhostVdpaFd } from './vhost-vdpa-fd.ts';
import { toDeviceError, VhostVdpaDevice } from './vhost-vdpa.ts';

export interface KernelDeviceOptions {
  /** The character device, e.g. `/dev/vhost-vdpa-0`. */
  node: string;
  /** Default: the node's basename. */
  name?: string;
  memory: MemoryRegistry;
  logger?: DeviceLogger;
  /** Whether the parent pins pages (PA mode): openDevices asks the kernel (pin-probe.ts); default true. */
  pinned?: boolean;
  /** What sysfs tells (discovery.ts); default 'unknown'. */
  iommu?: IommuKind;
  /** Whether the parent keeps its mappings at reset (discovery.ts: VDUSE); default false. */
  parentKeepsMapOnReset?: boolean;
  /** Opens the transport; default the real fd (tests inject a recorder). */
  openTransport?: (node: string) => VhostTransport;
}

export class KernelDevice extends VhostVdpaDevice {
  constructor(opts: KernelDeviceOptions) {
    const name = opts.name ?? path.basename(opts.node);
    let transport: VhostTransport;
    try {
      transport = (opts.openTransport ?? openVhostVdpaFd)(opts.node);
    } catch (e) {
      throw toDeviceError(e, `${name}: open ${opts.node}`);
    }
    super({
      name,
      kind: 'kernel',
      node: opts.node,
      iommu: opts.iommu ?? 'unknown',
      pinned: opts.pinned ?? true,
      parentKeepsMapOnReset: opts.parentKeepsMapOnReset ?? false,
      transport,
      memory: opts.memory,
      ...(opts.logger ? { logger: opts.logger } : {}),
    });
  }
}
