/**
 * KernelDevice against a recording transport: the exact ioctl requests in order, the negotiated
 * feature mask, and the exact 72-byte messages (built by hand here, not with src/uapi).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { DeviceError } from '../../src/device/errors.ts';
import { KernelDevice } from '../../src/device/kernel.ts';
import { SimulatedVdpa } from '../../src/device/sim-kernel.ts';
import { TransportError } from '../../src/device/transport.ts';
import { openVhostVdpaFd } from '../../src/device/vhost-vdpa-fd.ts';
import { FULL_IOVA_RANGE, type IotlbOp } from '../../src/iotlb/types.ts';
import { PAGE, RecordingTransport, rawMsg, type TmpRegistry, tmpRegistry } from './device-helpers.ts';

const U64_MAX = (1n << 64n) - 1n;

// Request numbers as the C preprocessor computes them on x86_64 (include/uapi/linux/vhost.h).
const SET_OWNER = 0xaf01;
const GET_BACKEND_FEATURES = 0x8008af26;
const SET_BACKEND_FEATURES = 0x4008af25;
const GET_DEVICE_ID = 0x8004af70;
const GET_STATUS = 0x8001af71;
const SET_STATUS = 0x4001af72;
const GET_IOVA_RANGE = 0x8010af78;
const GET_CONFIG_SIZE = 0x8004af79;
const GET_AS_NUM = 0x8004af7a;
const SUSPEND = 0xaf7d;
const RESUME = 0xaf7e;
const GET_VQS_COUNT = 0x8004af80;
const GET_GROUP_NUM = 0x8004af81;

const SETUP = [
  SET_OWNER,
  GET_BACKEND_FEATURES,
  SET_BACKEND_FEATURES,
  GET_DEVICE_ID,
  GET_IOVA_RANGE,
  GET_AS_NUM,
  GET_GROUP_NUM,
  GET_VQS_COUNT,
  GET_CONFIG_SIZE,
  GET_STATUS,
];

// Message types.
const UPDATE = 2;
const INVALIDATE = 3;
const BATCH_BEGIN = 5;
const BATCH_END = 6;

let tmp: TmpRegistry;
let uaddr: bigint;
before(() => {
  tmp = tmpRegistry();
  uaddr = tmp.registry.create({ id: 'mem', size: 16n * PAGE, kind: 'memfd' }).uaddr;
});
after(() => tmp.cleanup());

type Answers = Map<number, (arg: Buffer | null) => void>;

/** A kernel that offers `offered` and answers every facts ioctl; `lacking` ones get ENOTTY. */
function fakeKernel(offered: bigint, lacking: number[] = []): Answers {
  const answers: Answers = new Map<number, (arg: Buffer | null) => void>([
    [SET_OWNER, () => {}],
    [GET_BACKEND_FEATURES, (a) => a!.writeBigUInt64LE(offered)],
    [SET_BACKEND_FEATURES, () => {}],
    [GET_DEVICE_ID, (a) => a!.writeUInt32LE(2)],
    [
      GET_IOVA_RANGE,
      (a) => {
        a!.writeBigUInt64LE(0x1000n, 0);
        a!.writeBigUInt64LE(0xffff_ffff_ffffn, 8);
      },
    ],
    [GET_AS_NUM, (a) => a!.writeUInt32LE(2)],
    [GET_GROUP_NUM, (a) => a!.writeUInt32LE(2)],
    [GET_VQS_COUNT, (a) => a!.writeUInt32LE(3)],
    [GET_CONFIG_SIZE, (a) => a!.writeUInt32LE(60)],
    [GET_STATUS, (a) => a!.writeUInt8(0)],
    [SET_STATUS, () => {}],
    [SUSPEND, () => {}],
    [RESUME, () => {}],
  ]);
  for (const request of lacking) answers.delete(request);
  return answers;
}

function open(t: RecordingTransport): KernelDevice {
  return new KernelDevice({ node: '/dev/vhost-vdpa-3', memory: tmp.registry, openTransport: () => t });
}

const update = (iova: bigint, offset: bigint, asid = 0): Extract<IotlbOp, { type: 'update' }> => ({
  type: 'update',
  asid,
  iova,
  size: PAGE,
  memory: 'mem',
  offset,
  perm: 'rw',
});

