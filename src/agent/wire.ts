/**
 * The agent protocol's wire shapes and their conversion to and from the library's types, used by
 * both the agent and its client. Wire objects are what protobufjs' toObject hands out (proto.ts) with
 * `longs: String, enums: String, defaults: true, oneofs: true`: every uint64 is a decimal string,
 * converted to bigint here and nowhere else (never through a JS number), enums are their names.
 */
import { COUNTER_KEYS } from '../device/counters.ts';
import type { DeviceCounters, DeviceFacts, DeviceKind, IommuKind, OpResult } from '../device/types.ts';
import type { Mapping, Perm } from '../iotlb/types.ts';
import type { CreateMemoryRequest, MemoryInfo, MemoryKind, OpenMemoryRequest } from '../memory/types.ts';
import type { BackendStats, VringView } from '../vhost-user/backend.ts';
import { status } from '@grpc/grpc-js';
import { isU64Text, U64_MAX } from '../u64.ts';
import { AgentError } from './errors.ts';

/** Options for protobufjs' toObject that produce the shapes below. */
export const WIRE_OBJECT_OPTIONS = {
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
} as const;

function badRequest(field: string, message: string): AgentError {
  return new AgentError(status.INVALID_ARGUMENT, 'BAD_REQUEST', `${field}: ${message}`, field);
}

/** A u64 as it goes on the wire: its decimal string. Throws for anything outside 0..2^64-1. */
export function u64ToWire(value: bigint, field: string): string {
  if (value < 0n || value > U64_MAX) throw badRequest(field, `${value} is not a u64`);
  return value.toString();
}

/** A u64 from the wire: decimal or 0x hex, 0..2^64-1; anything else is a BAD_REQUEST naming the field. */
export function u64FromWire(value: unknown, field: string): bigint {
  if (typeof value !== 'string' || !isU64Text(value)) {
    throw badRequest(field, `expected a u64 as a decimal or 0x hex string, got ${JSON.stringify(value)}`);
  }
  const n = BigInt(value);
  if (n > U64_MAX) throw badRequest(field, `${value} does not fit in 64 bits`);
  return n;
}

/** A page size: a power of two (0, what an agent without the field sends, is refused). */
function pageSizeFromWire(value: unknown, field: string): bigint {
  const n = u64FromWire(value, field);
  if (n === 0n || (n & (n - 1n)) !== 0n) throw badRequest(field, `${n} is not a page size (a power of two)`);
  return n;
}

/** Counters are numbers in the library (safe integers) and uint64 on the wire. */
function countToWire(value: number, field: string): string {
  if (!Number.isSafeInteger(value) || value < 0) throw badRequest(field, `${value} is not a count`);
  return String(value);
}

function countFromWire(value: unknown, field: string): number {
  const n = u64FromWire(value, field);
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw badRequest(field, `${n} is beyond 2^53`);
  return Number(n);
}

/** A proto enum <-> library string literal table, checked both ways. */
function enumCodec<T extends string, W extends string>(table: Record<T, W>, what: string) {
  const back = new Map<string, T>(Object.entries(table).map(([k, v]) => [v as string, k as T]));
  return {
    toWire: (value: T): W => table[value],
    fromWire(value: unknown, field: string): T {
      const found = typeof value === 'string' ? back.get(value) : undefined;
      if (found === undefined) throw badRequest(field, `${JSON.stringify(value)} is not a valid ${what}`);
      return found;
    },
  };
}

export type WirePerm = 'PERM_UNSPECIFIED' | 'PERM_RO' | 'PERM_WO' | 'PERM_RW';
const PERM = enumCodec<Perm, WirePerm>({ ro: 'PERM_RO', wo: 'PERM_WO', rw: 'PERM_RW' }, 'perm');
const DEVICE_KIND = enumCodec<DeviceKind, string>(
  { kernel: 'DEVICE_KIND_KERNEL', simulated: 'DEVICE_KIND_SIMULATED' },
  'device kind',
);
const IOMMU_KIND = enumCodec<IommuKind, string>(
  { platform: 'IOMMU_KIND_PLATFORM', onchip: 'IOMMU_KIND_ONCHIP', unknown: 'IOMMU_KIND_UNKNOWN' },
  'IOMMU kind',
);
const MEMORY_KIND = enumCodec<MemoryKind, string>(
  { memfd: 'MEMORY_KIND_MEMFD', file: 'MEMORY_KIND_FILE' },
  'memory kind',
);

