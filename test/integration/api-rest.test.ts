/**
 * Every REST route against the real agent (simulated devices) and the real API server.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { until } from './agent-harness.ts';
import { startStack } from './api-harness.ts';

type Stack = Awaited<ReturnType<typeof startStack>>;

const MiB = 1024 * 1024;

const hex = (n: number) => `0x${n.toString(16)}`;

describe('REST API', () => {
  let s: Stack;
  const mappings = async (device = 'vdpa0', query = '') => {
    const res = await s.http('GET', `/v1/devices/${device}/mappings${query}`);
    assert.equal(res.status, 200);
    return res.body.mappings as Record<string, unknown>[];
  };

  before(async () => {
    s = await startStack('rest');
  });
  after(async () => {
    await s?.stop();
  });

  test('health, readiness, OpenAPI', async () => {
    assert.deepEqual((await s.http('GET', '/healthz')).body, { status: 'ok' });
    assert.equal((await s.http('GET', '/readyz')).status, 200);
    const doc = await s.http('GET', '/docs/json');
    assert.equal(doc.status, 200);
    assert.match(doc.body.openapi, /^3\./);
    for (const p of [
      '/v1/devices',
      '/v1/devices/{device}',
      '/v1/devices/{device}/mappings',
      '/v1/devices/{device}/mappings:unmap',
      '/v1/devices/{device}/memtable',
      '/v1/devices/{device}:batch',
      '/v1/devices/{device}:submit',
      '/v1/devices/{device}:flush',
      '/v1/memory',
      '/v1/memory/{id}',
    ]) {
      assert.ok(doc.body.paths[p], `OpenAPI lacks ${p}`);
    }
  });

  test('devices: list and get', async () => {
    const list = await s.http('GET', '/v1/devices');
    assert.equal(list.status, 200);
    const ids = list.body.devices.map((d: { id: string }) => d.id).sort();
    assert.deepEqual(ids, ['vdpa0', 'vdpa1']);
    const one = await s.http('GET', '/v1/devices/vdpa1');
    assert.equal(one.status, 200);
    assert.equal(one.body.device.id, 'vdpa1');
    assert.equal(one.body.device.iommu, 'onchip');
    assert.match(one.body.device.iovaRange.last, /^0x[0-9a-f]+$/);
    assert.equal(typeof one.body.device.counters.setMapPushes, 'number');
    const missing = await s.http('GET', '/v1/devices/nope');
    assert.equal(missing.status, 404);
    assert.equal(missing.body.error.code, 'NOT_FOUND');
  });

  test('memory: create, open by path, refuse a path, list', async () => {
    const created = await s.http('POST', '/v1/memory', { id: 'ram0', size: hex(64 * MiB) });
    assert.equal(created.status, 201);
    assert.equal(created.body.memory.id, 'ram0');
    assert.equal(created.body.memory.size, '0x4000000');

    const dup = await s.http('POST', '/v1/memory', { id: 'ram0', size: '4096' });
    assert.equal(dup.status, 409);
    assert.equal(dup.body.error.code, 'ALREADY_EXISTS');

    const file = path.join(s.agent.sharedDir, 'guest.mem');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 2 * MiB);
    const opened = await s.http('POST', '/v1/memory', { id: 'file0', path: file });
    assert.equal(opened.status, 201, JSON.stringify(opened.body));
    assert.equal(opened.body.memory.size, hex(2 * MiB));

    const refused = await s.http('POST', '/v1/memory', { id: 'etc', path: '/etc/hostname' });
    assert.equal(refused.status, 403);
    assert.equal(refused.body.error.code, 'PERMISSION_DENIED');
    assert.ok(refused.body.error.message.length > 0);

    // Missing under the allowed roots: 404. Outside them: 403 whatever is there, and the answer
    // says nothing of where a link leads, whether the target exists, or the agent's pid.
    const absent = await s.http('POST', '/v1/memory', {
      id: 'gone',
      path: path.join(s.agent.sharedDir, 'no.mem'),
    });
    assert.equal(absent.status, 404, JSON.stringify(absent.body));
    assert.equal(absent.body.error.code, 'NOT_FOUND');
    assert.equal(absent.body.error.field, 'path');
    const links = { proc: '/proc/self/status', dangling: '/etc/no-such-file', passwd: '/etc/passwd' };
    for (const [name, target] of Object.entries(links))
      fs.symlinkSync(target, path.join(s.agent.sharedDir, name));
    const messages = new Set<string>();
    for (const p of [
      '/etc/no-such-file',
      '/etc/hostname',
      ...Object.keys(links).map((n) => path.join(s.agent.sharedDir, n)),
    ]) {
      const res = await s.http('POST', '/v1/memory', { id: 'leak', path: p });
      assert.equal(res.status, 403, `${p}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error.field, 'path');
      messages.add(res.body.error.message.replace(p, 'P'));
    }
    assert.deepEqual(
      [...messages],
      ['registering memory leak: P is not a regular file under the allowed roots'],
    );
    // The agent's own log keeps the whole story.
    await until('the agent to log the symlink', () =>
      s.agent.log.some((l) => l.includes('resolves to /etc/passwd')),
    );

    const list = await s.http('GET', '/v1/memory');
    assert.equal(list.status, 200);
    assert.deepEqual(list.body.memory.map((m: { id: string }) => m.id).sort(), ['file0', 'ram0']);
  });

  test('map, list in IOVA order, overlap, unknown device and memory', async () => {
    const second = await s.http('POST', '/v1/devices/vdpa0/mappings', {
      iova: '4194304',
      size: '2097152',
      memory: 'ram0',
      offset: hex(2 * MiB),
      perm: 'ro',
    });
    assert.equal(second.status, 201, JSON.stringify(second.body));
    assert.deepEqual(second.body.mapping, {
      iova: '0x400000',
      size: '0x200000',
      memory: 'ram0',
      offset: '0x200000',
      perm: 'ro',
      asid: 0,
    });
    const first = await s.http('POST', '/v1/devices/vdpa0/mappings', {
      iova: '0x100000',
      size: '0x200000',
      memory: 'ram0',
      offset: '0x0',
      perm: 'rw',
      asid: 0,
      requestId: 'map-first',
    });
    assert.equal(first.status, 201);
    assert.deepEqual(
      (await mappings()).map((m) => m.iova),
      ['0x100000', '0x400000'],
    );
    assert.deepEqual(await mappings('vdpa0', '?asid=0'), await mappings());

    const overlap = await s.http('POST', '/v1/devices/vdpa0/mappings', {
      iova: '0x200000',
      size: '0x1000',
      memory: 'ram0',
    });
    assert.equal(overlap.status, 409);
    assert.equal(overlap.body.error.code, 'CONFLICT');

    const noDevice = await s.http('POST', '/v1/devices/nope/mappings', {
      iova: '0',
      size: '4096',
      memory: 'ram0',
    });
    assert.equal(noDevice.status, 404);
    const noMemory = await s.http('POST', '/v1/devices/vdpa0/mappings', {
      iova: '0x10000000',
      size: '4096',
      memory: 'ghost',
    });
    assert.equal(noMemory.status, 404);
    assert.equal(noMemory.body.error.field, 'memory');
    assert.equal((await mappings()).length, 2);
  });

  test('unmap splits a partly covered mapping unless exact', async () => {
    const base = { memory: 'ram0', size: hex(3 * MiB), offset: hex(8 * MiB) };
    assert.equal(
      (await s.http('POST', '/v1/devices/vdpa0/mappings', { ...base, iova: hex(16 * MiB) })).status,
      201,
    );
    const before = await mappings();

    const exact = await s.http('POST', '/v1/devices/vdpa0/mappings:unmap', {
      iova: hex(17 * MiB),
      size: hex(MiB),
      exact: true,
    });
    assert.equal(exact.status, 409);
    assert.equal(exact.body.error.code, 'CONFLICT');
    assert.deepEqual(await mappings(), before);

    const split = await s.http('POST', '/v1/devices/vdpa0/mappings:unmap', {
      iova: hex(17 * MiB),
      size: hex(MiB),
      asid: 0,
    });
    assert.equal(split.status, 200, JSON.stringify(split.body));
    assert.equal(split.body.removed.length, 1);
    assert.deepEqual(
      split.body.remapped.map((m: { iova: string; size: string; offset: string }) => [
        m.iova,
        m.size,
        m.offset,
      ]),
      [
        [hex(16 * MiB), hex(MiB), hex(8 * MiB)],
        [hex(18 * MiB), hex(MiB), hex(10 * MiB)],
      ],
    );
    const after = (await mappings()).map((m) => m.iova);
    assert.deepEqual(after, ['0x100000', '0x400000', hex(16 * MiB), hex(18 * MiB)]);

    const whole = await s.http('POST', '/v1/devices/vdpa0/mappings:unmap', {
      iova: hex(16 * MiB),
      size: hex(3 * MiB),
    });
    assert.equal(whole.status, 200);
    assert.equal(whole.body.matched, 2);
    assert.deepEqual(
      (await mappings()).map((m) => m.iova),
      ['0x100000', '0x400000'],
    );

    const nothing = await s.http('POST', '/v1/devices/vdpa0/mappings:unmap', {
      iova: hex(16 * MiB),
      size: hex(3 * MiB),
    });
    assert.equal(nothing.status, 200);
    assert.deepEqual(nothing.body, { matched: 0, removed: [], remapped: [], ops: [] });
    const none = await s.http('POST', '/v1/devices/vdpa0/mappings:unmap', {
      iova: hex(16 * MiB),
      size: hex(3 * MiB),
      exact: true,
    });
    assert.equal(none.status, 404, JSON.stringify(none.body));
    assert.equal(none.body.error.code, 'NOT_FOUND');
    assert.equal(none.body.error.field, 'iova');
    assert.match(none.body.error.message, /\[0x1000000, 0x1300000\)/);
    const inBatch = await s.http('POST', '/v1/devices/vdpa0:batch', {
      ops: [{ op: 'unmap', iova: hex(16 * MiB), size: hex(MiB), exact: true }],
    });
    assert.equal(inBatch.body.results[0].error.code, 'NOT_FOUND');
    assert.equal(inBatch.body.results[0].error.field, 'ops[0].iova');
    assert.deepEqual(
      (await mappings()).map((m) => m.iova),
      ['0x100000', '0x400000'],
    );
  });

  test('memtable: dry run changes nothing, then apply', async () => {
    const regions = [
      { iova: '0x100000', size: '0x200000', memory: 'ram0', offset: '0x0', perm: 'rw' },
      { iova: '0x800000', size: '0x100000', memory: 'file0', offset: '0x0', perm: 'wo' },
    ];
    const before = await mappings();
    const dry = await s.http('PUT', '/v1/devices/vdpa0/memtable?dryRun=true', { asid: 0, regions });
    assert.equal(dry.status, 200, JSON.stringify(dry.body));
    assert.equal(dry.body.dryRun, true);
    assert.equal(dry.body.unchanged, 1);
    assert.deepEqual(
      dry.body.ops.map((o: { type: string; iova: string }) => [o.type, o.iova]),
      [
        ['invalidate', '0x400000'],
        ['update', '0x800000'],
      ],
    );
    assert.deepEqual(await mappings(), before);

    const applied = await s.http('PUT', '/v1/devices/vdpa0/memtable', { asid: 0, regions });
    assert.equal(applied.status, 200);
    assert.equal(applied.body.dryRun, false);
    assert.equal(applied.body.ops.length, 2);
    assert.deepEqual(
      await mappings(),
      regions.map((r) => ({ ...r, asid: 0 })),
    );
  });

  test('batch: a result per op; atomic failure changes nothing', async () => {
    const ok = await s.http('POST', '/v1/devices/vdpa0:batch', {
      ops: [
        { op: 'map', iova: '0x2000000', size: '0x1000', memory: 'ram0' },
        { op: 'map', iova: '0x2001000', size: '0x1000', memory: 'ram0', offset: '0x1000' },
        { op: 'unmap', iova: '0x2000000', size: '0x1000' },
        { op: 'map', iova: '0x100000', size: '0x1000', memory: 'ram0' },
      ],
    });
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.equal(ok.body.atomic, false);
    assert.deepEqual(
      ok.body.results.map((r: { ok: boolean }) => r.ok),
      [true, true, true, false],
    );
    assert.equal(ok.body.results[3].error.code, 'CONFLICT');
    const before = await mappings();
    assert.ok(before.some((m) => m.iova === '0x2001000'));

    const atomic = await s.http('POST', '/v1/devices/vdpa0:batch', {
      atomic: true,
      ops: [
        { op: 'map', iova: '0x3000000', size: '0x1000', memory: 'ram0' },
        { op: 'map', iova: '0x100000', size: '0x1000', memory: 'ram0' },
      ],
    });
    if (atomic.status === 200) {
      assert.equal(atomic.body.committed, false);
    } else {
      assert.equal(atomic.status, 409);
    }
    assert.deepEqual(await mappings(), before);
  });

  test('submit then flush', async () => {
    const first = await s.http('POST', '/v1/devices/vdpa1:submit', {
      ops: [{ op: 'map', iova: '0x100000', size: '0x1000', memory: 'ram0' }],
    });
    assert.equal(first.status, 202, JSON.stringify(first.body));
    assert.match(first.body.sequence, /^[0-9]+$/);
    const bad = await s.http('POST', '/v1/devices/vdpa1:submit', {
      ops: [{ op: 'map', iova: '0x100000', size: '0x1000', memory: 'ram0' }],
    });
    assert.equal(bad.status, 202);
    assert.ok(BigInt(bad.body.sequence) > BigInt(first.body.sequence));

    const flushed = await s.http('POST', '/v1/devices/vdpa1:flush');
    assert.equal(flushed.status, 200, JSON.stringify(flushed.body));
    assert.ok(BigInt(flushed.body.sequence) >= BigInt(bad.body.sequence));
    assert.equal(flushed.body.failures.length, 1);
    assert.equal(flushed.body.failures[0].sequence, bad.body.sequence);
    assert.equal(flushed.body.failures[0].error.code, 'CONFLICT');
    assert.deepEqual(
      (await mappings('vdpa1')).map((m) => m.iova),
      ['0x100000'],
    );
    // An empty JSON body is no body.
    const again = await fetch(`${s.api.restAddress}/v1/devices/vdpa1:flush`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
    });
    assert.equal(again.status, 200);
    assert.deepEqual(((await again.json()) as { failures: unknown[] }).failures, []);
  });

  test('bad inputs: status, field, nothing changed', async () => {
    const before = await mappings();
    const MAP = { iova: '0x40000000', size: '0x1000', memory: 'ram0' };
    const cases: [string, string, unknown, number, string | undefined][] = [
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, iova: '-1' }, 400, 'iova'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, iova: '0x10000000000000000' }, 400, 'iova'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, iova: ' 0x1000' }, 400, 'iova'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, iova: '+4096' }, 400, 'iova'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, iova: 4096.5 }, 400, 'iova'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, iova: 2 ** 60 }, 400, 'iova'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, size: '0' }, 400, 'size'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, iova: '0xffffffffffffffff', size: '2' }, 400, 'size'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, size: '0xg' }, 400, 'size'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, offset: '1.5' }, 400, 'offset'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, perm: 'x' }, 400, 'perm'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, asid: 2 ** 32 }, 400, 'asid'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, memory: '../etc' }, 400, 'memory'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, requestId: 'x'.repeat(129) }, 400, 'requestId'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, colour: 'red' }, 400, 'colour'],
      ['POST', '/v1/devices/vdpa0/mappings', [MAP], 400, 'body'],
      ['POST', '/v1/devices/vdpa0/mappings', '{"iova": "0x1000",', 400, 'body'],
      ['POST', '/v1/devices/vdpa0/mappings', '{"__proto__": {"x": 1}, "iova": "1"}', 400, 'body'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, constructor: { prototype: {} } }, 400, 'body'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, memory: 'ghost' }, 404, 'memory'],
      ['POST', '/v1/devices/vdpa0/mappings', { ...MAP, iova: '0x100000' }, 409, 'iova'],
      ['POST', '/v1/devices/bad$id/mappings', MAP, 400, 'device'],
      ['POST', '/v1/devices/vdpa0/mappings:unmap', { iova: '0x100000', size: '0' }, 400, 'size'],
      [
        'POST',
        '/v1/devices/vdpa0/mappings:unmap',
        { iova: '0x100000', size: '1', exact: 'yes' },
        400,
        'exact',
      ],
      ['PUT', '/v1/devices/vdpa0/memtable', { regions: [MAP, { ...MAP, size: '' }] }, 400, 'regions[1].size'],
      ['PUT', '/v1/devices/vdpa0/memtable', { regions: [{ ...MAP, asid: 0 }] }, 400, 'regions[0].asid'],
      ['PUT', '/v1/devices/vdpa0/memtable?dryRun=maybe', { regions: [] }, 400, 'dryRun'],
      ['PUT', '/v1/devices/vdpa0/memtable?force=1', { regions: [] }, 400, 'force'],
      ['POST', '/v1/devices/vdpa0:batch', { ops: [{ op: 'map', ...MAP }, { op: 'zap' }] }, 400, 'ops[1].op'],
      [
        'POST',
        '/v1/devices/vdpa0:batch',
        {
          ops: [
            { op: 'map', ...MAP },
            { op: 'map', iova: '1', size: '1' },
          ],
        },
        400,
        'ops[1].memory',
      ],
      ['POST', '/v1/devices/vdpa0:batch', { ops: {} }, 400, 'ops'],
      [
        'POST',
        '/v1/devices/vdpa0:batch',
        { ops: Array.from({ length: 4097 }, () => ({ op: 'unmap', iova: '1', size: '1' })) },
        400,
        'ops',
      ],
      ['POST', '/v1/devices/vdpa0:submit', { ops: [{ op: 'map', ...MAP, memory: 7 }] }, 400, 'ops[0].memory'],
      ['GET', '/v1/devices/vdpa0/mappings?asid=-1', undefined, 400, 'asid'],
      ['POST', '/v1/memory', { id: 'x', size: '1', path: '/dev/shm/x' }, 400, 'size'],
      ['POST', '/v1/memory', { id: 'a b', size: '4096' }, 400, 'id'],
      ['POST', '/v1/devices/vdpa0/mappings', 'x'.repeat(1024 * 1024 + 1), 400, 'body'],
    ];
    for (const [method, url, body, status, field] of cases) {
      const res = await s.http(method, url, body);
      const label = `${method} ${url} ${JSON.stringify(body)?.slice(0, 80)}`;
      assert.equal(res.status, status, `${label}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error.field, field, label);
      assert.equal(typeof res.body.error.message, 'string');
    }
    assert.deepEqual(await mappings(), before);
    assert.equal(({} as Record<string, unknown>).x, undefined);
  });

  test('media type, methods, duplicate keys and ids are refused by name', async () => {
    const before = await mappings();
    const url = `${s.api.restAddress}/v1/devices/vdpa0/mappings`;
    const MAP = JSON.stringify({ iova: '0x50000000', size: '0x1000', memory: 'ram0' });
    for (const headers of [
      {},
      { 'content-type': 'text/plain' },
      { 'content-type': 'application/xml' },
    ] as Record<string, string>[]) {
      const res = await fetch(url, { method: 'POST', headers, body: MAP });
      const body = (await res.json()) as { error: { code: string; message: string; field: string } };
      assert.equal(res.status, 415, JSON.stringify({ headers, body }));
      assert.equal(body.error.code, 'UNSUPPORTED_MEDIA_TYPE');
      assert.equal(body.error.field, 'body');
      assert.match(body.error.message, /application\/json/);
    }
    // A body-less POST needs no content type.
    assert.equal(
      (await fetch(`${s.api.restAddress}/v1/devices/vdpa0:flush`, { method: 'POST' })).status,
      200,
    );

    for (const [method, path, allow] of [
      ['GET', '/v1/devices/vdpa0:batch', 'POST'],
      ['DELETE', '/v1/devices/vdpa0/mappings', 'GET, POST, HEAD'],
      ['GET', '/v1/devices/vdpa0/mappings:unmap', 'POST'],
      ['POST', '/v1/devices/vdpa0/memtable', 'PUT'],
      ['PATCH', '/v1/memory/ram0', 'DELETE'],
      ['POST', '/healthz', 'GET, HEAD'],
    ] as const) {
      const res = await s.http(method, path);
      assert.equal(res.status, 405, `${method} ${path}: ${JSON.stringify(res.body)}`);
      assert.equal(res.headers.get('allow'), allow, `${method} ${path}`);
      assert.equal(res.body.error.code, 'METHOD_NOT_ALLOWED');
    }
    assert.equal((await s.http('GET', '/v1/nowhere')).status, 404);

    const duplicates: [string, string][] = [
      ['{"iova":"0x50000000","size":"0x1000","memory":"nope","memory":"ram0"}', 'memory'],
      ['{"iova":"0x50000000","size":"0x1000","memory":"ram0","\\u006demory":"ram0"}', 'memory'],
      [
        '{"ops":[{"op":"map","iova":"0x50000000","size":"0x1000","memory":"ram0"},{"op":"unmap","iova":"1","size":"1","size":"2"}]}',
        'ops[1].size',
      ],
    ];
    for (const [body, field] of duplicates) {
      const target = body.startsWith('{"ops"') ? '/v1/devices/vdpa0:batch' : '/v1/devices/vdpa0/mappings';
      const res = await s.http('POST', target, body);
      assert.equal(res.status, 400, `${body}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error.code, 'INVALID_ARGUMENT');
      assert.equal(res.body.error.field, field);
      assert.match(res.body.error.message, /given twice/);
    }
    // Equal values in different objects are no duplicates.
    const fine = await s.http('POST', '/v1/devices/vdpa0:batch', {
      ops: [
        { op: 'map', iova: '0x50000000', size: '0x1000', memory: 'ram0' },
        { op: 'unmap', iova: '0x50000000', size: '0x1000' },
      ],
    });
    assert.equal(fine.status, 200, JSON.stringify(fine.body));

    for (const id of ['...', '.', '..', '-', '-rf', '.hidden', '_x']) {
      const res = await s.http('POST', '/v1/memory', { id, size: '4096' });
      assert.equal(res.status, 400, `${id}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error.field, 'id');
      // fetch resolves the dot segments `.` and `..` itself.
      if (id !== '.' && id !== '..') {
        assert.equal((await s.http('GET', `/v1/devices/${id}/mappings`)).status, 400, id);
      }
    }
    assert.deepEqual(await mappings(), before);
  });

  test('unregister memory: refused while mapped', async () => {
    const busy = await s.http('DELETE', '/v1/memory/file0');
    assert.equal(busy.status, 409);
    assert.equal(busy.body.error.code, 'FAILED_PRECONDITION');
    const mapped = await mappings();
    const fileMapping = mapped.find((m) => m.memory === 'file0')!;
    const unmapped = await s.http('POST', '/v1/devices/vdpa0/mappings:unmap', {
      iova: fileMapping.iova,
      size: fileMapping.size,
    });
    assert.equal(unmapped.status, 200);
    const gone = await s.http('DELETE', '/v1/memory/file0');
    assert.equal(gone.status, 204);
    assert.equal((await s.http('DELETE', '/v1/memory/file0')).status, 404);
  });

  test('metrics: the exposition parses and the request histogram moves', async () => {
    const count = async () => {
      const res = await s.http('GET', '/metrics');
      assert.equal(res.status, 200);
      assert.match(res.headers.get('content-type') ?? '', /^text\/plain/);
      const text = res.body as string;
      // A value as Prometheus parses it (ParseFloat: NaN and Inf in any case; prom-client prints Nan).
      const sample =
        /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? ([0-9.e+-]+|nan|[+-]?inf)$/i;
      for (const line of text.split('\n')) {
        if (line === '' || line.startsWith('# HELP ') || line.startsWith('# TYPE ')) continue;
        assert.match(line, sample, `bad exposition line: ${line}`);
      }
      const re =
        /^vdpa_mapd_request_duration_seconds_count\{[^}]*transport="rest"[^}]*method="ListDevices"[^}]*code="OK"[^}]*\} ([0-9]+)$/m;
      return Number(re.exec(text)?.[1] ?? 0);
    };
    const before = await count();
    assert.equal((await s.http('GET', '/v1/devices')).status, 200);
    assert.equal(await count(), before + 1);
  });
});
