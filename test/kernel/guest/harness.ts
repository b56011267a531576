/**
 * Shared by the guest scripts of the real-kernel tier (run inside the VM from the project root):
 * the check runner, assertions, the device's view compared with the agent's, child processes (the
 * agent, the API server) and the push that leaves the device clean.
 *
 * Output contract (init.sh / run-vm.ts): one `GUEST: <check> PASS|FAIL <detail> (<ms> ms)` line per
 * check, exit code 1 if any failed. Checks run in order and share state, so after the first failure
 * the rest are reported as `GUEST: <check> FAIL not run (...)` and only the cleanup runs (unless
 * they are `independent`).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import type { IotlbOp, Mapping, Perm } from '../../../src/iotlb/types.ts';
import { TransportError, type VhostTransport } from '../../../src/device/transport.ts';
import { openVhostVdpaFd } from '../../../src/device/vhost-vdpa-fd.ts';
import {
  backendFeatureMask,
  encodeMsgV2,
  IotlbMsgType,
  Ioctl,
  type IotlbMsgType as MsgType,
} from '../../../src/uapi/index.ts';
import { budgetMs, bundlePath } from '../guest-js.ts';
import { type DeviceMapEntry, VduseClient } from './vduse.ts';

export const devicePath = process.env.VHOST_VDPA_DEV ?? '/dev/vhost-vdpa-0';
export const vduse = new VduseClient();

/** A check returns its detail line, or throws to fail. */
export type Check = () => Promise<string>;

export function assert(ok: boolean, message: string): asserts ok {
  if (!ok) throw new Error(message);
}

export const hex = (n: bigint | number): string => `0x${n.toString(16)}`;

/**
 * Runs the checks in order and prints one line each; `cleanup` always runs last (its failure is
 * a failed `cleanup` check). Sets the exit code: 1 if anything failed.
 */
export async function runChecks(
  checks: [string, Check][],
  cleanup?: () => Promise<string>,
  opts: { independent?: boolean } = {},
): Promise<void> {
  let failed: string | undefined;
  const all: [string, Check][] = cleanup ? [...checks, ['cleanup', cleanup]] : checks;
  for (const [name, check] of all) {
    if (failed !== undefined && name !== 'cleanup' && !opts.independent) {
      console.log(`GUEST: ${name} FAIL not run (${failed} failed)`);
      continue;
    }
    const started = performance.now();
    try {
      const detail = await check();
      console.log(`GUEST: ${name} PASS ${detail} (${Math.round(performance.now() - started)} ms)`);
    } catch (err) {
      failed ??= name;
      process.exitCode = 1;
      const why = err instanceof Error ? (err.stack ?? err.message) : String(err);
      console.log(`GUEST: ${name} FAIL ${why.replaceAll('\n', '\n    ')}`);
    }
  }
  if (failed === undefined) process.exitCode = 0;
}

/** The errno a call fails with ('ok' if it does not); other exceptions pass through. */
export async function errnoOf(fn: () => unknown): Promise<string> {
  try {
    await fn();
    return 'ok';
  } catch (e) {
    if (e instanceof TransportError) return e.errno;
    const code = (e as NodeJS.ErrnoException | undefined)?.code;
    if (typeof code === 'string') return code;
    throw e;
  }
}

/** One device-map entry as `0xSTART-0xLAST:perm@0xOFFSET`. */
export function showEntry(e: { start: bigint; last: bigint; perm: string; offset: bigint }): string {
  return `${hex(e.start)}-${hex(e.last)}:${e.perm}@${hex(e.offset)}`;
}

export function showMap(entries: readonly DeviceMapEntry[]): string {
  return entries.length === 0 ? '(empty)' : entries.map(showEntry).join(' ');
}

/**
 * What the device should hold for the agent's mappings: one entry per mapping, its file offset
 * being the mapping's offset (every backing memory is mmap'd whole from file offset 0).
 */
export function expectedEntries(mappings: readonly Mapping[]): DeviceMapEntry[] {
  return mappings
    .map((m) => ({ start: m.iova, last: m.iova + m.size - 1n, perm: m.perm, offset: m.offset }))
    .sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
}

/** Reads the device's table and fails unless it is exactly `expected`; returns it shown. */
export async function deviceTableIs(expected: readonly DeviceMapEntry[], what: string): Promise<string> {
  const seen = await vduse.map();
  const want = expected.map(showEntry).join(' ') || '(empty)';
  const got = showMap(seen);
  assert(got === want, `${what}: the device holds ${got}, expected ${want}`);
  return got;
}

/** The device's update count (one VDUSE_UPDATE_IOTLB per set_map push). */
export async function deviceUpdates(): Promise<number> {
  return (await vduse.stats()).updates;
}

