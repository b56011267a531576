/**
 * RLIMIT_MEMLOCK for devices that pin (PA mode): the agent's pre-write guard sums the pages of
 * every pinning device and refuses, with ENOMEM and the numbers, an UPDATE that would pass the
 * limit; the simulated parent refuses like vhost_vdpa_pa_map when the guard is bypassed.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { openDevices } from '../../src/device/factory.ts';
import { PAGE_SIZE, PinnedMemory, pagesOf, processPinnedMemory } from '../../src/device/memlock.ts';
import { SimulatedVdpa } from '../../src/device/sim-kernel.ts';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import { TransportError } from '../../src/device/transport.ts';
import type { OpResult } from '../../src/device/types.ts';
import { FULL_IOVA_RANGE, type IotlbOp } from '../../src/iotlb/types.ts';
import { getrlimit, RLIM_INFINITY, RLIMIT_MEMLOCK } from '../../src/sys/libc.ts';
import { IotlbMsgType, VHOST_ACCESS_RW } from '../../src/uapi/constants.ts';
import { Ioctl } from '../../src/uapi/ioctl.ts';
import { rawMsg, type TmpRegistry, tmpRegistry } from './device-helpers.ts';

const KiB = 1024n;
const map = (iova: bigint, size: bigint, offset = 0n): IotlbOp => ({
  type: 'update',
  asid: 0,
  iova,
  size,
  memory: 'ram',
  offset,
  perm: 'rw',
});
const unmap = (iova: bigint, size: bigint): IotlbOp => ({ type: 'invalidate', asid: 0, iova, size });

function refusedForMemlock(r: OpResult | undefined, limit: string, needed: string): void {
  assert.ok(r && !r.ok, 'expected a refusal');
  assert.equal(r.errno, 'ENOMEM');
  assert.equal(r.code, 'MEMLOCK');
  assert.equal(r.field, 'size');
  assert.match(r.message, /RLIMIT_MEMLOCK/);
  assert.ok(r.message.includes(`(${limit} bytes`), r.message);
  assert.ok(r.message.includes(`pinning ${needed} bytes more`), r.message);
}

test('pages are counted as vhost_vdpa_pa_map does: PFN_UP(size + (iova & ~PAGE_MASK))', () => {
  assert.equal(pagesOf(0n, 4096n), 1n);
  assert.equal(pagesOf(0n, 4097n), 2n);
  assert.equal(pagesOf(0x800n, 4096n), 2n);
  assert.equal(pagesOf(0xfffn, 1n), 1n);
  assert.equal(pagesOf(0x1000n, 0x20_0000n), 512n);
  const pins = new PinnedMemory(() => 3n * PAGE_SIZE + 100n); // PFN_DOWN: 3 pages
  assert.equal(pins.refusal(0n, 3n * PAGE_SIZE), undefined);
  pins.pin(0n, 2n * PAGE_SIZE);
  assert.equal(pins.pinnedBytes, 2n * PAGE_SIZE);
  assert.equal(pins.refusal(0x1000n, PAGE_SIZE), undefined);
  assert.ok(pins.refusal(0x1800n, PAGE_SIZE)); // straddles two pages
  pins.unpin(0n, 2n * PAGE_SIZE);
  assert.equal(pins.pinnedBytes, 0n);
  assert.equal(new PinnedMemory(() => RLIM_INFINITY).refusal(0n, (1n << 64n) - 1n), undefined);
});

test("the agent's own account follows its real RLIMIT_MEMLOCK", () => {
  const { cur } = getrlimit(RLIMIT_MEMLOCK);
  const overLimit = processPinnedMemory().refusal(0n, cur === RLIM_INFINITY ? 1n << 40n : cur + PAGE_SIZE);
  if (cur === RLIM_INFINITY) assert.equal(overLimit, undefined);
  else assert.ok(overLimit?.includes(`(0x${cur.toString(16)} bytes`), overLimit);
});

describe('pinning devices', () => {
  let tmp: TmpRegistry;
  before(() => {
    tmp = tmpRegistry();
    tmp.registry.create({ id: 'ram', size: 1024n * KiB, kind: 'memfd' });
  });
  after(() => tmp.cleanup());

  test('the guard sums every device sharing the account and refuses past the limit', async () => {
    const limit = 64n * KiB;
    const pins = new PinnedMemory(() => limit);
    const a = new SimulatedDevice({ name: 'a', memlock: limit, pins }, tmp.registry);
    const b = new SimulatedDevice({ name: 'b', memlock: limit, pins, iommu: 'onchip' }, tmp.registry);
    try {
      assert.equal(a.facts().pinned, true);
      assert.deepEqual(await a.apply([map(0x10_0000n, 32n * KiB)]), [{ ok: true }]);
      assert.deepEqual(await b.apply([map(0x10_0000n, 24n * KiB, 32n * KiB)]), [{ ok: true }]);
      assert.equal(pins.pinnedBytes, 56n * KiB);

      const written = a.counters().messagesWritten;
      const [refused] = await a.apply([map(0x20_0000n, 12n * KiB)]);
      refusedForMemlock(refused, '0x10000', '0x3000');
      assert.ok(refused && !refused.ok && refused.message.includes('0xe000 already pinned'), String(refused));
      assert.equal(a.counters().messagesWritten, written, 'a refused op is not written');
      assert.equal(a.mappings().length, 1);

      // Exactly up to the limit fits; an INVALIDATE on the other device makes room.
      assert.deepEqual(await a.apply([map(0x20_0000n, 8n * KiB)]), [{ ok: true }]);
      refusedForMemlock((await b.apply([map(0x30_0000n, 4n * KiB)]))[0], '0x10000', '0x1000');
      assert.deepEqual(await b.apply([unmap(0x10_0000n, 24n * KiB)]), [{ ok: true }]);
      assert.deepEqual(await a.apply([map(0x30_0000n, 24n * KiB)]), [{ ok: true }]);
      assert.equal(pins.pinnedBytes, limit);

      // Closing a device releases what it pinned.
      await a.close();
      assert.equal(pins.pinnedBytes, 0n);
    } finally {
      await a.close();
      await b.close();
    }
  });

  test('an onchip parent without a memlock is in VA mode: nothing counted, nothing refused', async () => {
    const va = new SimulatedDevice({ name: 'va', iommu: 'onchip' }, tmp.registry);
    try {
      assert.equal(va.facts().pinned, false);
      assert.deepEqual(await va.apply([map(0n, 1024n * KiB)]), [{ ok: true }]);
      assert.equal(va.simulator.pins, undefined);
    } finally {
      await va.close();
    }
  });

  test('a platform IOMMU always pins (no VA mode), under no limit unless memlock is given', async () => {
    const pa = new SimulatedDevice({ name: 'pa' }, tmp.registry);
    try {
      assert.equal(pa.facts().pinned, true);
      assert.deepEqual(await pa.apply([map(0n, 1024n * KiB)]), [{ ok: true }]);
      assert.equal(pa.simulator.pins?.pinnedBytes, 1024n * KiB);
    } finally {
      await pa.close();
    }
    assert.throws(
      () => new SimulatedDevice({ name: 'bad', useVa: true }, tmp.registry),
      /cannot use VA mode/,
    );
  });

  test('the simulated kernel refuses like vhost_vdpa_pa_map when the guard is bypassed', async () => {
    const sim = new SimulatedVdpa(
      {
        deviceId: 1,
        iommu: 'platform',
        iovaRange: FULL_IOVA_RANGE,
        asNum: 1,
        groupNum: 1,
        vqCount: 2,
        configSize: 64,
        offeredFeatures: 0n,
        pushDelayMs: 0,
        memlock: 16n * KiB,
      },
      tmp.registry,
    );
    const file = sim.open();
    try {
      file.ioctl(Ioctl.VHOST_SET_OWNER);
      const uaddr = tmp.registry.translate('ram', 0n, 16n * KiB);
      const update = (iova: bigint, size: bigint) =>
        file.write(rawMsg(1, 0, IotlbMsgType.UPDATE, iova, size, uaddr, VHOST_ACCESS_RW));
      await update(0x10_0000n, 12n * KiB);
      assert.throws(
        () => update(0x20_0000n, 8n * KiB),
        (e: unknown) => e instanceof TransportError && e.errno === 'EFAULT' && /ENOMEM/.test(e.message),
      );
      assert.equal(sim.kernelMappings().length, 3, 'one entry per page: shmem pages are not contiguous');
      await update(0x20_0000n, 4n * KiB);
      assert.equal(sim.pins?.pinnedBytes, 16n * KiB);
    } finally {
      file.close();
    }
    assert.equal(sim.pins?.pinnedBytes, 0n);
  });

  test('device specs: memlock=BYTES, one value for every simulated device, shared by them', async () => {
    const devices = await openDevices(
      ['sim:p0,memlock=0x4000', 'sim:p1,iommu=onchip,memlock=16384', 'sim:free,iommu=onchip'],
      tmp.registry,
    );
    try {
      const [p0, p1, free] = devices;
      assert.deepEqual(
        devices.map((d) => d.facts().pinned),
        [true, true, false],
      );
      assert.deepEqual(await p0!.apply([map(0n, 12n * KiB)]), [{ ok: true }]);
      refusedForMemlock((await p1!.apply([map(0n, 8n * KiB)]))[0], '0x4000', '0x2000');
      assert.deepEqual(await free!.apply([map(0n, 1024n * KiB)]), [{ ok: true }]);
    } finally {
      await Promise.all(devices.map((d) => d.close()));
    }
    await assert.rejects(
      openDevices(['sim:p0,memlock=0x4000', 'sim:p1,memlock=0x8000'], tmp.registry),
      /memlock=32768 differs from 16384/,
    );
  });
});
