/**
 * `npm run soak`: the agent, then the API server, SIGKILLed again and again under mixed REST and gRPC
 * load, on loopback and one unix socket. Six clients (test/integration/workload.ts) map and unmap
 * pages of their own slots on vdpa0 and vdpa1 and keep a model built only from the answers they got;
 * an answer lost with a killed API server is sent again, with its requestId, to the next one. After
 * each kill series the clients' model, the API server's lists and the agent's own tables must agree:
 *
 * - lost: an acknowledged mapping missing from the API server's list or the agent's table;
 * - extra: a mapping there that no acknowledged answer accounts for;
 * - duplicates: a mapping listed twice, or an acknowledged op applied more than once (the changes
 *   WatchMappings announced, against the acknowledged ops).
 *
 * Prints one line per kill (recovery time: from the SIGKILL until every device is ready again, the
 * new process's start included) and the figures of each series; exits 1 on any loss, extra,
 * duplicate or unexpected answer, 2 when the time limit ends it first (or on a bad option).
 *
 *   npm run soak -- [--kills N] [--scale S] [--max-minutes M] [--seed N]
 *
 * `--kills` (default 20) is the number of SIGKILLs of each process. `--scale` (default 1) scales the
 * load: each client gets ceil(10 * S) ops acknowledged between two kills, on ceil(24 * S) slots (at
 * most 200).
 */
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import {
  type ApiProcess,
  type Applied,
  agentTable,
  createRig,
  desiredTable,
  mappingKeys,
  type Proc,
  type Rig,
  watchApplied,
} from '../test/integration/process-harness.ts';
import {
  grpcWriter,
  type ModelClient,
  mapUnmapFleet,
  percentile,
  restWriter,
} from '../test/integration/workload.ts';

const DEVICES = ['vdpa0', 'vdpa1'] as const;
const MEMORY = 'ram';
/** Sentinel pages (to learn a watch is subscribed) live here on vdpa0, outside every client's slots. */
const SENTINEL_BASE = 0x7000_0000n;
/** A sentinel page, as watchApplied maps it. */
const SENTINEL_PAGE = { asid: 0, size: 0x1000n, memory: MEMORY, offset: 0n, perm: 'rw' } as const;
/** Re-sends of one op refused with a retry-after (an agent outage is a few of them). */
const RETRIES = 120;
/** Bound on waiting for the clients to make progress between kills. */
const PROGRESS_MS = 120_000;

interface Options {
  kills: number;
  scale: number;
  maxMinutes: number;
  seed: number;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      kills: { type: 'string', default: '20' },
      scale: { type: 'string', default: '1' },
      'max-minutes': { type: 'string', default: '30' },
      seed: { type: 'string', default: '1' },
    },
    strict: true,
  });
  const number = (flag: string, value: string, integer: boolean) => {
    const n = Number(value);
    if (!(n > 0) || (integer && !Number.isInteger(n)))
      throw new Error(`--${flag}: not a positive number: ${value}`);
    return n;
  };
  return {
    kills: number('kills', values.kills, true),
    scale: number('scale', values.scale, false),
    maxMinutes: number('max-minutes', values['max-minutes'], false),
    seed: number('seed', values.seed, true),
  };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const secs = (ms: number) => `${(ms / 1000).toFixed(2)} s`;

/**
 * Keeps every client sending one op after the other until stopped. An op whose answer was lost
 * (the API server died) waits for the next API server and is sent to it again with its requestId.
 */
class Load {
  private api: Promise<ApiProcess>;
  private resume: ((api: ApiProcess) => void) | undefined;
  private stopped = false;
  private drivers: Promise<void>[] = [];
  /** Ops sent again after their answer was lost. */
  resent = 0;

  constructor(
    private readonly clients: ModelClient[],
    api: ApiProcess,
  ) {
    this.api = Promise.resolve(api);
  }

  start(): void {
    this.stopped = false;
    this.drivers = this.clients.map((c) => this.drive(c));
  }

  /** From now on, an op whose answer is lost waits for `resumeWith`. Call before killing the server. */
  hold(): void {
    this.api = new Promise((resolve) => {
      this.resume = resolve;
    });
  }

  resumeWith(api: ApiProcess): void {
    this.resume?.(api);
    this.api = Promise.resolve(api);
  }

  /** Stops sending new ops; resolves once every op in doubt is settled. */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.drivers);
  }

  private async drive(c: ModelClient): Promise<void> {
    while (c.unexpected.length === 0) {
      if (c.inDoubt) {
        await sleep(100);
        const api = await this.api;
        c.writer = c.writer.transport === 'rest' ? restWriter(api.http) : grpcWriter(api.grpc);
        this.resent++;
        await c.resolveInDoubt(RETRIES);
      } else if (this.stopped) return;
      else await c.run({ ops: 1, retries: RETRIES });
    }
  }
}

