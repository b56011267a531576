/**
 * Every gRPC method, health checking and server reflection, against the real agent (simulated
 * devices) and the real API server, with a grpc-js client built from the same proto.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { credentials, loadPackageDefinition, type ServiceClientConstructor, status } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { API_SERVICES, HEALTH_SERVICE } from '../../services/api/proto.ts';
import { until } from './agent-harness.ts';
import { type GrpcFailure, grpcFails, startStack } from './api-harness.ts';

type Stack = Awaited<ReturnType<typeof startStack>>;

const MiB = 1024 * 1024;
const WATCH_HISTORY = 16;
const hex = (n: number) => `0x${n.toString(16)}`;

interface WatchEvent {
  device: string;
  kind: string;
  sequence: string;
  mapping?: { iova: string };
}

function expectFailure(f: GrpcFailure, code: status, field?: string): void {
  assert.equal(f.code, code, `${status[f.code]}: ${f.details}`);
  assert.equal(f.metadata.get('field')[0], field, f.details);
  assert.ok(f.details.length > 0);
}

describe('gRPC API', () => {
  let s: Stack;
  const list = async (device = 'vdpa0') =>
    ((await s.grpc.mapping('listMappings', { device })).mappings ?? []) as Record<string, unknown>[];

  before(async () => {
    s = await startStack('grpc', { core: { watchHistory: WATCH_HISTORY } });
  });
  after(async () => {
    await s?.stop();
  });

  test('health: SERVING once ready, per service too', async () => {
    assert.deepEqual(await s.grpc.check('check', { service: '' }), { status: 'SERVING' });
    for (const name of API_SERVICES) {
      assert.deepEqual(await s.grpc.check('check', { service: name }), { status: 'SERVING' });
    }
    expectFailure(await grpcFails(s.grpc.check('check', { service: 'nope.Service' })), status.NOT_FOUND);
  });

  test('reflection lists our services and describes them', async () => {
    const require = createRequire(import.meta.url);
    const protoDir = path.resolve(path.dirname(require.resolve('@grpc/reflection')), '../proto');
    const def = loadSync('grpc/reflection/v1/reflection.proto', { includeDirs: [protoDir], keepCase: true });
    const pkg = loadPackageDefinition(def) as unknown as {
      grpc: { reflection: { v1: { ServerReflection: ServiceClientConstructor } } };
    };
    const client = new pkg.grpc.reflection.v1.ServerReflection(
      s.api.grpcAddress,
      credentials.createInsecure(),
    );
    try {
      const ask = (request: object) =>
        // biome-ignore lint/suspicious/noExplicitAny: reflection answers
        new Promise<any>((resolve, reject) => {
          const call = (
            client as unknown as { ServerReflectionInfo(): NodeJS.ReadWriteStream }
          ).ServerReflectionInfo();
          call.on('data', (answer) => {
            resolve(answer);
            call.end();
          });
          call.on('error', reject);
          call.write(request as unknown as string);
        });
      const services = await ask({ list_services: '*' });
      const names = services.list_services_response.service.map((x: { name: string }) => x.name);
      for (const name of [...API_SERVICES, HEALTH_SERVICE])
        assert.ok(names.includes(name), `${name} not listed`);
      const file = await ask({ file_containing_symbol: 'vdpa.mapd.v1.MappingService' });
      assert.ok(file.file_descriptor_response.file_descriptor_proto.length > 0);
    } finally {
      client.close();
    }
  });

  test('devices', async () => {
    const { devices } = await s.grpc.device('listDevices', {});
    assert.deepEqual(devices.map((d: { id: string }) => d.id).sort(), ['vdpa0', 'vdpa1']);
    const { device } = await s.grpc.device('getDevice', { device: 'vdpa1' });
    assert.equal(device.iommu, 'onchip');
    assert.match(device.iovaRange.last, /^0x[0-9a-f]+$/);
    expectFailure(
      await grpcFails(s.grpc.device('getDevice', { device: 'nope' })),
      status.NOT_FOUND,
      'device',
    );
    expectFailure(await grpcFails(s.grpc.device('getDevice', {})), status.INVALID_ARGUMENT, 'device');
  });

  test('memory: register, list, refuse a path', async () => {
    const { memory } = await s.grpc.mem('registerMemory', { id: 'ram0', size: hex(64 * MiB) });
    assert.equal(memory.size, '0x4000000');
    const file = path.join(s.agent.sharedDir, 'guest.mem');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 2 * MiB);
    assert.equal((await s.grpc.mem('registerMemory', { id: 'file0', path: file })).memory.id, 'file0');
    expectFailure(
      await grpcFails(s.grpc.mem('registerMemory', { id: 'etc', path: '/etc/hostname' })),
      status.PERMISSION_DENIED,
      'path',
    );
    expectFailure(
      await grpcFails(s.grpc.mem('registerMemory', { id: 'ram0', size: '4096' })),
      status.ALREADY_EXISTS,
      'id',
    );
    const all = await s.grpc.mem('listMemory', {});
    assert.deepEqual(all.memory.map((m: { id: string }) => m.id).sort(), ['file0', 'ram0']);
  });

  test('map, list, unmap with split and exact', async () => {
    const answer = await s.grpc.mapping('map', {
      device: 'vdpa0',
      iova: '1048576',
      size: '0x300000',
      memory: 'ram0',
      offset: '0x0',
      perm: 'rw',
      requestId: 'g-map-1',
    });
    assert.deepEqual(answer.mapping, {
      iova: '0x100000',
      size: '0x300000',
      memory: 'ram0',
      offset: '0x0',
      perm: 'rw',
      asid: 0,
    });
    expectFailure(
      await grpcFails(
        s.grpc.mapping('map', { device: 'vdpa0', iova: '0x200000', size: '0x1000', memory: 'ram0' }),
      ),
      status.ABORTED,
      'iova',
    );
    expectFailure(
      await grpcFails(
        s.grpc.mapping('unmap', { device: 'vdpa0', iova: '0x200000', size: '0x100000', exact: true }),
      ),
      status.ABORTED,
      'iova',
    );
    const split = await s.grpc.mapping('unmap', { device: 'vdpa0', iova: '0x200000', size: '0x100000' });
    assert.equal(split.removed.length, 1);
    assert.equal(split.remapped.length, 2);
    assert.deepEqual(
      (await list()).map((m) => [m.iova, m.size]),
      [
        ['0x100000', '0x100000'],
        ['0x300000', '0x100000'],
      ],
    );
    const asid0 = await s.grpc.mapping('listMappings', { device: 'vdpa0', asid: 0 });
    assert.equal(asid0.mappings.length, 2);
  });

  test('set-mem-table with dry run', async () => {
    const regions = [
      { iova: '0x100000', size: '0x100000', memory: 'ram0', offset: '0x0', perm: 'rw' },
      { iova: '0x800000', size: '0x200000', memory: 'file0', offset: '0x0', perm: 'ro' },
    ];
    const before = await list();
    const dry = await s.grpc.mapping('setMemTable', { device: 'vdpa0', regions, dryRun: true });
    assert.equal(dry.dryRun, true);
    assert.deepEqual(
      dry.ops.map((o: { type: string; iova: string }) => [o.type, o.iova]),
      [
        ['invalidate', '0x300000'],
        ['update', '0x800000'],
      ],
    );
    assert.deepEqual(await list(), before);
    const applied = await s.grpc.mapping('setMemTable', { device: 'vdpa0', asid: 0, regions });
    assert.equal(applied.ops.length, 2);
    assert.deepEqual(
      await list(),
      regions.map((r) => ({ ...r, asid: 0 })),
    );
    // An empty table clears the address space (proto3 sends no field for an empty repeated one).
    const cleared = await s.grpc.mapping('setMemTable', { device: 'vdpa0', regions: [] });
    assert.deepEqual(
      cleared.invalidated.map((m: { iova: string }) => m.iova),
      ['0x100000', '0x800000'],
    );
    assert.deepEqual(await list(), []);
    await s.grpc.mapping('setMemTable', { device: 'vdpa0', regions });
  });

  test('batch, submit, flush, and the watch stream sees the changes', async () => {
    const events: WatchEvent[] = [];
    const stream = s.grpc.watch({ device: 'vdpa1' });
    stream.on('data', (e: WatchEvent) => events.push(e));
    stream.on('error', () => {});
    // The stream is live from its "subscribed" event on: nothing after it is missed.
    await until('an event', () => events.length > 0);
    assert.deepEqual(Object.keys(events[0]!).sort(), ['device', 'kind', 'sequence']);
    assert.equal(events[0]!.kind, 'subscribed');
    assert.equal(events[0]!.device, 'vdpa1');

    const batch = await s.grpc.mapping('batch', {
      device: 'vdpa1',
      ops: [
        { op: 'map', iova: '0x100000', size: '0x1000', memory: 'ram0' },
        { op: 'map', iova: '0x100000', size: '0x1000', memory: 'ram0' },
        { op: 'unmap', iova: '0x100000', size: '0x1000' },
      ],
    });
    assert.deepEqual(
      batch.results.map((r: { ok?: boolean }) => r.ok === true),
      [true, false, true],
    );
    assert.equal(batch.results[1].error.code, 'CONFLICT');

    const submitted = await s.grpc.mapping('submit', {
      device: 'vdpa1',
      ops: [{ op: 'map', iova: '0x200000', size: '0x1000', memory: 'ram0' }],
    });
    assert.match(submitted.sequence, /^[0-9]+$/);
    const flushed = await s.grpc.mapping('flush', { device: 'vdpa1' });
    assert.ok(BigInt(flushed.sequence) >= BigInt(submitted.sequence));
    assert.deepEqual(flushed.failures, []);
    assert.ok((await list('vdpa1')).some((m) => m.iova === '0x200000'));

    await until('four events', () => events.length >= 4);
    stream.cancel();
    const seen = events.slice(1).map((e) => [e.kind, e.mapping?.iova]);
    assert.deepEqual(seen, [
      ['mapped', '0x100000'],
      ['unmapped', '0x100000'],
      ['mapped', '0x200000'],
    ]);
    expectFailure(
      await new Promise<GrpcFailure>((resolve) => s.grpc.watch({ device: 'nope' }).on('error', resolve)),
      status.NOT_FOUND,
      'device',
    );
  });

  test('watch: "subscribed" first, then resume after a sequence, or a clear "too old, re-list"', async () => {
    const watch = async (request: object, want: number) => {
      const events: WatchEvent[] = [];
      const stream = s.grpc.watch(request);
      stream.on('data', (e: WatchEvent) => events.push(e));
      stream.on('error', () => {});
      await until(`${want} events`, () => events.length >= want);
      stream.cancel();
      return events;
    };
    const map = (iova: number) =>
      s.grpc.mapping('map', { device: 'vdpa1', iova: hex(iova), size: '0x1000', memory: 'ram0' });
    const unmap = (iova: number, exact = false) =>
      s.grpc.mapping('unmap', { device: 'vdpa1', iova: hex(iova), size: '0x1000', exact });

    // Every device watched gets its position first.
    const all = await watch({}, 2);
    assert.deepEqual(all.map((e) => [e.device, e.kind]).sort(), [
      ['vdpa0', 'subscribed'],
      ['vdpa1', 'subscribed'],
    ]);

    const [start] = await watch({ device: 'vdpa1' }, 1);
    const base = 0x60000000;
    await map(base);
    await map(base + 0x1000);
    const unmapped = await unmap(base);
    assert.equal(unmapped.matched, 1);
    const none = await unmap(base);
    assert.equal(none.matched ?? 0, 0);
    expectFailure(await grpcFails(unmap(base, true)), status.NOT_FOUND, 'iova');

    // Resumed after the subscribed sequence: the three changes since, in order, then live ones.
    const resumed = await watch({ device: 'vdpa1', fromSequence: start!.sequence }, 4);
    assert.equal(resumed[0]!.kind, 'subscribed');
    assert.ok(BigInt(resumed[0]!.sequence) > BigInt(start!.sequence));
    assert.deepEqual(
      resumed.slice(1).map((e) => [e.kind, e.mapping?.iova]),
      [
        ['mapped', hex(base)],
        ['mapped', hex(base + 0x1000)],
        ['unmapped', hex(base)],
      ],
    );
    // From the last one seen: nothing to replay.
    const caughtUp = await watch({ device: 'vdpa1', fromSequence: resumed[3]!.sequence }, 1);
    assert.equal(caughtUp.length, 1);

    // More changes than the history keeps: the old position is too old, and says from where on.
    for (let i = 0; i < WATCH_HISTORY; i++) await map(base + 0x10000 + i * 0x1000);
    const tooOld = await new Promise<GrpcFailure>((resolve) =>
      s.grpc.watch({ device: 'vdpa1', fromSequence: start!.sequence }).on('error', resolve),
    );
    expectFailure(tooOld, status.FAILED_PRECONDITION, 'from_sequence');
    assert.match(tooOld.details, /too old, re-list.*after sequence [0-9]+/);
    await s.grpc.mapping('batch', {
      device: 'vdpa1',
      ops: Array.from({ length: WATCH_HISTORY }, (_, i) => ({
        op: 'unmap',
        iova: hex(base + 0x10000 + i * 0x1000),
        size: '0x1000',
      })),
    });

    const ahead = await new Promise<GrpcFailure>((resolve) =>
      s.grpc.watch({ device: 'vdpa1', fromSequence: '999999999' }).on('error', resolve),
    );
    expectFailure(ahead, status.INVALID_ARGUMENT, 'from_sequence');
    const everywhere = await new Promise<GrpcFailure>((resolve) =>
      s.grpc.watch({ fromSequence: '1' }).on('error', resolve),
    );
    expectFailure(everywhere, status.INVALID_ARGUMENT, 'from_sequence');
  });

  test('bad inputs: status, field metadata, nothing changed', async () => {
    const before = await list();
    const MAP = { device: 'vdpa0', iova: '0x40000000', size: '0x1000', memory: 'ram0' };
    const cases: [string, object, status, string | undefined][] = [
      ['map', { ...MAP, iova: '-1' }, status.INVALID_ARGUMENT, 'iova'],
      ['map', { ...MAP, iova: '18446744073709551616' }, status.INVALID_ARGUMENT, 'iova'],
      ['map', { ...MAP, size: '' }, status.INVALID_ARGUMENT, 'size'],
      ['map', { ...MAP, size: '0' }, status.INVALID_ARGUMENT, 'size'],
      ['map', { ...MAP, iova: '0xffffffffffffffff', size: '0x2' }, status.INVALID_ARGUMENT, 'size'],
      ['map', { ...MAP, offset: '0x' }, status.INVALID_ARGUMENT, 'offset'],
      ['map', { ...MAP, perm: 'rwx' }, status.INVALID_ARGUMENT, 'perm'],
      ['map', { ...MAP, memory: 'a/b' }, status.INVALID_ARGUMENT, 'memory'],
      ['map', { ...MAP, memory: 'ghost' }, status.NOT_FOUND, 'memory'],
      ['map', { ...MAP, device: 'ghost' }, status.NOT_FOUND, 'device'],
      ['map', { ...MAP, device: '' }, status.INVALID_ARGUMENT, 'device'],
      ['map', { ...MAP, requestId: 'r'.repeat(129) }, status.INVALID_ARGUMENT, 'requestId'],
      ['unmap', { device: 'vdpa0', iova: '0x1', size: '0' }, status.INVALID_ARGUMENT, 'size'],
      [
        'setMemTable',
        {
          device: 'vdpa0',
          regions: [
            { iova: '0', size: '1', memory: 'ram0' },
            { iova: '1', size: 'x', memory: 'm' },
          ],
        },
        status.INVALID_ARGUMENT,
        'regions[1].size',
      ],
      [
        'batch',
        { device: 'vdpa0', ops: [{ op: 'map', iova: '1', size: '1' }] },
        status.INVALID_ARGUMENT,
        'ops[0].memory',
      ],
      [
        'batch',
        { device: 'vdpa0', ops: [{ op: 'remap', iova: '1', size: '1' }] },
        status.INVALID_ARGUMENT,
        'ops[0].op',
      ],
      [
        'batch',
        { device: 'vdpa0', ops: [{ op: 'unmap', iova: '1', size: '1', memory: 'ram0' }] },
        status.INVALID_ARGUMENT,
        'ops[0].memory',
      ],
      [
        'submit',
        { device: 'vdpa0', ops: [{ op: 'map', iova: '1', size: '1', perm: 'x', memory: 'm' }] },
        status.INVALID_ARGUMENT,
        'ops[0].perm',
      ],
      ['flush', { device: 'bad id' }, status.INVALID_ARGUMENT, 'device'],
    ];
    for (const [method, request, code, field] of cases) {
      const failure = await grpcFails(s.grpc.mapping(method, request));
      assert.equal(failure.code, code, `${method} ${JSON.stringify(request)}: ${failure.details}`);
      assert.equal(failure.metadata.get('field')[0], field, `${method} ${JSON.stringify(request)}`);
    }
    expectFailure(
      await grpcFails(s.grpc.mem('registerMemory', { id: 'x', size: '1', path: '/dev/shm/x' })),
      status.INVALID_ARGUMENT,
      'size',
    );
    assert.deepEqual(await list(), before);
  });

  test('unregister memory: refused while mapped', async () => {
    expectFailure(
      await grpcFails(s.grpc.mem('unregisterMemory', { id: 'file0' })),
      status.FAILED_PRECONDITION,
      'id',
    );
    await s.grpc.mapping('unmap', { device: 'vdpa0', iova: '0x800000', size: '0x200000' });
    assert.deepEqual(await s.grpc.mem('unregisterMemory', { id: 'file0' }), {});
    const gone = await grpcFails(s.grpc.mem('unregisterMemory', { id: 'file0' }));
    assert.equal(gone.code, status.NOT_FOUND, gone.details);
  });

  test('the request histogram counts gRPC calls', async () => {
    const count = async () => {
      const text = (await s.http('GET', '/metrics')).body as string;
      const re =
        /^vdpa_mapd_request_duration_seconds_count\{[^}]*transport="grpc"[^}]*method="ListMemory"[^}]*code="OK"[^}]*\} ([0-9]+)$/m;
      return Number(re.exec(text)?.[1] ?? 0);
    };
    const before = await count();
    await s.grpc.mem('listMemory', {});
    assert.equal(await count(), before + 1);
  });
});