/** Present (non-null) sub-message, or a BAD_REQUEST naming the field. */
function required<T>(value: T | null | undefined, field: string): T {
  if (value === null || value === undefined) throw badRequest(field, 'is required');
  return value;
}

// ---- wire shapes (proto-loader objects) ----

export interface WireAgentInfo {
  bootId: string;
  version: string;
  pid: number;
}

export interface WireIovaRange {
  first: string;
  last: string;
}

export interface WireDeviceFacts {
  name: string;
  kind: string;
  node?: string | null;
  deviceId: number;
  offeredFeatures: string;
  negotiatedFeatures: string;
  iovaRange?: WireIovaRange | null;
  asNum: number;
  groupNum: number;
  vqCount: number;
  configSize: number;
  status: number;
  iommu: string;
  pinned: boolean;
  pageSize: string;
}

export interface WireDeviceCounters {
  messagesWritten: string;
  batches: string;
  dmaMapCalls: string;
  dmaUnmapCalls: string;
  setMapPushes: string;
  setMapEntriesPushed: string;
}

export interface WireDeviceDescription {
  facts?: WireDeviceFacts | null;
  counters?: WireDeviceCounters | null;
  attachment?: WireAttachment | null;
}

export interface WireMapping {
  asid: number;
  iova: string;
  size: string;
  memory: string;
  offset: string;
  perm: string;
}

export interface WireDeviceRequest {
  device: string;
}

export interface WireRegisterMemoryRequest {
  id: string;
  path?: string | null;
  create?: { size: string; kind: string } | null;
}

export interface WireMemoryInfo {
  id: string;
  path: string;
  kind: string;
  created: boolean;
  size: string;
  uaddr: string;
  mappedEntries: number;
}

export interface WireDmaReadRequest {
  device: string;
  asid: number;
  iova: string;
  length: number;
}

export interface WireDmaWriteRequest {
  device: string;
  asid: number;
  iova: string;
  data: Uint8Array;
}

// ---- library types that exist only on this protocol ----

export interface AgentInfo {
  /** Random at every agent start: a new one means every mapping of the previous run is gone. */
  bootId: string;
  version: string;
  pid: number;
}

/** A device's facts and counters, as DescribeDevice returns them; its attachment when attached. */
export interface DeviceDescription {
  facts: DeviceFacts;
  counters: DeviceCounters;
  attachment?: AttachmentInfo;
}

/** An op result; failures of an overlapping UPDATE name the live entry they collide with (mapping-codec.ts codes them). */
export type AgentOpResult = OpResult & { conflict?: Mapping };

export type RegisterMemoryRequest = OpenMemoryRequest | CreateMemoryRequest;

// ---- conversions ----

export function factsToWire(f: DeviceFacts): WireDeviceFacts {
  return {
    name: f.name,
    kind: DEVICE_KIND.toWire(f.kind),
    ...(f.node === null ? {} : { node: f.node }),
    deviceId: f.deviceId,
    offeredFeatures: u64ToWire(f.offeredFeatures, 'offeredFeatures'),
    negotiatedFeatures: u64ToWire(f.negotiatedFeatures, 'negotiatedFeatures'),
    iovaRange: {
      first: u64ToWire(f.iovaRange.first, 'iovaRange.first'),
      last: u64ToWire(f.iovaRange.last, 'iovaRange.last'),
    },
    asNum: f.asNum,
    groupNum: f.groupNum,
    vqCount: f.vqCount,
    configSize: f.configSize,
    status: f.status,
    iommu: IOMMU_KIND.toWire(f.iommu),
    pinned: f.pinned,
    pageSize: u64ToWire(f.pageSize, 'pageSize'),
  };
}

