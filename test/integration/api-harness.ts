/**
 * Shared by the api-*.test.ts files: a real agent process with two simulated devices (vdpa0 on
 * the platform IOMMU, vdpa1 on-chip), the real API server in this process on 127.0.0.1 port 0,
 * a REST helper over fetch and promisified gRPC clients from the same proto.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import {
  type Client,
  type ClientReadableStream,
  credentials,
  type Metadata,
  type ServiceError,
} from '@grpc/grpc-js';
import { DEFAULT_LIMITS } from '../../src/api/parse.ts';
import { type ApiConfig, DEFAULT_CONNECTIONS } from '../../services/api/config.ts';
import { type RunningApiServer, startApiServer } from '../../services/api/main.ts';
import {
  DeviceServiceClient,
  HealthClient,
  MappingServiceClient,
  MemoryServiceClient,
} from '../../services/api/proto.ts';
import { until } from './agent-harness.ts';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `vdpa-mapd-${prefix}-`));
}

export interface Agent {
  socket: string;
  /** A directory the agent accepts memory files from. */
  sharedDir: string;
  /** SIGTERM: the agent closes its devices and removes its socket. */
  stop(): Promise<void>;
  /** SIGKILL, as a crash: the socket file stays behind, stale. */
  kill(): Promise<void>;
  /** The agent's latest log lines (JSON), at most {@link AGENT_LOG_LINES}. */
  log: string[];
}

const AGENT_LOG_LINES = 1000;

/** The devices spawnAgent opens unless told otherwise. */
const AGENT_DEVICES = ['sim:vdpa0', 'sim:vdpa1,iommu=onchip'];

/** Agents still running: SIGKILLed when this process exits first, so that none outlives a bench or test stopped early. */
const runningAgents = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of runningAgents) child.kill('SIGKILL');
});

/** Spawns services/agent/main.ts and waits for its "agent serving" log line. */
export async function spawnAgent(dir: string, devices: readonly string[] = AGENT_DEVICES): Promise<Agent> {
  const stateDir = path.join(dir, 'agent');
  const sharedDir = path.join(dir, 'shared');
  const socket = path.join(dir, 'agent.sock');
  fs.mkdirSync(sharedDir, { recursive: true });
  const child = spawn(
    process.execPath,
    [
      '--import',
      'tsx',
      'services/agent/main.ts',
      ...devices.flatMap((d) => ['--device', d]),
      '--state-dir',
      stateDir,
      '--socket',
      socket,
      '--allowed-root',
      sharedDir,
      '--allowed-root',
      path.join(stateDir, 'memory'),
      '--log-level',
      'info',
    ],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  runningAgents.add(child);
  child.once('exit', () => runningAgents.delete(child));
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const log: string[] = [];
  createInterface({ input: child.stdout! }).on('line', (line) => {
    if (log.push(line) > AGENT_LOG_LINES) log.shift();
  });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`agent did not start in time: ${stderr}`)), 60_000);
    const lines = createInterface({ input: child.stdout! });
    lines.on('line', (line) => {
      if (line.includes('"agent serving"')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`agent exited with ${code}: ${stderr}`));
    });
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const kill = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    return exited;
  };
  return { socket, sharedDir, stop: () => stopChild(child), kill, log };
}

