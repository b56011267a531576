/**
 * A minimal device side for attach tests: offers virtio-blk features, records what the backend
 * gives it (features, vrings, memory diffs) and hands every memory change to the agent's memory
 * function, as the vring relay does. It moves no data.
 */
import type { AttachMemory, DeviceSideFactory } from '../../src/agent/attach.ts';
import type { Device } from '../../src/device/types.ts';
import type { VhostUserDeviceSide, VringConfig } from '../../src/vhost-user/backend.ts';
import type { MemoryDiff } from '../../src/vhost-user/memory-table.ts';

/** VIRTIO_F_VERSION_1, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH. */
export const BLK_FEATURES = (1n << 32n) | (1n << 2n) | (1n << 6n) | (1n << 9n);

export class RecordingBlkSide implements VhostUserDeviceSide {
  readonly features = BLK_FEATURES;
  readonly queueCount = 1;
  readonly maxQueueSize = 256;
  readonly negotiated: bigint[] = [];
  readonly started: VringConfig[] = [];
  /** Guest addresses of each diff the backend handed on. */
  readonly diffs: { added: bigint[]; removed: bigint[] }[] = [];

  constructor(
    readonly device: Device,
    private readonly memory: AttachMemory,
  ) {}

  config(): Buffer {
    const config = Buffer.alloc(60);
    config.writeBigUInt64LE(2048n, 0); // capacity in sectors
    return config;
  }

  featuresNegotiated(features: bigint): void {
    this.negotiated.push(features);
  }

  memoryChanged(diff: MemoryDiff): Promise<void> {
    this.diffs.push({
      added: diff.added.map((r) => r.guestAddr),
      removed: diff.removed.map((r) => r.guestAddr),
    });
    return this.memory(diff);
  }

  startVring(vring: VringConfig): void {
    this.started.push(vring);
  }

  stopVring(index: number): number {
    return [...this.started].reverse().find((v) => v.index === index)?.lastAvail ?? 0;
  }
}

/** A factory of recording sides that keeps every side it made, newest last. */
export function recordingSides(): { factory: DeviceSideFactory; sides: RecordingBlkSide[] } {
  const sides: RecordingBlkSide[] = [];
  return {
    sides,
    factory: (device, memory) => {
      const side = new RecordingBlkSide(device, memory);
      sides.push(side);
      return side;
    },
  };
}
