/**
 * One queue per device: the only writer of that device (every change goes through it, in order).
 *
 * While a group is at the agent, new requests wait; the next round drains all of them (up to
 * `maxGroup`) as one group (group commit): one apply() at the agent and one journal write. Order
 * is strict: a request is validated against the state every earlier request produced.
 *
 * Persist / apply / answer: a group is applied at the device first, then its net change, the
 * sequence numbers, the idempotency records and the submit bookkeeping are committed to the store
 * in one record, and only after that fsync are callers answered. If the commit fails the working
 * tables are taken back and the device is reconciled to the (unchanged) desired state; callers get
 * UNAVAILABLE. So an acknowledged change is always on disk, and a change that is not on disk was
 * never acknowledged (and is undone on the device).
 *
 * Degraded: reconciliation may leave off the mappings of memory the agent cannot open (`missing`).
 * The device is ready and takes every other write; those mappings stay desired and are counted
 * per memory (the degraded gauges), and compensation never tries to put them back.
 *
 * Readiness: the device takes writes only after it was reconciled with the agent. While it is not
 * ready, synchronous writes are refused at once with UNAVAILABLE (the caller retries, with the
 * same requestId); submitted requests, already journaled, stay queued and run once the device is
 * ready again; flushes wait for them up to their deadline.
 */
import type { AddressSpaces } from '../iotlb/address-spaces.ts';
import type { Mapping } from '../iotlb/types.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { AgentPort } from '../core/agent-port.ts';
import { ERROR_CATALOG, ServiceError } from '../core/errors.ts';
import { bulkTurn, forEachInTimeSlices, runInTimeSlices } from '../sys/next-turn.ts';
import type { FlushResult, MappingEvent } from '../core/types.ts';
import type { Change, IdempotencyRecord } from '../state/desired.ts';
import type { StateStore } from '../state/store.ts';
import { type GroupRun, runGroup, type Step } from './group.ts';
import { failuresOf, outcomeOf } from './outcome.ts';
import type { Quota } from './quota.ts';
import type { FlushEntry, Outcome, QueueEntry, WriteEntry } from './types.ts';
import type { MemoryLookup } from './validate.ts';
import { WorkingTables } from './working.ts';

/** Steps of a group whose remaining stages run on in the turn of the agent's answer. */
const STAGE_IN_ONE_TURN_MAX = 256;

export const NOT_READY_RETRY_AFTER_MS = ERROR_CATALOG.UNAVAILABLE.retryAfterMs;

/** The desired mappings of one memory that the device does not hold. */
export interface MissingMappings {
  memory: string;
  /** Why they were left off (the agent's refusal to open the memory). */
  reason: string;
  mappings: number;
  bytes: bigint;
}

export interface DeviceQueueOptions {
  device: string;
  port: Pick<AgentPort, 'apply' | 'listMapped'>;
  store: StateStore;
  memory: MemoryLookup;
  metrics: Metrics;
  /** Waiting entries (requests and flushes) beyond which new ones are refused. */
  maxQueued: number;
  /** Most requests drained into one group. */
  maxGroup: number;
  /** Limits on what the device may have mapped (checked unit by unit, in order). */
  quota?: Quota;
  /** The idempotency record to keep for an answer, if any. */
  remember: (entry: WriteEntry, outcome: Outcome) => IdempotencyRecord | undefined;
  /** Hands the events of an applied and durable group on (watchers), in order; its answers wait for it. */
  onApplied: (events: MappingEvent[]) => Promise<void> | void;
  /** A group could not be done: the device is not ready and must be reconciled. */
  onTrouble: (error: ServiceError) => void;
}

/** The watch events of a group's units that stand, in order, as steps (runInTimeSlices). */
function* eventsOf(
  device: string,
  work: WorkingTables,
  steps: readonly Step[],
): Generator<void, MappingEvent[]> {
  const events: MappingEvent[] = [];
  for (const s of steps) {
    if (s.error) continue;
    const { sequence } = s.entry;
    yield* work.changes(s.mark, s.end, (kind, mapping) => {
      events.push({ device, kind, mapping, sequence });
    });
  }
  return events;
}