const ALL_KNOWN = 0x1fen; // every bit 1..8 the kernel knows
const UNDERSTOOD = 0x13en; // MSG_V2 | BATCH | ASID | SUSPEND | RESUME | IOTLB_PERSIST

describe('setup', () => {
  test('ioctls in order: owner, features, then the facts', async () => {
    const t = new RecordingTransport(fakeKernel(ALL_KNOWN | (1n << 9n) | (1n << 40n)));
    const dev = open(t);
    assert.deepEqual(
      t.ioctls.map((c) => c.request),
      SETUP,
    );
    assert.equal(t.ioctls[0]?.arg, null, 'SET_OWNER takes no argument');
    // Only what both sides know: never ENABLE_AFTER_DRIVER_OK, DESC_ASID or unknown bits.
    assert.equal(t.ioctls[2]?.arg?.readBigUInt64LE(0), UNDERSTOOD);
    assert.equal(t.ioctls[2]?.arg?.length, 8);
    const f = dev.facts();
    assert.equal(f.name, 'vhost-vdpa-3');
    assert.equal(f.kind, 'kernel');
    assert.equal(f.node, '/dev/vhost-vdpa-3');
    assert.equal(f.offeredFeatures, ALL_KNOWN | (1n << 9n) | (1n << 40n));
    assert.equal(f.negotiatedFeatures, UNDERSTOOD);
    assert.deepEqual(f.iovaRange, { first: 0x1000n, last: 0xffff_ffff_ffffn });
    assert.deepEqual([f.deviceId, f.asNum, f.groupNum, f.vqCount, f.configSize], [2, 2, 2, 3, 60]);
    assert.equal(f.iommu, 'unknown');
    await dev.close();
    assert.equal(t.closed, 1);
  });

  test('an older kernel: missing ioctls give defaults, no backend features means no SET', async () => {
    const t = new RecordingTransport(
      fakeKernel(0n, [
        GET_BACKEND_FEATURES,
        GET_IOVA_RANGE,
        GET_AS_NUM,
        GET_GROUP_NUM,
        GET_VQS_COUNT,
        GET_CONFIG_SIZE,
      ]),
    );
    const dev = open(t);
    assert.ok(!t.ioctls.some((c) => c.request === SET_BACKEND_FEATURES));
    const f = dev.facts();
    assert.equal(f.negotiatedFeatures, 0n);
    assert.deepEqual(f.iovaRange, FULL_IOVA_RANGE);
    assert.deepEqual([f.asNum, f.groupNum, f.vqCount, f.configSize], [1, 1, 0, 0]);
    await dev.close();
  });

  test('EBUSY on open: a clear "in use by another process"', () => {
    assert.throws(
      () =>
        new KernelDevice({
          node: '/dev/vhost-vdpa-0',
          memory: tmp.registry,
          openTransport: () => {
            throw new TransportError('EBUSY', 'open /dev/vhost-vdpa-0: EBUSY');
          },
        }),
      (e: unknown) =>
        e instanceof DeviceError &&
        e.code === 'BUSY' &&
        e.errno === 'EBUSY' &&
        /in use by another process/.test(e.message),
    );
  });

  test('a failing setup ioctl closes the transport and names the errno', () => {
    const answers = fakeKernel(UNDERSTOOD);
    answers.set(GET_DEVICE_ID, () => {
      throw new TransportError('EIO', 'GET_DEVICE_ID: EIO');
    });
    const t = new RecordingTransport(answers);
    assert.throws(
      () => open(t),
      (e: unknown) => e instanceof DeviceError && e.code === 'KERNEL' && e.errno === 'EIO',
    );
    assert.equal(t.closed, 1);
  });
});

