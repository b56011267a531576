/**
 * Per-device quotas against the real agent and API server: every write kind is refused with
 * QUOTA_EXCEEDED (HTTP 409, gRPC RESOURCE_EXHAUSTED) naming the quota and the device, nothing
 * reaches the agent, concurrent requests cannot overshoot together, and a device over a lowered
 * quota can still shrink.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import type { QuotaConfig } from '../../src/queue/quota.ts';
import type { RunningApiServer } from '../../services/api/main.ts';
import {
  type Agent,
  apiConfig,
  grpcClients,
  grpcFails,
  type Http,
  rest,
  spawnAgent,
  startReadyApi,
  tempDir,
} from './api-harness.ts';

const MiB = 1024 * 1024;
const hex = (n: number) => `0x${n.toString(16)}`;
/** vdpa0: 4 MiB and 8 entries (the defaults); vdpa1: 2 entries, bytes unlimited. */
const QUOTAS: QuotaConfig = {
  defaults: { maxBytes: BigInt(4 * MiB), maxEntries: 8 },
  devices: new Map([['vdpa1', { maxBytes: undefined, maxEntries: 2 }]]),
};

describe('quotas', () => {
  let dir: string;
  let agent: Agent;
  let api: RunningApiServer;
  let http: ReturnType<typeof rest>;

  const start = async (quotas: QuotaConfig) => {
    api = await startReadyApi(apiConfig(dir, agent.socket, { quotas }));
    http = rest(api.restAddress);
  };
  const map = (device: string, iova: number, size: number) =>
    http('POST', `/v1/devices/${device}/mappings`, { iova: hex(iova), size: hex(size), memory: 'ram' });
  const mappings = async (device = 'vdpa0') =>
    (await http('GET', `/v1/devices/${device}/mappings`)).body.mappings;
  const written = async (device = 'vdpa0') =>
    (await http('GET', `/v1/devices/${device}`)).body.device.counters.messagesWritten as number;
  const refused = (res: Http, quota: string, device = 'vdpa0', field?: string) => {
    assert.equal(res.status, 409, JSON.stringify(res.body));
    assert.equal(res.headers.get('retry-after'), null);
    assert.equal(res.body.error.code, 'QUOTA_EXCEEDED');
    assert.match(res.body.error.message, new RegExp(`device ${device}: quota ${quota} `));
    assert.equal(res.body.error.field, field);
  };

  before(async () => {
    dir = tempDir('quota');
    agent = await spawnAgent(dir);
    await start(QUOTAS);
    assert.equal((await http('POST', '/v1/memory', { id: 'ram', size: hex(64 * MiB) })).status, 201);
  });
  after(async () => {
    await api?.stop();
    await agent?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('map, batch, set-mem-table and its dry run are refused past max-bytes; nothing reaches the agent', async () => {
    assert.equal((await map('vdpa0', 0x1000_0000, 3 * MiB)).status, 201);
    const before = await mappings();
    const messages = await written();

    refused(await map('vdpa0', 0x2000_0000, 2 * MiB), 'max-bytes');
    assert.equal(await written(), messages);
    const batch = await http('POST', '/v1/devices/vdpa0:batch', {
      ops: [
        { op: 'map', iova: '0x30000000', size: hex(MiB), memory: 'ram' },
        { op: 'map', iova: '0x40000000', size: '0x1000', memory: 'ram' },
      ],
    });
    assert.equal(batch.status, 200);
    assert.equal(batch.body.results[0].ok, true);
    assert.equal(batch.body.results[1].error.code, 'QUOTA_EXCEEDED');
    assert.equal(batch.body.results[1].error.field, 'ops[1]');
    assert.match(batch.body.results[1].error.message, /device vdpa0: quota max-bytes 0x400000 exceeded/);
    const unmapped = await http('POST', '/v1/devices/vdpa0/mappings:unmap', {
      iova: '0x30000000',
      size: hex(MiB),
    });
    assert.equal(unmapped.status, 200);
    const afterBatch = await written();
    const atomic = await http('POST', '/v1/devices/vdpa0:batch', {
      atomic: true,
      ops: [{ op: 'map', iova: '0x30000000', size: hex(2 * MiB), memory: 'ram' }],
    });
    refused(atomic, 'max-bytes');
    assert.deepEqual(await mappings(), before);

    const regions = (sizes: number[]) =>
      sizes.map((size, i) => ({ iova: hex(0x5000_0000 + i * 0x1000_0000), size: hex(size), memory: 'ram' }));
    refused(
      await http('PUT', '/v1/devices/vdpa0/memtable', { regions: regions([4 * MiB, 4096]) }),
      'max-bytes',
    );
    refused(
      await http('PUT', '/v1/devices/vdpa0/memtable?dryRun=true', { regions: regions([3 * MiB, 2 * MiB]) }),
      'max-bytes',
    );
    assert.equal(await written(), afterBatch);
    assert.deepEqual(await mappings(), before);

    // Replacing 3 MiB by exactly 4 MiB fits: the quota is on the table a request leaves.
    const exact = await http('PUT', '/v1/devices/vdpa0/memtable', { regions: regions([3 * MiB, MiB]) });
    assert.equal(exact.status, 200, JSON.stringify(exact.body));
    assert.equal((await http('GET', '/v1/devices/vdpa0')).body.device.mappedBytes, hex(4 * MiB));
  });

  test('max-entries, per-device override; over gRPC the status is RESOURCE_EXHAUSTED', async () => {
    assert.equal((await map('vdpa1', 0x1000_0000, 4096)).status, 201);
    assert.equal((await map('vdpa1', 0x1001_0000, 64 * MiB - 0x1_0000)).status, 201); // bytes unlimited
    refused(await map('vdpa1', 0x2000_0000, 4096), 'max-entries', 'vdpa1');
    const grpc = grpcClients(api.grpcAddress);
    try {
      const f = await grpcFails(
        grpc.mapping('map', { device: 'vdpa1', iova: '0x30000000', size: '0x1000', memory: 'ram' }),
      );
      assert.equal(f.code, status.RESOURCE_EXHAUSTED, f.details);
      assert.equal(f.metadata.get('error-code')[0], 'QUOTA_EXCEEDED');
      assert.equal(f.metadata.get('retry-after-ms').length, 0);
      assert.match(f.details, /device vdpa1: quota max-entries 2 exceeded/);
    } finally {
      grpc.close();
    }
    assert.equal((await mappings('vdpa1')).length, 2);
  });

  test('concurrent maps cannot overshoot together; submitted ones fail at flush', async () => {
    const unmapAll = await http('PUT', '/v1/devices/vdpa0/memtable', { regions: [] });
    assert.equal(unmapAll.status, 200);
    const answers = await Promise.all(
      Array.from({ length: 12 }, (_, i) => map('vdpa0', 0x1000_0000 + i * 0x100_0000, MiB)),
    );
    const statuses = answers.map((a) => a.status).sort();
    assert.deepEqual(statuses, [...Array(4).fill(201), ...Array(8).fill(409)]);
    const device = (await http('GET', '/v1/devices/vdpa0')).body.device;
    assert.equal(device.mappedBytes, hex(4 * MiB));
    assert.equal(device.mappedEntries, 4);

    const submitted = await http('POST', '/v1/devices/vdpa0:submit', {
      ops: [{ op: 'map', iova: '0x70000000', size: '0x1000', memory: 'ram' }],
    });
    assert.equal(submitted.status, 202);
    const flushed = await http('POST', '/v1/devices/vdpa0:flush');
    assert.equal(flushed.status, 200);
    assert.equal(flushed.body.failures.length, 1);
    assert.equal(flushed.body.failures[0].error.code, 'QUOTA_EXCEEDED');
  });

  test('with a quota lowered below what is mapped, the device can shrink but not grow', async () => {
    await api.stop();
    await start({ defaults: { maxBytes: BigInt(MiB) }, devices: new Map() });
    refused(await map('vdpa0', 0x7000_0000, 4096), 'max-bytes');
    const list = await mappings();
    assert.equal(list.length, 4);
    const shrink = await http('POST', '/v1/devices/vdpa0/mappings:unmap', {
      iova: list[0].iova,
      size: list[0].size,
    });
    assert.equal(shrink.status, 200);
    // Still over (3 MiB > 1 MiB) but smaller: allowed.
    const table = list.slice(1, 3).map(({ asid: _, ...r }: Record<string, unknown>) => r);
    assert.equal((await http('PUT', '/v1/devices/vdpa0/memtable', { regions: table })).status, 200);
    assert.equal((await mappings()).length, 2);
  });
});
