/**
 * Agent transport: the product's agent hop (AgentClient against the agent as it serves,
 * services/agent/main.ts) vs the floor: a bare framed protobuf round trip on a unix socket,
 * written here in a few lines ([u32 length][u32 call id][u8 method | status][protobuf payload],
 * no deadlines, no error detail, no slicing, no connection handling).
 *
 * Both servers are child processes (this file, run with --serve) with one simulated device and the
 * same handlers (services/agent/server.ts); both ends of both code every message the same way
 * (src/agent/sliced-codec.ts: Apply's straight between bytes and bigints, mapping-codec.ts). What the ratio
 * shows is what the product's transport adds to the bare framing. The two are measured in
 * alternating rounds; each figure is the median over rounds of the mean round trip of sequential
 * calls (one in flight). The 256-op Apply is also counted in messages per second beside the raw
 * write floor (writeSync of one 72-byte message to /dev/null), measured in the same rounds.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { AgentClient } from '../../src/agent/client.ts';
import type { ApplyAnswer } from '../../src/agent/mapping-codec.ts';
import { agentService } from '../../src/agent/proto.ts';
import { decodeMessage, encodeMessage } from '../../src/agent/sliced-codec.ts';
import type { AgentOpResult } from '../../src/agent/wire.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import type { AgentConfig } from '../../services/agent/config.ts';
import { createLogger, openAgentCore, startAgent } from '../../services/agent/main.ts';
import { type AgentHandlers, createHandlers } from '../../services/agent/server.ts';
import { RAW_WRITE, rawWriteRate } from '../floor.ts';
import { alternate, type BenchContext, compare, median, scaled } from '../harness.ts';

type Transport = 'agent' | 'floor';
const ROUNDS = 5;
const BATCH = 256;
const PAGE = 4096n;
const BASE_IOVA = 0x100000n;
const DEVICE = 'bench0';

// ---- the floor: [u32 length][u32 call id][u8 method | status][protobuf payload] ----

/** The same codings the agent uses, so the encoding work is identical. */
const METHODS = Object.entries(agentService).map(([name, def]) => ({
  name: name as keyof AgentHandlers,
  def,
}));
const HEADER = 9;

function frame(id: number, tag: number, payload: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(HEADER + payload.length);
  out.writeUInt32LE(payload.length + HEADER - 4, 0);
  out.writeUInt32LE(id, 4);
  out.writeUInt8(tag, 8);
  out.set(payload, HEADER);
  return out;
}

/** Calls `onFrame(id, tag, payload)` for every complete frame arriving on `socket`. */
function readFrames(socket: net.Socket, onFrame: (id: number, tag: number, payload: Buffer) => void): void {
  let pending: Buffer = Buffer.alloc(0);
  socket.on('data', (chunk: Buffer) => {
    pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
    while (pending.length >= 4) {
      const end = 4 + pending.readUInt32LE(0);
      if (pending.length < end) break;
      onFrame(pending.readUInt32LE(4), pending.readUInt8(8), pending.subarray(HEADER, end));
      pending = pending.subarray(end);
    }
  });
}

function serveFramed(socketPath: string, handlers: AgentHandlers): Promise<net.Server> {
  const server = net.createServer((socket) => {
    readFrames(socket, (id, methodIndex, payload) => {
      const { name, def } = METHODS[methodIndex]!;
      const handler = handlers[name] as (r: unknown) => Promise<object>;
      decodeMessage(def, 'request', payload)
        .then(handler)
        .then((res) => encodeMessage(def, 'response', res))
        .then(
          (bytes) => socket.write(frame(id, 0, bytes)),
          (err: Error) => socket.write(frame(id, 1, Buffer.from(err.message))),
        );
    });
  });
  return new Promise((resolve) => server.listen(socketPath, () => resolve(server)));
}

class FramedClient {
  private nextId = 1;
  private readonly calls = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();

  private constructor(private readonly socket: net.Socket) {
    readFrames(socket, (id, status, payload) => {
      const call = this.calls.get(id)!;
      this.calls.delete(id);
      if (status === 0) call.resolve(payload);
      else call.reject(new Error(payload.toString()));
    });
  }

  static connect(socketPath: string): Promise<FramedClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(socketPath, () => resolve(new FramedClient(socket)));
      socket.once('error', reject);
    });
  }

  async call<Res>(name: keyof AgentHandlers, req: object): Promise<Res> {
    const index = METHODS.findIndex((m) => m.name === name);
    const { def } = METHODS[index]!;
    const id = this.nextId++;
    const request = await encodeMessage(def, 'request', req);
    const payload = await new Promise<Buffer>((resolve, reject) => {
      this.calls.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(frame(id, index, request));
    });
    return (await decodeMessage(def, 'response', payload)) as Res;
  }

  async apply(device: string, ops: readonly IotlbOp[]): Promise<AgentOpResult[]> {
    return (await this.call<ApplyAnswer>('Apply', { device, ops })).results;
  }

  close(): void {
    this.socket.destroy();
  }
}

// ---- the serving child ----

function childConfig(socketPath: string, stateDir: string): AgentConfig {
  return {
    socketPath,
    stateDir,
    devices: [`sim:${DEVICE}`],
    allowedRoots: [],
    memory: [{ id: 'ram', size: 64n << 20n, kind: 'memfd' }],
    logLevel: 'silent',
  };
}

async function serve(transport: Transport, socketPath: string, stateDir: string): Promise<void> {
  const config = childConfig(socketPath, stateDir);
  if (transport === 'agent') {
    await startAgent(config);
  } else {
    const core = await openAgentCore(config, createLogger('silent'));
    await serveFramed(socketPath, createHandlers(core));
  }
  process.stdout.write('ready\n');
}