export function factsFromWire(w: WireDeviceFacts, field = 'facts'): DeviceFacts {
  const range = required(w.iovaRange, `${field}.iovaRange`);
  return {
    name: w.name,
    kind: DEVICE_KIND.fromWire(w.kind, `${field}.kind`),
    node: w.node ?? null,
    deviceId: w.deviceId,
    offeredFeatures: u64FromWire(w.offeredFeatures, `${field}.offeredFeatures`),
    negotiatedFeatures: u64FromWire(w.negotiatedFeatures, `${field}.negotiatedFeatures`),
    iovaRange: {
      first: u64FromWire(range.first, `${field}.iovaRange.first`),
      last: u64FromWire(range.last, `${field}.iovaRange.last`),
    },
    asNum: w.asNum,
    groupNum: w.groupNum,
    vqCount: w.vqCount,
    configSize: w.configSize,
    status: w.status,
    iommu: IOMMU_KIND.fromWire(w.iommu, `${field}.iommu`),
    pinned: w.pinned,
    pageSize: pageSizeFromWire(w.pageSize, `${field}.pageSize`),
  };
}

export function countersToWire(c: DeviceCounters): WireDeviceCounters {
  return Object.fromEntries(
    COUNTER_KEYS.map((k) => [k, countToWire(c[k], `counters.${k}`)]),
  ) as unknown as WireDeviceCounters;
}

export function countersFromWire(w: WireDeviceCounters): DeviceCounters {
  return Object.fromEntries(
    COUNTER_KEYS.map((k) => [k, countFromWire(w[k], `counters.${k}`)]),
  ) as unknown as DeviceCounters;
}

export function descriptionFromWire(w: WireDeviceDescription): DeviceDescription {
  return {
    facts: factsFromWire(required(w.facts, 'facts')),
    counters: countersFromWire(required(w.counters, 'counters')),
    ...(w.attachment ? { attachment: attachmentFromWire(w.attachment) } : {}),
  };
}

function mappingToWire(m: Mapping, field = 'mapping'): WireMapping {
  return {
    asid: m.asid,
    iova: u64ToWire(m.iova, `${field}.iova`),
    size: u64ToWire(m.size, `${field}.size`),
    memory: m.memory,
    offset: u64ToWire(m.offset, `${field}.offset`),
    perm: PERM.toWire(m.perm),
  };
}

function mappingFromWire(w: WireMapping, field = 'mapping'): Mapping {
  return {
    asid: w.asid,
    iova: u64FromWire(w.iova, `${field}.iova`),
    size: u64FromWire(w.size, `${field}.size`),
    memory: w.memory,
    offset: u64FromWire(w.offset, `${field}.offset`),
    perm: PERM.fromWire(w.perm, `${field}.perm`),
  };
}

export function registerToWire(req: RegisterMemoryRequest): WireRegisterMemoryRequest {
  if ('path' in req) return { id: req.id, path: req.path };
  return {
    id: req.id,
    create: {
      size: u64ToWire(req.size, 'create.size'),
      kind: req.kind === undefined ? 'MEMORY_KIND_UNSPECIFIED' : MEMORY_KIND.toWire(req.kind),
    },
  };
}

export function registerFromWire(w: WireRegisterMemoryRequest): RegisterMemoryRequest {
  if (typeof w.path === 'string') return { id: w.id, path: w.path };
  if (w.create) {
    const { size, kind } = w.create;
    return {
      id: w.id,
      size: u64FromWire(size, 'create.size'),
      ...(kind === 'MEMORY_KIND_UNSPECIFIED' ? {} : { kind: MEMORY_KIND.fromWire(kind, 'create.kind') }),
    };
  }
  throw badRequest('source', 'needs path or create');
}

export function memoryToWire(m: MemoryInfo): WireMemoryInfo {
  return {
    id: m.id,
    path: m.path,
    kind: MEMORY_KIND.toWire(m.kind),
    created: m.created,
    size: u64ToWire(m.size, 'size'),
    uaddr: u64ToWire(m.uaddr, 'uaddr'),
    mappedEntries: m.mappedEntries,
  };
}

export function memoryFromWire(w: WireMemoryInfo, field = 'memory'): MemoryInfo {
  return {
    id: w.id,
    path: w.path,
    kind: MEMORY_KIND.fromWire(w.kind, `${field}.kind`),
    created: w.created,
    size: u64FromWire(w.size, `${field}.size`),
    uaddr: u64FromWire(w.uaddr, `${field}.uaddr`),
    mappedEntries: w.mappedEntries,
  };
}

