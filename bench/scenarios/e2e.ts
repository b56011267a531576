/**
 * Scenario 5: end to end. Map+Unmap pairs against the real API server (in this process, over the real
 * agent process with simulated devices) vs bare servers with the same message shapes that answer at
 * once: a grpc-js server built from the same proto, and a fastify app with the same routes. Both
 * sides run in this process and are driven by the same client code, so the ratio is what the service
 * adds (parsing, queue, journal durable write, agent round trip) over the transport alone.
 *
 * Then Batch: 256 ops per call (the request encoded once; every answer decoded and checked), one
 * call in flight, vs the same 256 ops as single Map/Unmap calls with 64 in flight (the best the
 * single-call path does).
 *
 * At one in flight, the p50 is also set beside the floor of one durable Map, measured in the same
 * rounds: the bare server's p50 + one durable append of the journal's record size per op (measured
 * from the journal's growth; the cheapest way to make it, bench/floor.ts) + one raw unix-socket
 * round trip to another process. Each piece is measured back to back on its own. And beside a
 * bare server that makes those steps in its handler (a round trip to the same echo peer, then an
 * O_DSYNC write of the record's size on the calling thread, as the journal writes it at one in
 * flight): what the pieces cost together in one server, where every wait lets the cores go idle.
 *
 * Every worker owns its own IOVA, so pairs never conflict and every pair leaves the table as it was.
 */
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import {
  Client,
  credentials,
  type sendUnaryData,
  Server,
  ServerCredentials,
  type ServerUnaryCall,
  type UntypedServiceImplementation,
} from '@grpc/grpc-js';
import fastify, { type FastifyInstance } from 'fastify';
import { MAPD_PACKAGE, MappingServiceClient, packageDefinition } from '../../services/api/proto.ts';
import {
  apiConfig,
  type Call,
  grpcClients,
  spawnAgent,
  startReadyApi,
  tempDir,
} from '../../test/integration/api-harness.ts';
import { appendSyncSamples, durableAppender, type EchoPeer, journalBytes, startEchoPeer } from '../floor.ts';
import { alternate, type BenchContext, compare, median, percentiles, scaled } from '../harness.ts';

const ROUNDS = 5;
const DEVICE = 'vdpa0';
const PAGE = 0x1000;
/** Worker w maps the page at PAIR_BASE + 2w pages; batches use pages from BATCH_BASE. */
const PAIR_BASE = 0x100000;
const BATCH_BASE = 0x40000000;
const BATCH = 256;
const hex = (n: number) => `0x${n.toString(16)}`;
/** About one Apply request of one op on the agent's socket. */
const ROUND_TRIP_BYTES = 64;

type Op = 'map' | 'unmap';
/** A method of the package definition, for calls made with bytes. */
interface RawMethod {
  path: string;
  requestSerialize: (message: object) => Buffer;
  responseDeserialize: (bytes: Buffer) => unknown;
}
/** One call; rejects unless the server answered with success. */
type Caller = (op: Op, worker: number) => Promise<void>;

interface Figures {
  opsPerSecond: number;
  p50: number;
  p99: number;
}

function mapBody(worker: number) {
  return {
    iova: hex(PAIR_BASE + 2 * worker * PAGE),
    size: hex(PAGE),
    memory: 'ram0',
    offset: hex(worker * PAGE),
  };
}
function unmapBody(worker: number) {
  return { iova: hex(PAIR_BASE + 2 * worker * PAGE), size: hex(PAGE) };
}

/** `concurrency` workers, each doing `pairs` Map+Unmap pairs on its own page. */
async function runPairs(call: Caller, concurrency: number, pairs: number): Promise<Figures> {
  const samples: number[] = [];
  const start = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async (_, worker) => {
      for (let i = 0; i < pairs; i++) {
        for (const op of ['map', 'unmap'] as const) {
          const t = performance.now();
          await call(op, worker);
          samples.push(performance.now() - t);
        }
      }
    }),
  );
  const seconds = (performance.now() - start) / 1000;
  return { opsPerSecond: samples.length / seconds, ...percentiles(samples) };
}

// ---- the bare servers: the same shapes, no work ----

