/**
 * Answers on the wire, shared by REST (as JSON) and gRPC (the same objects, field for field, are
 * the proto messages): u64 as `0x` hex strings, sequences as decimal strings.
 */
import type { IotlbOp, Mapping } from '../iotlb/types.ts';
import type { ServiceErrorInfo } from '../core/errors.ts';
import type {
  AttachmentInfo,
  BatchResult,
  DeviceView,
  FlushResult,
  ListedMapping,
  MapResult,
  MappingEvent,
  MemoryView,
  SetMemTableResult,
  SubmitResult,
  UnmapResult,
  WatchPosition,
} from '../core/types.ts';
import { formatU64 as hex } from '../u64.ts';

export function formatMapping(m: Mapping | ListedMapping) {
  const formatted: {
    iova: string;
    size: string;
    memory: string;
    offset: string;
    perm: Mapping['perm'];
    asid: number;
    missing?: true;
  } = {
    iova: hex(m.iova),
    size: hex(m.size),
    memory: m.memory,
    offset: hex(m.offset),
    perm: m.perm,
    asid: m.asid,
  };
  // Set, not spread: a spread made two more objects per mapping of every listing.
  if ('missing' in m && m.missing) formatted.missing = true;
  return formatted;
}

/**
 * JSON.stringify(formatMapping(m)), written straight to text: a 65,536-region SetMemTable answer
 * lists 131,072 mappings and ops, and their formatted objects were most of its garbage.
 */
export function formatMappingJson(m: Mapping | ListedMapping): string {
  const missing = 'missing' in m && m.missing ? ',"missing":true' : '';
  return `{"iova":"${hex(m.iova)}","size":"${hex(m.size)}","memory":${JSON.stringify(m.memory)},"offset":"${hex(m.offset)}","perm":"${m.perm}","asid":${m.asid}${missing}}`;
}

/** JSON.stringify(formatOp(op)), written straight to text (see formatMappingJson). */
export function formatOpJson(op: IotlbOp): string {
  if (op.type === 'invalidate') {
    return `{"type":"invalidate","asid":${op.asid},"iova":"${hex(op.iova)}","size":"${hex(op.size)}"}`;
  }
  return `{"type":"update","iova":"${hex(op.iova)}","size":"${hex(op.size)}","memory":${JSON.stringify(op.memory)},"offset":"${hex(op.offset)}","perm":"${op.perm}","asid":${op.asid}}`;
}

/** An UPDATE's fields are a mapping's, in formatMapping's order (an op is never `missing`). */
export function formatOp(op: IotlbOp) {
  if (op.type === 'invalidate') {
    return { type: op.type, asid: op.asid, iova: hex(op.iova), size: hex(op.size) };
  }
  return {
    type: op.type,
    iova: hex(op.iova),
    size: hex(op.size),
    memory: op.memory,
    offset: hex(op.offset),
    perm: op.perm,
    asid: op.asid,
  };
}

export function formatError(e: ServiceErrorInfo) {
  return {
    code: e.code,
    message: e.message,
    ...(e.field !== undefined ? { field: e.field } : {}),
    ...(e.errno !== undefined ? { errno: e.errno } : {}),
  };
}

export function formatDevice(d: DeviceView) {
  return {
    id: d.id,
    name: d.name,
    kind: d.kind,
    node: d.node,
    deviceId: d.deviceId,
    offeredFeatures: hex(d.offeredFeatures),
    negotiatedFeatures: hex(d.negotiatedFeatures),
    iovaRange: { first: hex(d.iovaRange.first), last: hex(d.iovaRange.last) },
    asNum: d.asNum,
    groupNum: d.groupNum,
    vqCount: d.vqCount,
    configSize: d.configSize,
    status: d.status,
    iommu: d.iommu,
    pinned: d.pinned,
    ready: d.ready,
    mappedBytes: hex(d.mappedBytes),
    mappedEntries: d.mappedEntries,
    degraded: d.degraded.map((m) => ({
      memory: m.memory,
      mappings: m.mappings,
      bytes: hex(m.bytes),
      reason: m.reason,
      remedy: m.remedy,
    })),
    queueDepth: d.queueDepth,
    // The agent's wire decodes exactly the DeviceCounters keys (agent/wire.ts), so a copy is the answer.
    counters: { ...d.counters },
    ...(d.attachment === undefined ? {} : { attachment: formatAttachment(d.attachment) }),
  };
}

