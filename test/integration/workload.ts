/**
 * Clients that drive the API server as an orchestrator would, over REST or gRPC, each keeping a
 * model built only from the answers it got:
 * - an acknowledged op is applied to the model;
 * - a refusal that asks for a retry (UNAVAILABLE, RESOURCE_EXHAUSTED, with a retry-after) means
 *   nothing was done: after the retry-after the same op is sent again with the same requestId;
 * - an op that got no answer at all (the server died) is kept in doubt until a retry settles it.
 * Each client owns its own IOVA slots (or a whole address space, for set-mem-table), so the final
 * state must be the union of the clients' models whatever order the server ran their ops in.
 */
import { performance } from 'node:perf_hooks';
import type { Mapping } from '../../src/iotlb/types.ts';
import type { GrpcFailure, grpcClients, rest } from './api-harness.ts';
import { type Applied, mappingKeys } from './process-harness.ts';

export const PAGE = 0x1000n;
/** Slots are a page each, two pages apart, so no two mappings ever touch. */
export const SLOT_STRIDE = 0x2000n;

export type Transport = 'rest' | 'grpc';
export type Method = 'map' | 'unmap' | 'setMemTable' | 'batch';

export interface Call {
  method: Method;
  device: string;
  requestId: string;
  /** The request as REST takes it (gRPC takes the same fields, plus device). */
  body: Record<string, unknown>;
}

export type Reply =
  | { kind: 'ok'; body: unknown }
  | { kind: 'refused'; code: string; message: string; retryAfterMs: number | undefined }
  | { kind: 'lost'; error: string };

export interface Writer {
  transport: Transport;
  send(call: Call): Promise<Reply>;
}

const hex = (n: bigint) => `0x${n.toString(16)}`;

const REST_ROUTES: Record<Method, (device: string) => [string, string]> = {
  map: (d) => ['POST', `/v1/devices/${d}/mappings`],
  unmap: (d) => ['POST', `/v1/devices/${d}/mappings:unmap`],
  setMemTable: (d) => ['PUT', `/v1/devices/${d}/memtable`],
  batch: (d) => ['POST', `/v1/devices/${d}:batch`],
};

export function restWriter(http: ReturnType<typeof rest>): Writer {
  return {
    transport: 'rest',
    async send(call) {
      const [method, url] = REST_ROUTES[call.method](call.device);
      let res: Awaited<ReturnType<typeof http>>;
      try {
        res = await http(method, url, call.body);
      } catch (e) {
        return { kind: 'lost', error: String(e) };
      }
      if (res.status >= 200 && res.status < 300) return { kind: 'ok', body: res.body };
      const retryAfter = res.headers.get('retry-after');
      return {
        kind: 'refused',
        code: String(res.body?.error?.code ?? `HTTP ${res.status}`),
        message: String(res.body?.error?.message ?? ''),
        retryAfterMs: retryAfter === null ? undefined : Number(retryAfter) * 1000,
      };
    },
  };
}

export function grpcWriter(grpc: ReturnType<typeof grpcClients>): Writer {
  return {
    transport: 'grpc',
    async send(call) {
      try {
        return { kind: 'ok', body: await grpc.mapping(call.method, { device: call.device, ...call.body }) };
      } catch (e) {
        const failure = e as GrpcFailure;
        // The service's own refusals carry its error code; a bare status is the transport's.
        const code = failure.metadata?.get('error-code')[0];
        if (code === undefined) return { kind: 'lost', error: `status ${failure.code}: ${failure.details}` };
        const retryAfter = failure.metadata.get('retry-after-ms')[0];
        return {
          kind: 'refused',
          code: String(code),
          message: failure.details,
          retryAfterMs: retryAfter === undefined ? undefined : Number(retryAfter),
        };
      }
    },
  };
}