interface Verdict {
  lost: string[];
  extra: string[];
  duplicates: string[];
}

/** Keys listed more than once. */
function repeated(keys: readonly string[]): string[] {
  const seen = new Set<string>();
  return keys.filter((k) => {
    if (seen.has(k)) return true;
    seen.add(k);
    return false;
  });
}

/** The announced changes that no acknowledged op accounts for (each op accounts for one). */
function overApplied(applied: readonly string[], acked: readonly string[]): string[] {
  const left = new Map<string, number>();
  for (const a of acked) left.set(a, (left.get(a) ?? 0) + 1);
  const over: string[] = [];
  for (const e of applied) {
    const n = left.get(e) ?? 0;
    if (n > 0) left.set(e, n - 1);
    else over.push(e);
  }
  return over;
}

/** The clients' model against the API server's lists and the agent's tables, with the load stopped. */
async function compare(
  rig: Rig,
  api: ApiProcess,
  clients: readonly ModelClient[],
  sentinels: readonly bigint[],
  series: { events: readonly Applied[]; ackedFrom: readonly number[] },
): Promise<Verdict> {
  const verdict: Verdict = { lost: [], extra: [], duplicates: [] };
  const agent = rig.agentClient();
  for (const device of DEVICES) {
    const expected = new Set(clients.filter((c) => c.spec.device === device).flatMap((c) => c.expected()));
    if (device === 'vdpa0')
      for (const key of mappingKeys(
        device,
        sentinels.map((iova) => ({ ...SENTINEL_PAGE, iova })),
      ))
        expected.add(key);
    for (const [where, keys] of [
      ['API server', await desiredTable(api, device)],
      ['agent', await agentTable(agent, device)],
    ] as const) {
      const held = new Set(keys);
      verdict.lost.push(...[...expected].filter((k) => !held.has(k)).map((k) => `${k} (${where})`));
      verdict.extra.push(...keys.filter((k) => !expected.has(k)).map((k) => `${k} (${where})`));
      verdict.duplicates.push(...repeated(keys).map((k) => `${k} listed twice (${where})`));
    }
  }
  clients.forEach((c, i) => {
    const over = overApplied(c.appliedChanges(series.events), c.ackedChanges(series.ackedFrom[i]));
    verdict.duplicates.push(...over.map((e) => `${c.spec.name}: ${e} applied once more than acknowledged`));
  });
  return verdict;
}

interface SeriesFigures {
  name: string;
  kills: number;
  acked: number;
  retried: number;
  resent: number;
  recoveries: number[];
  took: number;
  verdict: Verdict;
}

function summary(f: SeriesFigures): string {
  const { lost, extra, duplicates } = f.verdict;
  return (
    `series ${f.name}: ${f.kills} kills, ${f.acked} ops acknowledged, ${lost.length} lost, ${extra.length} extra, ` +
    `${duplicates.length} duplicates; ${f.retried} refusals retried, ${f.resent} ops resent after a lost answer; ` +
    `recovery median ${secs(percentile(f.recoveries, 0.5))}, max ${secs(Math.max(...f.recoveries))}; ` +
    `took ${secs(f.took)}`
  );
}

const USAGE = 'usage: npm run soak -- [--kills N] [--scale S] [--max-minutes M] [--seed N]';