/** A vring's guest physical addresses are left out until the VMM set them. */
export function formatAttachment(a: AttachmentInfo) {
  const address = (k: 'desc' | 'avail' | 'used', v: bigint | undefined) =>
    v === undefined ? {} : { [k]: hex(v) };
  return {
    socketPath: a.socketPath,
    mode: a.mode,
    ...(a.group === undefined ? {} : { group: a.group }),
    vmmConnected: a.vmmConnected,
    negotiatedFeatures: hex(a.negotiatedFeatures),
    protocolFeatures: hex(a.protocolFeatures),
    vrings: a.vrings.map((v) => ({
      index: v.index,
      num: v.size,
      lastAvail: v.lastAvail,
      ...address('desc', v.desc),
      ...address('avail', v.avail),
      ...address('used', v.used),
      enabled: v.enabled,
      running: v.running,
    })),
    memoryTableEntries: a.memoryTable.length,
    memoryTableBytes: hex(a.memoryTable.reduce((sum, m) => sum + m.size, 0n)),
    stats: {
      messages: Object.entries(a.stats.messages).map(([request, count]) => ({ request, count })),
      memoryUpdates: a.stats.memoryUpdates,
      regionsAdded: a.stats.regionsAdded,
      regionsRemoved: a.stats.regionsRemoved,
      refusals: a.stats.refusals,
    },
    connections: a.connections,
  };
}

export function formatMemory(m: MemoryView) {
  return {
    id: m.id,
    path: m.path,
    kind: m.kind,
    created: m.created,
    size: hex(m.size),
    mappedEntries: m.mappedEntries,
  };
}

export function formatMapResult(r: MapResult) {
  return { mapping: formatMapping(r.mapping), ops: r.ops.map(formatOp) };
}

export function formatUnmapResult(r: UnmapResult) {
  return {
    matched: r.removed.length,
    removed: r.removed.map(formatMapping),
    remapped: r.remapped.map(formatMapping),
    ops: r.ops.map(formatOp),
  };
}

/** The answer of SetMemTable; with `summary` its counts without its lists. */
export function formatSetMemTableResult(r: SetMemTableResult, summary = false) {
  const lists = summary
    ? {}
    : {
        ops: r.ops.map(formatOp),
        invalidated: r.invalidated.map(formatMapping),
        mapped: r.mapped.map(formatMapping),
      };
  return { dryRun: r.dryRun, ...lists, unchanged: r.unchanged, ...setMemTableCounts(r) };
}

/** The answer's counts, in the order of their fields. */
export function setMemTableCounts(r: SetMemTableResult) {
  return { opCount: r.ops.length, invalidatedCount: r.invalidated.length, mappedCount: r.mapped.length };
}

export function formatBatchResult(r: BatchResult) {
  return {
    atomic: r.atomic,
    committed: r.committed,
    results: r.results.map((op) =>
      op.error === undefined
        ? { ok: op.ok, ops: op.ops.map(formatOp) }
        : { ok: op.ok, error: formatError(op.error), ops: op.ops.map(formatOp) },
    ),
  };
}

export function formatSubmitResult(r: SubmitResult) {
  return { sequence: r.sequence.toString() };
}

export function formatFlushResult(r: FlushResult) {
  return {
    sequence: r.sequence.toString(),
    failures: r.failures.map((f) => ({ sequence: f.sequence.toString(), error: formatError(f.error) })),
  };
}

/** The first event of a watch, per device watched: no mapping, the device's latest sequence. */
export function formatSubscribed(p: WatchPosition) {
  return { device: p.device, kind: 'subscribed', sequence: p.sequence.toString() };
}

export function formatEvent(e: MappingEvent) {
  return {
    device: e.device,
    kind: e.kind,
    mapping: formatMapping(e.mapping),
    sequence: e.sequence.toString(),
  };
}
