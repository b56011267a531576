import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import fc from 'fast-check';
import {
  errorBody,
  grpcStatus,
  httpStatus,
  retryAfterSeconds,
  toServiceError,
} from '../../src/api/errors.ts';
import { formatDevice, formatMapping, formatOp } from '../../src/api/format.ts';
import {
  type ApiLimits,
  DEFAULT_LIMITS,
  parseAsidFilter,
  parseBatch,
  parseBoolParam,
  parseId,
  parseMap,
  parseRegisterMemory,
  parseSetMemTable,
  parseUnmap,
} from '../../src/api/parse.ts';
import { parseU32, parseU64 } from '../../src/core/u64.ts';
import { formatU64, U64_LIMIT } from '../../src/u64.ts';
import { ERROR_CATALOG, ServiceError, type ServiceErrorCode } from '../../src/core/errors.ts';
import type { DeviceView } from '../../src/core/types.ts';

/** Runs `fn`, which must throw INVALID_ARGUMENT naming `field`. */
async function rejectsAsync(fn: () => Promise<unknown>, field: string): Promise<void> {
  await assert.rejects(fn, (err: unknown) => {
    assert.ok(err instanceof ServiceError, `expected a ServiceError, got ${String(err)}`);
    assert.equal(err.code, 'INVALID_ARGUMENT');
    assert.equal(err.field, field, err.message);
    return true;
  });
}

function rejects(fn: () => unknown, field: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof ServiceError, `expected a ServiceError, got ${String(err)}`);
    assert.equal(err.code, 'INVALID_ARGUMENT');
    assert.equal(err.field, field, err.message);
    return true;
  });
}

const MAP = { iova: '0x100000', size: '0x200000', memory: 'ram0' };
const LIMITS: ApiLimits = { ...DEFAULT_LIMITS, maxBatchOps: 3, maxRegions: 2 };

describe('u64', () => {
  const good: [unknown, bigint][] = [
    ['0', 0n],
    ['4096', 4096n],
    ['0x0', 0n],
    ['0x1000', 4096n],
    ['0XABCdef', 0xabcdefn],
    ['0x00000000000000000000000000000001', 1n],
    ['18446744073709551615', U64_LIMIT - 1n],
    ['0xffffffffffffffff', U64_LIMIT - 1n],
    [0, 0n],
    [4096, 4096n],
    [Number.MAX_SAFE_INTEGER, BigInt(Number.MAX_SAFE_INTEGER)],
  ];
  for (const [wire, value] of good) {
    test(`accepts ${JSON.stringify(wire)}`, () => assert.equal(parseU64(wire, 'iova'), value));
  }

  const bad: unknown[] = [
    '',
    ' 1',
    '1 ',
    '\t1',
    '+1',
    '-1',
    '-0',
    '1.0',
    '1e3',
    '1_000',
    '0x',
    '0x-1',
    '0xg',
    'x10',
    '0b101',
    '0o7',
    '01',
    '00',
    '١٢',
    '18446744073709551616',
    '0x10000000000000000',
    '9'.repeat(1000),
    -1,
    1.5,
    Number.NaN,
    Number.POSITIVE_INFINITY,
    Number.MAX_SAFE_INTEGER + 1,
    2 ** 64,
    -0.5,
    null,
    true,
    [],
    ['1'],
    {},
    { value: '1' },
  ];
  for (const wire of bad) {
    const label = typeof wire === 'number' ? String(wire) : JSON.stringify(wire).slice(0, 30);
    test(`refuses ${label}`, () => rejects(() => parseU64(wire, 'iova'), 'iova'));
  }

  test('every u64 round-trips through decimal and hex', () => {
    fc.assert(
      fc.property(fc.bigInt({ min: 0n, max: U64_LIMIT - 1n }), (v) => {
        assert.equal(parseU64(v.toString(), 'x'), v);
        assert.equal(parseU64(`0x${v.toString(16)}`, 'x'), v);
        assert.equal(parseU64(`0X${v.toString(16).toUpperCase()}`, 'x'), v);
        assert.equal(parseU64(formatU64(v), 'x'), v);
        assert.match(formatU64(v), /^0x[0-9a-f]+$/);
      }),
      { numRuns: 2000 },
    );
  });

  test('values >= 2^64 and negatives are refused in either base', () => {
    fc.assert(
      fc.property(fc.bigInt({ min: U64_LIMIT, max: 1n << 128n }), (v) => {
        rejects(() => parseU64(v.toString(), 'size'), 'size');
        rejects(() => parseU64(`0x${v.toString(16)}`, 'size'), 'size');
      }),
    );
    fc.assert(
      fc.property(fc.bigInt({ min: 1n, max: U64_LIMIT }), (v) => {
        rejects(() => parseU64(`-${v}`, 'size'), 'size');
        rejects(() => parseU64(`-0x${v.toString(16)}`, 'size'), 'size');
      }),
    );
  });

  test('u32 bounds', () => {
    assert.equal(parseU32('4294967295', 'asid'), 4294967295);
    assert.equal(parseU32(7, 'asid'), 7);
    rejects(() => parseU32('4294967296', 'asid'), 'asid');
    rejects(() => parseU32(-1, 'asid'), 'asid');
  });
});

