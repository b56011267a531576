/**
 * Runs the real agent as a child process (`node --import tsx services/agent/main.ts ...`) for
 * integration tests, in a temp directory, and makes sure nothing outlives the test.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';

const REPO = fileURLToPath(new URL('../..', import.meta.url));
const MAIN = path.join(REPO, 'services', 'agent', 'main.ts');
/**
 * Bound on every wait of the harnesses: the shortest test timeout of the tier (120 s), so that a
 * wait never fails a test that a busy machine would have let pass (`tsx` compiles every process at
 * start, which takes seconds on a loaded 2-core machine).
 */
export const WAIT_MS = 120_000;

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface AgentProcess {
  child: ChildProcess;
  pid: number;
  /** Everything written so far. */
  stdout(): string;
  stderr(): string;
  /** The pino records written to stdout so far. */
  logs(): Record<string, unknown>[];
  exited: Promise<Exit>;
  /** Sends `signal` (SIGTERM by default) and waits for the exit. */
  stop(signal?: NodeJS.Signals): Promise<Exit>;
}

/** A temp directory removed after the test. */
export function tempDir(t: TestContext, prefix = 'vdpa-agent-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function withTimeout<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${WAIT_MS} ms: ${what}`)), WAIT_MS).unref();
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Spawns the agent (or another main, given by path); it is killed (SIGKILL) after the test if still running. */
export function spawnAgent(
  t: TestContext,
  args: string[],
  env: NodeJS.ProcessEnv = {},
  main = MAIN,
): AgentProcess {
  const cleanEnv = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith('VDPA_MAPD_')),
  );
  const child = spawn(process.execPath, ['--import', 'tsx', main, ...args], {
    cwd: REPO,
    env: { ...cleanEnv, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (s: string) => {
    out += s;
  });
  child.stderr!.setEncoding('utf8').on('data', (s: string) => {
    err += s;
  });
  const exited = new Promise<Exit>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const logs = () =>
    out
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  return {
    child,
    pid: child.pid!,
    stdout: () => out,
    stderr: () => err,
    logs,
    exited,
    stop(signal = 'SIGTERM') {
      child.kill(signal);
      return withTimeout(exited, `agent ${child.pid} to exit on ${signal}`);
    },
  };
}

/** Waits until the agent logs that it serves (rejects if it exits first). */
export async function untilServing(agent: AgentProcess): Promise<void> {
  const serving = new Promise<void>((resolve, reject) => {
    const check = () => {
      if (agent.logs().some((l) => l.msg === 'agent serving')) resolve();
    };
    agent.child.stdout!.on('data', check);
    check();
    void agent.exited.then((e) =>
      reject(
        new Error(`agent exited (${e.code ?? e.signal}) before serving:\n${agent.stderr()}${agent.stdout()}`),
      ),
    );
  });
  await withTimeout(serving, `agent ${agent.pid} to serve`);
}

/** Spawns an agent and waits until it serves. */
export async function startAgentProcess(
  t: TestContext,
  args: string[],
  env: NodeJS.ProcessEnv = {},
  main = MAIN,
): Promise<AgentProcess> {
  const agent = spawnAgent(t, args, env, main);
  await untilServing(agent);
  return agent;
}

/** Resolves with the first emission of `event`, bounded; a test that fails before awaiting it
 *  does not leave an unhandled rejection behind. */
export function nextEvent<T>(
  emitter: { once(event: string, listener: (value: T) => void): unknown },
  event: string,
): Promise<T> {
  const next = withTimeout(new Promise<T>((resolve) => emitter.once(event, resolve)), `event ${event}`);
  next.catch(() => undefined);
  return next;
}
