import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import type { ServiceError } from '../../src/core/errors.ts';
import type { MappingEvent } from '../../src/core/types.ts';
import { type Harness, harness, mapReq, PAGE } from './core-harness.ts';

const U64_MAX = (1n << 64n) - 1n;

function refused(code: string, fields: { field?: string; errno?: string; message?: RegExp } = {}) {
  return (e: unknown) => {
    const err = e as ServiceError;
    assert.equal(err.code, code, err.message);
    if (fields.field !== undefined) assert.equal(err.field, fields.field);
    if (fields.errno !== undefined) assert.equal(err.errno, fields.errno);
    if (fields.message) assert.match(err.message, fields.message);
    return true;
  };
}

let h: Harness;
before(async () => {
  h = await harness([
    { name: 'vdpa0', iovaRange: { first: 0x1000n, last: 0xffff_ffffn } },
    { name: 'vdpa1', iommu: 'onchip', asNum: 2 },
  ]);
  await h.service.registerMemory({ id: 'm0', size: 64n * PAGE });
});
after(async () => {
  await h.cleanup();
});
beforeEach(async () => {
  for (const device of ['vdpa0', 'vdpa1']) {
    for (const asid of [0, 1]) {
      if (device === 'vdpa0' && asid === 1) continue;
      await h.service.setMemTable({ device, asid, regions: [] });
    }
  }
});

describe('map', () => {
  test('maps at the device and in the desired state', async () => {
    const r = await h.service.map(mapReq(0x100000n, 2n, 'm0', PAGE));
    assert.deepEqual(r.mapping, {
      asid: 0,
      iova: 0x100000n,
      size: 2n * PAGE,
      memory: 'm0',
      offset: PAGE,
      perm: 'rw',
    });
    assert.deepEqual(r.ops, [{ type: 'update', ...r.mapping }]);
    assert.deepEqual(h.agent.device('vdpa0').mappings(), [r.mapping]);
    assert.deepEqual(await h.service.listMappings('vdpa0'), [r.mapping]);
    // DMA through the device reaches the registered memory at the mapped offset.
    h.agent.device('vdpa0').dmaWrite(0, 0x100010n, Buffer.from('hello'));
    assert.equal(h.agent.registry.read('m0', PAGE + 0x10n, 5).toString(), 'hello');
  });

  test('precise refusals, each naming the field', async () => {
    await h.service.map(mapReq(0x100000n, 4n));
    const cases: [Parameters<typeof h.service.map>[0], ReturnType<typeof refused>][] = [
      [
        mapReq(0x102000n, 4n),
        refused('CONFLICT', {
          field: 'iova',
          errno: 'EEXIST',
          message: /overlaps .*existing mapping: asid 0 \[0x100000, 0x104000\) -> m0\+0x0 rw/,
        }),
      ],
      [{ ...mapReq(0x200000n), size: 0n }, refused('INVALID_ARGUMENT', { field: 'size', errno: 'EINVAL' })],
      [mapReq(0x0n), refused('INVALID_ARGUMENT', { field: 'iova', errno: 'EINVAL', message: /IOVA range/ })],
      [
        { ...mapReq(U64_MAX - 0xfffn, 2n), device: 'vdpa1' },
        refused('INVALID_ARGUMENT', { field: 'size', errno: 'EINVAL', message: /overflows/ }),
      ],
      [{ ...mapReq(0x200000n), asid: 1 }, refused('INVALID_ARGUMENT', { field: 'asid', errno: 'EINVAL' })],
      [
        { ...mapReq(0x200000n), perm: 'x' as never },
        refused('INVALID_ARGUMENT', { field: 'perm', errno: 'EINVAL' }),
      ],
      [mapReq(0x200000n, 1n, 'nope'), refused('NOT_FOUND', { field: 'memory' })],
      [mapReq(0x200000n, 1n, 'm0', 64n * PAGE), refused('INVALID_ARGUMENT', { field: 'offset' })],
      [mapReq(0x200000n, 2n, 'm0', 63n * PAGE), refused('INVALID_ARGUMENT', { field: 'size' })],
      [mapReq(0x200000n, 1n, 'm0', 0n, 'vdpa9'), refused('NOT_FOUND', { field: 'device' })],
      [{ ...mapReq(0x200000n), iova: 5 as never }, refused('INVALID_ARGUMENT', { field: 'iova' })],
    ];
    for (const [req, check] of cases) await assert.rejects(h.service.map(req), check);
    const before = h.agent.applies.length;
    assert.equal(h.agent.device('vdpa0').mappings().length, 1);
    assert.equal(h.agent.applies.length, before, 'nothing refused reached the device');
  });
});

