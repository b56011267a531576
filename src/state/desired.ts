/**
 * The desired state: what the service has acknowledged and must make true on the devices, and
 * what it must remember to answer retries. Changed only through `applyChange`, which the store
 * calls for records it has made durable and again when it replays them, so both paths agree.
 */
import type { Mapping } from '../iotlb/types.ts';
import type { MemoryKind } from '../memory/types.ts';
import type { ServiceErrorInfo } from '../core/errors.ts';
import type { BatchOp } from '../core/types.ts';
import { TimeSlices } from '../sys/next-turn.ts';

export interface MemoryRecord {
  id: string;
  /** The agent's path of the backing (a file to re-open after an agent restart, or memfd:<id>). */
  path: string;
  kind: MemoryKind;
  created: boolean;
  size: bigint;
  /** ISO time of registration. */
  registeredAt: string;
}

/**
 * An attached device: what its Attach asked for, so that a new agent is asked to serve the same
 * socket again (service/attachments.ts). The VMM's table itself is asid 0 of the device's mappings.
 */
export interface AttachmentRecord {
  device: string;
  /** The vhost-user socket the agent serves. */
  socketPath: string;
  /** The socket is 0660 owned by this group; 0600 without one. */
  group?: string;
}

/** A submitted request that is durably queued but not applied yet. */
export interface PendingSubmit {
  sequence: bigint;
  ops: BatchOp[];
  atomic: boolean;
}

export interface SubmitFailure {
  sequence: bigint;
  error: ServiceErrorInfo;
}

export interface IdempotencyRecord {
  requestId: string;
  /** Digest of the request (method and body without the id): a reuse with another body is refused. */
  digest: string;
  /** The answer given, in its stored form (see service/idempotency.ts). */
  answer: unknown;
}

export interface DeviceState {
  /** The next sequence number to hand out; sequence numbers never repeat. */
  nextSequence: bigint;
  /** Keyed by `asid:iova`. */
  mappings: Map<string, Mapping>;
  /** In sequence order. */
  pending: Map<bigint, PendingSubmit>;
  /** Failures of submitted requests not reported by a flush yet, oldest first. */
  failures: SubmitFailure[];
  /** Oldest first (Map insertion order); bounded. */
  idempotency: Map<string, IdempotencyRecord>;
}

export interface StateLimits {
  /** Idempotency records kept per device (the oldest are forgotten). */
  idempotencyPerDevice: number;
  /** Unreported submit failures kept per device (the oldest are dropped). */
  failuresPerDevice: number;
}

/** The limits, unset ones at their defaults. */
export function stateLimits(limits: Partial<StateLimits> = {}): StateLimits {
  return {
    idempotencyPerDevice: limits.idempotencyPerDevice ?? 10_000,
    failuresPerDevice: limits.failuresPerDevice ?? 10_000,
  };
}

export interface DesiredState {
  readonly limits: StateLimits;
  memory: Map<string, MemoryRecord>;
  devices: Map<string, DeviceState>;
  /** Desired mappings per memory id, over all devices. */
  memoryUse: Map<string, number>;
  /** Attached devices, by device name. */
  attachments: Map<string, AttachmentRecord>;
}

export type Change =
  | { t: 'memory.put'; memory: MemoryRecord }
  | { t: 'memory.delete'; id: string }
  | { t: 'mapping.put'; device: string; mapping: Mapping }
  | { t: 'mapping.delete'; device: string; asid: number; iova: bigint }
  | { t: 'sequence'; device: string; next: bigint }
  | { t: 'pending.put'; device: string; submit: PendingSubmit }
  | { t: 'pending.delete'; device: string; sequence: bigint }
  | { t: 'failure.add'; device: string; failure: SubmitFailure }
  | { t: 'failures.clear'; device: string; through: bigint }
  | { t: 'idempotency.put'; device: string; record: IdempotencyRecord }
  | { t: 'attachment.put'; attachment: AttachmentRecord }
  | { t: 'attachment.delete'; device: string };

export const mappingKey = (asid: number, iova: bigint): string => `${asid}:${iova}`;

export function emptyState(limits: StateLimits): DesiredState {
  return { limits, memory: new Map(), devices: new Map(), memoryUse: new Map(), attachments: new Map() };
}

