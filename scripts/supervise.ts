/**
 * Runs services as child processes and keeps them running the way systemd's `Restart=on-failure`
 * does: a service that dies (a non-zero exit or a signal) is started again after a backoff
 * (`RestartSec`, doubled for every restart within the window, up to `maxDelaySec`), at most `burst`
 * times within `intervalSec` (`StartLimitBurst` / `StartLimitIntervalSec`); one more death within
 * that window and the supervisor gives up and stops everything. A service that exits with 0 on its
 * own was not asked to: that ends everything too. Every death, restart and give-up is said on the
 * console, naming the service, its pid, how it died and when it comes back.
 *
 * Services are stopped in the reverse order of their first start (SIGTERM, then SIGKILL after
 * STOP_TIMEOUT_MS).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

const READY_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 15_000;

export interface RestartPolicy {
  /** Delay before the first restart, in seconds (doubled for each further one within the window). */
  restartSec: number;
  maxDelaySec: number;
  /** Restarts allowed within `intervalSec`; the next death gives up. */
  burst: number;
  intervalSec: number;
}

export const DEFAULT_RESTART_POLICY: RestartPolicy = {
  restartSec: 1,
  maxDelaySec: 30,
  burst: 5,
  intervalSec: 60,
};

export type LogRecord = Record<string, unknown>;

export interface ServiceSpec {
  name: string;
  /** Run as `node --import tsx <script> <args>` from `cwd`. */
  script: string;
  args: readonly string[];
  /** The `msg` of the pino record that says the service is up. */
  readyMsg: string;
  /** What to say beside "started" / "restarted", from that record (e.g. where it listens). */
  describeReady?(ready: LogRecord): string;
}

interface Running {
  process: ChildProcess;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** A service and its current process (undefined until first spawned). */
interface Entry {
  spec: ServiceSpec;
  running: Running | undefined;
}

function parseLogLine(line: string): LogRecord | undefined {
  try {
    const value: unknown = JSON.parse(line);
    return typeof value === 'object' && value !== null ? (value as LogRecord) : undefined;
  } catch {
    return undefined;
  }
}

function describeExit({ code, signal }: { code: number | null; signal: NodeJS.Signals | null }): string {
  return signal !== null ? `was killed by ${signal}` : `exited with code ${code}`;
}

const seconds = (s: number) => `${Number(s.toFixed(1))} s`;

export class Supervisor {
  private readonly services: Entry[] = [];
  private readonly timers = new Set<NodeJS.Timeout>();
  private stopping: Promise<void> | undefined;
  private endWith!: (code: number) => void;
  /** Resolves with the exit code once the supervisor has given up or a service ended on its own. */
  readonly ended = new Promise<number>((resolve) => {
    this.endWith = resolve;
  });

  constructor(
    private readonly opts: {
      cwd: string;
      policy: RestartPolicy;
      /** Where the services' stdout lines go (they are echoed as they come). */
      echo: (line: string) => void;
      /** The supervisor's own messages. */
      say: (line: string) => void;
    },
  ) {}

  /**
   * Starts `spec` and resolves with its ready record. A first start that fails (the service exits
   * or is not up within READY_TIMEOUT_MS) is not retried: that is a configuration to fix.
   */
  async start(spec: ServiceSpec): Promise<LogRecord> {
    const entry: Entry = { spec, running: undefined };
    this.services.push(entry);
    const { running, ready } = this.spawn(spec);
    entry.running = running;
    try {
      const record = await ready;
      this.opts.say(`${spec.name} started (pid ${running.process.pid})${this.describe(spec, record)}`);
      void this.watch(entry, running, []);
      return record;
    } catch (err) {
      running.process.kill('SIGKILL');
      throw err;
    }
  }