describe('unmap', () => {
  test('a partly covered mapping is split: the rest is mapped again in the same apply()', async () => {
    await h.service.map(mapReq(0x100000n, 4n));
    const r = await h.service.unmap({ device: 'vdpa0', asid: 0, iova: 0x101000n, size: PAGE });
    assert.deepEqual(
      r.removed.map((m) => m.iova),
      [0x100000n],
    );
    assert.deepEqual(
      r.remapped.map((m) => [m.iova, m.size, m.offset]),
      [
        [0x100000n, PAGE, 0n],
        [0x102000n, 2n * PAGE, 2n * PAGE],
      ],
    );
    assert.deepEqual(h.agent.applies.at(-1)!.ops, r.ops);
    assert.deepEqual(h.agent.device('vdpa0').mappings(), await h.service.listMappings('vdpa0'));
  });

  test('exact refuses a split with CONFLICT; an empty range is fine', async () => {
    await h.service.map(mapReq(0x100000n, 4n));
    await assert.rejects(
      h.service.unmap({ device: 'vdpa0', asid: 0, iova: 0x101000n, size: PAGE, exact: true }),
      refused('CONFLICT', { field: 'iova' }),
    );
    const r = await h.service.unmap({ device: 'vdpa0', asid: 0, iova: 0x900000n, size: PAGE });
    assert.deepEqual(r, { removed: [], remapped: [], ops: [] });
    assert.equal((await h.service.listMappings('vdpa0')).length, 1);
  });
});

describe('set-mem-table', () => {
  const regions = [
    { iova: 0x10000n, size: 2n * PAGE, memory: 'm0', offset: 0n, perm: 'rw' as const },
    { iova: 0x20000n, size: PAGE, memory: 'm0', offset: 8n * PAGE, perm: 'ro' as const },
  ];

  test('dry run returns the plan and changes nothing; the real run sends exactly that plan', async () => {
    await h.service.map({ ...mapReq(0x10000n, 2n), device: 'vdpa1' });
    await h.service.map({ ...mapReq(0x50000n), device: 'vdpa1' });
    const applies = h.agent.applies.length;
    const dry = await h.service.setMemTable({ device: 'vdpa1', asid: 0, regions, dryRun: true });
    assert.equal(dry.dryRun, true);
    assert.equal(dry.unchanged, 1);
    assert.deepEqual(
      dry.ops.map((op) => `${op.type} ${op.iova.toString(16)}`),
      ['invalidate 50000', 'update 20000'],
    );
    assert.equal(h.agent.applies.length, applies);
    assert.equal((await h.service.listMappings('vdpa1')).length, 2);

    const real = await h.service.setMemTable({ device: 'vdpa1', asid: 0, regions });
    assert.deepEqual({ ...real, dryRun: true }, dry);
    assert.deepEqual(h.agent.applies.at(-1)!.ops, real.ops);
    assert.deepEqual(
      (await h.service.listMappings('vdpa1', 0)).map((m) => m.iova),
      [0x10000n, 0x20000n],
    );
    assert.deepEqual(h.agent.device('vdpa1').mappings(), await h.service.listMappings('vdpa1'));
  });

  test('refusals name the region', async () => {
    await assert.rejects(
      h.service.setMemTable({
        device: 'vdpa1',
        asid: 0,
        regions: [...regions, { ...regions[0]!, iova: 0x11000n }],
      }),
      refused('CONFLICT', { field: 'regions[2].iova', errno: 'EEXIST' }),
    );
    await assert.rejects(
      h.service.setMemTable({
        device: 'vdpa1',
        asid: 0,
        regions: [regions[0]!, { ...regions[1]!, memory: 'x' }],
      }),
      refused('NOT_FOUND', { field: 'regions[1].memory' }),
    );
    await assert.rejects(
      h.service.setMemTable({ device: 'vdpa1', asid: 2, regions }),
      refused('INVALID_ARGUMENT', { field: 'asid', errno: 'EINVAL' }),
    );
  });

  test('each address space is its own table', async () => {
    await h.service.setMemTable({ device: 'vdpa1', asid: 1, regions });
    await h.service.setMemTable({ device: 'vdpa1', asid: 0, regions: regions.slice(0, 1) });
    const all = await h.service.listMappings('vdpa1');
    assert.deepEqual(
      all.map((m) => `${m.asid}:${m.iova.toString(16)}`),
      ['0:10000', '1:10000', '1:20000'],
    );
  });
});