function mappingOf(req: Record<string, string | undefined>) {
  return {
    iova: req.iova,
    size: req.size,
    memory: req.memory,
    offset: req.offset ?? '0x0',
    perm: req.perm || 'rw',
    asid: 0,
  };
}
const mapAnswer = (req: Record<string, string | undefined>) => {
  const mapping = mappingOf(req);
  return { mapping, ops: [{ type: 'update', ...mapping }] };
};
const unmapAnswer = (req: Record<string, string | undefined>) => ({
  removed: [mappingOf({ ...req, memory: 'ram0' })],
  remapped: [],
  ops: [{ type: 'invalidate', asid: 0, iova: req.iova, size: req.size }],
});

/** The floor's steps, made in a bare server's handler before it answers (none: answers at once). */
type Steps = (() => Promise<void>) | undefined;

async function startBareGrpc(steps?: Steps): Promise<{ address: string; stop: () => void }> {
  type Unary = (call: ServerUnaryCall<Record<string, string>, object>, cb: sendUnaryData<object>) => void;
  const answering =
    (answer: (req: Record<string, string>) => object): Unary =>
    (call, cb) => {
      if (steps === undefined) cb(null, answer(call.request));
      else steps().then(() => cb(null, answer(call.request)), cb);
    };
  const map = answering(mapAnswer);
  const unmap = answering(unmapAnswer);
  const server = new Server();
  server.addService(MappingServiceClient.service, { map, unmap } as UntypedServiceImplementation);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) =>
      err ? reject(err) : resolve(p),
    ),
  );
  return { address: `127.0.0.1:${port}`, stop: () => server.forceShutdown() };
}

