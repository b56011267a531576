import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { AgentError, errorFromWire, errorToWire, toAgentError } from '../../src/agent/errors.ts';
import { agentService, callErrorCoding } from '../../src/agent/proto.ts';
import {
  answerFromWire,
  answerToWire,
  attachmentEventFromWire,
  attachmentEventToWire,
  attachmentFromWire,
  attachmentToWire,
  factsFromWire,
  factsToWire,
  memoryFromWire,
  memoryToWire,
  registerFromWire,
  registerToWire,
  u64FromWire,
  u64ToWire,
} from '../../src/agent/wire.ts';
import { DeviceError, DmaError } from '../../src/device/errors.ts';
import type { DeviceFacts } from '../../src/device/types.ts';
import { IotlbError } from '../../src/iotlb/types.ts';
import { MemoryError } from '../../src/memory/types.ts';

const U64_MAX = (1n << 64n) - 1n;

function rejects(fn: () => unknown, field: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof AgentError);
    assert.equal(e.status, status.INVALID_ARGUMENT);
    assert.equal(e.code, 'BAD_REQUEST');
    assert.equal(e.field, field);
    return true;
  });
}

describe('u64 on the wire', () => {
  test('2^64-1 round trips as decimal and is read back from decimal and hex', () => {
    assert.equal(u64ToWire(U64_MAX, 'iova'), '18446744073709551615');
    assert.equal(u64FromWire('18446744073709551615', 'iova'), U64_MAX);
    assert.equal(u64FromWire('0xffffffffffffffff', 'iova'), U64_MAX);
    assert.equal(u64FromWire('0XFFFFFFFFFFFFFFFF', 'iova'), U64_MAX);
    assert.equal(u64FromWire('0', 'iova'), 0n);
    assert.equal(u64FromWire('0x0', 'iova'), 0n);
  });

  test('anything that is not a u64 is refused, naming the field', () => {
    for (const bad of [
      '18446744073709551616',
      '0x10000000000000000',
      '-1',
      '1.5',
      '',
      ' 1',
      '0x',
      '1e3',
      'abc',
    ]) {
      rejects(() => u64FromWire(bad, 'ops[0].update.iova'), 'ops[0].update.iova');
    }
    rejects(() => u64FromWire(42, 'size'), 'size');
    rejects(() => u64ToWire(1n << 64n, 'size'), 'size');
    rejects(() => u64ToWire(-1n, 'offset'), 'offset');
  });
});

describe('messages round trip', () => {
  test('device facts keep their feature masks and IOVA range', () => {
    const facts: DeviceFacts = {
      name: 'vdpa0',
      kind: 'simulated',
      node: null,
      deviceId: 1,
      offeredFeatures: U64_MAX,
      negotiatedFeatures: (1n << 2n) | (1n << 63n),
      iovaRange: { first: 0x1000n, last: U64_MAX },
      asNum: 2,
      groupNum: 2,
      vqCount: 3,
      configSize: 12,
      status: 0,
      iommu: 'onchip',
      pinned: false,
      pageSize: 0x4000n,
    };
    const method = agentService.ListDevices!;
    const decoded = method.responseDeserialize(
      method.responseSerialize({ devices: [factsToWire(facts)] }),
    ) as {
      devices: ReturnType<typeof factsToWire>[];
    };
    assert.deepEqual(factsFromWire(decoded.devices[0]!), facts);
    const kernel = { ...facts, kind: 'kernel' as const, node: '/dev/vhost-vdpa-0' };
    assert.deepEqual(factsFromWire(factsToWire(kernel)), kernel);
    // A page size that is missing (an older agent: 0) or not a power of two is refused.
    for (const pageSize of ['0', '12288']) {
      assert.throws(
        () => factsFromWire({ ...factsToWire(facts), pageSize }),
        (e: unknown) => e instanceof AgentError && e.field === 'facts.pageSize',
      );
    }
  });

  test('memory info and register requests', () => {
    const info = {
      id: 'ram0',
      path: '/dev/shm/x',
      kind: 'file' as const,
      created: false,
      size: 1n << 40n,
      uaddr: 0x7fff_0000_0000n,
      mappedEntries: 3,
    };
    assert.deepEqual(memoryFromWire(memoryToWire(info)), info);
    assert.deepEqual(registerFromWire(registerToWire({ id: 'a', path: '/x' })), { id: 'a', path: '/x' });
    assert.deepEqual(registerFromWire(registerToWire({ id: 'a', size: U64_MAX, kind: 'memfd' })), {
      id: 'a',
      size: U64_MAX,
      kind: 'memfd',
    });
    assert.deepEqual(registerFromWire(registerToWire({ id: 'a', size: 4096n })), { id: 'a', size: 4096n });
    rejects(() => registerFromWire({ id: 'a' }), 'source');
  });

  test('an attachment, its events and their answers survive the protobuf encoding', () => {
    const entry = {
      asid: 0,
      iova: 1n << 32n,
      size: 8n << 20n,
      memory: 'vhost-user-1-2',
      offset: 0n,
      perm: 'rw' as const,
    };
    const attachment = {
      device: 'vdpa0',
      socketPath: '/run/vdpa-mapd/vhost-user/vdpa0.sock',
      mode: 0o660,
      group: 'kvm',
      vmmConnected: true,
      negotiatedFeatures: U64_MAX,
      protocolFeatures: 0x209n,
      vrings: [
        {
          index: 0,
          size: 256,
          lastAvail: 7,
          desc: 0x1000n,
          avail: 0x2000n,
          used: U64_MAX,
          enabled: true,
          running: true,
        },
        { index: 1, size: 0, lastAvail: 0, enabled: false, running: false },
      ],
      memoryTable: [entry],
      stats: {
        messages: { SET_MEM_TABLE: 2 },
        memoryUpdates: 2,
        regionsAdded: 3,
        regionsRemoved: 1,
        refusals: 1,
      },
      connections: 4,
    };
    const describe = agentService['DescribeDevice']!;
    const wire = describe.responseDeserialize(
      describe.responseSerialize({ attachment: attachmentToWire(attachment) }),
    ) as {
      attachment: Parameters<typeof attachmentFromWire>[0];
    };
    assert.deepEqual(attachmentFromWire(wire.attachment), attachment);

    const watch = agentService['WatchAttachments']!;
    const events = [
      { type: 'watching' as const, attached: ['vdpa0'] },
      { type: 'connected' as const, device: 'vdpa0' },
      { type: 'memoryTable' as const, device: 'vdpa0', requestId: 'r1', entries: [entry] },
      { type: 'memoryTable' as const, device: 'vdpa0', requestId: 'r2', entries: [] },
      { type: 'disconnected' as const, device: 'vdpa0', reason: 'EOF inside a message' },
    ];
    for (const e of events) {
      const back = watch.responseDeserialize(watch.responseSerialize(attachmentEventToWire(e)));
      assert.deepEqual(attachmentEventFromWire(back as never), e);
    }
    const answer = agentService['AnswerMemoryTable']!;
    for (const a of [
      { requestId: 'r1', ok: true as const },
      { requestId: 'r2', ok: false as const, code: 'QUOTA_EXCEEDED', message: 'over' },
    ]) {
      assert.deepEqual(
        answerFromWire(answer.requestDeserialize(answer.requestSerialize(answerToWire(a))) as never),
        a,
      );
    }
    rejects(() => answerFromWire({ requestId: 'r' }), 'outcome');
  });
});