export function deviceState(state: DesiredState, device: string): DeviceState {
  let d = state.devices.get(device);
  if (d === undefined) {
    d = { nextSequence: 1n, mappings: new Map(), pending: new Map(), failures: [], idempotency: new Map() };
    state.devices.set(device, d);
  }
  return d;
}

function countUse(state: DesiredState, memory: string, delta: number): void {
  const n = (state.memoryUse.get(memory) ?? 0) + delta;
  if (n === 0) state.memoryUse.delete(memory);
  else state.memoryUse.set(memory, n);
}

type MappingChange = Extract<Change, { t: 'mapping.put' | 'mapping.delete' }>;

/** One mapping change on a device's table; `count` is told how each memory's use changes. */
function applyMappingChange(
  table: Map<string, Mapping>,
  c: MappingChange,
  count: (memory: string, delta: number) => void,
): void {
  const key = c.t === 'mapping.put' ? mappingKey(c.mapping.asid, c.mapping.iova) : mappingKey(c.asid, c.iova);
  const old = table.get(key);
  if (old) count(old.memory, -1);
  if (c.t === 'mapping.put') {
    table.set(key, c.mapping);
    count(c.mapping.memory, 1);
  } else {
    table.delete(key);
  }
}

export function applyChange(state: DesiredState, c: Change): void {
  switch (c.t) {
    case 'memory.put':
      state.memory.set(c.memory.id, c.memory);
      return;
    case 'memory.delete':
      state.memory.delete(c.id);
      return;
    case 'mapping.put':
    case 'mapping.delete':
      applyMappingChange(deviceState(state, c.device).mappings, c, (memory, delta) =>
        countUse(state, memory, delta),
      );
      return;
    case 'sequence': {
      const d = deviceState(state, c.device);
      if (c.next > d.nextSequence) d.nextSequence = c.next;
      return;
    }
    case 'pending.put': {
      const d = deviceState(state, c.device);
      d.pending.set(c.submit.sequence, c.submit);
      if (c.submit.sequence >= d.nextSequence) d.nextSequence = c.submit.sequence + 1n;
      return;
    }
    case 'pending.delete':
      deviceState(state, c.device).pending.delete(c.sequence);
      return;
    case 'failure.add': {
      const d = deviceState(state, c.device);
      d.failures.push(c.failure);
      if (d.failures.length > state.limits.failuresPerDevice) d.failures.shift();
      return;
    }
    case 'failures.clear': {
      const d = deviceState(state, c.device);
      d.failures = d.failures.filter((f) => f.sequence > c.through);
      return;
    }
    case 'idempotency.put': {
      const d = deviceState(state, c.device);
      d.idempotency.delete(c.record.requestId);
      d.idempotency.set(c.record.requestId, c.record);
      while (d.idempotency.size > state.limits.idempotencyPerDevice) {
        const oldest = d.idempotency.keys().next().value as string;
        d.idempotency.delete(oldest);
      }
      return;
    }
    case 'attachment.put':
      state.attachments.set(c.attachment.device, c.attachment);
      return;
    case 'attachment.delete':
      state.attachments.delete(c.device);
      return;
  }
}

/**
 * The device whose records a change writes, or undefined for a change of the records every device
 * depends on (memory). Changes of different devices commute: applied in either order they leave
 * the same state (the per-memory use counts are sums).
 */
export function deviceOf(c: Change): string | undefined {
  switch (c.t) {
    case 'memory.put':
    case 'memory.delete':
      return undefined;
    case 'attachment.put':
      return c.attachment.device;
    default:
      return c.device;
  }
}

/** Commits with more mapping changes than this are staged on a copy in slices; smaller ones apply in one piece. */
export const APPLY_WHOLE_MAX = 1024;

/** A commit's changes made ready to apply: `install()` applies all of them at once. */
export interface StagedChanges {
  install(): void;
}

/**
 * Prepares `changes` for applyChange of each in order, without changing `state` until `install()`.
 * A commit of many mapping changes (a large table) has its devices' mapping tables built as copies
 * in slices that give the event loop back, with the per-memory use it adds up; `install()` then
 * puts the copies in place and applies the few other changes, so it costs little, holds the event
 * loop for no table, and nobody sees a table half applied. A small commit is applied by `install()`
 * in one piece. Between this and `install()` nothing else may change the devices the changes write
 * (the store applies the commits of one device in order).
 */