export function sendRaw(t: VhostTransport, type: MsgType, iova = 0n, size = 0n, uaddr = 0n, perm = 0) {
  return t.write(encodeMsgV2(0, { iova, size, uaddr, perm, type }));
}

/**
 * Becomes the device's owner and pushes its (empty) table, as init.sh's `guest-smoke --sync` does:
 * VDUSE keeps the last table it was given after its owner closes, until a new owner pushes. Also
 * proves nothing holds the device (the open would fail with EBUSY). Returns the device's table.
 */
export async function pushEmptyTable(): Promise<DeviceMapEntry[]> {
  const t = openVhostVdpaFd(devicePath);
  try {
    t.ioctl(Ioctl.VHOST_SET_OWNER);
    const features = Buffer.alloc(8);
    features.writeBigUInt64LE(backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH'));
    t.ioctl(Ioctl.VHOST_SET_BACKEND_FEATURES, features);
    await sendRaw(t, IotlbMsgType.BATCH_BEGIN);
    await sendRaw(t, IotlbMsgType.BATCH_END);
  } finally {
    t.close();
  }
  return vduse.map();
}

/** Whether the device node can be opened right now (false: EBUSY, someone holds it). */
export function deviceBusy(): boolean {
  try {
    fs.closeSync(fs.openSync(devicePath, fs.constants.O_RDWR));
    return false;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EBUSY') return true;
    throw e;
  }
}

/** The tier's budget: the bound of every wait in the guest (no tighter limit, see guest-js.ts). */
export const WAIT_MS = budgetMs();

/**
 * A service started as a child process from its bundle (`node .cache/guest-js/<agent|api>.mjs`,
 * compiled from services/<agent|api>/main.ts before the boot), its output kept.
 */
export class Service {
  readonly lines: string[] = [];
  private readonly listeners: ((line: string) => void)[] = [];
  private readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  private constructor(
    readonly name: string,
    private readonly child: ChildProcess,
  ) {
    for (const stream of [child.stdout, child.stderr]) {
      if (!stream) continue;
      createInterface({ input: stream }).on('line', (line) => {
        this.lines.push(line);
        for (const listener of this.listeners) listener(line);
      });
    }
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => resolve({ code, signal }));
    });
  }

  /**
   * Starts the `bundle` service and waits until one of its output lines satisfies `ready`
   * (returned), or fails if it exits first (or the tier's budget passes).
   */
  static async start(
    name: string,
    /** `agent`, `api` or a guest script's bundle (bundle.ts). */
    bundle: string,
    args: string[],
    ready: (line: string) => boolean,
    timeoutMs = WAIT_MS,
  ): Promise<{ service: Service; line: string; ms: number }> {
    const started = performance.now();
    const child = spawn(process.execPath, [bundlePath(bundle), ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const service = new Service(name, child);
    const line = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new Error(`${name} not ready after ${timeoutMs} ms:\n${service.tail()}`));
      }, timeoutMs);
      const onLine = (l: string) => {
        if (ready(l)) {
          clearTimeout(timer);
          resolve(l);
        }
      };
      service.listeners.push(onLine);
      void service.exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`${name} exited (${code ?? signal}) before it was ready:\n${service.tail()}`));
      });
    });
    return { service, line, ms: Math.round(performance.now() - started) };
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Its JSON (pino) log lines. */
  logs(): Record<string, unknown>[] {
    const out: Record<string, unknown>[] = [];
    for (const line of this.lines) {
      if (!line.startsWith('{')) continue;
      try {
        out.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        // not a log line
      }
    }
    return out;
  }

  tail(n = 30): string {
    return this.lines
      .slice(-n)
      .map((l) => `  ${this.name}| ${l}`)
      .join('\n');
  }

  /** Sends `signal` and waits for the exit (SIGKILL after `timeoutMs`). */
  async stop(
    signal: NodeJS.Signals = 'SIGTERM',
    timeoutMs = WAIT_MS,
  ): Promise<{ code: number | null; signal: NodeJS.Signals | null; ms: number }> {
    const started = performance.now();
    if (this.running) {
      this.child.kill(signal);
      const timer = setTimeout(() => this.child.kill('SIGKILL'), timeoutMs);
      await this.exited.finally(() => clearTimeout(timer));
    }
    return { ...(await this.exited), ms: Math.round(performance.now() - started) };
  }

  /** Cleanup: SIGKILL if still running. */
  async kill(): Promise<void> {
    if (this.running) await this.stop('SIGKILL');
  }
}

/**
 * The boot's API server (init.sh starts it before the first kind): its REST address, once its
 * "api server listening" line is in $VDPA_MAPD_API_LOG. Waits for it within the tier's budget.
 */
