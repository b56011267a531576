/**
 * The application core: createMapdService() wires the durable store, one queue per device, the
 * memory catalog, idempotency, reconciliation and the link to the agent behind `MapdService`.
 *
 * While the agent is down (or a device is being reconciled):
 * - synchronous writes (map, unmap, set-mem-table, batch) are refused at once with UNAVAILABLE
 *   and retryAfterMs. Holding them would tie up callers for an unbounded time and leave them
 *   unsure whether a late success happened; a prompt, definite "nothing was done" lets an
 *   orchestrator retry with the same requestId, which idempotency makes safe;
 * - submit still queues: its contract is "durably queued", so it is journaled and applied once
 *   the device is reconciled (the queue bound caps what waits); flush waits for it up to its
 *   deadline, then answers UNAVAILABLE while the requests stay queued;
 * - reads of the desired state (listMappings, listMemory, devices with their last known facts)
 *   keep working: they need only the store;
 * - registering and unregistering memory need the agent: UNAVAILABLE.
 */
import type { AgentInfo } from '../agent/wire.ts';
import { ZERO_COUNTERS } from '../device/counters.ts';
import { type DeviceCounters, type DeviceFacts, pinPageSize } from '../device/types.ts';
import { AddressSpaces } from '../iotlb/address-spaces.ts';
import { createMetrics, type Metrics } from '../metrics/metrics.ts';
import { DeviceQueue, type MissingMappings } from '../queue/device-queue.ts';
import { type QuotaConfig, quotaError, quotaOf } from '../queue/quota.ts';
import type { Outcome, WriteAnswer, WriteEntry, WriteRequest } from '../queue/types.ts';
import { applySetMemTable } from '../queue/validate.ts';
import { WorkingTables } from '../queue/working.ts';
import { type Change, sortedMappings } from '../state/desired.ts';
import type { StoreFs } from '../state/fs.ts';
import { StateStore } from '../state/store.ts';
import { type AgentPort, measuredPort } from '../core/agent-port.ts';
import { fromAgentError } from '../core/agent-errors.ts';
import { ERROR_CATALOG, ServiceError } from '../core/errors.ts';
import { Idempotency, recordOf } from './idempotency.ts';
import type { CoreLogger } from '../core/logger.ts';
import { MemoryCatalog, memoryRemedy } from './memory.ts';
import { reconcileDevice } from './reconcile.ts';
import { batchOpsOf, mapSpecOf, memoriesOf, regionsOf, unmapSpecOf } from './requests.ts';
import { AgentSupervisor } from './supervisor.ts';
import type {
  BatchRequest,
  BatchResult,
  DeviceView,
  FlushResult,
  ListedMapping,
  MapdService,
  MappingEvent,
  MapRequest,
  MapResult,
  MemoryView,
  RegisterMemoryRequest,
  SetMemTableRequest,
  SetMemTableResult,
  SubmitResult,
  UnmapRequest,
  UnmapResult,
} from '../core/types.ts';
import { WatchHub } from './watch.ts';

export interface MapdServiceOptions {
  /** The agent: a port (the main's AgentClient, or an in-process one in tests), owned by the caller. */
  agent: AgentPort;
  /** Directory of the durable desired state. */
  stateDir: string;
  /** Default: a fresh registry (createMetrics()). */
  metrics?: Metrics;
  logger?: CoreLogger;
  /** File operations of the store (tests inject failures). */
  storeFs?: StoreFs;
  /** Journal size that triggers compaction (default 64 MiB). */
  compactBytes?: number;
  /** Waiting requests per device before RESOURCE_EXHAUSTED (default 1024). */
  maxQueued?: number;
  /** Requests per group commit at most (default 256). */
  maxGroup?: number;
  /** How long flush waits (default 30 s). */
  flushTimeoutMs?: number;
  /** Events kept per device for watchers resuming from a sequence (default 4096). */
  watchHistory?: number;
  /** Per-device limits on mapped bytes and entries (default none). */
  quotas?: QuotaConfig;
  /** Idempotency records kept per device (default 10,000). */
  idempotencyPerDevice?: number;
  /** Backoff of reconnect / reconcile retries (default 200 ms doubling up to 5 s). */
  retryInitialMs?: number;
  retryMaxMs?: number;
}

export interface MapdCore extends MapdService {
  /** Runs a pass now (connect, list devices, restore memory, reconcile every device not ready). */
  reconcile(): Promise<void>;
}

