/**
 * The application core: createMapdService() wires its pieces behind `MapdService`, each with one job:
 * the device registry (devices.ts: a slot and a queue per device), the write path (writes.ts),
 * dry runs (dry-run.ts), the views (views.ts), the memory catalog (memory.ts), watches (watch.ts),
 * attached VMMs (attachments.ts: their memory tables as asid 0), and the agent's lifecycle: the link that reaches it (agent-link.ts) and the pass that reconciles
 * after every (re)connection (agent-pass.ts, reconcile.ts).
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
import { type AgentPort, measuredPort } from '../core/agent-port.ts';
import type { CoreLogger } from '../core/logger.ts';
import type { AttachmentInfo } from '../agent/wire.ts';
import type {
  AttachDeviceRequest,
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
  WatchSubscription,
} from '../core/types.ts';
import { createMetrics, type Metrics } from '../metrics/metrics.ts';
import { type QuotaConfig, quotaOf } from '../queue/quota.ts';
import type { StoreFs } from '../state/fs.ts';
import { StateStore } from '../state/store.ts';
import { AgentLink } from './agent-link.ts';
import { AgentPass } from './agent-pass.ts';
import { Attachments } from './attachments.ts';
import { DeviceRegistry } from './devices.ts';
import { dryRunSetMemTable } from './dry-run.ts';
import { Idempotency } from './idempotency.ts';
import { MemoryCatalog } from './memory.ts';
import { regionsOf } from './requests.ts';
import { Views } from './views.ts';
import { WatchHub } from './watch.ts';
import { WritePath } from './writes.ts';

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

/** The core's face for the transports: each call goes to the piece that does it. */
class Mapd implements MapdCore {
  constructor(
    private readonly store: StateStore,
    private readonly devices: DeviceRegistry,
    private readonly writes: WritePath,
    private readonly views: Views,
    private readonly memory: MemoryCatalog,
    private readonly hub: WatchHub,
    private readonly link: AgentLink,
    private readonly attachments: Attachments,
    private readonly quotas: QuotaConfig | undefined,
  ) {}

  async listDevices(): Promise<DeviceView[]> {
    return this.views.listDevices();
  }

  async getDevice(id: string): Promise<DeviceView> {
    return this.views.getDevice(id);
  }

  async map(req: MapRequest): Promise<MapResult> {
    return this.writes.map(req);
  }

  async unmap(req: UnmapRequest): Promise<UnmapResult> {
    return this.writes.unmap(req);
  }

  async setMemTable(req: SetMemTableRequest): Promise<SetMemTableResult> {
    const regions = await regionsOf(req.regions);
    if (!req.dryRun) return this.writes.setMemTable(req.device, req.requestId, req.asid, regions);
    const { facts } = this.devices.withFacts(req.device);
    const desired = this.store.state.devices.get(req.device);
    const quota = quotaOf(this.quotas, req.device);
    return dryRunSetMemTable(facts, desired, this.memory, quota, req.asid, regions);
  }

  async batch(req: BatchRequest): Promise<BatchResult> {
    return this.writes.batch(req);
  }

  async submit(req: BatchRequest): Promise<SubmitResult> {
    return this.writes.submit(req);
  }

  async flush(device: string): Promise<FlushResult> {
    return this.writes.flush(device);
  }

  async listMappings(device: string, asid?: number): Promise<ListedMapping[]> {
    return this.views.listMappings(device, asid);
  }

  watch(
    device: string | undefined,
    listener: (e: MappingEvent) => void,
    fromSequence?: bigint,
  ): WatchSubscription {
    const devices =
      device === undefined ? this.devices.known().map((s) => s.name) : [this.devices.existing(device).name];
    return this.hub.subscribe(device, devices, fromSequence, listener);
  }

  async registerMemory(req: RegisterMemoryRequest): Promise<MemoryView> {
    return this.memory.register(req);
  }

  async listMemory(): Promise<MemoryView[]> {
    return this.memory.list();
  }

  async unregisterMemory(id: string): Promise<void> {
    return this.memory.unregister(id);
  }

  attachDevice(req: AttachDeviceRequest): Promise<AttachmentInfo> {
    return this.attachments.attach(req);
  }