export class DeviceQueue {
  private entries: QueueEntry[] = [];
  private readonly tasks: { run: () => Promise<void>; cancel: (err: ServiceError) => void }[] = [];
  private running = false;
  private pumping: Promise<void> | undefined;
  private closed = false;
  private work: WorkingTables | undefined;
  private bootId = '';
  private isReady = false;
  private notReadyReason = 'it has not been reconciled with the agent yet';
  private nextSequence: bigint;
  private lastGroupMs = 0;
  /** Memories whose desired mappings the device does not hold, with why (from reconciliation). */
  private missingMemory: ReadonlyMap<string, string> = new Map();

  constructor(private readonly opts: DeviceQueueOptions) {
    const stored = opts.store.state.devices.get(opts.device);
    this.nextSequence = stored?.nextSequence ?? 1n;
    let bytes = 0n;
    for (const m of stored?.mappings.values() ?? []) bytes += m.size;
    opts.metrics.mappedBytes.set({ device: opts.device }, Number(bytes));
    opts.metrics.mappedEntries.set({ device: opts.device }, stored?.mappings.size ?? 0);
    this.publishState();
  }

  get device(): string {
    return this.opts.device;
  }

  get ready(): boolean {
    return this.isReady;
  }

  /** The agent boot id of the last reconciliation. */
  get reconciledWith(): string {
    return this.bootId;
  }

  /** Why the device is not ready (meaningful while `ready` is false). */
  get reason(): string {
    return this.notReadyReason;
  }

  get depth(): number {
    return this.entries.length;
  }

  /** Memories whose mappings reconciliation left off the device. */
  get missingMemories(): readonly string[] {
    return [...this.missingMemory.keys()];
  }

  /** Whether the device holds `m` as far as the queue knows (false for a missing mapping). */
  held(m: Pick<Mapping, 'memory'>): boolean {
    return !this.missingMemory.has(m.memory);
  }

  /** The missing mappings, per memory, counted in the working tables (what is desired now). */
  missing(): MissingMappings[] {
    if (this.missingMemory.size === 0 || this.work === undefined) return [];
    const out = new Map<string, MissingMappings>();
    for (const [memory, reason] of this.missingMemory)
      out.set(memory, { memory, reason, mappings: 0, bytes: 0n });
    for (const m of this.work.spaces.mappings()) {
      const entry = out.get(m.memory);
      if (!entry) continue;
      entry.mappings++;
      entry.bytes += m.size;
    }
    return [...out.values()].filter((e) => e.mappings > 0);
  }

  allocateSequence(): bigint {
    return this.nextSequence++;
  }

  /** Refuses with RESOURCE_EXHAUSTED when full, and a sync write with UNAVAILABLE while not ready. */
  checkAccepts(mode: 'sync' | 'submit' | 'flush'): void {
    if (this.closed) throw new ServiceError('UNAVAILABLE', 'the service is shutting down');
    if (this.entries.length >= this.opts.maxQueued) {
      const rounds = Math.ceil(this.entries.length / this.opts.maxGroup);
      throw new ServiceError(
        'RESOURCE_EXHAUSTED',
        `device ${this.device}: ${this.entries.length} requests are already queued (limit ${this.opts.maxQueued})`,
        { retryAfterMs: Math.max(10, Math.ceil(this.lastGroupMs * rounds)) },
      );
    }
    if (mode === 'sync' && !this.isReady) throw this.notReadyError();
  }

  /** Queues a write; call checkAccepts() first (in the same tick). */
  enqueue(entry: WriteEntry): void {
    this.entries.push(entry);
    this.publishState();
    this.kick();
  }

  /** Puts journaled submits recovered after a restart ahead of everything else. */
  restore(entries: WriteEntry[]): void {
    this.entries.unshift(...entries);
    this.publishState();
  }