interface Slot {
  name: string;
  /** Last facts the agent reported; undefined for a device known only from the desired state. */
  facts: DeviceFacts | undefined;
  /** Whether the agent's last listing had it. */
  present: boolean;
  counters: DeviceCounters;
  queue: DeviceQueue;
}

class Mapd implements MapdCore {
  private readonly slots = new Map<string, Slot>();
  private readonly idempotency: Idempotency;
  private readonly memory: MemoryCatalog;
  private readonly hub: WatchHub;
  private readonly supervisor: AgentSupervisor;
  private readonly port: AgentPort;
  /** Whether the agent listed its devices at least once (before that, no device is unknown). */
  private listed = false;

  constructor(
    private readonly store: StateStore,
    private readonly metrics: Metrics,
    rawPort: AgentPort,
    private readonly opts: MapdServiceOptions,
  ) {
    this.port = measuredPort(rawPort, metrics);
    this.idempotency = new Idempotency(store);
    this.memory = new MemoryCatalog(
      store,
      this.port,
      () => this.supervisor.up,
      opts.logger,
      () => {
        void this.supervisor.sync();
      },
    );
    this.hub = new WatchHub(opts.logger, opts.watchHistory);
    this.supervisor = new AgentSupervisor({
      port: rawPort,
      metrics,
      logger: opts.logger,
      onConnected: (info) => this.onConnected(info),
      onLost: (reason) => {
        for (const slot of this.slots.values()) slot.queue.setNotReady(reason);
      },
      retryInitialMs: opts.retryInitialMs ?? 200,
      retryMaxMs: opts.retryMaxMs ?? 5000,
    });
    for (const [name, d] of store.state.devices) {
      const slot = this.slotOf(name);
      const pending = [...d.pending.values()].sort((a, b) => (a.sequence < b.sequence ? -1 : 1));
      // Events before this start are gone; restored submits still to apply keep their sequences.
      this.hub.startAt(name, (pending[0]?.sequence ?? d.nextSequence) - 1n);
      slot.queue.restore(
        pending.map((p) => this.submitEntry({ kind: 'batch', ops: p.ops, atomic: p.atomic }, p.sequence)),
      );
    }
  }

  start(): void {
    this.metrics.agentUp.set(0);
    this.supervisor.start();
  }

  // ---- devices ----

  async listDevices(): Promise<DeviceView[]> {
    const views: DeviceView[] = [];
    for (const slot of this.slots.values()) {
      if (slot.facts) views.push(await this.view(slot));
    }
    return views;
  }

  async getDevice(id: string): Promise<DeviceView> {
    const slot = this.existing(id);
    if (!slot.facts) throw this.unknownDevice(id);
    return this.view(slot);
  }

  // ---- writes ----

  async map(req: MapRequest): Promise<MapResult> {
    return this.write(req.device, req.requestId, 'Map', {
      kind: 'map',
      spec: mapSpecOf(req),
    }) as Promise<MapResult>;
  }

  async unmap(req: UnmapRequest): Promise<UnmapResult> {
    return this.write(req.device, req.requestId, 'Unmap', {
      kind: 'unmap',
      spec: unmapSpecOf(req),
    }) as Promise<UnmapResult>;
  }

  async setMemTable(req: SetMemTableRequest): Promise<SetMemTableResult> {
    const regions = regionsOf(req.regions);
    if (req.dryRun) return this.dryRun(req.device, req.asid, regions);
    const request: WriteRequest = { kind: 'setMemTable', asid: req.asid, regions };
    return this.write(req.device, req.requestId, 'SetMemTable', request) as Promise<SetMemTableResult>;
  }

  async batch(req: BatchRequest): Promise<BatchResult> {
    const request: WriteRequest = { kind: 'batch', ops: batchOpsOf(req.ops), atomic: req.atomic === true };
    return this.write(req.device, req.requestId, 'Batch', request) as Promise<BatchResult>;
  }

