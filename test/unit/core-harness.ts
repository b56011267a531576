/**
 * Fixtures of the core's tests: an in-process agent port that runs the agent's real handlers
 * (services/agent/server.ts) over simulated devices and a real shared-memory registry, with the
 * same wire conversions and errors as AgentClient. It can restart (new boot id, devices that lost
 * every mapping, memory to register again), go away, and record every apply() that reached it.
 */
import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import {
  decodeApplyAnswer,
  decodeApplyRequest,
  decodeListMappedAnswer,
  encodeApplyAnswer,
  encodeApplyRequest,
  encodeListMappedAnswer,
} from '../../src/agent/mapping-codec.ts';
import type { AgentClientEvents, ApplyResult, MappedSnapshot } from '../../src/agent/client.ts';
import { AgentError, toAgentError } from '../../src/agent/errors.ts';
import {
  type AgentInfo,
  type AttachmentEvent,
  type AttachmentInfo,
  type AttachRequest,
  type DeviceDescription,
  type MemoryTableAnswer,
  descriptionFromWire,
  factsFromWire,
  memoryFromWire,
  type RegisterMemoryRequest,
  registerToWire,
} from '../../src/agent/wire.ts';
import { SimulatedDevice, type SimulatedDeviceOptions } from '../../src/device/simulated.ts';
import type { DeviceFacts } from '../../src/device/types.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { SharedMemoryRegistry } from '../../src/memory/registry.ts';
import type { MemoryInfo } from '../../src/memory/types.ts';
import { createMetrics, type Metrics } from '../../src/metrics/metrics.ts';
import { DeviceQueue } from '../../src/queue/device-queue.ts';
import type { Outcome, WriteRequest } from '../../src/queue/types.ts';
import type { AgentPort } from '../../src/core/agent-port.ts';
import { createMapdService, type MapdCore, type MapdServiceOptions } from '../../src/service/mapd.ts';
import { reconcileDevice } from '../../src/service/reconcile.ts';
import { type DesiredState, replayState, sortedMappings, stateLimits } from '../../src/state/desired.ts';
import { journalName, parseJournal, parseSnapshot, SNAPSHOT } from '../../src/state/journal.ts';
import { nodeStoreFs, type OpenFlags, type StoreFile, type StoreFs } from '../../src/state/fs.ts';
import { StateStore } from '../../src/state/store.ts';
import { type AgentHandlers, createHandlers } from '../../services/agent/server.ts';

export const PAGE = 0x1000n;

export interface ApplyCall {
  device: string;
  ops: IotlbOp[];
}

export class InProcessAgent extends EventEmitter<AgentClientEvents> implements AgentPort {
  info!: AgentInfo;
  devices!: SimulatedDevice[];
  registry!: SharedMemoryRegistry;
  private handlers!: AgentHandlers;
  /** While true every call fails as if the socket were gone. */
  unreachable = false;
  /** Every apply() that reached the agent, in order. */
  readonly applies: ApplyCall[] = [];
  /** Runs before each apply(); may throw (the call then fails) or wait. */
  beforeApply: ((call: ApplyCall) => void | Promise<void>) | undefined;

  constructor(
    readonly stateDir: string,
    private readonly specs: SimulatedDeviceOptions[],
  ) {
    super();
    this.boot();
  }

  device(name: string): SimulatedDevice {
    const d = this.devices.find((x) => x.name === name);
    if (!d) throw new Error(`no device ${name}`);
    return d;
  }

  /**
   * The agent process dies and starts again: the kernel dropped every mapping, memory is unmapped.
   * `emit`: the connection is seen to drop (as AgentClient's channel sees the socket close);
   * without it, only the next answer's boot id tells.
   */
  async restart(emit = true): Promise<void> {
    await this.shutdown();
    // A new agent process serves no attachment; the streams of the old one end.
    this.attached.clear();
    const ends = [...this.watchEnds.values()];
    this.attachmentWatchers.clear();
    this.watchEnds.clear();
    for (const end of ends) end(new AgentError(status.UNAVAILABLE, 'UNAVAILABLE', 'the agent is gone'));
    this.boot();
    if (emit) {
      this.emit(
        'disconnected',
        new AgentError(status.UNAVAILABLE, 'UNAVAILABLE', 'lost the connection to the agent'),
      );
    }
  }