  /** Resolves once every request queued before it is done; reports submit failures since the last flush. */
  flush(timeoutMs: number): Promise<FlushResult> {
    this.checkAccepts('flush');
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.entries = this.entries.filter((e) => e !== entry);
        this.publishState();
        const why = this.isReady
          ? 'the queue did not drain'
          : `the device is not ready: ${this.notReadyReason}`;
        reject(
          new ServiceError(
            'UNAVAILABLE',
            `device ${this.device}: flush timed out (${why}); queued requests stay queued`,
            {
              retryAfterMs: NOT_READY_RETRY_AFTER_MS,
            },
          ),
        );
      }, timeoutMs);
      const entry: FlushEntry = {
        kind: 'flush',
        through: this.nextSequence - 1n,
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.entries.push(entry);
      this.publishState();
      this.kick();
    });
  }

  /** Runs `task` between groups, with nothing of this device at the agent meanwhile. */
  exclusive<T>(task: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      if (this.closed) {
        reject(new ServiceError('UNAVAILABLE', 'the service is shutting down'));
        return;
      }
      this.tasks.push({ run: () => task().then(resolve, reject), cancel: reject });
      this.kick();
    });
  }

  /**
   * The device matches `tables` at agent `bootId`, except for the mappings into the memories of
   * `missing`: writes may flow. Call from an exclusive task.
   */
  setReady(tables: AddressSpaces, bootId: string, missing: ReadonlyMap<string, string> = new Map()): void {
    this.work = new WorkingTables(tables);
    this.bootId = bootId;
    this.missingMemory = missing;
    this.isReady = true;
    this.publishState();
    this.publishMissing();
    this.kick();
  }

  /** Stops writes until the next setReady(); queued sync writes are refused now. */
  setNotReady(reason: string): void {
    this.isReady = false;
    this.notReadyReason = reason;
    const error = this.notReadyError();
    const keep: QueueEntry[] = [];
    for (const e of this.entries) {
      if (e.kind === 'write' && e.mode === 'sync') e.settle({ ok: false, error });
      else keep.push(e);
    }
    this.entries = keep;
    this.publishState();
  }

  /** Stops the queue; waiting callers get UNAVAILABLE (journaled submits stay journaled). */
  async close(): Promise<void> {
    this.closed = true;
    const error = new ServiceError('UNAVAILABLE', 'the service is shutting down');
    for (const e of this.entries) {
      if (e.kind === 'flush') e.reject(error);
      else if (e.mode === 'sync') e.settle({ ok: false, error });
    }
    this.entries = [];
    for (const task of this.tasks.splice(0)) task.cancel(error);
    await this.pumping;
  }

  private notReadyError(): ServiceError {
    return new ServiceError('UNAVAILABLE', `device ${this.device} is not ready: ${this.notReadyReason}`, {
      retryAfterMs: NOT_READY_RETRY_AFTER_MS,
    });
  }

  private publishState(): void {
    const { metrics, device } = this.opts;
    metrics.queueDepth.set({ device }, this.entries.length);
    metrics.deviceReady.set({ device }, this.isReady ? 1 : 0);
  }

  private publishMissing(): void {
    const { metrics, device } = this.opts;
    const missing = this.missing();
    metrics.degradedMemories.set({ device }, missing.length);
    metrics.degradedMappings.set(
      { device },
      missing.reduce((n, m) => n + m.mappings, 0),
    );
  }

  private kick(): void {
    if (this.running) return;
    this.running = true;
    this.pumping = this.pump();
  }

  private async pump(): Promise<void> {
    // The finally runs in the same tick as the loop's last look at the queue, so an entry queued
    // after that look always starts a new pump.
    try {
      while (!this.closed) {
        const task = this.tasks.shift();
        if (task) {
          await task.run();
          continue;
        }
        const head = this.entries[0];
        if (head?.kind === 'flush') {
          this.entries.shift();
          this.publishState();
          await this.completeFlush(head);
          continue;
        }
        if (head === undefined || !this.isReady) return;
        await this.runGroup(this.takeGroup());
      }
    } finally {
      this.running = false;
    }
  }

  private takeGroup(): WriteEntry[] {
    const group: WriteEntry[] = [];
    while (group.length < this.opts.maxGroup && this.entries[0]?.kind === 'write') {
      group.push(this.entries.shift() as WriteEntry);
    }
    this.publishState();
    return group;
  }

  private async completeFlush(entry: FlushEntry): Promise<void> {
    const { store, device } = this.opts;
    const d = store.state.devices.get(device);
    // Report only sequence numbers that are on disk (they can never be handed out again).
    const durable = (d?.nextSequence ?? 1n) - 1n;
    const through = entry.through < durable ? entry.through : durable;
    const failures = (d?.failures ?? []).filter((f) => f.sequence <= through);
    try {
      if (failures.length > 0) await store.commit([{ t: 'failures.clear', device, through }]);
    } catch (e) {
      entry.reject(e as ServiceError);
      return;
    }
    entry.resolve({ sequence: through, failures });
  }

  private async runGroup(group: WriteEntry[]): Promise<void> {
    const live: WriteEntry[] = [];
    for (const e of group) {
      if (e.durable === undefined || (await e.durable)) live.push(e);
      else
        e.settle({ ok: false, error: new ServiceError('UNAVAILABLE', 'the submit could not be journaled') });
    }
    if (live.length === 0) return;
    const { metrics, device } = this.opts;
    const began = performance.now();
    const now = process.hrtime.bigint();
    for (const e of live) metrics.queueWait.observe({ device }, Number(now - e.enqueuedAt) / 1e9);
    metrics.groupRequests.observe({ device }, live.length);

    const work = this.work!;
    const run: GroupRun = await runGroup(
      {
        device,
        port: this.opts.port,
        memory: this.opts.memory,
        work,
        bootId: this.bootId,
        metrics,
        quota: this.opts.quota ?? {},
        held: (m) => this.held(m),
      },
      live,
    );
    this.lastGroupMs = Number(process.hrtime.bigint() - now) / 1e6;
    if (!run.done) {
      this.notDone(live, run.error);
      return;
    }

    // Each stage of a big group is long: others' requests get a turn between them. A small group
    // goes on at once: a turn here would make it wait for every other device's slice once more.
    if (run.steps.length > STAGE_IN_ONE_TURN_MAX) await bulkTurn(began);
    const byEntry = new Map<WriteEntry, Step[]>(live.map((e) => [e, []]));
    for (const s of run.steps) byEntry.get(s.entry)!.push(s);
    const outcomes = live.map((e) => outcomeOf(e, byEntry.get(e)!));
    const events = await runInTimeSlices(eventsOf(device, work, run.steps));
    try {
      await this.opts.store.commit(await this.changesOf(run, live, byEntry, outcomes));
    } catch (e) {
      work.rollback(run.base);
      this.notDone(live, e instanceof ServiceError ? e : new ServiceError('UNAVAILABLE', String(e)));
      return;
    }
    work.settle();
    metrics.mappedBytes.set({ device }, Number(work.spaces.bytes));
    metrics.mappedEntries.set({ device }, work.spaces.count);
    if (this.missingMemory.size > 0) this.publishMissing();
    if (events.length > 0) await this.opts.onApplied(events);
    live.forEach((e, i) => {
      e.settle(outcomes[i]!);
    });
  }

  private async changesOf(
    run: Extract<GroupRun, { done: true }>,
    live: WriteEntry[],
    byEntry: Map<WriteEntry, Step[]>,
    outcomes: Outcome[],
  ): Promise<Change[]> {
    const { device } = this.opts;
    const { deleted, put } = await this.work!.netDelta(run.base);
    const changes: Change[] = [];
    await forEachInTimeSlices(deleted, (m) => {
      changes.push({ t: 'mapping.delete', device, asid: m.asid, iova: m.iova });
    });
    await forEachInTimeSlices(put, (mapping) => {
      changes.push({ t: 'mapping.put', device, mapping });
    });
    let last = 0n;
    live.forEach((entry, i) => {
      if (entry.sequence > last) last = entry.sequence;
      if (entry.mode === 'submit') {
        changes.push({ t: 'pending.delete', device, sequence: entry.sequence });
        for (const failure of failuresOf(entry, byEntry.get(entry)!))
          changes.push({ t: 'failure.add', device, failure });
      }
      const record = this.opts.remember(entry, outcomes[i]!);
      if (record) changes.push({ t: 'idempotency.put', device, record });
    });
    changes.push({ t: 'sequence', device, next: last + 1n });
    return changes;
  }

  /** Nothing of the group happened: sync callers get `error`, submits go back to the head. */
  private notDone(live: WriteEntry[], error: ServiceError): void {
    for (const e of live) if (e.mode === 'sync') e.settle({ ok: false, error });
    this.entries.unshift(...live.filter((e) => e.mode === 'submit'));
    this.setNotReady(error.message);
    this.opts.onTrouble(error);
  }
}