describe('requests', () => {
  test('the default body limit holds a table of the default most regions, in their longest form', () => {
    const hex64 = `0x${'f'.repeat(16)}`;
    const region = { iova: hex64, size: hex64, memory: 'm'.repeat(64), offset: hex64, perm: 'rw' };
    const body = JSON.stringify({ asid: 0, regions: Array(DEFAULT_LIMITS.maxRegions).fill(region) });
    assert.ok(
      Buffer.byteLength(body) <= DEFAULT_LIMITS.bodyLimit,
      `${Buffer.byteLength(body)} > ${DEFAULT_LIMITS.bodyLimit}`,
    );
  });

  test('map: defaults and values', () => {
    assert.deepEqual(parseMap('vdpa0', { ...MAP }), {
      device: 'vdpa0',
      asid: 0,
      iova: 0x100000n,
      size: 0x200000n,
      memory: 'ram0',
      offset: 0n,
      perm: 'rw',
    });
    assert.deepEqual(parseMap('vdpa0', { ...MAP, offset: '4096', perm: 'ro', asid: 1, requestId: 'r-1' }), {
      device: 'vdpa0',
      asid: 1,
      iova: 0x100000n,
      size: 0x200000n,
      memory: 'ram0',
      offset: 4096n,
      perm: 'ro',
      requestId: 'r-1',
    });
  });

  test('a range ending exactly at 2^64 is fine', () => {
    const req = parseMap('d', { iova: '0xfffffffffffff000', size: '0x1000', memory: 'm' });
    assert.equal(req.iova + req.size, U64_LIMIT);
  });

  const badMaps: [string, unknown, string][] = [
    ['missing iova', { size: '1', memory: 'm' }, 'iova'],
    ['missing size', { iova: '1', memory: 'm' }, 'size'],
    ['missing memory', { iova: '1', size: '1' }, 'memory'],
    ['size 0', { ...MAP, size: '0' }, 'size'],
    ['iova + size > 2^64', { ...MAP, iova: '0xffffffffffffffff', size: '2' }, 'size'],
    ['iova float', { ...MAP, iova: 1.5 }, 'iova'],
    ['offset negative', { ...MAP, offset: '-4096' }, 'offset'],
    ['offset null', { ...MAP, offset: null }, 'offset'],
    ['perm unknown', { ...MAP, perm: 'rwx' }, 'perm'],
    ['perm upper case', { ...MAP, perm: 'RW' }, 'perm'],
    ['asid too big', { ...MAP, asid: 2 ** 32 }, 'asid'],
    ['asid negative', { ...MAP, asid: -1 }, 'asid'],
    ['asid float', { ...MAP, asid: 0.5 }, 'asid'],
    ['memory bad id', { ...MAP, memory: 'ram 0' }, 'memory'],
    ['memory too long', { ...MAP, memory: 'm'.repeat(65) }, 'memory'],
    ['memory empty', { ...MAP, memory: '' }, 'memory'],
    ['memory number', { ...MAP, memory: 7 }, 'memory'],
    ['requestId too long', { ...MAP, requestId: 'r'.repeat(129) }, 'requestId'],
    ['requestId empty', { ...MAP, requestId: '' }, 'requestId'],
    ['requestId number', { ...MAP, requestId: 1 }, 'requestId'],
    ['unknown field', { ...MAP, color: 'red' }, 'color'],
    ['exact on map', { ...MAP, exact: true }, 'exact'],
    ['body array', [MAP], 'body'],
    ['body null', null, 'body'],
    ['body string', 'iova=1', 'body'],
    ['no body', undefined, 'body'],
  ];
  for (const [name, body, field] of badMaps) {
    test(`map refuses ${name} → ${field}`, () => rejects(() => parseMap('vdpa0', body), field));
  }

  test('__proto__ and constructor keys are refused and pollute nothing', () => {
    const poisoned = JSON.parse('{"iova":"1","size":"1","memory":"m","__proto__":{"polluted":"yes"}}');
    rejects(() => parseMap('d', poisoned), '__proto__');
    rejects(() => parseMap('d', { ...MAP, constructor: { prototype: { polluted: 'yes' } } }), 'constructor');
    rejects(
      () => parseBatch('d', JSON.parse('{"ops":[{"op":"map","__proto__":{"x":1}}]}'), LIMITS),
      'ops[0].__proto__',
    );
    assert.equal(({} as Record<string, unknown>).polluted, undefined);
    assert.equal(({} as Record<string, unknown>).x, undefined);
  });

  test('inherited fields are not read', () => {
    const inherited = Object.create({ iova: '1', size: '1', memory: 'm' }) as object;
    rejects(() => parseMap('d', inherited), 'iova');
  });

  test('unmap', () => {
    assert.deepEqual(parseUnmap('d', { iova: '0x1000', size: '0x1000' }), {
      device: 'd',
      asid: 0,
      iova: 0x1000n,
      size: 0x1000n,
      exact: false,
    });
    assert.equal(parseUnmap('d', { iova: '0', size: '1', exact: true }).exact, true);
    rejects(() => parseUnmap('d', { iova: '0', size: '1', exact: 'yes' }), 'exact');
    rejects(() => parseUnmap('d', { iova: '0', size: '1', memory: 'm' }), 'memory');
    rejects(() => parseUnmap('d', { iova: '0', size: '0' }), 'size');
  });

  test('set-mem-table names the region at fault', async () => {
    const ok = await parseSetMemTable('d', { asid: 1, regions: [{ ...MAP }] }, true, LIMITS);
    assert.equal(ok.dryRun, true);
    assert.equal(ok.asid, 1);
    assert.deepEqual(ok.regions, [
      { iova: 0x100000n, size: 0x200000n, memory: 'ram0', offset: 0n, perm: 'rw' },
    ]);
    assert.deepEqual((await parseSetMemTable('d', { regions: [] }, false, LIMITS)).regions, []);
    await rejectsAsync(
      () => parseSetMemTable('d', { regions: [MAP, { ...MAP, size: '0x' }] }, false, LIMITS),
      'regions[1].size',
    );
    await rejectsAsync(
      () => parseSetMemTable('d', { regions: [MAP, { ...MAP, asid: 0 }] }, false, LIMITS),
      'regions[1].asid',
    );
    await rejectsAsync(() => parseSetMemTable('d', { regions: [MAP, 'x'] }, false, LIMITS), 'regions[1]');
    await rejectsAsync(() => parseSetMemTable('d', { regions: [MAP, MAP, MAP] }, false, LIMITS), 'regions');
    await rejectsAsync(() => parseSetMemTable('d', { regions: {} }, false, LIMITS), 'regions');
    await rejectsAsync(() => parseSetMemTable('d', {}, false, LIMITS), 'regions');
  });

  test('batch names the op at fault', () => {
    const ok = parseBatch(
      'd',
      {
        ops: [
          { op: 'map', ...MAP },
          { op: 'unmap', iova: '1', size: '1' },
        ],
      },
      LIMITS,
    );
    assert.equal(ok.atomic, false);
    assert.deepEqual(
      ok.ops.map((o) => o.op),
      ['map', 'unmap'],
    );
    assert.equal(parseBatch('d', { ops: [], atomic: true }, LIMITS).atomic, true);
    rejects(
      () =>
        parseBatch(
          'd',
          {
            ops: [
              { op: 'map', ...MAP },
              { op: 'map', iova: '1', size: '1' },
            ],
          },
          LIMITS,
        ),
      'ops[1].memory',
    );
    rejects(() => parseBatch('d', { ops: [{ op: 'map', ...MAP }, { op: 'remap' }] }, LIMITS), 'ops[1].op');
    rejects(() => parseBatch('d', { ops: [{ ...MAP }] }, LIMITS), 'ops[0].op');
    rejects(
      () => parseBatch('d', { ops: [{ op: 'unmap', iova: '1', size: '1', perm: 'rw' }] }, LIMITS),
      'ops[0].perm',
    );
    rejects(() => parseBatch('d', { ops: [[]] }, LIMITS), 'ops[0]');
    rejects(
      () => parseBatch('d', { ops: Array.from({ length: 4 }, () => ({ op: 'map', ...MAP })) }, LIMITS),
      'ops',
    );
    rejects(() => parseBatch('d', { ops: [], atomic: 1 }, LIMITS), 'atomic');
  });

  test('register memory: exactly one of path and size', () => {
    assert.deepEqual(parseRegisterMemory({ id: 'ram0', size: '0x200000' }), { id: 'ram0', size: 0x200000n });
    assert.deepEqual(parseRegisterMemory({ id: 'ram0', path: '/dev/shm/x' }), {
      id: 'ram0',
      path: '/dev/shm/x',
    });
    rejects(() => parseRegisterMemory({ id: 'ram0' }), 'path');
    rejects(() => parseRegisterMemory({ id: 'ram0', path: '/a', size: '1' }), 'size');
    rejects(() => parseRegisterMemory({ id: 'ram0', size: '0' }), 'size');
    rejects(() => parseRegisterMemory({ id: 'ram0', path: '' }), 'path');
    rejects(() => parseRegisterMemory({ id: 'ram0', path: 'a\0b' }), 'path');
    rejects(() => parseRegisterMemory({ id: '../x', size: '1' }), 'id');
    rejects(() => parseRegisterMemory({ size: '1' }), 'id');
  });

  test('ids, query values', () => {
    assert.equal(parseId('a.B_c-9', 'device'), 'a.B_c-9');
    rejects(() => parseId('a/b', 'device'), 'device');
    rejects(() => parseId('a:b', 'device'), 'device');
    rejects(() => parseId('x'.repeat(65), 'device'), 'device');
    assert.equal(parseAsidFilter(undefined), undefined);
    assert.equal(parseAsidFilter('3'), 3);
    rejects(() => parseAsidFilter(['1', '2']), 'asid');
    assert.equal(parseBoolParam('true', 'dryRun'), true);
    assert.equal(parseBoolParam(undefined, 'dryRun'), false);
    rejects(() => parseBoolParam('yes', 'dryRun'), 'dryRun');
  });
});