describe('messages', () => {
  test('a batch: BATCH_BEGIN, UPDATE with the translated uaddr, INVALIDATE, BATCH_END (v2)', async () => {
    const t = new RecordingTransport(fakeKernel(ALL_KNOWN));
    const dev = open(t);
    const results = await dev.apply([
      update(0x10000n, 3n * PAGE, 1),
      { type: 'invalidate', asid: 1, iova: 0x10000n, size: PAGE },
    ]);
    assert.deepEqual(results, [{ ok: true }, { ok: true }]);
    assert.deepEqual(t.writes, [
      rawMsg(2, 1, BATCH_BEGIN),
      rawMsg(2, 1, UPDATE, 0x10000n, PAGE, uaddr + 3n * PAGE, 3),
      rawMsg(2, 1, INVALIDATE, 0x10000n, PAGE),
      rawMsg(2, 1, BATCH_END),
    ]);
    assert.equal(t.writes[1]?.length, 72);
    assert.deepEqual(dev.counters(), {
      messagesWritten: 4,
      batches: 1,
      dmaMapCalls: 0,
      dmaUnmapCalls: 0,
      setMapPushes: 0,
      setMapEntriesPushed: 0,
    });
    await dev.close();
  });

  test('v1 framing when MSG_V2 is not offered (asid 0, no asid field)', async () => {
    const t = new RecordingTransport(fakeKernel(1n << 2n)); // IOTLB_BATCH only
    const dev = open(t);
    await dev.apply([update(0x10000n, 0n, 1)]);
    assert.deepEqual(t.writes, [
      rawMsg(1, 0, BATCH_BEGIN),
      rawMsg(1, 0, UPDATE, 0x10000n, PAGE, uaddr, 3),
      rawMsg(1, 0, BATCH_END),
    ]);
    assert.equal(dev.mappings()[0]?.asid, 0, 'without IOTLB_ASID the kernel uses address space 0');
    await dev.close();
  });

  test('no BATCH_BEGIN/END without IOTLB_BATCH; perms RO=1 WO=2', async () => {
    const t = new RecordingTransport(fakeKernel(1n << 1n)); // IOTLB_MSG_V2 only
    const dev = open(t);
    await dev.apply([
      { ...update(0x10000n, 0n), perm: 'ro' },
      { ...update(0x11000n, PAGE), perm: 'wo' },
    ]);
    assert.deepEqual(t.writes, [
      rawMsg(2, 0, UPDATE, 0x10000n, PAGE, uaddr, 1),
      rawMsg(2, 0, UPDATE, 0x11000n, PAGE, uaddr + PAGE, 2),
    ]);
    await dev.close();
  });

  test('the guard refuses before any write', async () => {
    const t = new RecordingTransport(fakeKernel(ALL_KNOWN));
    const dev = open(t);
    await dev.apply([update(0x10000n, 0n)]);
    const before = t.writes.length;
    const results = await dev.apply([
      update(0x10000n, 0n), // overlap
      update(0n, 0n), // below the IOVA range
      { ...update(0x20000n, 0n), memory: 'nope' },
      update(0x20000n, 0n, 2), // asid out of range
    ]);
    assert.deepEqual(
      results.map((r) => (r.ok ? 'ok' : `${r.errno}/${r.code}`)),
      ['EEXIST/OVERLAP', 'EINVAL/OUT_OF_RANGE', 'EFAULT/NOT_FOUND', 'EINVAL/BAD_ASID'],
    );
    assert.equal(t.writes.length, before, 'not even a BATCH_BEGIN');
    await dev.close();
  });

  test('a write the kernel refuses after the guard passed: errno from the kernel, code KERNEL', async () => {
    const t = new RecordingTransport(fakeKernel(ALL_KNOWN));
    const dev = open(t);
    t.writeErrors.push(undefined, 'EFAULT'); // BATCH_BEGIN accepted, the UPDATE refused
    const [result] = await dev.apply([update(0x10000n, 0n)]);
    assert.ok(result && !result.ok);
    assert.equal(result.errno, 'EFAULT');
    assert.equal(result.code, 'KERNEL');
    assert.deepEqual(dev.mappings(), []);
    assert.equal(tmp.registry.get('mem')?.mappedEntries, 0, 'no reference kept for a refused UPDATE');
    assert.equal(t.writes.at(-1)?.readUInt8(33), BATCH_END, 'the batch is still closed');
    await dev.close();
  });
});