  goAway(): void {
    this.unreachable = true;
    this.emit(
      'disconnected',
      new AgentError(status.UNAVAILABLE, 'UNAVAILABLE', 'lost the connection to the agent'),
    );
  }

  /** Reachable again: the core finds it on its next pass. */
  comeBack(): void {
    this.unreachable = false;
  }

  async shutdown(): Promise<void> {
    for (const d of this.devices) await d.close();
    this.registry.closeAll();
  }

  connect(): Promise<AgentInfo> {
    return this.call(async () => ({ ...(await this.handlers.GetInfo({})) }));
  }

  listDevices(): Promise<DeviceFacts[]> {
    return this.call(async () => (await this.handlers.ListDevices({})).devices.map((d) => factsFromWire(d)));
  }

  describeDevice(device: string): Promise<DeviceDescription> {
    return this.call(async () => descriptionFromWire(await this.handlers.DescribeDevice({ device })));
  }

  apply(device: string, ops: readonly IotlbOp[]): Promise<ApplyResult> {
    return this.call(async () => {
      const call = { device, ops: [...ops] };
      await this.beforeApply?.(call);
      this.applies.push(call);
      // Through the bytes both ends code, as over the socket.
      const req = await decodeApplyRequest(await encodeApplyRequest({ device, ops }));
      return decodeApplyAnswer(await encodeApplyAnswer(await this.handlers.Apply(req)));
    });
  }

  listMapped(device: string): Promise<MappedSnapshot> {
    return this.call(async () => {
      // Through the bytes both ends code, as over the socket.
      return decodeListMappedAnswer(await encodeListMappedAnswer(await this.handlers.ListMapped({ device })));
    });
  }

  registerMemory(req: RegisterMemoryRequest): Promise<MemoryInfo> {
    return this.call(async () => memoryFromWire(await this.handlers.RegisterMemory(registerToWire(req))));
  }

  releaseMemory(id: string): Promise<void> {
    return this.call(async () => {
      await this.handlers.ReleaseMemory({ id });
    });
  }

  listMemory(): Promise<MemoryInfo[]> {
    return this.call(async () => (await this.handlers.ListMemory({})).memory.map((m) => memoryFromWire(m)));
  }

  /** The core's WatchAttachments subscribers (a test plays the agent's events to them). */
  readonly attachmentWatchers = new Set<(e: AttachmentEvent) => void>();
  readonly answers: MemoryTableAnswer[] = [];
  readonly attached = new Set<string>();
  /** Every Attach that reached the agent, in order. */
  readonly attachCalls: AttachRequest[] = [];

  attach(req: AttachRequest): Promise<AttachmentInfo> {
    return this.call(async () => {
      this.device(req.device);
      if (this.attached.has(req.device)) {
        throw new AgentError(
          status.ALREADY_EXISTS,
          'ALREADY_ATTACHED',
          `${req.device} is already attached`,
          'device',
        );
      }
      this.attachCalls.push(req);
      this.attached.add(req.device);
      return {
        device: req.device,
        socketPath: req.socketPath,
        mode: 0o600,
        vmmConnected: false,
        negotiatedFeatures: 0n,
        protocolFeatures: 0n,
        vrings: [],
        memoryTable: [],
        stats: { messages: {}, memoryUpdates: 0, regionsAdded: 0, regionsRemoved: 0, refusals: 0 },
        connections: 0,
      };
    });
  }

  detach(device: string): Promise<void> {
    return this.call(async () => {
      if (!this.attached.delete(device)) {
        throw new AgentError(
          status.FAILED_PRECONDITION,
          'NOT_ATTACHED',
          `${device} is not attached`,
          'device',
        );
      }
    });
  }