export async function bootApi(): Promise<{ rest: string; agentSocket: string; ms: number }> {
  const log = process.env.VDPA_MAPD_API_LOG;
  const agentSocket = process.env.VDPA_MAPD_AGENT_SOCKET;
  assert(log !== undefined && agentSocket !== undefined, 'no boot API server (VDPA_MAPD_API_LOG unset)');
  const started = performance.now();
  for (;;) {
    const text = fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : '';
    const line = text.split('\n').find((l) => l.includes('"api server listening"'));
    if (line)
      return {
        rest: String(JSON.parse(line).rest),
        agentSocket,
        ms: Math.round(performance.now() - started),
      };
    assert(
      performance.now() - started < WAIT_MS,
      `the boot's API server did not listen within the tier's budget:\n${text.slice(-3000)}`,
    );
    await new Promise((r) => setTimeout(r, 200));
  }
}

export type UpdateOp = Extract<IotlbOp, { type: 'update' }>;

/** An IOTLB UPDATE in address space 0. */
export const updateOp = (
  iova: bigint,
  size: bigint,
  memory: string,
  offset: bigint,
  perm: Perm,
): UpdateOp => ({
  type: 'update',
  asid: 0,
  iova,
  size,
  memory,
  offset,
  perm,
});

/** An IOTLB INVALIDATE in address space 0. */
export const invalidateOp = (iova: bigint, size: bigint): IotlbOp => ({
  type: 'invalidate',
  asid: 0,
  iova,
  size,
});

export interface RestAnswer {
  status: number;
  // biome-ignore lint/suspicious/noExplicitAny: JSON answers are checked field by field
  body: any;
}

/** One REST call to the API server at `base` (JSON in and out). */
export async function restCall(
  base: string,
  method: string,
  url: string,
  body?: unknown,
): Promise<RestAnswer> {
  const res = await fetch(`${base}${url}`, {
    method,
    ...(body === undefined
      ? {}
      : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }),
  });
  const text = await res.text();
  return { status: res.status, body: text === '' ? undefined : JSON.parse(text) };
}

/** A REST call that must answer `status`. */
export async function restExpect(
  base: string,
  method: string,
  url: string,
  status: number,
  body?: unknown,
): Promise<RestAnswer> {
  const a = await restCall(base, method, url, body);
  assert(a.status === status, `${method} ${url}: ${a.status}, expected ${status}: ${JSON.stringify(a.body)}`);
  return a;
}

/** The agent's arguments for the kernel device under test, serving on `socket`. */
export function kernelAgentArgs(stateDir: string, socket: string, allowedRoot: string): string[] {
  return [
    ...['--device', `kernel:${devicePath}`, '--state-dir', stateDir, '--socket', socket],
    ...['--allowed-root', allowedRoot, '--log-level', 'info'],
  ];
}

/**
 * Stops the agent with SIGTERM (its client closed first): it must exit 0 and leave the device node
 * free. Returns the ms it took.
 */
export async function stopAgent(agent: Service, client: { close(): void }): Promise<number> {
  client.close();
  const exit = await agent.stop('SIGTERM');
  assert(exit.code === 0, `agent exit ${exit.code ?? exit.signal}:\n${agent.tail()}`);
  assert(!deviceBusy(), 'the device node cannot be opened after the agent exited');
  return exit.ms;
}

/** The agent's line that says it serves. */
export const agentServing = (line: string): boolean => line.includes('"agent serving"');

/** Waits until the API server at `base` is ready (it has reconciled its agent); returns the ms. */
export async function untilApiReady(base: string): Promise<number> {
  const t0 = performance.now();
  while ((await restCall(base, 'GET', '/readyz')).status !== 200) {
    assert(performance.now() - t0 < WAIT_MS, "the API server did not become ready within the tier's budget");
    await new Promise((r) => setTimeout(r, 100));
  }
  return Math.round(performance.now() - t0);
}

/** Where the boot's API server expects its agent (init.sh's VDPA_MAPD_AGENT_SOCKET). */
export const bootAgentSocket = process.env.VDPA_MAPD_AGENT_SOCKET ?? '/run/vdpa-mapd/agent.sock';

/** A step's scratch folder under /tmp: the agent's state dir and an allowed root with a 1 MiB image. */
export function scratchDirs(prefix: string): {
  root: string;
  agentState: string;
  sharedDir: string;
  imagePath: string;
} {
  const root = fs.mkdtempSync(`/tmp/${prefix}-`);
  const sharedDir = path.join(root, 'shared');
  fs.mkdirSync(sharedDir);
  const imagePath = path.join(sharedDir, 'guest.img');
  fs.writeFileSync(imagePath, '');
  fs.truncateSync(imagePath, 1024 * 1024);
  return { root, agentState: path.join(root, 'agent'), sharedDir, imagePath };
}
