/**
 * Discovery tells the truth: whether a parent pins is asked of the kernel (one page mapped and
 * invalidated, VmPin read before and after), and what /proc/self says is parsed exactly. The
 * probe runs here against the simulated kernel in each mode, whose pinned_vm stands in for VmPin.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { openDevices } from '../../src/device/factory.ts';
import { probePinning } from '../../src/device/pin-probe.ts';
import { type SimulatedVdpaConfig, SimulatedVdpa } from '../../src/device/sim-kernel.ts';
import { FULL_IOVA_RANGE } from '../../src/iotlb/types.ts';
import { ownVmPin, parseMaps, parseVmPin } from '../../src/sys/proc-self.ts';
import { type TmpRegistry, tmpRegistry, vpVdpaConfig } from './device-helpers.ts';

const STATUS = `Name:\tnode
VmPeak:\t 1168044 kB
VmLck:\t       0 kB
VmPin:\t    1028 kB
VmHWM:\t   70400 kB
`;

describe('/proc/self', () => {
  test('VmPin is read in bytes; a kernel without the line gives undefined', () => {
    assert.equal(parseVmPin(STATUS), 1028n * 1024n);
    assert.equal(parseVmPin(STATUS.replace(/VmPin.*\n/, '')), undefined);
    assert.equal(parseVmPin('VmPin:\t       0 kB\n'), 0n);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-status-'));
    try {
      fs.writeFileSync(path.join(dir, 'status'), STATUS);
      assert.equal(ownVmPin(path.join(dir, 'status')), 1028n * 1024n);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    assert.equal(typeof ownVmPin(), 'bigint', 'this kernel shows VmPin');
  });

  test('maps lines give range, permissions and sharing', () => {
    const maps = [
      '55d0c0000000-55d0c0021000 r--p 00000000 fd:01 1234    /usr/bin/node',
      '7f0000000000-7f0000100000 rw-s 00000000 00:01 99      /memfd:ram (deleted)',
      '7f0000200000-7f0000201000 ---p 00000000 00:00 0 ',
      'garbage',
    ].join('\n');
    assert.deepEqual(parseMaps(maps), [
      { start: 0x55d0c0000000n, end: 0x55d0c0021000n, read: true, write: false, shared: false },
      { start: 0x7f0000000000n, end: 0x7f0000100000n, read: true, write: true, shared: true },
      { start: 0x7f0000200000n, end: 0x7f0000201000n, read: false, write: false, shared: false },
    ]);
  });
});

let tmp: TmpRegistry;
before(() => {
  tmp = tmpRegistry();
});
after(() => tmp.cleanup());

function parent(over: Partial<SimulatedVdpaConfig>): SimulatedVdpa {
  return new SimulatedVdpa(
    vpVdpaConfig({ iovaRange: { first: 0x800n, last: FULL_IOVA_RANGE.last }, ...over }),
    tmp.registry,
  );
}

const vmPinOf = (sim: SimulatedVdpa) => () => sim.pins?.pinnedBytes ?? 0n;

describe('the pinning probe', () => {
  test('a PA-mode parent pins the page: true; nothing is left mapped or pinned', async () => {
    const sim = parent({});
    assert.equal(await probePinning({ open: () => sim.open(), readVmPin: vmPinOf(sim) }), true);
    assert.deepEqual(sim.kernelMappings(), []);
    assert.equal(sim.pins?.pinnedBytes, 0n);
    assert.equal(sim.counters.dmaMapCalls, 1, 'at the first whole page of the range');
    sim.open().close(); // the node was closed again
  });

  test('a VA-mode parent (set_map or dma_map) pins nothing: false, one push at BATCH_END', async () => {
    for (const onchipMap of ['set_map', 'dma_map'] as const) {
      const sim = parent({ iommu: 'onchip', onchipMap, useVa: true });
      assert.equal(await probePinning({ open: () => sim.open(), readVmPin: vmPinOf(sim) }), false);
      assert.equal(sim.counters.setMapPushes, onchipMap === 'set_map' ? 1 : 0);
      assert.equal(sim.deviceTable(0)?.count, 0);
    }
  });

  test('a PA-mode parent that cannot pin (RLIMIT_MEMLOCK 0) refuses the UPDATE: still true', async () => {
    const sim = parent({ memlock: 0n });
    assert.equal(await probePinning({ open: () => sim.open(), readVmPin: vmPinOf(sim) }), true);
  });

  test('without VmPin the kernel cannot tell: undefined, and the node is not opened', async () => {
    let opened = 0;
    const sim = parent({});
    const open = () => {
      opened++;
      return sim.open();
    };
    assert.equal(await probePinning({ open, readVmPin: () => undefined }), undefined);
    assert.equal(opened, 0);
  });

  test('openDevices takes pinned from the probe and iommu from sysfs', async () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-probe-'));
    try {
      const pci = path.join(root, 'sys', 'pci0000:00', '0000:00:03.0');
      fs.mkdirSync(path.join(pci, 'vp0', 'vhost-vdpa-0'), { recursive: true });
      fs.symlinkSync('../../../kernel/iommu_groups/4', path.join(pci, 'iommu_group'));
      fs.mkdirSync(path.join(root, 'sys', 'bus'), { recursive: true });
      fs.symlinkSync('../pci0000:00/0000:00:03.0/vp0', path.join(root, 'sys', 'bus', 'vp0'));
      fs.mkdirSync(path.join(root, 'dev'));
      for (const n of ['vhost-vdpa-0', 'vhost-vdpa-1']) fs.writeFileSync(path.join(root, 'dev', n), '');
      const sims = new Map([
        [path.join(root, 'dev', 'vhost-vdpa-0'), parent({})],
        [path.join(root, 'dev', 'vhost-vdpa-1'), parent({ iommu: 'onchip', useVa: true })],
      ]);
      let current: SimulatedVdpa | undefined;
      const devices = await openDevices(['kernel:auto'], tmp.registry, undefined, {
        discovery: { devDir: path.join(root, 'dev'), sysDir: path.join(root, 'sys', 'bus') },
        openTransport: (node) => {
          current = sims.get(node)!;
          return current.open();
        },
        readVmPin: () => current?.pins?.pinnedBytes ?? 0n,
      });
      try {
        assert.deepEqual(
          devices.map((d) => [d.name, d.facts().pinned, d.facts().iommu]),
          [
            ['vp0', true, 'platform'],
            ['vhost-vdpa-1', false, 'unknown'],
          ],
        );
      } finally {
        await Promise.all(devices.map((d) => d.close()));
      }
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });
});