  detachDevice(device: string): Promise<void> {
    return this.attachments.detach(device);
  }

  /** The agent is reached and every device it reports is reconciled with it. */
  isReady(): boolean {
    const { link } = this;
    if (!link.up || !this.devices.everListed) return false;
    return this.devices.present().every((s) => s.queue.ready && s.queue.reconciledWith === link.bootId);
  }

  degraded(): { device: string; memory: string; mappings: number }[] {
    return this.views.degraded();
  }

  reconcile(): Promise<void> {
    return this.link.sync();
  }

  async close(): Promise<void> {
    this.link.stop();
    this.attachments.stop();
    await this.devices.close();
    await this.store.close();
  }
}

/** Opens the desired state, restores journaled submits, and starts following the agent. */
export async function createMapdService(opts: MapdServiceOptions): Promise<MapdCore> {
  const metrics = opts.metrics ?? createMetrics();
  const { logger } = opts;
  // Made after the store; the store reaches it only from its quiet() callback.
  let writePath: WritePath | undefined;
  const { store, droppedBytes, unfinished } = await StateStore.open({
    dir: opts.stateDir,
    ...(opts.storeFs ? { fs: opts.storeFs } : {}),
    ...(opts.compactBytes !== undefined ? { compactBytes: opts.compactBytes } : {}),
    limits: { idempotencyPerDevice: opts.idempotencyPerDevice ?? 10_000 },
    // One write in progress is the one being committed: nothing else waits for the event loop.
    quiet: () => (writePath?.inProgress ?? 0) <= 1,
    onWrite: (seconds, ok) => metrics.storeWrite.observe({ result: ok ? 'ok' : 'error' }, seconds),
    onCompactionError: (err) => logger?.warn({ err: String(err) }, 'state compaction failed'),
  });
  if (droppedBytes > 0) logger?.warn({ bytes: droppedBytes }, 'cut a torn tail off the state journal');
  if (unfinished > 0) {
    logger?.warn(
      { records: unfinished },
      'skipped a state journal record whose parts stop (a crash while a large commit was written; it was never acknowledged)',
    );
  }

  const port = measuredPort(opts.agent, metrics);
  // The link is made last: the pieces before it reach it only from callbacks.
  let link: AgentLink | undefined;
  let attachments: Attachments | undefined;
  const agentUp = () => link?.up === true;
  const memory = new MemoryCatalog(store, port, agentUp, logger, () => void link?.sync());
  const hub = new WatchHub(logger, opts.watchHistory);
  const devices = new DeviceRegistry({
    port,
    store,
    memory,
    metrics,
    logger,
    maxQueued: opts.maxQueued ?? 1024,
    maxGroup: opts.maxGroup ?? 256,
    quotas: opts.quotas,
    onApplied: (events) => hub.emit(events),
    onTrouble: () => link?.retryLater(),
  });
  const pass = new AgentPass(devices, store, memory, port, metrics, logger);
  link = new AgentLink({
    port,
    metrics,
    logger,
    // Attachments are followed once the devices are reconciled, so their tables meet ready queues.
    onConnected: (info) => pass.run(info).finally(() => attachments?.follow()),
    onLost: (reason) => devices.setAllNotReady(reason),
    retryInitialMs: opts.retryInitialMs ?? 200,
    retryMaxMs: opts.retryMaxMs ?? 5000,
  });
  const writes = new WritePath(
    devices,
    store,
    memory,
    new Idempotency(store),
    opts.flushTimeoutMs ?? 30_000,
    (device) => attachments?.owns(device) === true,
  );
  writePath = writes;
  attachments = new Attachments(port, devices, store, writes, memory, logger, () => link?.retryLater());

  for (const [name, d] of store.state.devices) {
    // Events before this start are gone; restored submits still to apply keep their sequences.
    const pending = [...d.pending.values()].map((p) => p.sequence).sort((a, b) => (a < b ? -1 : 1));
    hub.startAt(name, (pending[0] ?? d.nextSequence) - 1n);
  }
  writes.restoreJournaled();

  const views = new Views(devices, store, port, agentUp, logger);
  const service = new Mapd(store, devices, writes, views, memory, hub, link, attachments, opts.quotas);
  link.start();
  return service;
}
