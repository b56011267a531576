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
import { type GrpcFailure, grpcFails, startStack } from './api-harness.ts';

type Stack = Awaited<ReturnType<typeof startStack>>;

const MiB = 1024 * 1024;
const hex = (n: number) => `0x${n.toString(16)}`;

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
    s = await startStack('grpc');
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
    const events: { kind: string; mapping: { iova: string } }[] = [];
    const stream = s.grpc.watch({ device: 'vdpa1' });
    stream.on('data', (e: { kind: string; mapping: { iova: string } }) => events.push(e));
    stream.on('error', () => {});
    // The stream is live once the server has subscribed; a first change proves it, bounded.
    let warm = 0;
    for (let i = 0; events.length === 0 && i < 50; i++) {
      const iova = hex(0x10000000 + i * 0x1000);
      await s.grpc.mapping('map', { device: 'vdpa1', iova, size: '0x1000', memory: 'ram0' });
      warm++;
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.ok(events.length > 0, 'watch stream saw nothing');

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

    for (let i = 0; events.length < warm + 3 && i < 100; i++) await new Promise((r) => setTimeout(r, 20));
    stream.cancel();
    const seen = events.slice(-3).map((e) => [e.kind, e.mapping.iova]);
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
