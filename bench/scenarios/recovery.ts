/**
 * Scenario 7: recovery, with 10k mappings desired on a device.
 *
 * - Agent SIGKILL (the device loses every mapping) and a new agent on the same socket: time until
 *   /readyz says every device is ready again (memory re-registered, the device reconciled). Its
 *   floor, measured in the same rounds: the new agent's start (spawn -> "agent serving") plus one
 *   raw apply of the same 10k UPDATEs straight at a new agent, as the first apply that agent
 *   makes (AgentClient.apply from a client of the bench, to an agent spawned for it in a directory
 *   of its own). The first apply of a process runs its code before V8 has optimised it, and the
 *   reconciliation's apply is always a new agent's first: a raw apply at an agent that has applied
 *   before (the emptied device of the running agent) is shown beside it, as what that costs. The
 *   part after the agent serves (which includes the API server's reconnect) and the part after the
 *   API server is connected again (vdpa_mapd_agent_up 1: listing, memory, reconciliation) are
 *   beside the new agent's raw apply alone.
 * - API server restart (the in-process server stopped, a new one started on the same state dir
 *   against the same agent): time from its start until /readyz is 200. The device still holds its
 *   table, so this is a reconcile of a device that already matches. Floor: one set-mem-table of
 *   the same mappings to the emptied device of a running API server.
 *
 * The sides alternate round by round (harness.ts `alternate`).
 */
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { AgentClient } from '../../src/agent/client.ts';
import { DEFAULT_LIMITS } from '../../src/api/parse.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { startApiServer } from '../../services/api/main.ts';
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
  // The same mappings as the agent gets them (the API's default perm is rw).
  const updates: IotlbOp[] = regions.map((_r, k) => ({
    type: 'update',
    asid: 0,
    iova: BigInt(BASE + 2 * k * PAGE),
    size: BigInt(PAGE),
    memory: 'ram0',
    offset: BigInt(k * PAGE),
    perm: 'rw',
  }));
  const invalidates: IotlbOp[] = updates.map((op) => ({
    type: 'invalidate',
    asid: 0,
    iova: op.iova,
    size: op.size,
  }));
  const dir = tempDir('bench-recovery');
  const socket = path.join(dir, 'agent.sock');
  // Room for the whole table in one request at any BENCH_SCALE.
  const limits = { ...DEFAULT_LIMITS, bodyLimit: Math.max(DEFAULT_LIMITS.bodyLimit, 256 * n) };
  const config = apiConfig(dir, socket, { limits });
  let agent = await spawnAgent(dir);
  try {
    let api = await startReadyApi(config);
    try {
      const http = (method: string, url: string, body?: unknown) => rest(api.restAddress)(method, url, body);
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

      /** The emptied device: one raw apply at the agent, then one set-mem-table through the API. */
      const fresh = async () => {
        await expect(200, 'PUT', memtable, { regions: [] });
        const client = new AgentClient({ socketPath: socket });
        let rawApply: number;
        try {
          await client.connect();
          const start = performance.now();
          const { results } = await client.apply(DEVICE, updates);
          rawApply = (performance.now() - start) / 1000;
          if (!results.every((r) => r.ok)) throw new Error('the raw apply was refused');
          // Empty again, as the API server believes it is.
          const undone = await client.apply(DEVICE, invalidates);
          if (!undone.results.every((r) => r.ok)) throw new Error('undoing the raw apply was refused');
        } finally {
          client.close();
        }
        const start = performance.now();
        const answer = await expect(200, 'PUT', memtable, { regions });
        const setMemTable = (performance.now() - start) / 1000;
        if (answer.mapped.length !== n) throw new Error(`set-mem-table mapped ${answer.mapped.length}`);
        return { rawApply, setMemTable };
      };
      /** A new agent's first apply: the same UPDATEs to its own memory and device. */
      const newAgentApply = async () => {
        const own = tempDir('bench-recovery-new');
        const newAgent = await spawnAgent(own);
        const client = new AgentClient({ socketPath: newAgent.socket });
        try {
          await client.connect();
          await client.registerMemory({ id: 'ram0', size: BigInt(Math.max(64 << 20, n * PAGE)) });
          const start = performance.now();
          const { results } = await client.apply(DEVICE, updates);
          const seconds = (performance.now() - start) / 1000;
          if (!results.every((r) => r.ok)) throw new Error("the new agent's raw apply was refused");
          return seconds;
        } finally {
          client.close();
          await newAgent.stop();
          fs.rmSync(own, { recursive: true, force: true });
        }
      };
      const agentRestart = async () => {
        const start = performance.now();
        await agent.kill();
        // Ready before the API server has seen the loss would mean nothing: wait for it to notice.
        await until(async () => !(await ready()), 'the API server noticed the agent was gone');
        const spawned = performance.now();
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
          agentStart: (serving - spawned) / 1000,
          fromKill: (end - start) / 1000,
          fromServing: (end - serving) / 1000,
          fromReconnect: (end - reconnected) / 1000,
        };
      };
      const apiRestart = async () => {
        await api.stop();
        const start = performance.now();
        api = await startApiServer(config);
        await until(ready, 'the new API server was ready');
        const seconds = (performance.now() - start) / 1000;
        const { device } = await expect(200, 'GET', `/v1/devices/${DEVICE}`);
        if (!device.ready || Number(device.mappedEntries) !== n)
          throw new Error(`not ready after the restart: ${JSON.stringify(device)}`);
        return seconds;
      };
      const figures = await alternate(ROUNDS, { agentRestart, fresh, apiRestart, newAgentApply });
      const restarts = figures.agentRestart;
      const raw = figures.newAgentApply;
      const label = `${n.toLocaleString('en-US')} mappings desired`;
      const row = (metric: string, value: number, baselineName: string, baseline: number) =>
        compare(ctx, { scenario: 'recovery', case: label, metric, value, unit: 's' }, baselineName, baseline);
      row(
        'agent SIGKILL -> every device ready',
        median(restarts.map((f) => f.fromKill)),
        'agent start + one raw apply of the same mappings at a new agent',
        median(restarts.map((f, i) => f.agentStart + raw[i]!)),
      );
      row(
        "one raw apply of the same mappings, a new agent's first",
        median(raw),
        'one raw apply of the same mappings at an agent that applied before',
        median(figures.fresh.map((f) => f.rawApply)),
      );
      const rawName = "one raw apply of the same mappings, a new agent's first";
      row(
        'new agent serving -> every device ready',
        median(restarts.map((f) => f.fromServing)),
        rawName,
        median(raw),
      );
      row(
        'API server reconnected -> every device ready',
        median(restarts.map((f) => f.fromReconnect)),
        rawName,
        median(raw),
      );
      row(
        'API server restart -> ready',
        median(figures.apiRestart),
        'one set-mem-table of the same mappings, clean device',
        median(figures.fresh.map((f) => f.setMemTable)),
      );
    } finally {
      await api.stop();
    }
  } finally {
    await agent.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