  /** Stops every service, the last started first. Idempotent; no restart happens once called. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      for (const t of this.timers) clearTimeout(t);
      for (const entry of [...this.services].reverse()) {
        const { running } = entry;
        if (running === undefined || !isAlive(running.process)) continue;
        this.opts.say(`stopping ${entry.spec.name} (pid ${running.process.pid})`);
        running.process.kill('SIGTERM');
        const timer = setTimeout(() => running.process.kill('SIGKILL'), STOP_TIMEOUT_MS);
        const exit = await running.exited;
        clearTimeout(timer);
        this.opts.say(`${entry.spec.name} stopped: it ${describeExit(exit)}`);
      }
    })();
    return this.stopping;
  }

  /** SIGKILLs every service at once (a second Ctrl-C, or this process exiting). */
  killAll(): void {
    for (const t of this.timers) clearTimeout(t);
    for (const { running } of this.services)
      if (running && isAlive(running.process)) running.process.kill('SIGKILL');
  }

  private spawn(spec: ServiceSpec): { running: Running; ready: Promise<LogRecord> } {
    // Its own process group, so that a terminal's Ctrl-C reaches only the supervisor, which then
    // stops the services in order.
    const proc = spawn(process.execPath, ['--import', 'tsx', spec.script, ...spec.args], {
      cwd: this.opts.cwd,
      detached: true,
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
      proc.once('exit', (code, signal) => resolve({ code, signal }));
    });
    const ready = new Promise<LogRecord>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`${spec.name} was not up within ${READY_TIMEOUT_MS / 1000} s`)),
        READY_TIMEOUT_MS,
      );
      createInterface({ input: proc.stdout! }).on('line', (line) => {
        this.opts.echo(line);
        const record = parseLogLine(line);
        if (record?.msg === spec.readyMsg) {
          clearTimeout(timer);
          resolve(record);
        }
      });
      void exited.then((exit) => {
        clearTimeout(timer);
        reject(new Error(`${spec.name} ${describeExit(exit)} before it was up`));
      });
    });
    ready.catch(() => undefined);
    return { running: { process: proc, exited }, ready };
  }

  /**
   * Waits for the running service to end and restarts it per the policy. `restarts` holds the
   * times (ms) of its earlier restarts.
   */
  private async watch(entry: Entry, running: Running, restarts: number[]): Promise<void> {
    const { spec } = entry;
    const { policy } = this.opts;
    const exit = await running.exited;
    if (this.stopping) return;
    const who = `${spec.name} (pid ${running.process.pid})`;
    if (exit.code === 0) {
      this.opts.say(`${who} exited with code 0 on its own; stopping everything`);
      return this.giveUp();
    }
    const now = Date.now();
    const recent = restarts.filter((t) => now - t < policy.intervalSec * 1000);
    if (recent.length >= policy.burst) {
      this.opts.say(
        `${who} ${describeExit(exit)}; it was restarted ${recent.length} times within ` +
          `${seconds(policy.intervalSec)} (at most ${policy.burst}): giving up, stopping everything`,
      );
      return this.giveUp();
    }
    const delay = Math.min(policy.restartSec * 2 ** recent.length, policy.maxDelaySec);
    this.opts.say(
      `${who} ${describeExit(exit)}; restarting it in ${seconds(delay)} ` +
        `(restart ${recent.length + 1} of at most ${policy.burst} within ${seconds(policy.intervalSec)})`,
    );
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.timers.delete(timer);
        resolve();
      }, delay * 1000);
      this.timers.add(timer);
    });
    if (this.stopping) return;
    const next = this.spawn(spec);
    entry.running = next.running;
    const history = [...recent, Date.now()];
    try {
      const record = await next.ready;
      if (this.stopping) return;
      this.opts.say(`${spec.name} restarted (pid ${next.running.process.pid})${this.describe(spec, record)}`);
    } catch (err) {
      // Died or hung before it was up: that counts as one more death (said below).
      if (this.stopping) return;
      if (isAlive(next.running.process)) {
        this.opts.say(`${(err as Error).message}: killing it`);
        next.running.process.kill('SIGKILL');
      }
    }
    return this.watch(entry, next.running, history);
  }

  private describe(spec: ServiceSpec, ready: LogRecord): string {
    return spec.describeReady ? `: ${spec.describeReady(ready)}` : '';
  }

  private async giveUp(): Promise<void> {
    await this.stop();
    this.endWith(1);
  }
}

function isAlive(proc: ChildProcess): boolean {
  return proc.exitCode === null && proc.signalCode === null;
}