  watchAttachments(
    onEvent: (e: AttachmentEvent) => void,
    ended: (error: AgentError | undefined) => void,
  ): { cancel(): void } {
    this.attachmentWatchers.add(onEvent);
    this.watchEnds.set(onEvent, ended);
    queueMicrotask(() => onEvent({ type: 'watching', attached: [...this.attached] }));
    return {
      cancel: () => {
        this.attachmentWatchers.delete(onEvent);
        this.watchEnds.delete(onEvent);
      },
    };
  }

  /** How each WatchAttachments stream is told it ended. */
  private readonly watchEnds = new Map<
    (e: AttachmentEvent) => void,
    (error: AgentError | undefined) => void
  >();

  answerMemoryTable(answer: MemoryTableAnswer): Promise<void> {
    return this.call(async () => {
      this.answers.push(answer);
    });
  }

  private boot(): void {
    this.info = { bootId: randomUUID(), version: 'test', pid: process.pid };
    this.registry = new SharedMemoryRegistry({ allowedRoots: [this.stateDir], stateDir: this.stateDir });
    this.devices = this.specs.map((s) => new SimulatedDevice(s, this.registry));
    this.handlers = createHandlers({ info: this.info, devices: this.devices, registry: this.registry });
  }

  /** Errors come out as AgentErrors, as AgentClient rebuilds them from the status and metadata. */
  private async call<T>(run: () => Promise<T>): Promise<T> {
    if (this.unreachable)
      throw new AgentError(status.UNAVAILABLE, 'UNAVAILABLE', 'connect ENOENT agent.sock');
    try {
      return await run();
    } catch (e) {
      throw toAgentError(e);
    }
  }
}

export interface Harness {
  agent: InProcessAgent;
  service: MapdCore;
  /** The metrics of the current service. */
  metrics: Metrics;
  stateDir: string;
  agentDir: string;
  /** Opens a new service on the same state directory and agent (an API server restart). */
  reopen(extra?: Partial<MapdServiceOptions>): Promise<MapdCore>;
  /** What is on disk now: the state a restarted API server would start from. */
  reopenState(): DesiredState;
  cleanup(): Promise<void>;
}

export async function harness(
  specs: SimulatedDeviceOptions[] = [{ name: 'vdpa0' }],
  extra: Partial<MapdServiceOptions> = {},
): Promise<Harness> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-core-'));
  const stateDir = path.join(root, 'api');
  const agentDir = path.join(root, 'agent');
  fs.mkdirSync(agentDir);
  const agent = new InProcessAgent(agentDir, specs);
  let metrics = createMetrics();
  const open = async (more: Partial<MapdServiceOptions>) => {
    metrics = createMetrics();
    const service = await createMapdService({ agent, stateDir, metrics, ...extra, ...more });
    await service.reconcile();
    return service;
  };
  const h: Harness = {
    agent,
    service: await open({}),
    get metrics() {
      return metrics;
    },
    stateDir,
    agentDir,
    async reopen(more = {}) {
      await h.service.close();
      h.service = await open(more);
      return h.service;
    },
    reopenState() {
      return readDiskState(stateDir);
    },
    async cleanup() {
      await h.service.close();
      await agent.shutdown();
      fs.rmSync(root, { recursive: true, force: true });
    },
  };
  return h;
}

/** A map request of `pages` pages at `iova` into `memory` at `offset`. */
export function mapReq(iova: bigint, pages = 1n, memory = 'm0', offset = 0n, device = 'vdpa0') {
  return { device, asid: 0, iova, size: pages * PAGE, memory, offset, perm: 'rw' as const };
}

export interface QueueFixture {
  agent: InProcessAgent;
  store: StateStore;
  queue: DeviceQueue;
  metrics: Metrics;
  /** Queues a sync write; resolves with its outcome (never rejects). */
  write(request: WriteRequest): Promise<Outcome>;
  /** Re-reads the device's state into a ready queue (what reconciliation does). */
  makeReady(): Promise<void>;
  cleanup(): Promise<void>;
}