  async submit(req: BatchRequest): Promise<SubmitResult> {
    const request = { kind: 'batch' as const, ops: batchOpsOf(req.ops), atomic: req.atomic === true };
    const slot = this.existing(req.device);
    return this.idempotency.run(req.device, req.requestId, 'Submit', request, async (digest) => {
      slot.queue.checkAccepts('submit');
      const sequence = slot.queue.allocateSequence();
      const changes: Change[] = [
        {
          t: 'pending.put',
          device: slot.name,
          submit: { sequence, ops: request.ops, atomic: request.atomic },
        },
      ];
      if (req.requestId !== undefined && digest !== undefined) {
        const answer: SubmitResult = { sequence };
        const record = recordOf(req.requestId, digest, { ok: true, answer })!;
        changes.push({ t: 'idempotency.put', device: slot.name, record });
      }
      // Queued at once (its place in the order is now), run only once journaled.
      const journaled = this.store.commit(changes);
      const entry = this.submitEntry(request, sequence);
      entry.durable = journaled.then(
        () => true,
        () => false,
      );
      slot.queue.enqueue(entry);
      await journaled;
      return { sequence };
    });
  }

  async flush(device: string): Promise<FlushResult> {
    return this.existing(device).queue.flush(this.opts.flushTimeoutMs ?? 30_000);
  }

  // ---- reads ----

  async listMappings(device: string, asid?: number): Promise<ListedMapping[]> {
    const { queue } = this.existing(device);
    const all = sortedMappings(this.store.state.devices.get(device), asid);
    if (queue.missingMemories.length === 0) return all;
    return all.map((m) => (queue.held(m) ? m : { ...m, missing: true }));
  }

  watch(device: string | undefined, listener: (e: MappingEvent) => void, fromSequence?: bigint) {
    const devices =
      device === undefined
        ? [...this.slots.values()].filter((s) => s.facts).map((s) => s.name)
        : [this.existing(device).name];
    return this.hub.subscribe(device, devices, fromSequence, listener);
  }

  // ---- memory ----

  async registerMemory(req: RegisterMemoryRequest): Promise<MemoryView> {
    return this.memory.register(req);
  }

  async listMemory(): Promise<MemoryView[]> {
    return this.memory.list();
  }

  async unregisterMemory(id: string): Promise<void> {
    return this.memory.unregister(id);
  }

  // ---- lifecycle ----

  isReady(): boolean {
    if (!this.supervisor.up || !this.listed) return false;
    return [...this.slots.values()].every((s) => !s.present || s.queue.ready);
  }

  degraded(): { device: string; memory: string; mappings: number }[] {
    return [...this.slots.values()].flatMap((s) =>
      s.queue.missing().map((m) => ({ device: s.name, memory: m.memory, mappings: m.mappings })),
    );
  }

  reconcile(): Promise<void> {
    return this.supervisor.sync();
  }

  async close(): Promise<void> {
    this.supervisor.stop();
    await Promise.all([...this.slots.values()].map((s) => s.queue.close()));
    await this.store.close();
  }

  // ---- internals ----

  private write(
    device: string,
    requestId: string | undefined,
    method: string,
    request: WriteRequest,
  ): Promise<WriteAnswer> {
    const slot = this.existing(device);
    return this.idempotency.run(device, requestId, method, request, (digest) => {
      slot.queue.checkAccepts('sync');
      const unpin = this.memory.pin(memoriesOf(request));
      return new Promise<WriteAnswer>((resolve, reject) => {
        slot.queue.enqueue({
          kind: 'write',
          sequence: slot.queue.allocateSequence(),
          request,
          mode: 'sync',
          ...(requestId !== undefined && digest !== undefined ? { requestId, digest } : {}),
          enqueuedAt: process.hrtime.bigint(),
          settle: (outcome: Outcome) => {
            unpin();
            if (outcome.ok) resolve(outcome.answer);
            else reject(outcome.error);
          },
        });
      });
    });
  }

  private submitEntry(request: WriteRequest, sequence: bigint): WriteEntry {
    const unpin = this.memory.pin(memoriesOf(request));
    return {
      kind: 'write',
      sequence,
      request,
      mode: 'submit',
      enqueuedAt: process.hrtime.bigint(),
      settle: unpin,
    };
  }