export async function stageChanges(state: DesiredState, changes: readonly Change[]): Promise<StagedChanges> {
  let mappingChanges = 0;
  for (const c of changes) if (c.t === 'mapping.put' || c.t === 'mapping.delete') mappingChanges++;
  if (mappingChanges <= APPLY_WHOLE_MAX) {
    return {
      install: () => {
        for (const c of changes) applyChange(state, c);
      },
    };
  }
  const tables = new Map<string, Map<string, Mapping>>();
  const use = new Map<string, number>();
  const count = (memory: string, delta: number) => use.set(memory, (use.get(memory) ?? 0) + delta);
  const others: Change[] = [];
  const slices = new TimeSlices();
  const tableOf = async (device: string) => {
    let table = tables.get(device);
    if (table === undefined) {
      table = new Map();
      tables.set(device, table);
      for (const [key, m] of state.devices.get(device)?.mappings ?? []) {
        if (slices.due()) await slices.next();
        table.set(key, m);
      }
    }
    return table;
  };
  for (const c of changes) {
    if (slices.due()) await slices.next();
    if (c.t === 'mapping.put' || c.t === 'mapping.delete')
      applyMappingChange(await tableOf(c.device), c, count);
    else others.push(c);
  }
  return {
    install: () => {
      for (const [device, table] of tables) deviceState(state, device).mappings = table;
      for (const [memory, delta] of use) if (delta !== 0) countUse(state, memory, delta);
      // None of these reads or writes a mapping table: their order against the mapping changes is free.
      for (const c of others) applyChange(state, c);
    },
  };
}

/** Every desired mapping of a device, ordered by asid then iova. */
export function sortedMappings(d: DeviceState | undefined, asid?: number): Mapping[] {
  if (d === undefined) return [];
  const all = [...d.mappings.values()].filter((m) => asid === undefined || m.asid === asid);
  return all.sort((a, b) => a.asid - b.asid || (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0));
}

// ---- snapshot form (plain JSON-able values; bigints are kept as bigints for the codec) ----

interface DeviceSnapshot {
  name: string;
  nextSequence: bigint;
  mappings: Mapping[];
  pending: PendingSubmit[];
  failures: SubmitFailure[];
  idempotency: IdempotencyRecord[];
}

export interface StateSnapshot {
  memory: MemoryRecord[];
  devices: DeviceSnapshot[];
  /** Absent in snapshots written before attachments were kept, and when there is none. */
  attachments?: AttachmentRecord[];
}

export function toSnapshot(state: DesiredState): StateSnapshot {
  return {
    memory: [...state.memory.values()],
    devices: [...state.devices].map(([name, d]) => ({
      name,
      nextSequence: d.nextSequence,
      mappings: [...d.mappings.values()],
      pending: [...d.pending.values()],
      // Copied: failures are pushed in place, and a compaction encodes the snapshot while commits go on.
      failures: [...d.failures],
      idempotency: [...d.idempotency.values()],
    })),
    ...(state.attachments.size > 0 ? { attachments: [...state.attachments.values()] } : {}),
  };
}

export function fromSnapshot(snap: StateSnapshot, limits: StateLimits): DesiredState {
  const state = emptyState(limits);
  for (const m of snap.memory) applyChange(state, { t: 'memory.put', memory: m });
  for (const s of snap.devices) {
    const d = deviceState(state, s.name);
    d.nextSequence = s.nextSequence;
    for (const mapping of s.mappings) applyChange(state, { t: 'mapping.put', device: s.name, mapping });
    for (const submit of s.pending) d.pending.set(submit.sequence, submit);
    d.failures = [...s.failures];
    for (const record of s.idempotency) applyChange(state, { t: 'idempotency.put', device: s.name, record });
  }
  for (const attachment of snap.attachments ?? []) applyChange(state, { t: 'attachment.put', attachment });
  return state;
}

/** The state a snapshot (if any) and the records appended after it, in order, amount to. */
export function replayState(
  snapshot: StateSnapshot | undefined,
  records: readonly (readonly Change[])[],
  limits: StateLimits,
): DesiredState {
  const state = snapshot === undefined ? emptyState(limits) : fromSnapshot(snapshot, limits);
  for (const record of records) {
    for (const change of record) applyChange(state, change);
  }
  return state;
}
