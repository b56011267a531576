/** The one interface every device kind implements (kernel vhost-vdpa, simulated). */
import type { IotlbOp, IovaRange, Mapping } from '../iotlb/types.ts';

export type DeviceKind = 'kernel' | 'simulated';
/** platform: the parent maps through the platform IOMMU (dma_map/dma_unmap per message);
 *  onchip: the parent implements set_map and rebuilds its whole table per push. */
export type IommuKind = 'platform' | 'onchip' | 'unknown';

export interface DeviceFacts {
  name: string;
  kind: DeviceKind;
  /** `/dev/vhost-vdpa-N` for kernel devices, null for simulated ones. */
  node: string | null;
  /** virtio device id (1 net, 2 blk). */
  deviceId: number;
  offeredFeatures: bigint;
  negotiatedFeatures: bigint;
  iovaRange: IovaRange;
  asNum: number;
  groupNum: number;
  vqCount: number;
  configSize: number;
  status: number;
  iommu: IommuKind;
  /** Whether the parent needs pinned memory (PA mode) rather than VA mode (VDUSE, use_va). */
  pinned: boolean;
  /**
   * The kernel's PAGE_SIZE in bytes. A pinning parent maps whole pages (vhost_vdpa_pa_map), so
   * there every iova, size and memory offset must be a multiple of it.
   */
  pageSize: bigint;
}

/** The page size mappings must be aligned to on this device: only a pinning one has one. */
export function pinPageSize(facts: Pick<DeviceFacts, 'pinned' | 'pageSize'>): bigint | undefined {
  return facts.pinned ? facts.pageSize : undefined;
}

/** Outcome of one op: ok, or the errno name (EINVAL, EEXIST, EFAULT, ...) with a precise reason. */
export type OpResult =
  | { ok: true }
  | {
      ok: false;
      errno: string;
      /** Machine-readable cause: an IotlbViolationReason, a MemoryErrorCode, or KERNEL / INJECTED. */
      code: string;
      message: string;
      field?: string;
    };

/** Cost-model and traffic counters; all monotonic since the device was opened. */
export interface DeviceCounters {
  messagesWritten: number;
  batches: number;
  /** platform IOMMU: one per UPDATE / INVALIDATE of an entry. */
  dmaMapCalls: number;
  dmaUnmapCalls: number;
  /** on-chip IOMMU: one push per BATCH_END, one per message outside a batch. */
  setMapPushes: number;
  /** Sum over pushes of the table size pushed. */
  setMapEntriesPushed: number;
}

export interface Device {
  readonly name: string;
  facts(): DeviceFacts;
  counters(): DeviceCounters;
  /**
   * Applies the ops in order, each checked first against the device's own table and the memory
   * registry; one BATCH_BEGIN/BATCH_END around them when IOTLB_BATCH was negotiated. A failed op
   * does not stop the ones after it. Returns one result per op.
   */
  apply(ops: readonly IotlbOp[]): Promise<OpResult[]>;
  /** Every live entry, ordered by asid then iova. */
  mappings(): Mapping[];
  suspend(): Promise<void>;
  resume(): Promise<void>;
  /** Virtio reset (status 0). Mappings survive only when IOTLB_PERSIST was negotiated. */
  reset(): Promise<void>;
  /** Closes the device; the kernel drops every mapping (and unpins) when the fd closes. */
  close(): Promise<void>;
}

/** Simulated devices only: DMA through the device's IOTLB into the real shared memory. */
export interface DmaCapable {
  dmaRead(asid: number, iova: bigint, length: number): Buffer;
  dmaWrite(asid: number, iova: bigint, data: Uint8Array): void;
}

/** What devices log through (a pino Logger fits). */
export interface DeviceLogger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}
