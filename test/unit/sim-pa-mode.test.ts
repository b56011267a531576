/**
 * The simulator's PA mode, rule by rule as the kernel answered on vp_vdpa and vdpa_sim use_va=0
 * (as measured on Debian 6.12 under QEMU; docs/kernel-notes.md), by raw messages to the simulated kernel: one entry per
 * physically contiguous run, page rounding, any memory of the owner pinned (private anonymous
 * memory too), holes refused with full rollback, VmPin counted per entry, RLIMIT_MEMLOCK exact.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { parseDeviceSpec } from '../../src/device/factory.ts';
import { PinnedMemory } from '../../src/device/memlock.ts';
import { SimulatedVdpa } from '../../src/device/sim-kernel.ts';
import { IOVA_RANGE_39_BITS, SimulatedDevice } from '../../src/device/simulated.ts';
import type { VhostTransport } from '../../src/device/transport.ts';
import { PROT_READ } from '../../src/sys/libc.ts';
import { IotlbMsgType, VHOST_ACCESS_RO, VHOST_ACCESS_RW } from '../../src/uapi/constants.ts';
import { Ioctl } from '../../src/uapi/ioctl.ts';
import {
  errnoOf,
  PAGE,
  privateMemory,
  rawMsg,
  type TmpRegistry,
  tmpRegistry,
  vpVdpaConfig,
} from './device-helpers.ts';

const { UPDATE, INVALIDATE, BATCH_BEGIN, BATCH_END } = IotlbMsgType;
const MiB = 1n << 20n;
const X = 0x4000_0000n;

let tmp: TmpRegistry;
let ram: bigint;
before(() => {
  tmp = tmpRegistry();
  ram = tmp.registry.create({ id: 'ram', size: 8n * MiB, kind: 'memfd' }).uaddr;
});
after(() => tmp.cleanup());

function owned(sim: SimulatedVdpa): VhostTransport {
  const t = sim.open();
  t.ioctl(Ioctl.VHOST_SET_OWNER);
  return t;
}

const update = (t: VhostTransport, iova: bigint, size: bigint, uaddr: bigint, perm = VHOST_ACCESS_RW) =>
  t.write(rawMsg(1, 0, UPDATE, iova, size, uaddr, perm));
const invalidate = (t: VhostTransport, iova: bigint, size: bigint) =>
  t.write(rawMsg(1, 0, INVALIDATE, iova, size));

const entries = (sim: SimulatedVdpa) => sim.kernelMappings().map((m) => [m.iova, m.size, m.offset]);

describe('PA mode (vhost_vdpa_pa_map)', () => {
  test('one entry per page of shmem; INVALIDATE of page 5 removes page 5 only (VmPin -4 kB)', () => {
    const sim = new SimulatedVdpa(vpVdpaConfig(), tmp.registry);
    const t = owned(sim);
    update(t, X, 16n * PAGE, ram);
    assert.equal(sim.kernelMappings().length, 16);
    assert.equal(sim.pins?.pinnedBytes, 16n * PAGE);
    assert.equal(sim.counters.dmaMapCalls, 16, 'iommu_map per run');
    invalidate(t, X + 5n * PAGE, PAGE);
    assert.equal(sim.kernelMappings().length, 15);
    assert.equal(sim.pins?.pinnedBytes, 15n * PAGE);
    assert.equal(sim.deviceTable(0)?.lookup(X + 5n * PAGE), undefined);
    assert.equal(sim.deviceTable(0)?.lookup(X + 6n * PAGE)?.offset, 6n * PAGE, 'the rest stays mapped');
    t.close();
    assert.equal(sim.pins?.pinnedBytes, 0n, 'close unpins everything');
  });

  test('THP (512 contiguous pages): the same INVALIDATE removes the whole 2 MiB run', () => {
    const sim = new SimulatedVdpa(vpVdpaConfig({ contiguousPages: 512 }), tmp.registry);
    const t = owned(sim);
    update(t, X, 3n * MiB, ram + MiB);
    // Runs follow the memory's 2 MiB blocks: [1, 2) MiB, then [2, 4) MiB of the memory.
    assert.deepEqual(entries(sim), [
      [X, MiB, MiB],
      [X + MiB, 2n * MiB, 2n * MiB],
    ]);
    invalidate(t, X + MiB + 5n * PAGE, PAGE);
    assert.deepEqual(entries(sim), [[X, MiB, MiB]]);
    assert.equal(sim.pins?.pinnedBytes, MiB);
    t.close();
  });

  test('entries are page-rounded: [X+0x800, +0x800) then [X, +0x800) is EFAULT (EEXIST)', () => {
    const sim = new SimulatedVdpa(vpVdpaConfig(), tmp.registry);
    const t = owned(sim);
    update(t, X + 0x800n, 0x800n, ram + 0x800n);
    assert.deepEqual(entries(sim), [[X, PAGE, 0n]]);
    assert.equal(
      errnoOf(() => update(t, X, 0x800n, ram)),
      'EFAULT',
    );
    // An UPDATE straddling two pages pins both.
    update(t, X + 0x10_0800n, PAGE, ram + 0x1800n);
    assert.deepEqual(entries(sim).slice(1), [
      [X + 0x10_0000n, PAGE, PAGE],
      [X + 0x10_1000n, PAGE, 2n * PAGE],
    ]);
    assert.equal(sim.pins?.pinnedBytes, 3n * PAGE);
    t.close();
  });

  test('private memory is pinned and mapped; VA mode accepts it and maps nothing', () => {
    const priv = privateMemory(4n);
    try {
      const pa = new SimulatedVdpa(vpVdpaConfig(), tmp.registry);
      const t = owned(pa);
      update(t, X, 4n * PAGE, priv.addr);
      assert.equal(pa.kernelMappings().length, 4);
      assert.match(pa.kernelMappings()[0]!.memory, /^unregistered@0x/);
      assert.equal(pa.pins?.pinnedBytes, 4n * PAGE);
      t.close();

      const va = new SimulatedVdpa(vpVdpaConfig({ iommu: 'onchip', useVa: true }), tmp.registry);
      const v = owned(va);
      update(v, X, 4n * PAGE, priv.addr);
      assert.deepEqual(va.kernelMappings(), []);
      assert.equal(va.pins, undefined);
      v.close();
    } finally {
      priv.free();
    }
  });

  test('a hole is EFAULT and fully rolled back, also after whole pin batches were mapped', () => {
    const priv = privateMemory(1024n, [600n]);
    try {
      const sim = new SimulatedVdpa(vpVdpaConfig(), tmp.registry);
      const t = owned(sim);
      assert.equal(
        errnoOf(() => update(t, X, 1024n * PAGE, priv.addr)),
        'EFAULT',
      );
      assert.deepEqual(sim.kernelMappings(), []);
      assert.equal(sim.pins?.pinnedBytes, 0n);
      assert.equal(sim.deviceTable(0)?.count, 0);
      // pin_user_pages takes 512 pages a call: the runs that ended inside the first call were
      // mapped (pages 0..510), then unmapped again by vhost_vdpa_unmap.
      assert.deepEqual([sim.counters.dmaMapCalls, sim.counters.dmaUnmapCalls], [511, 511]);
      // The pages before the hole still map on their own.
      update(t, X, 600n * PAGE, priv.addr);
      assert.equal(sim.pins?.pinnedBytes, 600n * PAGE);
      t.close();
    } finally {
      priv.free();
    }
  });

  test('a set_map parent outside a batch pushes per run; inside one, once at BATCH_END', () => {
    const sim = new SimulatedVdpa(vpVdpaConfig({ iommu: 'onchip', useVa: false }), tmp.registry);
    const t = owned(sim);
    update(t, X, 4n * PAGE, ram);
    assert.equal(sim.counters.setMapPushes, 4);
    t.write(rawMsg(1, 0, BATCH_BEGIN));
    update(t, X + MiB, 4n * PAGE, ram);
    assert.equal(sim.pins?.pinnedBytes, 8n * PAGE, 'pinned at once inside the batch');
    invalidate(t, X, 4n * PAGE);
    assert.equal(sim.pins?.pinnedBytes, 4n * PAGE, 'and unpinned at once');
    t.write(rawMsg(1, 0, BATCH_END));
    assert.equal(sim.counters.setMapPushes, 5);
    assert.equal(sim.deviceTable(0)?.count, 4);
    t.close();
  });

  test('RLIMIT_MEMLOCK is exact: npages + pinned_vm > limit refuses; limit 0 refuses one page', () => {
    const sim = new SimulatedVdpa(vpVdpaConfig({ memlock: 4n * PAGE + 100n }), tmp.registry);
    const t = owned(sim);
    update(t, X, 3n * PAGE, ram);
    assert.equal(
      errnoOf(() => update(t, X + MiB, 2n * PAGE, ram)),
      'EFAULT',
    );
    update(t, X + MiB, PAGE, ram);
    assert.equal(sim.pins?.pinnedBytes, 4n * PAGE);
    t.close();
    const none = new SimulatedVdpa(vpVdpaConfig({ memlock: 0n }), tmp.registry);
    const n = owned(none);
    assert.equal(
      errnoOf(() => update(n, X, PAGE, ram)),
      'EFAULT',
    );
    n.close();
  });

  test('parents of one owner share its pinned_vm (vmPin) and its limit', () => {
    const vmPin = new PinnedMemory(() => 4n * PAGE);
    const a = new SimulatedVdpa(vpVdpaConfig({ vmPin }), tmp.registry);
    const b = new SimulatedVdpa(vpVdpaConfig({ vmPin, iommu: 'onchip', useVa: false }), tmp.registry);
    const ta = owned(a);
    const tb = owned(b);
    update(ta, X, 3n * PAGE, ram);
    assert.equal(
      errnoOf(() => update(tb, X, 2n * PAGE, ram)),
      'EFAULT',
    );
    update(tb, X, PAGE, ram);
    assert.equal(vmPin.pinnedBytes, 4n * PAGE);
    ta.close();
    tb.close();
    assert.equal(vmPin.pinnedBytes, 0n);
  });

  test('a RO entry pins a read-only vma; a WO or RW one needs it writable (FOLL_WRITE)', () => {
    const readOnly = privateMemory(1n, [], PROT_READ);
    const ro = readOnly.addr;
    try {
      const sim = new SimulatedVdpa(vpVdpaConfig(), tmp.registry);
      const t = owned(sim);
      assert.equal(
        errnoOf(() => update(t, X, PAGE, ro, VHOST_ACCESS_RW)),
        'EFAULT',
      );
      update(t, X, PAGE, ro, VHOST_ACCESS_RO);
      assert.equal(sim.kernelMappings().length, 1);
      t.close();
    } finally {
      readOnly.free();
    }
  });
});

describe('the kinds a simulated device can be', () => {
  test("a platform IOMMU has vp_vdpa's facts and pins; VA mode is refused for it", () => {
    const dev = new SimulatedDevice({ name: 'vp', iovaRange: IOVA_RANGE_39_BITS }, tmp.registry);
    const f = dev.facts();
    assert.deepEqual(
      [f.iommu, f.pinned, f.offeredFeatures, f.asNum, f.vqCount, f.configSize, f.pageSize],
      ['platform', true, 0x10en, 1, 3, 4096, 4096n],
    );
    assert.deepEqual(f.iovaRange, { first: 0n, last: 0x7f_ffff_ffffn });
    void dev.close();
    assert.throws(() => new SimulatedVdpa(vpVdpaConfig({ useVa: true }), tmp.registry), /cannot use VA mode/);
  });

  test('device-spec keys configure every kind', () => {
    const spec = parseDeviceSpec(
      'sim:s,iommu=onchip,onchipMap=dma_map,useVa=0,pageSize=0x4000,contiguousPages=512,keepsMapOnReset=1,configSize=24',
    );
    assert.deepEqual(spec, {
      kind: 'simulated',
      options: {
        name: 's',
        iommu: 'onchip',
        onchipMap: 'dma_map',
        useVa: false,
        pageSize: 0x4000n,
        contiguousPages: 512,
        keepsMapOnReset: true,
        configSize: 24,
      },
    });
    for (const [bad, message] of [
      ['sim:s,useVa=1', /useVa=1 needs iommu=onchip/],
      ['sim:s,onchipMap=dma_map', /onchipMap needs iommu=onchip/],
      ['sim:s,iommu=onchip,onchipMap=iommu', /set_map or dma_map/],
      ['sim:s,pageSize=0x3000', /power of two/],
      ['sim:s,contiguousPages=0', /integer >= 1/],
      ['sim:s,iommu=onchip,useVa=yes', /0 or 1/],
    ] as const) {
      assert.throws(() => parseDeviceSpec(bad), message, bad);
    }
  });
});