  /** Plans against the acknowledged desired state; changes nothing. */
  private async dryRun(
    device: string,
    asid: number,
    regions: SetMemTableRequest['regions'],
  ): Promise<SetMemTableResult> {
    const slot = this.existing(device);
    if (!slot.facts) throw this.unknownDevice(device);
    const spaces = new AddressSpaces(slot.facts.asNum, slot.facts.iovaRange, pinPageSize(slot.facts));
    if (spaces.checkAsid(asid) === undefined) {
      for (const m of sortedMappings(this.store.state.devices.get(device), asid))
        spaces.apply({ type: 'update', ...m });
    }
    // The quota counts every address space; only `asid`'s table is loaded.
    const others = { bytes: 0n, entries: 0 };
    for (const m of this.store.state.devices.get(device)?.mappings.values() ?? []) {
      if (m.asid === asid) continue;
      others.bytes += m.size;
      others.entries++;
    }
    const usage = () => ({ bytes: others.bytes + spaces.bytes, entries: others.entries + spaces.count });
    const before = usage();
    const result = await applySetMemTable(new WorkingTables(spaces), this.memory, asid, regions);
    const over = quotaError(device, quotaOf(this.opts.quotas, device), before, usage());
    if (over) throw over;
    return { ...result, dryRun: true };
  }

  private slotOf(name: string): Slot {
    let slot = this.slots.get(name);
    if (slot) return slot;
    const queue = new DeviceQueue({
      device: name,
      port: this.port,
      store: this.store,
      memory: this.memory,
      metrics: this.metrics,
      maxQueued: this.opts.maxQueued ?? 1024,
      maxGroup: this.opts.maxGroup ?? 256,
      quota: quotaOf(this.opts.quotas, name),
      remember: (entry, outcome) =>
        entry.mode === 'sync' && entry.requestId !== undefined && entry.digest !== undefined
          ? recordOf(entry.requestId, entry.digest, outcome)
          : undefined,
      onApplied: (events) => this.hub.emit(events),
      onTrouble: (error) => {
        this.opts.logger?.warn({ device: name, err: error.message }, 'device needs reconciling');
        this.supervisor.retryLater();
      },
    });
    slot = { name, facts: undefined, present: false, counters: ZERO_COUNTERS, queue };
    this.slots.set(name, slot);
    return slot;
  }

  private existing(device: string): Slot {
    if (typeof device !== 'string' || device === '') {
      throw new ServiceError('INVALID_ARGUMENT', 'device is required', { field: 'device' });
    }
    const slot = this.slots.get(device);
    if (slot) return slot;
    throw this.unknownDevice(device);
  }

  private unknownDevice(device: string): ServiceError {
    if (!this.listed) {
      return new ServiceError('UNAVAILABLE', `device ${device} is unknown until the agent has been reached`, {
        retryAfterMs: ERROR_CATALOG.UNAVAILABLE.retryAfterMs,
      });
    }
    const known = [...this.slots.values()].filter((s) => s.present).map((s) => s.name);
    return new ServiceError('NOT_FOUND', `no device ${device} (known: ${known.join(', ') || 'none'})`, {
      field: 'device',
    });
  }

  private async view(slot: Slot): Promise<DeviceView> {
    if (this.supervisor.up && slot.present) {
      try {
        const d = await this.port.describeDevice(slot.name);
        slot.facts = d.facts;
        slot.counters = d.counters;
      } catch (e) {
        this.opts.logger?.warn(
          { device: slot.name, err: fromAgentError(e, 'describe').message },
          'stale device facts',
        );
      }
    }
    let mappedBytes = 0n;
    let mappedEntries = 0;
    for (const m of this.store.state.devices.get(slot.name)?.mappings.values() ?? []) {
      if (!slot.queue.held(m)) continue;
      mappedBytes += m.size;
      mappedEntries++;
    }
    const degraded = slot.queue.missing().map((m) => ({
      ...m,
      remedy: memoryRemedy(m.memory, this.store.state.memory.get(m.memory)?.path ?? '(unknown path)'),
    }));
    return {
      ...slot.facts!,
      id: slot.name,
      ready: slot.queue.ready,
      mappedBytes,
      mappedEntries,
      degraded,
      queueDepth: slot.queue.depth,
      counters: slot.counters,
    };
  }

