/**
 * Scenario 7: recovery. With 10k mappings desired on a device, the agent is killed (SIGKILL: the
 * device loses every mapping) and a new agent is started on the same socket; we time until /readyz
 * says every device is ready again (memory re-registered, the device reconciled). The
 * baseline, in the same run and alternating with it: the same 10k mappings applied as one
 * set-mem-table to the emptied device of a running agent.
 *
 * Three figures: from the kill (includes starting a new agent process), from the moment the new
 * agent serves (includes the API server's reconnect backoff), and from the moment the API server
 * is connected again (vdpa_mapd_agent_up 1: listing, memory re-registration and reconciliation).
 */
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { DEFAULT_LIMITS } from '../../src/api/parse.ts';
import { apiConfig, rest, spawnAgent, startReadyApi, tempDir } from '../../test/integration/api-harness.ts';
import { alternate, type BenchContext, compare, median, scaled } from '../harness.ts';

const ROUNDS = 5;
const DEVICE = 'vdpa0';
const PAGE = 0x1000;
const BASE = 0x100000;
const hex = (n: number) => `0x${n.toString(16)}`;

/** Polls `check` every 10 ms until it holds; fails after about 60 s. */
async function until(check: () => Promise<boolean>, what: string): Promise<void> {
  for (let i = 0; i < 6000; i++) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting until ${what}`);
}

export async function benchRecovery(ctx: BenchContext): Promise<void> {
  const n = scaled(ctx, 10_000, 50);
  const regions = Array.from({ length: n }, (_, k) => ({
    iova: hex(BASE + 2 * k * PAGE),
    size: hex(PAGE),
    memory: 'ram0',
    offset: hex(k * PAGE),
  }));
  const dir = tempDir('bench-recovery');
  let agent = await spawnAgent(dir);
  try {
    // Room for the whole table in one request at any BENCH_SCALE.
    const limits = { ...DEFAULT_LIMITS, bodyLimit: Math.max(DEFAULT_LIMITS.bodyLimit, 256 * n) };
    const api = await startReadyApi(apiConfig(dir, path.join(dir, 'agent.sock'), { limits }));
    try {
      const http = rest(api.restAddress);
      const expect = async (status: number, method: string, url: string, body?: unknown) => {
        const res = await http(method, url, body);
        if (res.status !== status)
          throw new Error(`${method} ${url}: ${res.status} ${JSON.stringify(res.body)}`);
        return res.body;
      };
      const memtable = `/v1/devices/${DEVICE}/memtable`;
      const ready = async () => (await http('GET', '/readyz')).status === 200;
      const agentUp = async () => /^vdpa_mapd_agent_up 1$/m.test((await http('GET', '/metrics')).body);
      await expect(201, 'POST', '/v1/memory', { id: 'ram0', size: hex(Math.max(64 << 20, n * PAGE)) });
      await expect(200, 'PUT', memtable, { regions });

      const fresh = async () => {
        await expect(200, 'PUT', memtable, { regions: [] });
        const start = performance.now();
        const answer = await expect(200, 'PUT', memtable, { regions });
        const seconds = (performance.now() - start) / 1000;
        if (answer.mapped.length !== n) throw new Error(`set-mem-table mapped ${answer.mapped.length}`);
        return { fromKill: seconds, fromServing: seconds, fromReconnect: seconds };
      };
      const restart = async () => {
        const start = performance.now();
        await agent.kill();
        // Ready before the API server has seen the loss would mean nothing: wait for it to notice.
        await until(async () => !(await ready()), 'the API server noticed the agent was gone');
        agent = await spawnAgent(dir);
        const serving = performance.now();
        await until(agentUp, 'the API server reached the new agent');
        const reconnected = performance.now();
        await until(ready, 'every device was ready again');
        const end = performance.now();
        const { device } = await expect(200, 'GET', `/v1/devices/${DEVICE}`);
        // The new agent's counters start at zero: these maps are the reconciliation's.
        if (!device.ready || Number(device.counters.dmaMapCalls) < n)
          throw new Error(`not recovered: ${JSON.stringify(device)}`);
        return {
          fromKill: (end - start) / 1000,
          fromServing: (end - serving) / 1000,
          fromReconnect: (end - reconnected) / 1000,
        };
      };
      const figures = await alternate(ROUNDS, { restart, fresh });
      const baseline = median(figures.fresh.map((f) => f.fromKill));
      const label = `${n.toLocaleString('en-US')} mappings desired`;
      const baselineName = 'one set-mem-table of the same mappings, clean device';
      for (const [metric, key] of [
        ['agent SIGKILL -> every device ready', 'fromKill'],
        ['new agent serving -> every device ready', 'fromServing'],
        ['API server reconnected -> every device ready', 'fromReconnect'],
      ] as const) {
        compare(
          ctx,
          {
            scenario: 'recovery',
            case: label,
            metric,
            value: median(figures.restart.map((f) => f[key])),
            unit: 's',
          },
          baselineName,
          baseline,
        );
      }
    } finally {
      await api.stop();
    }
  } finally {
    await agent.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
