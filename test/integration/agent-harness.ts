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
import { pollUntil } from '../poll.ts';

const REPO = fileURLToPath(new URL('../..', import.meta.url));
const MAIN = path.join(REPO, 'services', 'agent', 'main.ts');
/**
 * The integration tier's budget, and the only time limit of its tests and of every wait in them:
 * a busy machine, or one whose disk stalls in fsync, makes a step slower, never wrong, so nothing
 * is bounded tighter than the whole tier. About 6 minutes on a quiet 2-core machine; 30 here, so
 * that with the unit tier's 10 and the kernel tier's 40 a hang still ends inside CI's 90.
 */
export const TIER_BUDGET_MS = 30 * 60_000;

/** Polls `check` every 50 ms until it holds; fails once the tier's budget has passed. */
export function until(what: string, check: () => boolean | Promise<boolean>): Promise<void> {
  return pollUntil(TIER_BUDGET_MS, 50, what, check);
}

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

/** `promise`, or a rejection naming `what` once the tier's budget has passed. */
export function bounded<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`timed out after ${TIER_BUDGET_MS} ms: ${what}`)),
      TIER_BUDGET_MS,
    ).unref();
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
      return bounded(exited, `agent ${child.pid} to exit on ${signal}`);
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
  await bounded(serving, `agent ${agent.pid} to serve`);
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
  const next = bounded(new Promise<T>((resolve) => emitter.once(event, resolve)), `event ${event}`);
  next.catch(() => undefined);
  return next;
}