describe('lifecycle ioctls', () => {
  test('suspend, resume, and reset with IOTLB_PERSIST: SET_STATUS 0, mappings kept', async () => {
    const t = new RecordingTransport(fakeKernel(ALL_KNOWN));
    const dev = open(t);
    await dev.apply([update(0x10000n, 0n)]);
    const mark = t.ioctls.length;
    await dev.suspend();
    await dev.resume();
    await dev.reset();
    assert.deepEqual(
      t.ioctls.slice(mark).map((c) => c.request),
      [SUSPEND, RESUME, SET_STATUS, GET_STATUS],
    );
    assert.deepEqual(t.ioctls[mark + 2]?.arg, Buffer.of(0));
    assert.equal(dev.mappings().length, 1);
    await dev.close();
    assert.equal(tmp.registry.get('mem')?.mappedEntries, 0);
  });

  test('reset without IOTLB_PERSIST invalidates everything, in one batch', async () => {
    const t = new RecordingTransport(fakeKernel(0xen)); // MSG_V2 | BATCH | ASID
    const dev = open(t);
    await dev.apply([update(0x10000n, 0n), update(0x20000n, PAGE)]);
    const mark = t.writes.length;
    await dev.reset();
    assert.deepEqual(t.writes.slice(mark), [
      rawMsg(2, 0, BATCH_BEGIN),
      rawMsg(2, 0, INVALIDATE, 0n, U64_MAX),
      rawMsg(2, 0, BATCH_END),
    ]);
    assert.deepEqual(dev.mappings(), []);
    assert.equal(tmp.registry.get('mem')?.mappedEntries, 0);
    await assert.rejects(dev.suspend(), (e: unknown) => e instanceof DeviceError && e.errno === 'EOPNOTSUPP');
    await dev.close();
  });
});

test('a KernelDevice over the simulated kernel behaves like a SimulatedDevice', async () => {
  const sim = new SimulatedVdpa(
    {
      deviceId: 1,
      iommu: 'onchip',
      iovaRange: FULL_IOVA_RANGE,
      asNum: 2,
      groupNum: 2,
      vqCount: 2,
      configSize: 12,
      offeredFeatures: ALL_KNOWN,
      pushDelayMs: 0,
    },
    tmp.registry,
  );
  const t = new RecordingTransport(new Map(), sim.open());
  const dev = open(t);
  assert.deepEqual(
    t.ioctls.map((c) => c.request),
    SETUP,
  );
  assert.equal(dev.facts().negotiatedFeatures, UNDERSTOOD);
  const results = await dev.apply([update(0x10000n, 0n), update(0x10000n, 0n, 1), update(0x11000n, PAGE)]);
  assert.deepEqual(results, Array(3).fill({ ok: true }));
  assert.deepEqual(sim.kernelMappings(), dev.mappings());
  assert.equal(sim.counters.setMapPushes, 2, 'one push per address space batch');
  await dev.close();
  assert.deepEqual(sim.kernelMappings(), []);
});

describe('the real fd transport', () => {
  test('a missing node: DeviceError NOT_FOUND naming ENOENT', () => {
    assert.throws(
      () => new KernelDevice({ node: path.join(tmp.stateDir, 'vhost-vdpa-9'), memory: tmp.registry }),
      (e: unknown) => e instanceof DeviceError && e.code === 'NOT_FOUND' && e.errno === 'ENOENT',
    );
  });

  test('ioctls go through libc (ENOTTY on a regular file); one write of 72 bytes per message', async () => {
    const file = path.join(tmp.stateDir, 'not-a-device');
    fs.writeFileSync(file, '');
    const t = openVhostVdpaFd(file);
    assert.throws(
      () => t.ioctl(SET_OWNER),
      (e: unknown) => e instanceof TransportError && e.errno === 'ENOTTY',
    );
    assert.throws(
      () => t.ioctl(GET_BACKEND_FEATURES, Buffer.alloc(8)),
      (e: unknown) => e instanceof TransportError && e.errno === 'ENOTTY',
    );
    const msg = rawMsg(2, 0, BATCH_BEGIN);
    await t.write(msg);
    t.close();
    assert.deepEqual(fs.readFileSync(file), msg);
    await assert.rejects(
      async () => t.write(msg),
      (e: unknown) => e instanceof TransportError && e.errno === 'EBADF',
    );
  });
});
