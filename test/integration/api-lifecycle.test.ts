/**
 * Group commit seen from outside (concurrent maps to the on-chip device cost fewer set_map pushes
 * than requests) and durability across an API server restart with the agent still running.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { apiConfig, grpcClients, rest, startReadyApi, startStack } from './api-harness.ts';

type Stack = Awaited<ReturnType<typeof startStack>>;

const hex = (n: number) => `0x${n.toString(16)}`;

describe('API server lifecycle', () => {
  let s: Stack;

  before(async () => {
    s = await startStack('lifecycle');
    assert.equal((await s.http('POST', '/v1/memory', { id: 'ram0', size: hex(64 << 20) })).status, 201);
  });
  after(async () => {
    await s?.stop();
  });

  test('concurrent maps to the on-chip device coalesce into fewer set_map pushes', async () => {
    const pushes = async () => {
      const res = await s.http('GET', '/v1/devices/vdpa1');
      assert.equal(res.status, 200);
      return res.body.device.counters.setMapPushes as number;
    };
    const requests = 64;
    const before = await pushes();
    const answers = await Promise.all(
      Array.from({ length: requests }, (_, i) =>
        i % 2 === 0
          ? s.http('POST', '/v1/devices/vdpa1/mappings', {
              iova: hex(0x100000 + i * 0x1000),
              size: '0x1000',
              memory: 'ram0',
              offset: hex(i * 0x1000),
            })
          : s.grpc
              .mapping('map', {
                device: 'vdpa1',
                iova: hex(0x100000 + i * 0x1000),
                size: '0x1000',
                memory: 'ram0',
                offset: hex(i * 0x1000),
              })
              .then(() => ({ status: 201 })),
      ),
    );
    assert.ok(answers.every((a) => a.status === 201));
    const spent = (await pushes()) - before;
    assert.ok(spent >= 1, 'no push recorded');
    assert.ok(spent < requests, `${requests} concurrent maps cost ${spent} set_map pushes`);
    const listed = await s.http('GET', '/v1/devices/vdpa1/mappings');
    assert.equal(listed.body.mappings.length, requests);
  });

  test('a restarted API server (same state dir, same agent) keeps every acknowledged mapping', async () => {
    const acked: string[] = [];
    for (let i = 0; i < 8; i++) {
      const iova = hex(0x10000000 + i * 0x200000);
      const res = await s.http('POST', '/v1/devices/vdpa0/mappings', {
        iova,
        size: '0x100000',
        memory: 'ram0',
      });
      assert.equal(res.status, 201);
      acked.push(iova);
    }
    await s.grpc.mapping('submit', {
      device: 'vdpa0',
      ops: [{ op: 'map', iova: '0x20000000', size: '0x1000', memory: 'ram0' }],
    });
    await s.grpc.mapping('flush', { device: 'vdpa0' });
    acked.push('0x20000000');

    const snapshot = async (http: ReturnType<typeof rest>) => ({
      vdpa0: (await http('GET', '/v1/devices/vdpa0/mappings')).body.mappings,
      vdpa1: (await http('GET', '/v1/devices/vdpa1/mappings')).body.mappings,
      memory: (await http('GET', '/v1/memory')).body.memory.map((m: { id: string }) => m.id),
    });
    const before = await snapshot(s.http);
    assert.deepEqual(
      before.vdpa0.map((m: { iova: string }) => m.iova),
      acked,
    );

    // An open watch stream does not hold the shutdown up: it is ended.
    const watch = s.grpc.watch({});
    const ended = new Promise<void>((resolve) => {
      watch.on('end', resolve);
      watch.on('error', () => resolve());
    });
    watch.on('data', () => {});
    await s.api.stop();
    await ended;
    s.grpc.close();
    const config = apiConfig(s.dir, s.agent.socket);
    s.api = await startReadyApi(config);
    s.http = rest(s.api.restAddress);
    s.grpc = grpcClients(s.api.grpcAddress);

    assert.deepEqual(await snapshot(s.http), before);
    const device = (await s.http('GET', '/v1/devices/vdpa0')).body.device;
    assert.equal(device.mappedEntries, acked.length);
    const { mappings } = await s.grpc.mapping('listMappings', { device: 'vdpa1' });
    assert.equal(mappings.length, before.vdpa1.length);
  });
});