describe('batch', () => {
  test('non-atomic: every op gets its own result, the valid ones are applied', async () => {
    const r = await h.service.batch({
      device: 'vdpa0',
      ops: [
        { op: 'map', ...mapReq(0x10000n) },
        { op: 'map', ...mapReq(0x10000n) },
        { op: 'unmap', asid: 0, iova: 0x10000n, size: PAGE },
        { op: 'map', ...mapReq(0x20000n, 1n, 'zz') },
      ],
    });
    assert.equal(r.atomic, false);
    assert.deepEqual(
      r.results.map((x) => x.ok),
      [true, false, true, false],
    );
    assert.equal(r.results[1]!.error?.field, 'ops[1].iova');
    assert.equal(r.results[3]!.error?.code, 'NOT_FOUND');
    assert.deepEqual(await h.service.listMappings('vdpa0'), []);
  });

  test('atomic: a validation failure names the op and nothing is sent', async () => {
    const applies = h.agent.applies.length;
    await assert.rejects(
      h.service.batch({
        device: 'vdpa0',
        atomic: true,
        ops: [
          { op: 'map', ...mapReq(0x10000n) },
          { op: 'map', ...mapReq(0x20000n) },
          { op: 'map', ...mapReq(0x10000n) },
        ],
      }),
      refused('CONFLICT', { field: 'ops[2].iova', errno: 'EEXIST', message: /^ops\[2\]: / }),
    );
    assert.equal(h.agent.applies.length, applies);
    const r = await h.service.batch({
      device: 'vdpa0',
      atomic: true,
      ops: [
        { op: 'map', ...mapReq(0x10000n) },
        { op: 'map', ...mapReq(0x20000n) },
      ],
    });
    assert.equal(r.committed, true);
    assert.equal(h.agent.applies.length, applies + 1);
    assert.equal((await h.service.listMappings('vdpa0')).length, 2);
  });
});

describe('watch, devices, memory', () => {
  test('watch reports every applied change with its sequence, per device', async () => {
    const seen: MappingEvent[] = [];
    const all: MappingEvent[] = [];
    const one = h.service.watch('vdpa0', (e) => seen.push(e));
    const every = h.service.watch(undefined, (e) => all.push(e));
    await h.service.map(mapReq(0x100000n, 2n));
    await h.service.unmap({ device: 'vdpa0', asid: 0, iova: 0x101000n, size: PAGE });
    await h.service.map({ ...mapReq(0x100000n), device: 'vdpa1' });
    one.close();
    await h.service.map(mapReq(0x300000n));
    every.close();
    assert.deepEqual(
      seen.map((e) => `${e.kind} ${e.mapping.iova.toString(16)}+${e.mapping.size.toString(16)}`),
      ['mapped 100000+2000', 'unmapped 100000+2000', 'mapped 100000+1000'],
    );
    assert.ok(seen[1]!.sequence > seen[0]!.sequence);
    assert.equal(seen[1]!.sequence, seen[2]!.sequence);
    assert.equal(all.length, 5);
  });

  test('devices are listed with their facts, readiness and desired mappings', async () => {
    await h.service.map(mapReq(0x100000n, 3n));
    const views = await h.service.listDevices();
    assert.deepEqual(
      views.map((v) => v.id),
      ['vdpa0', 'vdpa1'],
    );
    const v = await h.service.getDevice('vdpa0');
    assert.equal(v.ready, true);
    assert.equal(v.mappedEntries, 1);
    assert.equal(v.mappedBytes, 3n * PAGE);
    assert.deepEqual(v.iovaRange, { first: 0x1000n, last: 0xffff_ffffn });
    assert.ok(v.counters.messagesWritten > 0);
    assert.equal((await h.service.getDevice('vdpa1')).asNum, 2);
    await assert.rejects(h.service.getDevice('nope'), refused('NOT_FOUND', { field: 'device' }));
    assert.equal(h.service.isReady(), true);
  });

  test('memory: the same file registered again is answered with its registration; another is refused', async () => {
    const file = path.join(h.agentDir, 'again.mem');
    fs.writeFileSync(file, Buffer.alloc(Number(4n * PAGE)));
    const first = await h.service.registerMemory({ id: 'again', path: file });
    const second = await h.service.registerMemory({ id: 'again', path: file });
    assert.deepEqual(second, first);
    await assert.rejects(
      h.service.registerMemory({ id: 'again', path: path.join(h.agentDir, 'other.mem') }),
      refused('ALREADY_EXISTS', { field: 'id' }),
    );
    await assert.rejects(h.service.registerMemory({ id: 'again', size: PAGE }), refused('ALREADY_EXISTS'));
    await h.service.unregisterMemory('again');
  });

  test('memory: register, list, refuse unregister while mapped, then unregister', async () => {
    await assert.rejects(h.service.registerMemory({ id: 'm0', size: PAGE }), refused('ALREADY_EXISTS'));
    await assert.rejects(
      h.service.registerMemory({ id: 'both', size: PAGE, path: '/x' }),
      refused('INVALID_ARGUMENT'),
    );
    await assert.rejects(h.service.registerMemory({ id: 'bad/id', size: PAGE }), refused('INVALID_ARGUMENT'));
    await assert.rejects(
      h.service.registerMemory({ id: 'etc', path: '/etc/passwd' }),
      refused('PERMISSION_DENIED', { field: 'path' }),
    );
    const m1 = await h.service.registerMemory({ id: 'm1', size: 4n * PAGE });
    assert.equal(m1.size, 4n * PAGE);
    await h.service.map(mapReq(0x100000n, 1n, 'm1'));
    assert.equal((await h.service.listMemory()).find((m) => m.id === 'm1')?.mappedEntries, 1);
    await assert.rejects(
      h.service.unregisterMemory('m1'),
      refused('FAILED_PRECONDITION', { message: /mapped/ }),
    );
    await h.service.unmap({ device: 'vdpa0', asid: 0, iova: 0x100000n, size: PAGE });
    await h.service.unregisterMemory('m1');
    assert.deepEqual(
      (await h.service.listMemory()).map((m) => m.id),
      ['m0'],
    );
    assert.equal(h.agent.registry.get('m1'), undefined, 'released at the agent');
    await assert.rejects(h.service.unregisterMemory('m1'), refused('NOT_FOUND'));
  });
});

