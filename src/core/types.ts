/**
 * Requests and answers of the application core (src/service), shared by the gRPC and REST
 * transports. Every 64-bit quantity is a bigint here; the transports parse and print them.
 */
import type { AttachmentInfo } from '../agent/wire.ts';
import type { DeviceCounters, DeviceFacts } from '../device/types.ts';
import type { IotlbOp, Mapping, Perm, Region } from '../iotlb/types.ts';
import type { ServiceErrorInfo } from './errors.ts';

export interface MapSpec {
  asid: number;
  iova: bigint;
  size: bigint;
  memory: string;
  offset: bigint;
  perm: Perm;
}

export interface UnmapSpec {
  asid: number;
  iova: bigint;
  size: bigint;
  /** Refuse (CONFLICT) instead of splitting a mapping the range covers only in part. */
  exact?: boolean;
}

export type BatchOp = ({ op: 'map' } & MapSpec) | ({ op: 'unmap' } & UnmapSpec);

/** Optional idempotency key: a retry with the same key gets the first answer, nothing re-applied. */
export interface Idempotent {
  requestId?: string;
}

/** The longest requestId a caller may give (characters). */
export const MAX_REQUEST_ID = 128;

export interface MapRequest extends MapSpec, Idempotent {
  device: string;
}
export interface UnmapRequest extends UnmapSpec, Idempotent {
  device: string;
}
export interface SetMemTableRequest extends Idempotent {
  device: string;
  asid: number;
  regions: Region[];
  dryRun?: boolean;
}
export interface BatchRequest extends Idempotent {
  device: string;
  ops: BatchOp[];
  /** All or nothing: on any failure the device is put back as it was before the batch. */
  atomic?: boolean;
}

export interface MapResult {
  mapping: Mapping;
  /** The IOTLB ops this request cost (here: one UPDATE). */
  ops: IotlbOp[];
}
export interface UnmapResult {
  removed: Mapping[];
  /** Remainders of partly covered mappings, mapped again in the same batch. */
  remapped: Mapping[];
  ops: IotlbOp[];
}
export interface SetMemTableResult {
  dryRun: boolean;
  ops: IotlbOp[];
  invalidated: Mapping[];
  mapped: Mapping[];
  unchanged: number;
}
export interface BatchOpResult {
  ok: boolean;
  error?: ServiceErrorInfo;
  ops: IotlbOp[];
}
export interface BatchResult {
  atomic: boolean;
  /** false when an atomic batch failed and was rolled back. */
  committed: boolean;
  results: BatchOpResult[];
}

/** Sequence numbers are per device, start at 1 and never repeat (they survive restarts). */
export interface SubmitResult {
  sequence: bigint;
}
export interface FlushResult {
  /** Highest sequence applied when the flush returned. */
  sequence: bigint;
  /** Submitted ops (since the last flush) that failed, with why. */
  failures: { sequence: bigint; error: ServiceErrorInfo }[];
}

export interface MappingEvent {
  device: string;
  kind: 'mapped' | 'unmapped';
  mapping: Mapping;
  /** Monotonic per device. */
  sequence: bigint;
}

/** Where a watch starts on one device: its latest sequence when the watch began. */
export interface WatchPosition {
  device: string;
  sequence: bigint;
}

export interface WatchSubscription {
  /** Per device watched: every change up to `sequence` is in ListMappings; later ones are sent. */
  positions: WatchPosition[];
  /** With `fromSequence`: the kept events after it, to send before any new one. */
  replay: MappingEvent[];
  close(): void;
}

/** Desired mappings of one memory that the device does not hold: the agent cannot open the memory. */
export interface DegradedMemory {
  memory: string;
  mappings: number;
  bytes: bigint;
  /** Why the agent cannot open it. */
  reason: string;
  /** What the operator can do. */
  remedy: string;
}

/** A desired mapping; `missing` when the device does not hold it (see DegradedMemory). */
export type ListedMapping = Mapping & { missing?: true };

export interface DeviceView extends DeviceFacts {
  id: string;
  /** false until reconciliation after a (re)start or an agent restart is done. */
  ready: boolean;
  /** Desired mappings the device holds (missing ones are counted in `degraded`). */
  mappedBytes: bigint;
  mappedEntries: number;
  /** Memories whose mappings the device does not hold; empty when nothing is missing. */
  degraded: DegradedMemory[];
  queueDepth: number;
  counters: DeviceCounters;
  /** The VMM attached over vhost-user (the agent's DescribeDevice), when the device is attached. */
  attachment?: AttachmentInfo;
}

/** The agent's view of an attachment, as the API shows it (src/api cannot reach the agent's layer). */
export type { AttachmentInfo };

export interface AttachDeviceRequest {
  device: string;
  /** Under the agent's attach directory. */
  socketPath: string;
  /** The socket is 0660 owned by this group; 0600 without it. */
  group?: string;
}

export interface MemoryView {
  id: string;
  path: string;
  kind: 'memfd' | 'file';
  created: boolean;
  size: bigint;
  mappedEntries: number;
}

export interface RegisterMemoryRequest {
  id: string;
  /** Open an existing file under the allowed roots... */
  path?: string;
  /** ...or create one of this size. Exactly one of path / size. */
  size?: bigint;
}

/** The application core both transports call. */
export interface MapdService {
  listDevices(): Promise<DeviceView[]>;
  getDevice(id: string): Promise<DeviceView>;
  map(req: MapRequest): Promise<MapResult>;
  unmap(req: UnmapRequest): Promise<UnmapResult>;
  setMemTable(req: SetMemTableRequest): Promise<SetMemTableResult>;
  batch(req: BatchRequest): Promise<BatchResult>;
  /** Durably queues the ops and returns at once; their outcome is reported by flush(). */
  submit(req: BatchRequest): Promise<SubmitResult>;
  flush(device: string): Promise<FlushResult>;
  listMappings(device: string, asid?: number): Promise<ListedMapping[]>;
  /**
   * Calls `listener` for every applied change to `device` (undefined: every device). With
   * `fromSequence` (one device only) the kept events after it come in `replay`; FAILED_PRECONDITION
   * when they are no longer all kept.
   */
  watch(
    device: string | undefined,
    listener: (e: MappingEvent) => void,
    fromSequence?: bigint,
  ): WatchSubscription;
  registerMemory(req: RegisterMemoryRequest): Promise<MemoryView>;
  listMemory(): Promise<MemoryView[]>;
  unregisterMemory(id: string): Promise<void>;
  /** The agent serves a vhost-user socket for the device; the VMM's memory table then owns asid 0. */
  attachDevice(req: AttachDeviceRequest): Promise<AttachmentInfo>;
  detachDevice(device: string): Promise<void>;
  /**
   * Ready = agent connected and every device reconciled. A degraded device (some memory cannot be
   * opened) is ready: it serves every other mapping.
   */
  isReady(): boolean;
  /** The devices missing mappings, per memory (for /readyz). */
  degraded(): { device: string; memory: string; mappings: number }[];
  close(): Promise<void>;
}
