/**
 * A simulated device's DMA, end to end through a real SharedMemoryRegistry (a file mmap'd
 * MAP_SHARED): bytes written to the file are read by DMA at their IOVA and back; permissions,
 * unmapped IOVAs, memory references, reset, suspend, close and injected faults.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, afterEach, before, beforeEach, describe, test } from 'node:test';
import { DeviceError, DmaError } from '../../src/device/errors.ts';
import {
  DEFAULT_SIM_FEATURES,
  SimulatedDevice,
  type SimulatedDeviceOptions,
} from '../../src/device/simulated.ts';
import type { IotlbOp, Perm } from '../../src/iotlb/types.ts';
import { MemoryError } from '../../src/memory/types.ts';
import { backendFeatureMask } from '../../src/uapi/constants.ts';
import { PAGE, type TmpRegistry, tmpRegistry } from './device-helpers.ts';

const SIZE = 64n * PAGE;

let tmp: TmpRegistry;
let file: string;
let fd: number;
before(() => {
  tmp = tmpRegistry();
  file = tmp.registry.create({ id: 'disk', size: SIZE, kind: 'file' }).path;
  fd = fs.openSync(file, 'r+');
});
after(() => {
  fs.closeSync(fd);
  tmp.cleanup();
});

type UpdateOp = Extract<IotlbOp, { type: 'update' }>;

const map = (iova: bigint, offset: bigint, size: bigint, perm: Perm = 'rw', asid = 0): UpdateOp => ({
  type: 'update',
  asid,
  iova,
  size,
  memory: 'disk',
  offset,
  perm,
});
const unmap = (iova: bigint, size: bigint, asid = 0): IotlbOp => ({ type: 'invalidate', asid, iova, size });

function pattern(length: number, seed: number): Buffer {
  return Buffer.from(Array.from({ length }, (_, i) => (i * 31 + seed) & 0xff));
}

function fileBytes(offset: bigint, length: number): Buffer {
  const out = Buffer.alloc(length);
  fs.readSync(fd, out, 0, length, Number(offset));
  return out;
}

function dmaError(fn: () => unknown, code: string, iova: bigint): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof DmaError, String(e));
    assert.equal(e.code, code);
    assert.equal(e.iova, iova);
    assert.match(e.message, new RegExp(`0x${iova.toString(16)}`));
    return true;
  });
}

let dev: SimulatedDevice;
const open = (opts: Partial<SimulatedDeviceOptions> = {}) => {
  dev = new SimulatedDevice({ name: 'dma0', ...opts }, tmp.registry);
  return dev;
};
beforeEach(() => {
  fs.writeSync(fd, Buffer.alloc(Number(SIZE)), 0, Number(SIZE), 0);
});
afterEach(async () => {
  await dev.close();
  assert.equal(tmp.registry.get('disk')?.mappedEntries, 0, 'close drops every memory reference');
});

describe('DMA through the IOTLB into shared memory', () => {
  for (const iommu of ['platform', 'onchip'] as const) {
    test(`${iommu}: bytes written to the file are read at iova + delta`, async () => {
      open({ iommu });
      const data = pattern(100, 7);
      fs.writeSync(fd, data, 0, data.length, 0x1000 + 0x345);
      assert.deepEqual(await dev.apply([map(0x100000n, 0x1000n, 4n * PAGE)]), [{ ok: true }]);
      assert.deepEqual(dev.dmaRead(0, 0x100000n + 0x345n, 100), data);
    });
  }

  test('a range spanning two entries is read from both pieces of memory', async () => {
    open();
    // IOVA 0x200000.. -> file 0x8000..; IOVA 0x201000.. -> file 0x3000.. (not contiguous).
    await dev.apply([map(0x200000n, 0x8000n, PAGE), map(0x201000n, 0x3000n, PAGE)]);
    const a = pattern(0x20, 1);
    const b = pattern(0x20, 2);
    fs.writeSync(fd, a, 0, a.length, 0x8000 + 0x1000 - 0x20);
    fs.writeSync(fd, b, 0, b.length, 0x3000);
    assert.deepEqual(dev.dmaRead(0, 0x201000n - 0x20n, 0x40), Buffer.concat([a, b]));
  });

  test('a DMA write lands in the file, at the memory offset of each piece', async () => {
    open({ iommu: 'onchip' });
    await dev.apply([map(0x300000n, 0x5000n, PAGE), map(0x301000n, 0x1000n, PAGE)]);
    const data = pattern(0x100, 9);
    dev.dmaWrite(0, 0x301000n - 0x80n, data);
    assert.deepEqual(fileBytes(0x6000n - 0x80n, 0x80), data.subarray(0, 0x80));
    assert.deepEqual(fileBytes(0x1000n, 0x80), data.subarray(0x80));
    assert.deepEqual(tmp.registry.read('disk', 0x1000n, 0x80), data.subarray(0x80));
  });

  test('permissions: RO allows reads only, WO writes only; a refused write writes nothing', async () => {
    open();
    await dev.apply([
      map(0x3ff000n, 3n * PAGE, PAGE),
      map(0x400000n, 0n, PAGE, 'ro'),
      map(0x401000n, PAGE, PAGE, 'wo'),
    ]);
    assert.doesNotThrow(() => dev.dmaRead(0, 0x400000n, 16));
    dmaError(() => dev.dmaWrite(0, 0x400010n, Buffer.alloc(4, 1)), 'PERMISSION', 0x400010n);
    assert.doesNotThrow(() => dev.dmaWrite(0, 0x401000n, Buffer.alloc(4, 1)));
    dmaError(() => dev.dmaRead(0, 0x401000n, 4), 'PERMISSION', 0x401000n);
    // RW then RO: the write is refused at the first RO byte and nothing at all is written.
    dmaError(() => dev.dmaWrite(0, 0x400000n - 0x10n, Buffer.alloc(0x20, 0xaa)), 'PERMISSION', 0x400000n);
    assert.deepEqual(fileBytes(4n * PAGE - 0x10n, 0x10), Buffer.alloc(0x10));
  });

  test('an unmapped IOVA, another address space, or a gap fails naming the IOVA', async () => {
    open({ iommu: 'onchip' });
    await dev.apply([map(0x500000n, 0n, PAGE), map(0x502000n, PAGE, PAGE)]);
    dmaError(() => dev.dmaRead(0, 0x600000n, 1), 'UNMAPPED', 0x600000n);
    dmaError(() => dev.dmaRead(1, 0x500000n, 1), 'UNMAPPED', 0x500000n);
    dmaError(() => dev.dmaRead(0, 0x500f00n, 0x2000), 'UNMAPPED', 0x501000n);
    dmaError(() => dev.dmaRead(2, 0x500000n, 1), 'BAD_ASID', 0x500000n);
    await dev.apply([unmap(0x500000n, 1n)]);
    dmaError(() => dev.dmaRead(0, 0x500000n, 1), 'UNMAPPED', 0x500000n);
  });
});

describe('memory references follow the entries', () => {
  test('release is refused while mapped and allowed after the unmap', async () => {
    const extra = tmp.registry.create({ id: 'extra', size: 4n * PAGE, kind: 'memfd' });
    open();
    await dev.apply([
      { ...map(0x100000n, 0n, PAGE), memory: extra.id },
      { ...map(0x101000n, PAGE, PAGE), memory: extra.id },
    ]);
    assert.equal(tmp.registry.get('extra')?.mappedEntries, 2);
    assert.throws(
      () => tmp.registry.release('extra'),
      (e: unknown) => e instanceof MemoryError && e.code === 'IN_USE',
    );
    await dev.apply([unmap(0x100000n, 2n * PAGE)]);
    assert.equal(tmp.registry.get('extra')?.mappedEntries, 0);
    assert.doesNotThrow(() => tmp.registry.release('extra'));
  });
});

describe('lifecycle', () => {
  test('reset without IOTLB_PERSIST drops every mapping everywhere', async () => {
    open({ iommu: 'onchip', features: backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID') });
    await dev.apply([map(0x100000n, 0n, PAGE), map(0x100000n, 0n, PAGE, 'rw', 1)]);
    await dev.reset();
    assert.deepEqual(dev.mappings(), []);
    assert.deepEqual(dev.simulator.kernelMappings(), [], 'the kernel tables were invalidated too');
    assert.equal(tmp.registry.get('disk')?.mappedEntries, 0);
    dmaError(() => dev.dmaRead(0, 0x100000n, 1), 'UNMAPPED', 0x100000n);
    // The same range maps again (no EEXIST left behind by the kernel's table).
    assert.deepEqual(await dev.apply([map(0x100000n, 0n, PAGE)]), [{ ok: true }]);
    assert.equal(dev.dmaRead(0, 0x100000n, 1).length, 1);
  });

  test('reset with IOTLB_PERSIST keeps the mappings and the DMA path', async () => {
    open({ iommu: 'platform' });
    await dev.apply([map(0x100000n, 0n, PAGE)]);
    await dev.reset();
    assert.equal(dev.mappings().length, 1);
    assert.equal(dev.dmaRead(0, 0x100000n, 8).length, 8);
    assert.equal(dev.facts().status, 0);
  });

  test('suspend / resume when offered; EOPNOTSUPP otherwise', async () => {
    open({ features: DEFAULT_SIM_FEATURES });
    // Before DRIVER_OK the kernel has nothing to suspend: it answers 0 and does nothing.
    await dev.suspend();
    assert.equal(dev.simulator.suspended, false);
    dev.simulator.setStatus(0xf);
    await dev.suspend();
    assert.equal(dev.simulator.suspended, true);
    await dev.resume();
    assert.equal(dev.simulator.suspended, false);
    await dev.close();
    open({ features: backendFeatureMask('IOTLB_MSG_V2') });
    await assert.rejects(dev.suspend(), (e: unknown) => e instanceof DeviceError && e.errno === 'EOPNOTSUPP');
    await assert.rejects(dev.resume(), (e: unknown) => e instanceof DeviceError && e.code === 'UNSUPPORTED');
  });

  test('after close nothing is mapped and every call is refused', async () => {
    open();
    await dev.apply([map(0x100000n, 0n, PAGE)]);
    await dev.close();
    assert.deepEqual(dev.mappings(), []);
    dmaError(() => dev.dmaRead(0, 0x100000n, 1), 'UNMAPPED', 0x100000n);
    await assert.rejects(
      dev.apply([map(0x100000n, 0n, PAGE)]),
      (e: unknown) => e instanceof DeviceError && e.code === 'CLOSED',
    );
  });
});

describe('injected faults', () => {
  test('failOn makes one op of a batch fail with EFAULT INJECTED; the others apply', async () => {
    open({ iommu: 'onchip', failOn: (msg) => msg.iotlb.iova === 0x101000n });
    const results = await dev.apply([
      map(0x100000n, 0n, PAGE),
      map(0x101000n, PAGE, PAGE),
      map(0x102000n, 2n * PAGE, PAGE),
    ]);
    assert.equal(results[0]?.ok, true);
    assert.equal(results[2]?.ok, true);
    const bad = results[1];
    assert.ok(bad && !bad.ok);
    assert.equal(bad.errno, 'EFAULT');
    assert.equal(bad.code, 'INJECTED');
    assert.deepEqual(
      dev.mappings().map((m) => m.iova),
      [0x100000n, 0x102000n],
    );
    assert.deepEqual(dev.simulator.kernelMappings(), dev.mappings());
    assert.equal(tmp.registry.get('disk')?.mappedEntries, 2);
    assert.equal(dev.counters().setMapPushes, 1);
    assert.equal(dev.counters().setMapEntriesPushed, 2);
    dmaError(() => dev.dmaRead(0, 0x101000n, 1), 'UNMAPPED', 0x101000n);
  });

  test('failAfter: from the given message on, every UPDATE and INVALIDATE fails', async () => {
    open({ failAfter: 2 });
    const results = await dev.apply([
      map(0x100000n, 0n, PAGE),
      map(0x101000n, PAGE, PAGE),
      map(0x102000n, 2n * PAGE, PAGE),
      unmap(0x100000n, PAGE),
    ]);
    assert.deepEqual(
      results.map((r) => (r.ok ? 'ok' : r.code)),
      ['ok', 'ok', 'INJECTED', 'INJECTED'],
    );
    assert.equal(dev.mappings().length, 2);
  });
});