describe('metrics', () => {
  test('every hop is recorded under vdpa_mapd_*', async () => {
    const read = async () => {
      const text = await h.metrics.registry.metrics();
      return (line: RegExp) =>
        Number(
          text
            .split('\n')
            .find((l) => line.test(l))
            ?.split(' ')
            .at(-1) ?? 0,
        );
    };
    const refusedEexist = /^vdpa_mapd_ops_total\{type="update",result="refused",errno="EEXIST"\}/;
    const before = (await read())(refusedEexist);
    await h.service.map(mapReq(0x100000n, 2n));
    await assert.rejects(h.service.map(mapReq(0x100000n)));
    const value = await read();
    const text = await h.metrics.registry.metrics();
    assert.equal(value(refusedEexist), before + 1);
    assert.ok(value(/^vdpa_mapd_ops_total\{type="update",result="ok",errno=""\}/) >= 1);
    assert.equal(value(/^vdpa_mapd_mapped_entries\{device="vdpa0"\}/), 1);
    assert.equal(value(/^vdpa_mapd_mapped_bytes\{device="vdpa0"\}/), Number(2n * PAGE));
    assert.equal(value(/^vdpa_mapd_agent_up /), 1);
    assert.equal(value(/^vdpa_mapd_device_ready\{device="vdpa1"\}/), 1);
    assert.ok(value(/^vdpa_mapd_reconciliations_total\{result="ok"\}/) >= 2);
    assert.ok(value(/^vdpa_mapd_agent_roundtrip_seconds_count\{method="Apply",result="ok"\}/) >= 1);
    // Every call is measured, the connect of each pass (GetInfo) too.
    for (const method of ['GetInfo', 'ListDevices', 'ListMemory', 'ListMapped']) {
      const count = new RegExp(
        `^vdpa_mapd_agent_roundtrip_seconds_count\\{method="${method}",result="ok"\\}`,
      );
      assert.ok(value(count) >= 1, method);
    }
    assert.ok(value(/^vdpa_mapd_batch_ops_count\{device="vdpa0"\}/) >= 1);
    assert.ok(value(/^vdpa_mapd_iotlb_message_write_seconds_count\{device="vdpa0"\}/) >= 1);
    assert.ok(value(/^vdpa_mapd_queue_wait_seconds_count\{device="vdpa0"\}/) >= 2);
    assert.ok(value(/^vdpa_mapd_store_write_seconds_count\{result="ok"\}/) >= 1);
    assert.match(text, /^process_cpu_user_seconds_total/m);
  });
});