/** A DeviceQueue over a real store and the in-process agent; memory m0 (64 pages) registered. */
export async function queueFixture(
  spec: SimulatedDeviceOptions = { name: 'vdpa0' },
  opts: { maxQueued?: number; maxGroup?: number; storeFs?: StoreFs } = {},
): Promise<QueueFixture> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-queue-'));
  const agent = new InProcessAgent(root, [spec]);
  const { store } = await StateStore.open({
    dir: path.join(root, 'state'),
    ...(opts.storeFs ? { fs: opts.storeFs } : {}),
  });
  const info = await agent.registerMemory({ id: 'm0', size: 64n * PAGE });
  await store.commit([
    {
      t: 'memory.put',
      memory: {
        id: 'm0',
        path: info.path,
        kind: info.kind,
        created: true,
        size: info.size,
        registeredAt: '',
      },
    },
  ]);
  const metrics = createMetrics();
  const queue = new DeviceQueue({
    device: spec.name,
    port: agent,
    store,
    memory: { sizeOf: (id) => store.state.memory.get(id)?.size },
    metrics,
    maxQueued: opts.maxQueued ?? 1024,
    maxGroup: opts.maxGroup ?? 256,
    remember: () => undefined,
    onApplied: () => undefined,
    onTrouble: () => undefined,
  });
  const f: QueueFixture = {
    agent,
    store,
    queue,
    metrics,
    write(request) {
      return new Promise((resolve) => {
        queue.checkAccepts('sync');
        queue.enqueue({
          kind: 'write',
          sequence: queue.allocateSequence(),
          request,
          mode: 'sync',
          enqueuedAt: process.hrtime.bigint(),
          settle: resolve,
        });
      });
    },
    makeReady() {
      return queue.exclusive(async () => {
        const { facts } = await agent.describeDevice(spec.name);
        const desired = sortedMappings(store.state.devices.get(spec.name));
        const { tables } = await reconcileDevice({
          port: agent,
          facts,
          desired,
          bootId: agent.info.bootId,
          metrics,
        });
        queue.setReady(tables, agent.info.bootId);
      });
    },
    async cleanup() {
      await queue.close();
      await store.close();
      await agent.shutdown();
      fs.rmSync(root, { recursive: true, force: true });
    },
  };
  await f.makeReady();
  return f;
}

export type FsOp = 'open' | 'write' | 'datasync' | 'sync' | 'truncate' | 'rename';

/**
 * The real file operations, with failures on demand: fail('write', 'ENOSPC') makes the next write
 * fail (after writing half of its bytes when `partial`), and so on. On a file opened for durable
 * writes (O_DSYNC) a write includes its sync: it counts as a datasync too, and a datasync failure
 * strikes it after all of its bytes went to the file, as a failed sync of them leaves it.
 */
/** One write of a state file, and the file's own write to do it with. */
export type StoreWrite = (
  file: string,
  write: StoreFile['write'],
  ...args: Parameters<StoreFile['write']>
) => ReturnType<StoreFile['write']>;

/** The real file system, each file's writes going through `write` (to hold or fail them). */
export function storeFsWithWrites(write: StoreWrite): StoreFs {
  return {
    ...nodeStoreFs,
    open: async (file, flags, opts) => {
      const f = await nodeStoreFs.open(file, flags, opts);
      const own = f.write.bind(f);
      return {
        write: (buffer, offset, length, position, onCaller) =>
          write(file, own, buffer, offset, length, position, onCaller),
        datasync: () => f.datasync(),
        sync: () => f.sync(),
        truncate: (n) => f.truncate(n),
        close: () => f.close(),
      };
    },
  };
}

export class FaultyFs implements StoreFs {
  private readonly armed: { op: FsOp; code: string; partial: boolean; file: RegExp | undefined }[] = [];
  /** Calls per op, for assertions. */
  readonly calls = new Map<FsOp, number>();

  /** `file`: only calls on files whose path matches. */
  fail(op: FsOp, code: string, opts: { partial?: boolean; times?: number; file?: RegExp } = {}): void {
    for (let i = 0; i < (opts.times ?? 1); i++) {
      this.armed.push({ op, code, partial: opts.partial ?? false, file: opts.file });
    }
  }

  get pending(): number {
    return this.armed.length;
  }