export interface ClientSpec {
  /** Unique; the prefix of the client's requestIds. */
  name: string;
  device: string;
  asid: number;
  /** mapUnmap: maps and unmaps single pages of its slots; memTable: sets its whole address space. */
  style: 'mapUnmap' | 'memTable';
  /** IOVA of slot 0; slot i is at base + i * SLOT_STRIDE. */
  base: bigint;
  slots: number;
  memory: string;
  /** Offset in the memory of slot 0's page; slot i uses the page i after it. */
  memoryBase: bigint;
  seed: number;
}

interface PlannedOp {
  call: Call;
  /** The client's mappings once the op is done, by IOVA. */
  after: Map<bigint, Mapping>;
}

export interface Acked {
  call: Call;
  answer: unknown;
}

/** mulberry32: a small seeded PRNG, so a failing run can be replayed. */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export class ModelClient {
  /** Where requests go; swapped when the API server is restarted on other ports. */
  writer: Writer;
  /** What the client was told its slots hold, by IOVA. */
  model = new Map<bigint, Mapping>();
  /** Every acknowledged op with its answer, in order. */
  readonly acked: Acked[] = [];
  /** The op whose answer was lost, until a retry settles it. */
  inDoubt: PlannedOp | undefined;
  /** Refusals that asked for a retry (and were retried). */
  readonly retried: { code: string; retryAfterMs: number }[] = [];
  /** Answers no client should ever get here. */
  readonly unexpected: string[] = [];
  /** Milliseconds of each acknowledged request (the last attempt). */
  readonly latencies: number[] = [];
  private readonly rand: () => number;
  private sent = 0;

  constructor(
    readonly spec: ClientSpec,
    writer: Writer,
  ) {
    this.writer = writer;
    this.rand = random(spec.seed);
  }

  /** The client's slots in the desired state / the device, as mappingKeys. */
  expected(): string[] {
    return mappingKeys(this.spec.device, [...this.model.values()]);
  }

  /** What expected() will be if the op in doubt turns out to have been done. */
  expectedIfDone(): string[] | undefined {
    return this.inDoubt && mappingKeys(this.spec.device, [...this.inDoubt.after.values()]);
  }

  /** The acknowledged map/unmap ops from the `from`-th on, named as appliedChanges names them. */
  ackedChanges(from = 0): string[] {
    return this.acked
      .slice(from)
      .map(({ call }) => `${call.method === 'map' ? 'mapped' : 'unmapped'} ${call.body.iova}`);
  }

  /** The changes of `events` in this client's slots, in order ("mapped 0x...", "unmapped 0x..."). */
  appliedChanges(events: readonly Applied[]): string[] {
    return events.filter((e) => this.owns(e.device, e.asid, e.iova)).map((e) => `${e.kind} ${hex(e.iova)}`);
  }

  /** Whether a mapping of `device` lies in this client's slots. */
  owns(device: string, asid: number, iova: bigint): boolean {
    const { spec } = this;
    const end = spec.base + BigInt(spec.slots) * SLOT_STRIDE;
    return device === spec.device && asid === spec.asid && iova >= spec.base && iova < end;
  }

  /**
   * Sends up to `ops` ops, one at a time. `retries` bounds the re-sends of one op after refusals
   * that ask for a retry. Stops early when an answer is lost or unexpected.
   */
  async run(opts: { ops: number; retries: number }): Promise<void> {
    for (let i = 0; i < opts.ops; i++) {
      if (!(await this.settle(this.plan(), opts.retries))) return;
    }
  }

  /** Sends the op in doubt again, with its requestId (and up to `retries` more times if refused). */
  async resolveInDoubt(retries: number): Promise<void> {
    const op = this.inDoubt;
    if (op === undefined) return;
    this.inDoubt = undefined;
    await this.settle(op, retries);
  }

  private mappingAt(slot: number): Mapping {
    const { spec } = this;
    return {
      asid: spec.asid,
      iova: spec.base + BigInt(slot) * SLOT_STRIDE,
      size: PAGE,
      memory: spec.memory,
      offset: spec.memoryBase + BigInt(slot) * PAGE,
      perm: 'rw',
    };
  }

  private plan(): PlannedOp {
    const { spec } = this;
    const requestId = `${spec.name}-${this.sent++}`;
    const call = (method: Method, body: Record<string, unknown>): Call => ({
      method,
      device: spec.device,
      requestId,
      body: { ...body, asid: spec.asid, requestId },
    });
    const slots = Array.from({ length: spec.slots }, (_, i) => this.mappingAt(i));
    if (spec.style === 'memTable') {
      const chosen = slots.filter(() => this.rand() < 0.5);
      const regions = chosen.map((m) => ({
        iova: hex(m.iova),
        size: hex(m.size),
        memory: m.memory,
        offset: hex(m.offset),
        perm: m.perm,
      }));
      return { call: call('setMemTable', { regions }), after: new Map(chosen.map((m) => [m.iova, m])) };
    }
    const after = new Map(this.model);
    const free = slots.filter((m) => !this.model.has(m.iova));
    if (this.model.size > 0 && (free.length === 0 || this.rand() < 0.4)) {
      const mapped = [...this.model.values()];
      const victim = mapped[Math.floor(this.rand() * mapped.length)]!;
      after.delete(victim.iova);
      return { call: call('unmap', { iova: hex(victim.iova), size: hex(victim.size), exact: true }), after };
    }
    const m = free[Math.floor(this.rand() * free.length)]!;
    after.set(m.iova, m);
    const body = {
      iova: hex(m.iova),
      size: hex(m.size),
      memory: m.memory,
      offset: hex(m.offset),
      perm: m.perm,
    };
    return { call: call('map', body), after };
  }

  /** True when the op was acknowledged. */
  private async settle(op: PlannedOp, retries: number): Promise<boolean> {
    for (let attempt = 0; ; attempt++) {
      const started = performance.now();
      const reply = await this.writer.send(op.call);
      if (reply.kind === 'ok') {
        this.latencies.push(performance.now() - started);
        this.model = op.after;
        this.acked.push({ call: op.call, answer: reply.body });
        return true;
      }
      if (reply.kind === 'lost') {
        this.inDoubt = op;
        return false;
      }
      const what = `${op.call.method} ${op.call.requestId}: ${reply.code} ${reply.message}`;
      const retryable = reply.code === 'UNAVAILABLE' || reply.code === 'RESOURCE_EXHAUSTED';
      if (!retryable || attempt >= retries) {
        this.unexpected.push(what);
        return false;
      }
      if (reply.retryAfterMs === undefined || !(reply.retryAfterMs > 0)) {
        this.unexpected.push(`${what} (without a retry-after)`);
        return false;
      }
      this.retried.push({ code: reply.code, retryAfterMs: reply.retryAfterMs });
      await sleep(reply.retryAfterMs);
    }
  }
}

/** The value below which `p` (0..1) of `values` lie (nearest rank). */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))]!;
}

/**
 * Six single-page map/unmap clients on both devices (vdpa0, vdpa1 alternating), two over REST, two
 * over gRPC, two over REST again; each on its own IOVA range and its own pages of `memory`.
 */
export function mapUnmapFleet(
  api: { http: ReturnType<typeof rest>; grpc: ReturnType<typeof grpcClients> },
  opts: { memory: string; slots: number; seed: number },
): ModelClient[] {
  const transports: Transport[] = ['rest', 'grpc'];
  return [0, 1, 2, 3, 4, 5].map((k) => {
    const spec: ClientSpec = {
      name: `c${k}`,
      device: k % 2 === 0 ? 'vdpa0' : 'vdpa1',
      asid: 0,
      style: 'mapUnmap',
      base: 0x1000_0000n * BigInt(k + 1),
      slots: opts.slots,
      memory: opts.memory,
      memoryBase: BigInt(k) * 0x10_0000n,
      seed: opts.seed + k,
    };
    const transport = transports[Math.floor(k / 2) % 2]!;
    return new ModelClient(spec, transport === 'rest' ? restWriter(api.http) : grpcWriter(api.grpc));
  });
}
