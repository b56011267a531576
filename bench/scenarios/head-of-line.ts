/**
 * Scenario 8: head-of-line across devices. Small maps (one 4 KiB Map over gRPC at a time) on vdpa1
 * while another device is busy, against the same small maps on an idle service, alternating. Busy:
 * - vdpa0 (platform IOMMU) is set a 65,536-region table (one PUT memtable over REST: JSON parse,
 *   planner, one apply at the agent, journal), the mappings then cleared again;
 * - the same table set over gRPC (protobuf decode instead of the JSON parse);
 * - vdpa2 (on-chip IOMMU, every set_map push takes PUSH_DELAY_MS) is set a small table: a slow
 *   parent, which the agent waits out;
 * - at the agent alone (its protocol, no API server): one Apply of 65,536 UPDATEs to agent0 while
 *   one-op Applies go to agent1, against the same one-op Applies alone (agent0 and agent1 are
 *   devices the API server leaves alone);
 * - at the state store alone (src/state, its own directory): the commit of a 65,536-mapping table
 *   of vdpa0 (then the one clearing it) while vdpa1 commits one mapping and its sequence number at
 *   a time, as its queue commits a Map, against the same small commits alone;
 * - what isolation would read: the same REST table set on vdpa3 through a second API server, in a
 *   worker thread of this process (its own heap and event loop) on the same agent, and on vdpa4
 *   through a third one whose thread runs at nice 19 (head-of-line-worker.ts). The first is what
 *   one device's work kept off the heap and event loop of another's would read; the second adds
 *   a lower CPU priority for the bulk work.
 * The latencies of every round are pooled; p50 and p99 beside the idle ones. Bulk work gives way to
 * small requests (src/sys/next-turn.ts bulkTurn), so the REST table's own time beside the small
 * maps is also measured, against the same table alone: the price of giving way. Real API server, real
 * agent process, both on the same 2 cores as the client. The API server runs in this process, so
 * the busy request's own client work is kept off this event loop: its body is encoded (to bytes)
 * before the clock starts and its answer is read but neither decoded nor parsed.
 */
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Worker } from 'node:worker_threads';
import { Client, credentials } from '@grpc/grpc-js';
import { AgentClient } from '../../src/agent/client.ts';
import { DEFAULT_LIMITS } from '../../src/api/parse.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import type { Change } from '../../src/state/desired.ts';
import { StateStore } from '../../src/state/store.ts';
import { MAPD_PACKAGE, packageDefinition } from '../../services/api/proto.ts';
import {
  apiConfig,
  grpcClients,
  rest,
  spawnAgent,
  startReadyApi,
  tempDir,
} from '../../test/integration/api-harness.ts';
import type { WorkerApiData } from './head-of-line-worker.ts';
import { alternate, type BenchContext, compare, median, percentiles, scaled } from '../harness.ts';

const ROUNDS = 3;
const PAGE = 0x1000;
const PUSH_DELAY_MS = 500;
const SMALL_BASE = 0x4000_0000;
const hex = (n: number) => `0x${n.toString(16)}`;
/** The niceness of the bulk worker thread in its lower-priority case (the lowest there is). */
const BULK_NICE = 19;

/** An API server in a worker thread (head-of-line-worker.ts); its REST address and its stop. */
async function apiInWorker(data: WorkerApiData): Promise<{ restAddress: string; stop: () => Promise<void> }> {
  const entry = new URL('./head-of-line-worker.ts', import.meta.url).href;
  // A worker does not inherit tsx's loader: it registers it, then imports the TypeScript entry.
  const worker = new Worker(
    `import('tsx/esm/api').then((tsx) => { tsx.register(); return import(${JSON.stringify(entry)}); })`,
    { eval: true, workerData: data },
  );
  const message = () =>
    new Promise<unknown>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
  const restAddress = String(await message());
  return {
    restAddress,
    async stop() {
      worker.postMessage('stop');
      await message();
      await worker.terminate();
    },
  };
}

/** Times `one(i)`, one call after another, until `busy` settles (at least `min` calls); then awaits it. */
async function timedWhile(
  busy: Promise<unknown> | undefined,
  min: number,
  one: (i: number) => Promise<void>,
): Promise<number[]> {
  let done = busy === undefined;
  void busy?.finally(() => {
    done = true;
  });
  const ms: number[] = [];
  for (let i = 0; (!done || i < min) && i < 100_000; i++) {
    const start = performance.now();
    await one(i);
    ms.push(performance.now() - start);
  }
  await busy;
  return ms;
}