describe('format', () => {
  test('u64 fields as 0x hex', () => {
    const m = { asid: 1, iova: 0x100000n, size: 4096n, memory: 'ram0', offset: 0n, perm: 'rw' as const };
    assert.deepEqual(formatMapping(m), {
      iova: '0x100000',
      size: '0x1000',
      memory: 'ram0',
      offset: '0x0',
      perm: 'rw',
      asid: 1,
    });
    assert.deepEqual(formatOp({ type: 'invalidate', asid: 0, iova: 0n, size: U64_LIMIT - 1n }), {
      type: 'invalidate',
      asid: 0,
      iova: '0x0',
      size: '0xffffffffffffffff',
    });
  });

  test('device views carry no bigint', () => {
    const view: DeviceView = {
      id: 'vdpa0',
      name: 'vdpa0',
      kind: 'simulated',
      node: null,
      deviceId: 1,
      offeredFeatures: 1n << 63n,
      negotiatedFeatures: 0n,
      iovaRange: { first: 0n, last: U64_LIMIT - 1n },
      asNum: 2,
      groupNum: 2,
      vqCount: 3,
      configSize: 8,
      status: 0,
      iommu: 'onchip',
      pinned: false,
      pageSize: 4096n,
      ready: true,
      mappedBytes: 4096n,
      mappedEntries: 1,
      degraded: [{ memory: 'ram1', mappings: 2, bytes: 8192n, reason: 'gone', remedy: 'restore it' }],
      queueDepth: 0,
      counters: {
        messagesWritten: 1,
        batches: 0,
        dmaMapCalls: 0,
        dmaUnmapCalls: 0,
        setMapPushes: 1,
        setMapEntriesPushed: 1,
      },
    };
    const wire = formatDevice(view);
    assert.doesNotThrow(() => JSON.stringify(wire));
    assert.equal(wire.offeredFeatures, '0x8000000000000000');
    assert.equal(wire.iovaRange.last, '0xffffffffffffffff');
  });
});

