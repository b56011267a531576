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
 * - the floor of isolation: the same REST table set on the vdpa0 of a second API server and agent
 *   (processes of their own, which share nothing with vdpa1's but the CPU), and the same again with
 *   those two processes at nice 19. What is left in the first is the machine's cores, not the
 *   service; the second shows what giving bulk work a lower CPU priority would add to that.
 * The latencies of every round are pooled; p50 and p99 beside the idle ones. Real API server, real
 * agent process, both on the same 2 cores as the client. The API server runs in this process, so
 * the busy request's own client work is kept off this event loop: its body is encoded (to bytes)
 * before the clock starts and its answer is read but neither decoded nor parsed.
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
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
import { createRig } from '../../test/integration/process-harness.ts';
import { alternate, type BenchContext, compare, percentiles, scaled } from '../harness.ts';

const ROUNDS = 3;
const PAGE = 0x1000;
const PUSH_DELAY_MS = 500;
const SMALL_BASE = 0x4000_0000;
const hex = (n: number) => `0x${n.toString(16)}`;
/** The niceness of the floor's second stack in its lower-priority case (the lowest there is). */
const BULK_NICE = 19;

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
  const cleanups: (() => unknown)[] = [];
  const agent = await spawnAgent(dir, [
    'sim:vdpa0',
    'sim:vdpa1,iommu=onchip',
    `sim:vdpa2,iommu=onchip,pushDelayMs=${PUSH_DELAY_MS}`,
    'sim:agent0',
    'sim:agent1,iommu=onchip',
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
      const checked = async (res: Promise<{ status: number; body: unknown }>, what: string) => {
        const { status, body } = await res;
        if (status >= 300) throw new Error(`${what}: ${status} ${JSON.stringify(body)}`);
      };
      const ram0 = { id: 'ram0', size: hex(Math.max(64 << 20, 2 * regions * PAGE)) };
      await checked(call('POST', '/v1/memory', ram0), 'POST /v1/memory');
      /** A second API server and agent, child processes holding vdpa0 only; REST base URL. */
      const separateStack = async (name: string, nice?: number): Promise<string> => {
        const rig = createRig({ after: (fn) => cleanups.push(fn) }, `bench-hol-${name}`);
        const separateAgent = await rig.startAgent(['sim:vdpa0']);
        const separateApi = await rig.startApi(['--body-limit', String(limits.bodyLimit)]);
        await checked(separateApi.http('POST', '/v1/memory', ram0), `${name}: POST /v1/memory`);
        if (nice !== undefined) {
          os.setPriority(separateAgent.pid, nice);
          os.setPriority(separateApi.proc.pid, nice);
        }
        return separateApi.restAddress;
      };
      const separate = await separateStack('separate');
      const separateNiced = await separateStack('separate-niced', BULK_NICE);
      const regionsOf = (n: number) =>
        Array.from({ length: n }, (_, k) => ({
          iova: hex(2 * k * PAGE),
          size: hex(PAGE),
          memory: 'ram0',
          offset: hex(k * PAGE),
        }));
      const table = (n: number) => Buffer.from(JSON.stringify({ regions: regionsOf(n) }));
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
      const busyWith =
        (device: string, body: Buffer, restAddress = api.restAddress) =>
        async () => {
          const ms = await smallMaps(putTable(device, body, restAddress), 1);
          await putTable(device, '{"regions":[]}', restAddress);
          return ms;
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
        bigTable: busyWith('vdpa0', big),
        bigTableGrpc: busyWithGrpc,
        slowSetMap: busyWith('vdpa2', slow),
        separateTable: busyWith('vdpa0', big, separate),
        separateTableNiced: busyWith('vdpa0', big, separateNiced),
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
          key: 'separateTable',
          idle: 'idle',
          label: `small maps on vdpa1 during the same table on another API server and agent`,
        },
        {
          key: 'separateTableNiced',
          idle: 'idle',
          label: `small maps on vdpa1 during the same table on another API server and agent at nice ${BULK_NICE}`,
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
    for (const cleanup of cleanups.reverse()) await cleanup();
    await agent.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
