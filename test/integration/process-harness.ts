/**
 * Real processes for the fault and load tests: the agent and the API server, each spawned as
 * `node --import tsx services/<name>/main.ts`, on one socket and one pair of state directories
 * that survive their restarts. Processes can be killed with any signal; after the test everything
 * still running is SIGKILLed, every client closed and the directory removed, even on failure.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { AgentClient } from '../../src/agent/client.ts';
import type { DeviceCounters } from '../../src/device/types.ts';
import type { Mapping } from '../../src/iotlb/types.ts';
import { memoryDir } from '../../src/memory/allowlist.ts';
import { bounded, type Exit, TIER_BUDGET_MS, until } from './agent-harness.ts';
import { grpcClients, rest } from './api-harness.ts';

const REPO = fileURLToPath(new URL('../..', import.meta.url));

/** Two simulated devices: vdpa0 on the platform IOMMU, vdpa1 with an on-chip one (set_map pushes). */
export const DEFAULT_DEVICES = ['sim:vdpa0', 'sim:vdpa1,iommu=onchip'] as const;

export type LogRecord = Record<string, unknown>;

export interface Proc {
  pid: number;
  readonly running: boolean;
  /** The pino records written to stdout so far. */
  logs(): LogRecord[];
  /** stderr and the last stdout lines, for failure messages. */
  output(): string;
  exited: Promise<Exit>;
  /** Resolves with the first record (already written or still to come) that `match` accepts. */
  waitForLog(match: (record: LogRecord) => boolean, what: string): Promise<LogRecord>;
  /** Sends `signal` and waits (bounded) for the exit. */
  kill(signal: NodeJS.Signals): Promise<Exit>;
}

function spawnNode(script: string, args: readonly string[]): Proc {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('VDPA_MAPD_')));
  const child: ChildProcess = spawn(process.execPath, ['--import', 'tsx', script, ...args], {
    cwd: REPO,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const records: LogRecord[] = [];
  const lines: string[] = [];
  const watchers = new Set<(r: LogRecord) => void>();
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (s: string) => {
    stderr += s;
  });
  createInterface({ input: child.stdout! }).on('line', (line) => {
    lines.push(line);
    if (!line.startsWith('{')) return;
    const record = JSON.parse(line) as LogRecord;
    records.push(record);
    for (const w of watchers) w(record);
  });
  const exited = new Promise<Exit>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  const proc: Proc = {
    pid: child.pid!,
    get running() {
      return child.exitCode === null && child.signalCode === null;
    },
    logs: () => [...records],
    output: () => `${stderr}${lines.slice(-40).join('\n')}`,
    exited,
    waitForLog(match, what) {
      const seen = records.find(match);
      if (seen) return Promise.resolve(seen);
      let watcher: ((r: LogRecord) => void) | undefined;
      const found = new Promise<LogRecord>((resolve, reject) => {
        watcher = (r) => {
          if (match(r)) resolve(r);
        };
        watchers.add(watcher);
        void exited.then((e) =>
          reject(new Error(`${script} exited (${e.code ?? e.signal}) before ${what}:\n${proc.output()}`)),
        );
      });
      return bounded(found, `${script} ${what}`).finally(() => watchers.delete(watcher!));
    },
    kill(signal) {
      if (proc.running) child.kill(signal);
      return bounded(exited, `${script} (pid ${child.pid}) to exit on ${signal}`);
    },
  };
  return proc;
}

export interface ApiProcess {
  proc: Proc;
  http: ReturnType<typeof rest>;
  grpc: ReturnType<typeof grpcClients>;
  /** Waits (bounded) until /readyz answers 200. */
  untilReady(): Promise<void>;
  /** Kills the process with `signal` and closes the gRPC clients. */
  kill(signal: NodeJS.Signals): Promise<Exit>;
}

export interface Rig {
  /** The API server's state directory, the same for every API server started here. */
  apiStateDir: string;
  /** Starts an agent (on the same socket and state directory every time) and waits until it serves. */
  startAgent(devices?: readonly string[], args?: readonly string[]): Promise<Proc>;
  /** Starts an API server on 127.0.0.1 port 0 (`args` added to its own) and waits until it is ready. */
  startApi(args?: readonly string[]): Promise<ApiProcess>;
  /** A client of whatever agent serves the socket; closed after the test. */
  agentClient(): AgentClient;
}