describe('errors', () => {
  /** Through the CallError of an error frame, as the client sees it. */
  const roundTrip = (e: AgentError) =>
    errorFromWire(callErrorCoding.deserialize(callErrorCoding.serialize(errorToWire(e))));

  test('library errors map to precise statuses and survive the trip to the client', () => {
    const cases: [unknown, status, string, string | undefined][] = [
      [
        new MemoryError('PATH_REFUSED', 'outside the roots', 'path'),
        status.PERMISSION_DENIED,
        'PATH_REFUSED',
        'path',
      ],
      [new MemoryError('IN_USE', 'still mapped', 'id'), status.FAILED_PRECONDITION, 'IN_USE', 'id'],
      [new MemoryError('NOT_FOUND', 'no memory x', 'id'), status.NOT_FOUND, 'NOT_FOUND', 'id'],
      [new MemoryError('ALREADY_EXISTS', 'taken', 'id'), status.ALREADY_EXISTS, 'ALREADY_EXISTS', 'id'],
      [
        new MemoryError('OUT_OF_BOUNDS', 'past the end', 'size'),
        status.INVALID_ARGUMENT,
        'OUT_OF_BOUNDS',
        'size',
      ],
      [new DeviceError('UNSUPPORTED', 'no SUSPEND'), status.FAILED_PRECONDITION, 'UNSUPPORTED', undefined],
      [new DmaError('UNMAPPED', 'not mapped', 0, 0x1000n), status.FAILED_PRECONDITION, 'UNMAPPED', 'iova'],
      [new Error('boom'), status.INTERNAL, 'INTERNAL', undefined],
    ];
    for (const [err, code, name, field] of cases) {
      const back = roundTrip(toAgentError(err));
      assert.equal(back.status, code, name);
      assert.equal(back.code, name);
      assert.equal(back.field, field);
      assert.equal(back.message, (err as Error).message);
    }
  });

  test('errno names travel too', () => {
    const sys = Object.assign(new Error('open: EACCES'), { errno: 'EACCES' });
    const back = roundTrip(toAgentError(sys));
    assert.equal(back.status, status.PERMISSION_DENIED);
    assert.equal(back.errno, 'EACCES');
    const overlap = new IotlbError({
      reason: 'OVERLAP',
      errno: 'EEXIST',
      field: 'iova',
      message: 'overlaps',
    });
    assert.equal(roundTrip(toAgentError(overlap)).errno, 'EEXIST');
  });
});