async function startBareRest(steps?: Steps): Promise<FastifyInstance> {
  const app = fastify();
  type Body = { Body: Record<string, string> };
  app.post<Body>('/v1/devices/:device/mappings', async (req, reply) => {
    await steps?.();
    reply.code(201);
    return mapAnswer(req.body);
  });
  app.post<Body>('/v1/devices/:device/mappings::unmap', async (req) => {
    await steps?.();
    return unmapAnswer(req.body);
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  return app;
}

// ---- clients ----

function grpcCaller(mapping: Call): Caller {
  return async (op, worker) => {
    await mapping(op, { device: DEVICE, ...(op === 'map' ? mapBody(worker) : unmapBody(worker)) });
  };
}

/** node:http over keep-alive connections (one per worker at most): less client cost than fetch. */
function restCaller(base: string, agent: http.Agent): Caller {
  return (op, worker) =>
    new Promise((resolve, reject) => {
      const payload = JSON.stringify(op === 'map' ? mapBody(worker) : unmapBody(worker));
      const url = `${base}/v1/devices/${DEVICE}/mappings${op === 'map' ? '' : ':unmap'}`;
      const req = http.request(
        url,
        {
          method: 'POST',
          agent,
          headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('error', reject);
          res.on('end', () => {
            const expected = op === 'map' ? 201 : 200;
            if (res.statusCode === expected) resolve();
            else reject(new Error(`${op}: HTTP ${res.statusCode}: ${Buffer.concat(chunks).toString()}`));
          });
        },
      );
      req.on('error', reject);
      req.end(payload);
    });
}

/** 128 maps then 128 unmaps of the same pages: every call leaves the table as it was. */
function batchOps() {
  const pages = Array.from({ length: BATCH / 2 }, (_, k) => BATCH_BASE + 2 * k * PAGE);
  return [
    ...pages.map((iova, k) => ({
      op: 'map',
      iova: hex(iova),
      size: hex(PAGE),
      memory: 'ram0',
      offset: hex(k * PAGE),
    })),
    ...pages.map((iova) => ({ op: 'unmap', iova: hex(iova), size: hex(PAGE) })),
  ];
}

// ---- the scenario ----

function addRows(ctx: BenchContext, label: string, real: Figures[], bare: Figures[], baseline: string): void {
  const pick = (xs: Figures[], key: keyof Figures) => median(xs.map((f) => f[key]));
  compare(
    ctx,
    { scenario: 'e2e', case: label, metric: 'ops/s', value: pick(real, 'opsPerSecond'), unit: 'op/s' },
    baseline,
    pick(bare, 'opsPerSecond'),
  );
  for (const key of ['p50', 'p99'] as const) {
    compare(
      ctx,
      { scenario: 'e2e', case: label, metric: `${key} latency`, value: pick(real, key), unit: 'ms' },
      baseline,
      pick(bare, key),
    );
  }
}

interface FloorFigures {
  recordBytes: number;
  syncP50: number;
  roundTripP50: number;
}

/**
 * One round of the floor's own pieces, as many samples as a round of the real side has ops.
 * `recordBytes`: the journal's record size per op.
 */
function floorRound(dir: string, echo: EchoPeer, ops: number, recordBytes: () => number) {
  return async (): Promise<FloorFigures> => {
    const bytes = recordBytes();
    const sync = percentiles(await appendSyncSamples(dir, bytes, ops));
    const trip = percentiles(await echo.samples(ROUND_TRIP_BYTES, ops));
    return { recordBytes: bytes, syncP50: sync.p50, roundTripP50: trip.p50 };
  };
}

/**
 * The floor's steps for a bare server's handler: one round trip to the echo peer, then one durable
 * append of `recordBytes()` bytes to a file opened O_DSYNC in `dir`, made on the calling thread.
 */
function floorSteps(
  dir: string,
  echo: EchoPeer,
  recordBytes: () => number,
): { steps: Steps; close: () => void } {
  const appender = durableAppender(dir);
  const steps = async () => {
    await echo.samples(ROUND_TRIP_BYTES, 1);
    appender.append(recordBytes());
  };
  return { steps, close: appender.close };
}

function addStepsRow(
  ctx: BenchContext,
  label: string,
  real: Figures[],
  steps: Figures[],
  baseline: string,
): void {
  compare(
    ctx,
    {
      scenario: 'e2e',
      case: label,
      metric: 'p50 latency vs a bare server making the floor steps',
      value: median(real.map((f) => f.p50)),
      unit: 'ms',
      note: 'its handler: one unix round trip, then one durable append of the record size',
    },
    `${baseline}, handler making the floor's steps`,
    median(steps.map((f) => f.p50)),
  );
}

function addFloorRow(
  ctx: BenchContext,
  label: string,
  real: Figures[],
  bare: Figures[],
  floor: FloorFigures[],
  baseline: string,
): void {
  const pick = <T>(xs: T[], f: (x: T) => number) => median(xs.map(f));
  const sync = pick(floor, (f) => f.syncP50);
  const trip = pick(floor, (f) => f.roundTripP50);
  const bytes = pick(floor, (f) => f.recordBytes);
  compare(
    ctx,
    {
      scenario: 'e2e',
      case: label,
      metric: 'p50 latency vs durable floor',
      value: pick(real, (f) => f.p50),
      unit: 'ms',
      note: `floor: bare ${pick(bare, (f) => f.p50).toFixed(3)} + durable append ${Math.round(bytes)} B ${sync.toFixed(3)} + unix round trip ${trip.toFixed(3)}`,
    },
    `${baseline} + durable append + unix round trip`,
    pick(bare, (f) => f.p50) + sync + trip,
  );
}

export async function benchE2e(ctx: BenchContext): Promise<void> {
  const dir = tempDir('bench-e2e');
  const agent = await spawnAgent(dir);
  const stops: (() => unknown)[] = [() => agent.stop()];
  try {
    const api = await startReadyApi(apiConfig(dir, agent.socket));
    stops.unshift(() => api.stop());
    const real = grpcClients(api.grpcAddress);
    stops.unshift(() => real.close());
    await real.mem('registerMemory', { id: 'ram0', size: hex(64 << 20) });
    const bareGrpc = await startBareGrpc();
    stops.unshift(() => bareGrpc.stop());
    const bare = grpcClients(bareGrpc.address);
    stops.unshift(() => bare.close());
    const bareRest = await startBareRest();
    stops.unshift(() => bareRest.close());
    const httpAgent = new http.Agent({ keepAlive: true, maxSockets: 64 });
    stops.unshift(() => httpAgent.destroy());
    const { port } = bareRest.server.address() as AddressInfo;
    const echo = await startEchoPeer(dir);
    stops.unshift(() => echo.stop());
    const journalDir = apiConfig(dir, agent.socket).stateDir;
    // The journal's growth per op of the real side's measured rounds (set before each one).
    let journalBefore = 0;
    let realOps = 0;
    const recordBytes = () => (realOps === 0 ? 1 : (journalBytes(journalDir) - journalBefore) / realOps);
    const floor = floorSteps(dir, echo, recordBytes);
    stops.unshift(() => floor.close());
    const stepsGrpc = await startBareGrpc(floor.steps);
    stops.unshift(() => stepsGrpc.stop());
    const steps = grpcClients(stepsGrpc.address);
    stops.unshift(() => steps.close());
    const stepsRest = await startBareRest(floor.steps);
    stops.unshift(() => stepsRest.close());
    const stepsPort = (stepsRest.server.address() as AddressInfo).port;

    const transports = {
      gRPC: {
        real: grpcCaller(real.mapping),
        bare: grpcCaller(bare.mapping),
        steps: grpcCaller(steps.mapping),
        baseline: 'bare grpc-js server, same proto',
      },
      REST: {
        real: restCaller(api.restAddress, httpAgent),
        bare: restCaller(`http://127.0.0.1:${port}`, httpAgent),
        steps: restCaller(`http://127.0.0.1:${stepsPort}`, httpAgent),
        baseline: 'bare fastify route',
      },
    };
    const sizes = [
      { concurrency: 1, pairs: scaled(ctx, 200, 2) },
      { concurrency: 64, pairs: scaled(ctx, 8, 1) },
    ];
    for (const [name, t] of Object.entries(transports)) {
      for (const { concurrency, pairs } of sizes) {
        const run = (call: Caller) => () => runPairs(call, concurrency, pairs);
        await alternate(1, { real: run(t.real), bare: run(t.bare) }); // warm-up
        const label = `${name} Map+Unmap, ${concurrency} in flight`;
        if (concurrency > 1) {
          const figures = await alternate(ROUNDS, { real: run(t.real), bare: run(t.bare) });
          addRows(ctx, label, figures.real, figures.bare, t.baseline);
          continue;
        }
        journalBefore = journalBytes(journalDir);
        realOps = 0;
        const measuredReal = async () => {
          const f = await run(t.real)();
          realOps += 2 * pairs;
          return f;
        };
        // The real side runs first: the floor and the steps have a record size from the start.
        const figures = await alternate(ROUNDS, {
          real: measuredReal,
          bare: run(t.bare),
          floor: floorRound(dir, echo, 2 * pairs, recordBytes),
          steps: run(t.steps),
        });
        addRows(ctx, label, figures.real, figures.bare, t.baseline);
        addFloorRow(ctx, label, figures.real, figures.bare, figures.floor, t.baseline);
        addStepsRow(ctx, label, figures.real, figures.steps, t.baseline);
      }
    }

    const calls = scaled(ctx, 10, 1);
    // The request encoded once, as head-of-line.ts sends its table: what is measured is the
    // service, not this process's protobuf encoder (about 1 ms per 256-op call, on the same cores).
    // Every answer is still decoded and checked.
    const batchMethod = (
      packageDefinition[`${MAPD_PACKAGE}.MappingService`] as unknown as Record<string, RawMethod>
    )['Batch']!;
    const batchRequest = batchMethod.requestSerialize({ device: DEVICE, ops: batchOps() });
    const raw = new Client(api.grpcAddress, credentials.createInsecure());
    stops.unshift(() => raw.close());
    const batch = () =>
      new Promise<{ results: { ok?: boolean }[] }>((resolve, reject) => {
        raw.makeUnaryRequest(
          batchMethod.path,
          (b: Buffer) => b,
          batchMethod.responseDeserialize,
          batchRequest,
          (err, answer) => (err ? reject(err) : resolve(answer as { results: { ok?: boolean }[] })),
        );
      });
    const batched = async () => {
      const start = performance.now();
      for (let i = 0; i < calls; i++) {
        const answer = await batch();
        if (answer.results.length !== BATCH || !answer.results.every((r) => r.ok))
          throw new Error('bench batch failed');
      }
      return (calls * BATCH) / ((performance.now() - start) / 1000);
    };
    // The same ops count: 64 workers, each doing calls * 2 pairs (calls * 256 ops in all).
    const single = async () => (await runPairs(transports.gRPC.real, 64, calls * 2)).opsPerSecond;
    await alternate(1, { batched, single }); // warm-up
    const figures = await alternate(ROUNDS, { batched, single });
    compare(
      ctx,
      {
        scenario: 'e2e',
        case: `gRPC Batch, ${BATCH} ops per call, 1 in flight`,
        metric: 'ops/s',
        value: median(figures.batched),
        unit: 'op/s',
      },
      'the same ops as single gRPC calls, 64 in flight',
      median(figures.single),
    );
  } finally {
    for (const stop of stops) await stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