  /** One pass after the agent answered: devices, memory, then every device not ready. */
  private async onConnected(info: AgentInfo): Promise<boolean> {
    let facts: DeviceFacts[];
    try {
      facts = await this.port.listDevices();
    } catch (e) {
      throw fromAgentError(e, 'listing devices');
    }
    const present = new Set(facts.map((f) => f.name));
    for (const f of facts) {
      const slot = this.slotOf(f.name);
      slot.facts = f;
      slot.present = true;
    }
    for (const slot of this.slots.values()) {
      if (!present.has(slot.name)) {
        slot.present = false;
        slot.queue.setNotReady('the agent does not report this device');
      }
    }
    this.listed = true;
    try {
      await this.memory.syncWithAgent();
    } catch (e) {
      throw fromAgentError(e, 'listing memory');
    }
    const slots = [...this.slots.values()].filter((s) => s.present);
    const results = await Promise.all(slots.map((s) => this.reconcileSlot(s, info.bootId)));
    const notReady = slots.filter((_s, i) => !results[i]).map((s) => s.name);
    const summary = { bootId: info.bootId, devices: slots.length, ready: slots.length - notReady.length };
    if (notReady.length === 0) this.opts.logger?.info(summary, 'agent link reconciled');
    else this.opts.logger?.warn({ ...summary, notReady }, 'agent link reconciled in part');
    // While some memory is unavailable, passes go on (with backoff) to try it again.
    return results.every(Boolean) && !this.memory.degraded;
  }

  private reconcileSlot(slot: Slot, bootId: string): Promise<boolean> {
    return slot.queue.exclusive(async () => {
      const { queue } = slot;
      const back = queue.missingMemories.filter((id) => this.memory.unavailable(id) === undefined);
      if (queue.ready && queue.reconciledWith === bootId && back.length === 0) return true;
      const before = queue.missing();
      queue.setNotReady('it is being reconciled with the agent');
      try {
        const desired = sortedMappings(this.store.state.devices.get(slot.name));
        const { tables, ops, missing } = await reconcileDevice({
          port: this.port,
          facts: slot.facts!,
          desired,
          bootId,
          metrics: this.metrics,
          unavailable: (id) => this.memory.unavailable(id),
        });
        queue.setReady(tables, bootId, missing);
        this.logMissing(slot.name, before, queue.missing());
        this.metrics.reconciliations.inc({ result: 'ok' });
        this.metrics.mappedBytes.set({ device: slot.name }, Number(tables.bytes));
        this.metrics.mappedEntries.set({ device: slot.name }, tables.count);
        this.opts.logger?.info({ device: slot.name, ops, entries: tables.count }, 'device reconciled');
        return true;
      } catch (e) {
        const err = fromAgentError(e, 'reconciling');
        slot.queue.setNotReady(`reconciliation failed: ${err.message}`);
        this.metrics.reconciliations.inc({ result: 'failed' });
        this.opts.logger?.warn({ device: slot.name, err: err.message }, 'reconciliation failed');
        return false;
      }
    });
  }

  /** Says once per change which memories' mappings a device lacks, and when they are back. */
  private logMissing(device: string, before: MissingMappings[], after: MissingMappings[]): void {
    const now = new Map(after.map((m) => [m.memory, m]));
    for (const m of after) {
      const was = before.find((b) => b.memory === m.memory);
      if (was && was.reason === m.reason && was.mappings === m.mappings) continue;
      const path = this.store.state.memory.get(m.memory)?.path ?? '(unknown path)';
      this.opts.logger?.warn(
        {
          device,
          memory: m.memory,
          mappings: m.mappings,
          err: m.reason,
          remedy: memoryRemedy(m.memory, path),
        },
        'device degraded: mappings of an unavailable memory are not restored',
      );
    }
    for (const m of before) {
      if (!now.has(m.memory)) {
        this.opts.logger?.info({ device, memory: m.memory, mappings: m.mappings }, 'mappings restored');
      }
    }
  }
}

/** Opens the desired state, restores journaled submits, and starts following the agent. */
export async function createMapdService(opts: MapdServiceOptions): Promise<MapdCore> {
  const metrics = opts.metrics ?? createMetrics();
  const { store, droppedBytes } = await StateStore.open({
    dir: opts.stateDir,
    ...(opts.storeFs ? { fs: opts.storeFs } : {}),
    ...(opts.compactBytes !== undefined ? { compactBytes: opts.compactBytes } : {}),
    limits: { idempotencyPerDevice: opts.idempotencyPerDevice ?? 10_000 },
    onWrite: (seconds, ok) => metrics.storeWrite.observe({ result: ok ? 'ok' : 'error' }, seconds),
    onCompactionError: (err) => opts.logger?.warn({ err: String(err) }, 'state compaction failed'),
  });
  if (droppedBytes > 0) opts.logger?.warn({ bytes: droppedBytes }, 'cut a torn tail off the state journal');
  const service = new Mapd(store, metrics, opts.agent, opts);
  service.start();
  return service;
}