export async function benchHeadOfLine(ctx: BenchContext): Promise<void> {
  const regions = scaled(ctx, 65_536, 256);
  const idleMaps = scaled(ctx, 200, 20);
  const dir = tempDir('bench-hol');
  const workers: { stop: () => Promise<void> }[] = [];
  const agent = await spawnAgent(dir, [
    'sim:vdpa0',
    'sim:vdpa1,iommu=onchip',
    `sim:vdpa2,iommu=onchip,pushDelayMs=${PUSH_DELAY_MS}`,
    'sim:agent0',
    'sim:agent1,iommu=onchip',
    'sim:vdpa3',
    'sim:vdpa4',
  ]);
  try {
    const limits = { ...DEFAULT_LIMITS, bodyLimit: Math.max(DEFAULT_LIMITS.bodyLimit, 128 * regions) };
    const api = await startReadyApi(apiConfig(dir, path.join(dir, 'agent.sock'), { limits }));
    const call = rest(api.restAddress);
    const grpc = grpcClients(api.grpcAddress);
    const raw = new Client(api.grpcAddress, credentials.createInsecure(), {
      'grpc.max_receive_message_length': -1,
    });
    const agentClient = new AgentClient({ socketPath: agent.socket });
    const { store } = await StateStore.open({ dir: path.join(dir, 'store-only') });
    try {
      await agentClient.connect();
      const expect = async (method: string, url: string, body?: unknown) => {
        const res = await call(method, url, body);
        if (res.status >= 300) throw new Error(`${method} ${url}: ${res.status} ${JSON.stringify(res.body)}`);
      };
      const memorySize = hex(Math.max(64 << 20, 2 * regions * PAGE));
      await expect('POST', '/v1/memory', { id: 'ram0', size: memorySize });
      // Each worker's API server registers a memory of its own at the agent.
      const inWorker = async (name: string, nice?: number) => {
        const worker = await apiInWorker({
          dir: path.join(dir, name),
          socket: agent.socket,
          bodyLimit: limits.bodyLimit,
          memory: { id: name, size: memorySize },
          ...(nice === undefined ? {} : { nice }),
        });
        workers.push(worker);
        return worker.restAddress;
      };
      const isolated = await inWorker('isolated');
      const isolatedNiced = await inWorker('isolated-niced', BULK_NICE);
      const regionsOf = (n: number, memory = 'ram0') =>
        Array.from({ length: n }, (_, k) => ({
          iova: hex(2 * k * PAGE),
          size: hex(PAGE),
          memory,
          offset: hex(k * PAGE),
        }));
      const table = (n: number, memory?: string) =>
        Buffer.from(JSON.stringify({ regions: regionsOf(n, memory) }));
      /**
       * PUT memtable with a body encoded already; the answer's status only. node:http writes the
       * bytes as they are (fetch would copy the 6.5 MB body on this event loop first).
       */
      const putTable = (device: string, body: Buffer | string, restAddress = api.restAddress) =>
        new Promise<void>((resolve, reject) => {
          const req = http.request(
            `${restAddress}/v1/devices/${device}/memtable`,
            { method: 'PUT', headers: { 'content-type': 'application/json' } },
            (res) => {
              const head: Buffer[] = [];
              // Read, not decoded: the client's work is not what is measured.
              res.on('data', (chunk: Buffer) => {
                if (res.statusCode !== 200 && head.length < 8) head.push(chunk);
              });
              res.on('error', reject);
              res.on('end', () => {
                if (res.statusCode === 200) resolve();
                else {
                  const text = Buffer.concat(head).toString().slice(0, 500);
                  reject(new Error(`PUT memtable ${device}: ${res.statusCode} ${text}`));
                }
              });
            },
          );
          req.on('error', reject);
          req.end(body);
        });
      const big = table(regions);
      const slow = table(16);
      // gRPC SetMemTable with the request encoded already and the answer left undecoded.
      const mappingService = packageDefinition[`${MAPD_PACKAGE}.MappingService`] as unknown as Record<
        string,
        { path: string; requestSerialize: (message: object) => Buffer }
      >;
      const setMemTable = mappingService['SetMemTable']!;
      const bigGrpc = setMemTable.requestSerialize({ device: 'vdpa0', regions: regionsOf(regions) });
      const grpcTable = (request: Buffer) =>
        new Promise<void>((resolve, reject) => {
          raw.makeUnaryRequest(
            setMemTable.path,
            (b: Buffer) => b,
            (b: Buffer) => b,
            request,
            (err) => (err ? reject(err) : resolve()),
          );
        });

      /** Small maps on vdpa1 one after another until `busy` settles (at least `min` of them). */
      const smallMaps = async (busy: Promise<unknown> | undefined, min: number): Promise<number[]> => {
        const ms = await timedWhile(busy, min, async (i) => {
          await grpc.mapping('map', {
            device: 'vdpa1',
            iova: hex(SMALL_BASE + 2 * i * PAGE),
            size: hex(PAGE),
            memory: 'ram0',
            offset: hex(i * PAGE),
          });
        });
        await grpc.mapping('unmap', {
          device: 'vdpa1',
          iova: hex(SMALL_BASE),
          size: hex(2 * ms.length * PAGE),
        });
        return ms;
      };
      /** How long the REST table on vdpa0 took, beside small maps and alone (ms per round). */
      const tableMs = { beside: [] as number[], alone: [] as number[] };
      const timed = async (p: Promise<void>, into: number[]) => {
        const start = performance.now();
        await p;
        into.push(performance.now() - start);
      };
      const busyWith =
        (device: string, body: Buffer, restAddress = api.restAddress, times?: number[]) =>
        async () => {
          const table = putTable(device, body, restAddress);
          const ms = await smallMaps(times ? timed(table, times) : table, 1);
          await putTable(device, '{"regions":[]}', restAddress);
          return ms;
        };
      const tableAlone = async () => {
        await timed(putTable('vdpa0', big), tableMs.alone);
        await putTable('vdpa0', '{"regions":[]}');
        return [];
      };
      const busyWithGrpc = async () => {
        const ms = await smallMaps(grpcTable(bigGrpc), 1);
        await putTable('vdpa0', '{"regions":[]}');
        return ms;
      };

      // At the agent alone: the memory is registered there by the API server already.
      const update = (k: number, base = 0n): IotlbOp => ({
        type: 'update',
        asid: 0,
        iova: base + BigInt(2 * k * PAGE),
        size: BigInt(PAGE),
        memory: 'ram0',
        offset: BigInt(k * PAGE),
        perm: 'rw',
      });
      const bigApply = Array.from({ length: regions }, (_, k) => update(k));
      const smallApplies = async (busy: Promise<unknown> | undefined, min: number): Promise<number[]> => {
        const ms = await timedWhile(busy, min, async (i) => {
          const [r] = (await agentClient.apply('agent1', [update(i, BigInt(SMALL_BASE))])).results;
          if (!r?.ok) throw new Error(`agent1 refused a small apply: ${JSON.stringify(r)}`);
        });
        await agentClient.apply('agent1', [
          { type: 'invalidate', asid: 0, iova: BigInt(SMALL_BASE), size: BigInt(2 * ms.length * PAGE) },
        ]);
        return ms;
      };
      const agentBusy = async () => {
        const ms = await smallApplies(agentClient.apply('agent0', bigApply), 1);
        await agentClient.apply('agent0', [
          { type: 'invalidate', asid: 0, iova: 0n, size: BigInt(2 * regions * PAGE) },
        ]);
        return ms;
      };

      // At the state store alone: the changes are made before the clock starts.
      const pageAt = (device: string, iova: bigint): Change => ({
        t: 'mapping.put',
        device,
        mapping: { asid: 0, iova, size: BigInt(PAGE), memory: 'ram0', offset: 0n, perm: 'rw' },
      });
      const tableCommit: Change[] = Array.from({ length: regions }, (_, k) =>
        pageAt('vdpa0', BigInt(2 * k * PAGE)),
      );
      const clearCommit: Change[] = Array.from({ length: regions }, (_, k) => ({
        t: 'mapping.delete',
        device: 'vdpa0',
        asid: 0,
        iova: BigInt(2 * k * PAGE),
      }));
      let storeSequence = 1n;
      const smallCommits = async (busy: Promise<unknown> | undefined, min: number): Promise<number[]> => {
        const ms = await timedWhile(busy, min, async (i) => {
          storeSequence++;
          await store.commit([
            pageAt('vdpa1', BigInt(SMALL_BASE + 2 * i * PAGE)),
            { t: 'sequence', device: 'vdpa1', next: storeSequence },
          ]);
        });
        await store.commit(
          ms.map((_, i) => ({
            t: 'mapping.delete',
            device: 'vdpa1',
            asid: 0,
            iova: BigInt(SMALL_BASE + 2 * i * PAGE),
          })),
        );
        return ms;
      };
      const storeBusy = async () => [
        ...(await smallCommits(store.commit(tableCommit), 1)),
        ...(await smallCommits(store.commit(clearCommit), 1)),
      ];

      const samples = await alternate(ROUNDS, {
        idle: () => smallMaps(undefined, idleMaps),
        bigTable: busyWith('vdpa0', big, api.restAddress, tableMs.beside),
        bigTableAlone: tableAlone,
        bigTableGrpc: busyWithGrpc,
        slowSetMap: busyWith('vdpa2', slow),
        isolatedTable: busyWith('vdpa3', table(regions, 'isolated'), isolated),
        isolatedTableNiced: busyWith('vdpa4', table(regions, 'isolated-niced'), isolatedNiced),
        agentIdle: () => smallApplies(undefined, idleMaps),
        agentBigApply: agentBusy,
        storeIdle: () => smallCommits(undefined, idleMaps),
        storeBigCommit: storeBusy,
      });
      const cases = [
        {
          key: 'bigTable',
          idle: 'idle',
          label: `small maps on vdpa1 during a ${regions.toLocaleString('en-US')}-region table on vdpa0`,
        },
        {
          key: 'bigTableGrpc',
          idle: 'idle',
          label: `small maps on vdpa1 during a ${regions.toLocaleString('en-US')}-region table on vdpa0 over gRPC`,
        },
        {
          key: 'slowSetMap',
          idle: 'idle',
          label: `small maps on vdpa1 during a slow set_map (${PUSH_DELAY_MS} ms per push) on vdpa2`,
        },
        {
          key: 'isolatedTable',
          idle: 'idle',
          label: `small maps on vdpa1 during the same table on vdpa3 of an API server in a worker thread`,
        },
        {
          key: 'isolatedTableNiced',
          idle: 'idle',
          label: `small maps on vdpa1 during the same table on vdpa4 of an API server in a worker thread at nice ${BULK_NICE}`,
        },
        {
          key: 'agentBigApply',
          idle: 'agentIdle',
          label: `agent only: 1-op Applies to agent1 during a ${regions.toLocaleString('en-US')}-op Apply to agent0`,
        },
        {
          key: 'storeBigCommit',
          idle: 'storeIdle',
          label: `store only: 1-mapping commits of vdpa1 during a ${regions.toLocaleString('en-US')}-mapping commit of vdpa0`,
        },
      ] as const;
      // What giving way costs the table (src/sys/next-turn.ts): it runs slower while they come.
      compare(
        ctx,
        {
          scenario: 'head-of-line',
          case: `the ${regions.toLocaleString('en-US')}-region table on vdpa0 itself, while small maps run on vdpa1`,
          metric: 'time',
          value: median(tableMs.beside),
          unit: 'ms',
        },
        'the same table alone',
        median(tableMs.alone),
      );
      for (const { key, idle: idleKey, label } of cases) {
        const all = samples[key].flat();
        const busy = percentiles(all);
        const idle = percentiles(samples[idleKey].flat());
        const note = `${all.length} measured`;
        for (const q of ['p50', 'p99'] as const) {
          compare(
            ctx,
            {
              scenario: 'head-of-line',
              case: label,
              metric: `${q} latency`,
              value: busy[q],
              unit: 'ms',
              note,
            },
            `idle ${q}`,
            idle[q],
          );
        }
      }
    } finally {
      await store.close();
      agentClient.close();
      raw.close();
      grpc.close();
      await api.stop();
    }
  } finally {
    for (const worker of workers) await worker.stop();
    await agent.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