describe('error table', () => {
  test('HTTP and gRPC statuses', () => {
    const expected: Record<string, [number, GrpcStatus]> = {
      INVALID_ARGUMENT: [400, GrpcStatus.INVALID_ARGUMENT],
      NOT_FOUND: [404, GrpcStatus.NOT_FOUND],
      ALREADY_EXISTS: [409, GrpcStatus.ALREADY_EXISTS],
      CONFLICT: [409, GrpcStatus.ABORTED],
      FAILED_PRECONDITION: [409, GrpcStatus.FAILED_PRECONDITION],
      PERMISSION_DENIED: [403, GrpcStatus.PERMISSION_DENIED],
      UNAUTHENTICATED: [401, GrpcStatus.UNAUTHENTICATED],
      RESOURCE_EXHAUSTED: [429, GrpcStatus.RESOURCE_EXHAUSTED],
      QUOTA_EXCEEDED: [409, GrpcStatus.RESOURCE_EXHAUSTED],
      UNAVAILABLE: [503, GrpcStatus.UNAVAILABLE],
      DEVICE_ERROR: [502, GrpcStatus.INTERNAL],
      UNSUPPORTED_MEDIA_TYPE: [415, GrpcStatus.INVALID_ARGUMENT],
      METHOD_NOT_ALLOWED: [405, GrpcStatus.UNIMPLEMENTED],
      INTERNAL: [500, GrpcStatus.INTERNAL],
    };
    assert.deepEqual(
      Object.fromEntries(
        Object.keys(ERROR_CATALOG).map((code) => {
          const err = new ServiceError(code as ServiceErrorCode, 'x');
          return [code, [httpStatus(err), grpcStatus(err)]];
        }),
      ),
      expected,
    );
  });

  test('Retry-After in whole seconds for retryable codes only', () => {
    assert.equal(
      retryAfterSeconds(new ServiceError('RESOURCE_EXHAUSTED', 'full', { retryAfterMs: 1500 })),
      2,
    );
    assert.equal(retryAfterSeconds(new ServiceError('RESOURCE_EXHAUSTED', 'full', { retryAfterMs: 10 })), 1);
    assert.equal(retryAfterSeconds(new ServiceError('UNAVAILABLE', 'agent down')), 1);
    assert.equal(
      retryAfterSeconds(new ServiceError('CONFLICT', 'overlap', { retryAfterMs: 1000 })),
      undefined,
    );
  });

  test('unknown errors become a bare INTERNAL; the body keeps field and errno', () => {
    const e = toServiceError(new Error('secret detail'));
    assert.equal(e.code, 'INTERNAL');
    assert.equal(httpStatus(e), 500);
    assert.doesNotMatch(e.message, /secret/);
    assert.deepEqual(errorBody(new ServiceError('CONFLICT', 'overlap', { field: 'iova', errno: 'EEXIST' })), {
      error: { code: 'CONFLICT', message: 'overlap', field: 'iova', errno: 'EEXIST' },
    });
  });
});