// ---- attachments (a VMM over vhost-user) ----

export interface WireVringInfo {
  index: number;
  size: number;
  lastAvail: number;
  desc?: string;
  avail?: string;
  used?: string;
  enabled: boolean;
  running: boolean;
}

export interface WireVhostUserStats {
  messages: Record<string, string>;
  memoryUpdates: string;
  regionsAdded: string;
  regionsRemoved: string;
  refusals: string;
}

export interface WireAttachment {
  device: string;
  socketPath: string;
  mode: number;
  group?: string;
  vmmConnected: boolean;
  negotiatedFeatures: string;
  protocolFeatures: string;
  vrings: WireVringInfo[];
  memoryTable: WireMapping[];
  stats?: WireVhostUserStats | null;
  connections: string;
}

export interface WireAttachRequest {
  device: string;
  socketPath: string;
  group?: string;
}

export interface WireAttachmentEvent {
  device: string;
  event?: 'connected' | 'memoryTable' | 'disconnected' | 'watching';
  watching?: { attached: string[] } | null;
  connected?: Record<string, never> | null;
  memoryTable?: { requestId: string; entries: WireMapping[] } | null;
  disconnected?: { reason: string } | null;
}

export interface WireMemoryTableAnswer {
  requestId: string;
  outcome?: 'ok' | 'error';
  ok?: Record<string, never> | null;
  error?: { code: string; message: string } | null;
}

/** A device's vhost-user socket and what the VMM on it (the current or last one) set up. */
export interface AttachmentInfo {
  device: string;
  socketPath: string;
  /** 0o600, or 0o660 with `group`. */
  mode: number;
  group?: string;
  vmmConnected: boolean;
  negotiatedFeatures: bigint;
  protocolFeatures: bigint;
  vrings: VringView[];
  /** The asid-0 table the API server last accepted (iova = guest physical address). */
  memoryTable: Mapping[];
  stats: BackendStats;
  /** VMM connections accepted since Attach. */
  connections: number;
}

export interface AttachRequest {
  device: string;
  socketPath: string;
  group?: string;
}

/**
 * What the agent tells the API server about attached VMMs. A `memoryTable` event is a request:
 * the VMM's whole new asid-0 table, waiting for an answer before the VMM gets its reply.
 */
export type AttachmentEvent =
  | { type: 'watching'; attached: string[] }
  | { type: 'connected'; device: string }
  | { type: 'memoryTable'; device: string; requestId: string; entries: Mapping[] }
  | { type: 'disconnected'; device: string; reason: string };

export type MemoryTableAnswer =
  | { requestId: string; ok: true }
  | { requestId: string; ok: false; code: string; message: string };

const STAT_KEYS = ['memoryUpdates', 'regionsAdded', 'regionsRemoved', 'refusals'] as const;

function optionalU64ToWire(value: bigint | undefined, field: string): string | undefined {
  return value === undefined ? undefined : u64ToWire(value, field);
}

export function attachmentToWire(a: AttachmentInfo): WireAttachment {
  const stats = Object.fromEntries(
    STAT_KEYS.map((k) => [k, countToWire(a.stats[k], `attachment.stats.${k}`)]),
  ) as Omit<WireVhostUserStats, 'messages'>;
  return {
    device: a.device,
    socketPath: a.socketPath,
    mode: a.mode,
    ...(a.group === undefined ? {} : { group: a.group }),
    vmmConnected: a.vmmConnected,
    negotiatedFeatures: u64ToWire(a.negotiatedFeatures, 'attachment.negotiatedFeatures'),
    protocolFeatures: u64ToWire(a.protocolFeatures, 'attachment.protocolFeatures'),
    vrings: a.vrings.map((v, i) => {
      const field = `attachment.vrings[${i}]`;
      const addr = (k: 'desc' | 'avail' | 'used') => optionalU64ToWire(v[k], `${field}.${k}`);
      const [desc, avail, used] = [addr('desc'), addr('avail'), addr('used')];
      return {
        index: v.index,
        size: v.size,
        lastAvail: v.lastAvail,
        ...(desc === undefined ? {} : { desc }),
        ...(avail === undefined ? {} : { avail }),
        ...(used === undefined ? {} : { used }),
        enabled: v.enabled,
        running: v.running,
      };
    }),
    memoryTable: a.memoryTable.map((m, i) => mappingToWire(m, `attachment.memoryTable[${i}]`)),
    stats: {
      ...stats,
      messages: Object.fromEntries(
        Object.entries(a.stats.messages).map(([k, n]) => [
          k,
          countToWire(n, `attachment.stats.messages.${k}`),
        ]),
      ),
    },
    connections: countToWire(a.connections, 'attachment.connections'),
  };
}