/** SIGTERM, then SIGKILL after 10 s; resolves once the child has exited. */
export function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const kill = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.once('exit', () => {
      clearTimeout(kill);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

export function apiConfig(dir: string, socket: string, overrides: Partial<ApiConfig> = {}): ApiConfig {
  return {
    restListen: { host: '127.0.0.1', port: 0 },
    grpcListen: { host: '127.0.0.1', port: 0 },
    agentSocket: socket,
    stateDir: path.join(dir, 'api'),
    limits: DEFAULT_LIMITS,
    connections: DEFAULT_CONNECTIONS,
    core: {},
    shutdownGraceMs: 5_000,
    logLevel: 'silent',
    ...overrides,
  };
}

export interface Http {
  status: number;
  headers: Headers;
  // biome-ignore lint/suspicious/noExplicitAny: JSON answers are asserted field by field
  body: any;
}

export function rest(base: string) {
  return async (method: string, url: string, body?: unknown): Promise<Http> => {
    const res = await fetch(`${base}${url}`, {
      method,
      ...(body === undefined
        ? {}
        : {
            headers: { 'content-type': 'application/json' },
            body: typeof body === 'string' ? body : JSON.stringify(body),
          }),
    });
    const text = await res.text();
    const json = res.headers.get('content-type')?.includes('application/json') ? JSON.parse(text) : text;
    return { status: res.status, headers: res.headers, body: json };
  };
}

/** Starts the API server and waits (bounded) until /readyz says ready. */
export async function startReadyApi(config: ApiConfig): Promise<RunningApiServer> {
  const server = await startApiServer(config);
  const http = rest(server.restAddress);
  try {
    await until('the API server to be ready', async () => (await http('GET', '/readyz')).status === 200);
  } catch (e) {
    await server.stop();
    throw e;
  }
  return server;
}

export interface GrpcFailure {
  code: number;
  details: string;
  metadata: Metadata;
}

// biome-ignore lint/suspicious/noExplicitAny: answers are asserted field by field
type Answer = any;
export type Call = (method: string, request: object) => Promise<Answer>;

function promisify(client: Client): Call {
  return (method, request) =>
    new Promise((resolve, reject) => {
      type Unary = (req: object, cb: (err: ServiceError | null, answer: Answer) => void) => void;
      const fn = (client as unknown as Record<string, Unary | undefined>)[method];
      assert.ok(fn, `no method ${method}`);
      fn.call(client, request, (err, answer) =>
        err
          ? reject({ code: err.code, details: err.details, metadata: err.metadata } as GrpcFailure)
          : resolve(answer),
      );
    });
}

export function grpcClients(target: string) {
  const creds = credentials.createInsecure();
  const clients = {
    devices: new DeviceServiceClient(target, creds),
    mappings: new MappingServiceClient(target, creds),
    memory: new MemoryServiceClient(target, creds),
    health: new HealthClient(target, creds),
  };
  return {
    ...clients,
    device: promisify(clients.devices),
    mapping: promisify(clients.mappings),
    mem: promisify(clients.memory),
    check: promisify(clients.health),
    watch: (request: object) =>
      (
        clients.mappings as unknown as { watchMappings(r: object): ClientReadableStream<Answer> }
      ).watchMappings(request),
    close: () => {
      for (const c of Object.values(clients)) c.close();
    },
  };
}

/** Awaits a gRPC call that must fail; returns the failure. */
export async function grpcFails(p: Promise<unknown>): Promise<GrpcFailure> {
  try {
    await p;
  } catch (err) {
    return err as GrpcFailure;
  }
  assert.fail('expected the call to fail');
}

/** Everything one test file runs against: agent, API server, clients; `stop` ends all of it. */
export async function startStack(prefix: string, overrides: Partial<ApiConfig> = {}) {
  const dir = tempDir(prefix);
  const agent = await spawnAgent(dir);
  let api: RunningApiServer;
  try {
    api = await startReadyApi(apiConfig(dir, agent.socket, overrides));
  } catch (err) {
    await agent.stop();
    throw err;
  }
  const stack = {
    dir,
    agent,
    api,
    http: rest(api.restAddress),
    grpc: grpcClients(api.grpcAddress),
    stop: async () => {
      stack.grpc.close();
      await stack.api.stop();
      await agent.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return stack;
}

/** `n` one-page regions of memory ram0, one page apart: region k at IOVA 2k pages, offset k pages. */
export function pageRegions(n: number): { iova: string; size: string; memory: string; offset: string }[] {
  const page = 0x1000;
  const hex = (x: number) => `0x${x.toString(16)}`;
  return Array.from({ length: n }, (_, k) => ({
    iova: hex(2 * k * page),
    size: hex(page),
    memory: 'ram0',
    offset: hex(k * page),
  }));
}