/** Where a rig registers its cleanup: a test's context, or the soak's own list. */
export interface Cleanup {
  after(fn: () => unknown): void;
}

export function createRig(t: Cleanup, prefix: string): Rig {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vdpa-mapd-${prefix}-`));
  const socket = path.join(dir, 'agent.sock');
  const agentStateDir = path.join(dir, 'agent');
  const apiStateDir = path.join(dir, 'api');
  const procs: Proc[] = [];
  const closers: (() => void)[] = [];
  t.after(async () => {
    for (const close of closers) close();
    await Promise.all(procs.map((p) => p.kill('SIGKILL')));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const untilReady = (http: ReturnType<typeof rest>) =>
    until(
      'the API server to be ready',
      async () => (await http('GET', '/readyz').catch(() => undefined))?.status === 200,
    );

  return {
    apiStateDir,
    async startAgent(devices = DEFAULT_DEVICES, args = []) {
      fs.mkdirSync(memoryDir(agentStateDir), { recursive: true });
      const proc = spawnNode('services/agent/main.ts', [
        ...devices.flatMap((d) => ['--device', d]),
        '--state-dir',
        agentStateDir,
        '--socket',
        socket,
        '--allowed-root',
        memoryDir(agentStateDir),
        '--log-level',
        'info',
        ...args,
      ]);
      procs.push(proc);
      await proc.waitForLog((r) => r.msg === 'agent serving', 'serving');
      return proc;
    },
    async startApi(args = []) {
      const proc = spawnNode('services/api/main.ts', [
        '--rest-listen',
        '127.0.0.1:0',
        '--grpc-listen',
        '127.0.0.1:0',
        '--agent-socket',
        socket,
        '--state-dir',
        apiStateDir,
        '--log-level',
        'info',
        ...args,
      ]);
      procs.push(proc);
      const listening = await proc.waitForLog((r) => r.msg === 'api server listening', 'listening');
      // The addresses it bound (port 0 picks free ones), from its "listening" record.
      const grpc = grpcClients(String(listening.grpc));
      closers.push(grpc.close);
      const http = rest(String(listening.rest));
      const api: ApiProcess = {
        proc,
        http,
        grpc,
        untilReady: () => untilReady(http),
        async kill(signal) {
          const exit = await proc.kill(signal);
          grpc.close();
          return exit;
        },
      };
      await api.untilReady();
      return api;
    },
    agentClient() {
      const client = new AgentClient({ socketPath: socket });
      closers.push(() => client.close());
      return client;
    },
  };
}

/**
 * Runs `node <args>` from the repository to its end, in its own process group so that it and every
 * process it started are SIGKILLed after the test if still running; resolves with its exit code
 * and output.
 */
export async function runNode(
  t: Cleanup,
  args: readonly string[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<ChildOutput> {
  const child = spawn(process.execPath, args, {
    cwd: REPO,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) process.kill(-child.pid!, 'SIGKILL');
  });
  return output(child);
}

/** How a child process ended, and what it printed. */
export interface ChildOutput {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Collects a child's stdout and stderr until it closes; resolves with its exit code and both.
 * With `killAfterMs`, a child still running then is SIGKILLed (its output so far is kept).
 */
export function output(child: ChildProcess, killAfterMs?: number): Promise<ChildOutput> {
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (c: Buffer) => {
    stdout += c.toString();
  });
  child.stderr!.on('data', (c: Buffer) => {
    stderr += c.toString();
  });
  const timer = killAfterMs === undefined ? undefined : setTimeout(() => child.kill('SIGKILL'), killAfterMs);
  return new Promise((resolve) =>
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    }),
  );
}

/** One line per mapping, sorted: what the comparisons below compare. */
export function mappingKeys(device: string, mappings: readonly Mapping[]): string[] {
  return mappings
    .map(
      (m) =>
        `${device} asid ${m.asid} 0x${m.iova.toString(16)}+0x${m.size.toString(16)} ${m.memory}@0x${m.offset.toString(16)} ${m.perm}`,
    )
    .sort();
}

/** The agent's own table of `device` (what the device has mapped), as mappingKeys. */
export async function agentTable(client: AgentClient, device: string): Promise<string[]> {
  return mappingKeys(device, (await client.listMapped(device)).mappings);
}

/** The API server's desired state of `device` (ListMappings over REST). */
export async function desiredMappings(api: ApiProcess, device: string): Promise<Mapping[]> {
  const res = await api.http('GET', `/v1/devices/${device}/mappings`);
  if (res.status !== 200)
    throw new Error(`ListMappings ${device}: ${res.status} ${JSON.stringify(res.body)}`);
  return (res.body.mappings as Record<string, string | number>[]).map((m) => ({
    asid: Number(m.asid ?? 0),
    iova: BigInt(m.iova!),
    size: BigInt(m.size!),
    memory: String(m.memory),
    offset: BigInt(m.offset!),
    perm: m.perm as Mapping['perm'],
  }));
}

/** The API server's desired state of `device`, as mappingKeys. */
export async function desiredTable(api: ApiProcess, device: string): Promise<string[]> {
  return mappingKeys(device, await desiredMappings(api, device));
}

/**
 * The ops the first reconciliation of each of `devices` took, from the API server's "device
 * reconciled" records. Waits for them: /readyz can answer before the log line is read here.
 */
export async function reconciliations(
  api: ApiProcess,
  devices: readonly string[],
): Promise<Record<string, number>> {
  const ops: Record<string, number> = {};
  for (const device of devices) {
    const record = await api.proc.waitForLog(
      (r) => r.msg === 'device reconciled' && r.device === device,
      `reconciling ${device}`,
    );
    ops[device] = Number(record.ops);
  }
  return ops;
}

/** The device's counters as the agent keeps them (messages written, dma_map calls, pushes...). */
export async function deviceCounters(client: AgentClient, device: string): Promise<DeviceCounters> {
  return (await client.describeDevice(device)).counters;
}

/** One change the API server announced on WatchMappings. */
export interface Applied {
  device: string;
  kind: 'mapped' | 'unmapped';
  asid: number;
  iova: bigint;
}

export interface AppliedWatch {
  /** Every change announced so far, in order. */
  events: Applied[];
  /** The IOVAs of the sentinel pages mapped to learn that the stream was subscribed. */
  sentinels: bigint[];
  close(): void;
}

/**
 * Watches every change `api` applies. The stream is known to be subscribed once it carries
 * something, so this maps single pages of `memory` (offset 0) on `device` at `sentinelBase`,
 * `sentinelBase + 0x2000`, ... over REST until one shows up; those stay mapped.
 */
export async function watchApplied(
  api: ApiProcess,
  opts: { device: string; memory: string; sentinelBase: bigint },
): Promise<AppliedWatch> {
  const events: Applied[] = [];
  const stream = api.grpc.watch({});
  stream.on('data', (e: { device: string; kind: string; mapping?: { asid?: number; iova: string } }) => {
    if ((e.kind === 'mapped' || e.kind === 'unmapped') && e.mapping)
      events.push({
        device: e.device,
        kind: e.kind,
        asid: e.mapping.asid ?? 0,
        iova: BigInt(e.mapping.iova),
      });
  });
  stream.on('error', () => undefined);
  const watch: AppliedWatch = { events, sentinels: [], close: () => stream.cancel() };
  for (let i = 0; i < TIER_BUDGET_MS / 50 && events.length === 0; i++) {
    const iova = opts.sentinelBase + BigInt(watch.sentinels.length) * 0x2000n;
    const body = {
      iova: `0x${iova.toString(16)}`,
      size: '0x1000',
      memory: opts.memory,
      offset: '0x0',
      perm: 'rw',
    };
    const res = await api.http('POST', `/v1/devices/${opts.device}/mappings`, body);
    if (res.status !== 201) throw new Error(`sentinel map: ${res.status} ${JSON.stringify(res.body)}`);
    watch.sentinels.push(iova);
    await new Promise((r) => setTimeout(r, 50));
  }
  if (events.length === 0) {
    watch.close();
    throw new Error('WatchMappings carried no change');
  }
  return watch;
}