  /** Forgets the faults not taken yet. */
  disarm(): void {
    this.armed.length = 0;
  }

  async open(file: string, flags: OpenFlags, opts?: { durableWrites?: boolean }): Promise<StoreFile> {
    this.trip('open', file);
    const inner = await nodeStoreFs.open(file, flags, opts);
    return {
      write: async (buffer, offset, length, position, onCaller) => {
        const fault = this.take('write', file);
        if (fault?.partial) await inner.write(buffer, offset, Math.floor(length / 2), position, onCaller);
        if (fault) throw errnoError(fault.code);
        if (!opts?.durableWrites) return inner.write(buffer, offset, length, position, onCaller);
        const written = await inner.write(buffer, offset, length, position, onCaller);
        this.trip('datasync', file);
        return written;
      },
      datasync: async () => {
        this.trip('datasync', file);
        await inner.datasync();
      },
      sync: async () => {
        this.trip('sync', file);
        await inner.sync();
      },
      truncate: async (length) => {
        this.trip('truncate', file);
        await inner.truncate(length);
      },
      close: () => inner.close(),
    };
  }

  readFile(file: string): Promise<Buffer> {
    return nodeStoreFs.readFile(file);
  }

  async rename(from: string, to: string): Promise<void> {
    this.trip('rename', from);
    await nodeStoreFs.rename(from, to);
  }

  unlink(file: string): Promise<void> {
    return nodeStoreFs.unlink(file);
  }

  readdir(dir: string): Promise<string[]> {
    return nodeStoreFs.readdir(dir);
  }

  mkdir(dir: string): Promise<void> {
    return nodeStoreFs.mkdir(dir);
  }

  restrict(file: string): Promise<void> {
    return nodeStoreFs.restrict(file);
  }

  private take(op: FsOp, file: string): { code: string; partial: boolean } | undefined {
    this.calls.set(op, (this.calls.get(op) ?? 0) + 1);
    const i = this.armed.findIndex((a) => a.op === op && (a.file === undefined || a.file.test(file)));
    if (i < 0) return undefined;
    return this.armed.splice(i, 1)[0];
  }

  private trip(op: FsOp, file: string): void {
    const fault = this.take(op, file);
    if (fault) throw errnoError(fault.code);
  }
}

function errnoError(code: string): NodeJS.ErrnoException {
  return Object.assign(new Error(`${code}: injected`), { code });
}

export interface Deferred<T = void> {
  promise: Promise<T>;
  resolve: (value: T) => void;
}

export function deferred<T = void>(): Deferred<T> {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/**
 * Holds the next apply() at the agent: `arrived` resolves when it got there, `release()` lets it
 * (and everything after it) through.
 */
export function holdNextApply(agent: InProcessAgent): { arrived: Promise<void>; release: () => void } {
  const arrived = deferred();
  const gate = deferred();
  agent.beforeApply = async () => {
    agent.beforeApply = undefined;
    arrived.resolve();
    await gate.promise;
  };
  return { arrived: arrived.promise, release: () => gate.resolve() };
}

/** Where the frames of a state file start: a walk over their length fields, not the store's reader. */
export function frameOffsets(data: Buffer): number[] {
  const offsets: number[] = [];
  for (let o = 0; o + 8 <= data.length; o += 8 + data.readUInt32LE(o)) offsets.push(o);
  return offsets;
}

/** Reads a state directory directly (snapshot + journal), as StateStore.open would, without opening it. */
export function readDiskState(dir: string): DesiredState {
  const snapPath = path.join(dir, SNAPSHOT);
  const snap = fs.existsSync(snapPath)
    ? parseSnapshot(fs.readFileSync(snapPath), snapPath)
    : { gen: 0, seq: 0n, state: undefined, legacy: false, outdated: false };
  const journal = path.join(dir, journalName(snap.gen));
  const records = fs.existsSync(journal) ? parseJournal(fs.readFileSync(journal), snap, journal).records : [];
  return replayState(
    snap.state,
    records.map((r) => r.changes),
    stateLimits(),
  );
}