async function main(): Promise<number> {
  let opts: Options;
  try {
    opts = parseOptions(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`soak: ${(err as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const began = performance.now();
  const cleanups: (() => unknown)[] = [];
  const cleanUp = async () => {
    for (const fn of cleanups.splice(0)) await fn();
  };
  const watchdog = setTimeout(() => {
    process.stdout.write(`soak stopped: the time limit of ${opts.maxMinutes} min ran out\n`);
    void cleanUp().finally(() => process.exit(2));
  }, opts.maxMinutes * 60_000);
  watchdog.unref();
  for (const signal of ['SIGINT', 'SIGTERM'] as const)
    process.once(signal, () => void cleanUp().finally(() => process.exit(130)));

  try {
    const rig = createRig({ after: (fn) => cleanups.push(fn) }, 'soak');
    let agent: Proc = await rig.startAgent();
    let api = await rig.startApi();
    const created = await api.http('POST', '/v1/memory', { id: MEMORY, size: '0x1000000' });
    if (created.status !== 201) throw new Error(`creating ${MEMORY}: ${created.status}`);
    const between = Math.ceil(10 * opts.scale);
    const slots = Math.min(200, Math.ceil(24 * opts.scale));
    const clients = mapUnmapFleet(api, { memory: MEMORY, slots, seed: opts.seed * 1000 });
    const load = new Load(clients, api);
    const sentinels: bigint[] = [];
    const watch = async (on: ApiProcess) => {
      const w = await watchApplied(on, {
        device: 'vdpa0',
        memory: MEMORY,
        sentinelBase: SENTINEL_BASE + BigInt(sentinels.length) * 0x2000n,
      });
      sentinels.push(...w.sentinels);
      cleanups.push(() => w.close());
      return w;
    };
    process.stdout.write(
      `soak: ${clients.length} clients (REST and gRPC, map/unmap on ${DEVICES.join(' and ')}, ${slots} slots each), ` +
        `${opts.kills} agent SIGKILLs then ${opts.kills} API server SIGKILLs, ` +
        `at least ${between} ops per client between kills; seed ${opts.seed}\n`,
    );

    /** Waits until every client has `n` more ops acknowledged than in `from`. */
    const progress = async (from: number[], n: number) => {
      for (let waited = 0; waited < PROGRESS_MS; waited += 20) {
        const stuck = clients.find((c) => c.unexpected.length > 0);
        if (stuck) throw new Error(`${stuck.spec.name}: unexpected answer: ${stuck.unexpected[0]}`);
        if (clients.every((c, i) => c.acked.length >= from[i]! + n)) return;
        await sleep(20);
      }
      throw new Error(`the clients made no progress in ${PROGRESS_MS / 1000} s`);
    };

    /** `kill` kills one process, waits until every device is ready again and returns a new API server. */
    const series = async (
      name: string,
      kill: () => Promise<ApiProcess | undefined>,
    ): Promise<SeriesFigures> => {
      const started = performance.now();
      const ackedFrom = clients.map((c) => c.acked.length);
      const retriedFrom = clients.reduce((n, c) => n + c.retried.length, 0);
      const resentFrom = load.resent;
      const watches = [await watch(api)];
      const recoveries: number[] = [];
      load.start();
      for (let k = 1; k <= opts.kills; k++) {
        await progress(
          clients.map((c) => c.acked.length),
          between,
        );
        const killedAt = performance.now();
        const fresh = await kill();
        recoveries.push(performance.now() - killedAt);
        // A new API server is watched before any client may write to it.
        if (fresh) {
          watches.push(await watch(fresh));
          load.resumeWith(fresh);
        }
        const acked = clients.reduce((n, c) => n + c.acked.length, 0);
        process.stdout.write(
          `${name} SIGKILL ${k}/${opts.kills}: every device ready again ${secs(recoveries.at(-1)!)} after the kill; ` +
            `${acked} ops acknowledged so far\n`,
        );
      }
      await load.stop();
      const unexpected = clients.flatMap((c) => c.unexpected.map((u) => `${c.spec.name}: ${u}`));
      if (unexpected.length > 0) throw new Error(`unexpected answers:\n${unexpected.join('\n')}`);
      const events = watches.flatMap((w) => w.events);
      const verdict = await compare(rig, api, clients, sentinels, { events, ackedFrom });
      return {
        name,
        kills: opts.kills,
        acked: clients.reduce((n, c, i) => n + c.acked.length - ackedFrom[i]!, 0),
        retried: clients.reduce((n, c) => n + c.retried.length, 0) - retriedFrom,
        resent: load.resent - resentFrom,
        recoveries,
        took: performance.now() - started,
        verdict,
      };
    };

    const figures: SeriesFigures[] = [];
    figures.push(
      await series('agent', async () => {
        await agent.kill('SIGKILL');
        // The API server must have seen the agent go before a new one may come.
        for (let i = 0; i < 600 && (await api.http('GET', '/readyz')).status !== 503; i++) await sleep(50);
        agent = await rig.startAgent();
        await api.untilReady();
        return undefined;
      }),
    );
    process.stdout.write(`${summary(figures[0]!)}\n`);
    figures.push(
      await series('api', async () => {
        load.hold();
        await api.kill('SIGKILL');
        api = await rig.startApi();
        return api;
      }),
    );
    process.stdout.write(`${summary(figures[1]!)}\n`);

    const problems = figures.flatMap((f) => [...f.verdict.lost, ...f.verdict.extra, ...f.verdict.duplicates]);
    const total = (pick: (v: Verdict) => string[]) => figures.reduce((n, f) => n + pick(f.verdict).length, 0);
    const verdict =
      `${total((v) => v.lost)} lost, ${total((v) => v.extra)} extra, ${total((v) => v.duplicates)} duplicates ` +
      `over ${2 * opts.kills} kills in ${secs(performance.now() - began)}`;
    if (problems.length === 0) {
      process.stdout.write(`soak passed: ${verdict}\n`);
      return 0;
    }
    process.stdout.write(`soak FAILED: ${verdict}\n${problems.slice(0, 50).join('\n')}\n`);
    return 1;
  } catch (err) {
    process.stdout.write(`soak FAILED: ${(err as Error).stack ?? err}\n`);
    return 1;
  } finally {
    clearTimeout(watchdog);
    await cleanUp();
  }
}

process.exitCode = await main();