interface ServerProcess {
  child: ChildProcess;
  /** SIGTERM, then SIGKILL after 5 s; resolves once it exited. */
  stop(): Promise<void>;
}

async function spawnServer(
  transport: Transport,
  socketPath: string,
  stateDir: string,
): Promise<ServerProcess> {
  const self = fileURLToPath(import.meta.url);
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', self, '--serve', transport, socketPath, stateDir],
    {
      stdio: ['ignore', 'pipe', 'inherit'],
    },
  );
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const kill = setTimeout(() => child.kill('SIGKILL'), 5_000);
    child.kill('SIGTERM');
    await exited;
    clearTimeout(kill);
  };
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${transport} server did not start in 30 s`)), 30_000);
      child.stdout!.once('data', () => {
        clearTimeout(timer);
        resolve();
      });
      void exited.then(() => {
        clearTimeout(timer);
        reject(new Error(`${transport} server exited with ${child.exitCode ?? child.signalCode}`));
      });
    });
  } catch (err) {
    await stop();
    throw err;
  }
  return { child, stop };
}

// ---- the measurement ----

function update(k: bigint): IotlbOp {
  return {
    type: 'update',
    asid: 0,
    iova: BASE_IOVA + k * PAGE,
    size: PAGE,
    memory: 'ram',
    offset: k * PAGE,
    perm: 'rw',
  };
}
function invalidate(k: bigint): IotlbOp {
  return { type: 'invalidate', asid: 0, iova: BASE_IOVA + k * PAGE, size: PAGE };
}

/** Call i of the 1-op loop maps a page, call i+1 unmaps it: the table ends every pair empty. */
const SMALL: IotlbOp[][] = [[update(0n)], [invalidate(0n)]];
/** 128 maps then 128 unmaps of the same pages: the table ends every call empty. */
const LARGE: IotlbOp[] = [
  ...Array.from({ length: BATCH / 2 }, (_, k) => update(BigInt(k))),
  ...Array.from({ length: BATCH / 2 }, (_, k) => invalidate(BigInt(k))),
];

type Apply = (ops: readonly IotlbOp[]) => Promise<AgentOpResult[]>;

/** Mean round trip, in µs, of `calls` sequential applies. */
async function meanMicros(apply: Apply, calls: number, batch: (i: number) => IotlbOp[]): Promise<number> {
  const start = performance.now();
  for (let i = 0; i < calls; i++) {
    const results = await apply(batch(i));
    if (!results.every((r) => r.ok))
      throw new Error(`apply failed: ${JSON.stringify(results.find((r) => !r.ok))}`);
  }
  return ((performance.now() - start) * 1000) / calls;
}

export async function benchAgentTransport(ctx: BenchContext): Promise<void> {
  /** Even, so the map/unmap pairs of the 1-op loop always complete. */
  const smallCalls = 2 * scaled(ctx, 500, 10);
  const largeCalls = scaled(ctx, 100, 4);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-bench-transport-'));
  const servers: ServerProcess[] = [];
  try {
    const agentSocket = path.join(dir, 'agent', 'agent.sock');
    const floorSocket = path.join(dir, 'floor.sock');
    servers.push(await spawnServer('agent', agentSocket, path.join(dir, 'state-agent')));
    servers.push(await spawnServer('floor', floorSocket, path.join(dir, 'state-floor')));
    const floorClient = await FramedClient.connect(floorSocket);
    const agentClient = new AgentClient({ socketPath: agentSocket });
    try {
      await agentClient.connect();
      const clients: Record<Transport, Apply> = {
        agent: async (ops) => (await agentClient.apply(DEVICE, ops)).results,
        floor: (ops) => floorClient.apply(DEVICE, ops),
      };
      const round = (t: Transport) => async () => ({
        small: await meanMicros(clients[t], smallCalls, (i) => SMALL[i % 2]!),
        large: await meanMicros(clients[t], largeCalls, () => LARGE),
      });
      // What one apply costs per message at the floor: BEGIN, the ops, END, each one raw write.
      const messages = largeCalls * (BATCH + 2);
      const floor = async () => rawWriteRate(messages, 1);
      await alternate(1, { agent: round('agent'), floor: round('floor') }); // warm-up
      const figures = await alternate(ROUNDS, {
        agent: round('agent'),
        floor: round('floor'),
        write: floor,
      });
      for (const [label, key] of [
        ['Apply, 1 op, 1 in flight', 'small'],
        [`Apply, ${BATCH} ops, 1 in flight`, 'large'],
      ] as const) {
        compare(
          ctx,
          {
            scenario: 'agent transport',
            case: label,
            metric: 'AgentClient round trip',
            value: median(figures.agent.map((f) => f[key])),
            unit: 'µs',
          },
          'bare framed protobuf on a unix socket',
          median(figures.floor.map((f) => f[key])),
        );
      }
      compare(
        ctx,
        {
          scenario: 'agent transport',
          case: `Apply, ${BATCH} ops, 1 in flight`,
          metric: 'msgs/s through the agent',
          value: median(figures.agent.map((f) => (BATCH + 2) / (f.large / 1e6))),
          unit: 'msg/s',
          note: 'BEGIN + ops + END per call, over AgentClient',
        },
        RAW_WRITE,
        median(figures.write),
      );
    } finally {
      agentClient.close();
      floorClient.close();
    }
  } finally {
    for (const server of servers) await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const serveAt = process.argv.indexOf('--serve');
  if (serveAt < 0) throw new Error('run by bench/run.ts (BENCH_ONLY=agent-transport npm run bench)');
  const [transport, socketPath, stateDir] = process.argv.slice(serveAt + 1) as [Transport, string, string];
  await serve(transport, socketPath, stateDir);
}