export function attachmentFromWire(w: WireAttachment, field = 'attachment'): AttachmentInfo {
  const stats = required(w.stats, `${field}.stats`);
  return {
    device: w.device,
    socketPath: w.socketPath,
    mode: w.mode,
    ...(w.group === undefined ? {} : { group: w.group }),
    vmmConnected: w.vmmConnected,
    negotiatedFeatures: u64FromWire(w.negotiatedFeatures, `${field}.negotiatedFeatures`),
    protocolFeatures: u64FromWire(w.protocolFeatures, `${field}.protocolFeatures`),
    vrings: w.vrings.map((v, i) => {
      const at = `${field}.vrings[${i}]`;
      return {
        index: v.index,
        size: v.size,
        lastAvail: v.lastAvail,
        ...(v.desc === undefined ? {} : { desc: u64FromWire(v.desc, `${at}.desc`) }),
        ...(v.avail === undefined ? {} : { avail: u64FromWire(v.avail, `${at}.avail`) }),
        ...(v.used === undefined ? {} : { used: u64FromWire(v.used, `${at}.used`) }),
        enabled: v.enabled,
        running: v.running,
      };
    }),
    memoryTable: w.memoryTable.map((m, i) => mappingFromWire(m, `${field}.memoryTable[${i}]`)),
    stats: {
      ...(Object.fromEntries(
        STAT_KEYS.map((k) => [k, countFromWire(stats[k], `${field}.stats.${k}`)]),
      ) as Omit<BackendStats, 'messages'>),
      messages: Object.fromEntries(
        Object.entries(stats.messages).map(([k, n]) => [k, countFromWire(n, `${field}.stats.messages.${k}`)]),
      ),
    },
    connections: countFromWire(w.connections, `${field}.connections`),
  };
}

export function attachmentEventToWire(e: AttachmentEvent): WireAttachmentEvent {
  switch (e.type) {
    case 'watching':
      return { device: '', watching: { attached: e.attached } };
    case 'connected':
      return { device: e.device, connected: {} };
    case 'disconnected':
      return { device: e.device, disconnected: { reason: e.reason } };
    case 'memoryTable':
      return {
        device: e.device,
        memoryTable: {
          requestId: e.requestId,
          entries: e.entries.map((m, i) => mappingToWire(m, `memoryTable.entries[${i}]`)),
        },
      };
  }
}

export function attachmentEventFromWire(w: WireAttachmentEvent): AttachmentEvent {
  if (w.watching) return { type: 'watching', attached: w.watching.attached };
  if (w.connected) return { type: 'connected', device: w.device };
  if (w.disconnected) return { type: 'disconnected', device: w.device, reason: w.disconnected.reason };
  if (w.memoryTable) {
    return {
      type: 'memoryTable',
      device: w.device,
      requestId: w.memoryTable.requestId,
      entries: w.memoryTable.entries.map((m, i) => mappingFromWire(m, `memoryTable.entries[${i}]`)),
    };
  }
  throw badRequest('event', 'needs watching, connected, memoryTable or disconnected');
}

export function answerToWire(a: MemoryTableAnswer): WireMemoryTableAnswer {
  if (a.ok) return { requestId: a.requestId, ok: {} };
  return { requestId: a.requestId, error: { code: a.code, message: a.message } };
}

export function answerFromWire(w: WireMemoryTableAnswer): MemoryTableAnswer {
  if (w.ok) return { requestId: w.requestId, ok: true };
  if (w.error) return { requestId: w.requestId, ok: false, code: w.error.code, message: w.error.message };
  throw badRequest('outcome', 'needs ok or error');
}
