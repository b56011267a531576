/**
 * Which parents the agent's attach takes: a device whose reset at a ring stop would keep the VMM's
 * memory mapped. IOTLB_PERSIST says so, and so does a VDUSE parent without it (vduse_vdpa_reset
 * ignores VDPA_RESET_F_CLEAN_MAP), which discovery tells from sysfs (the device sits under
 * /sys/devices/virtual/vduse), never from its name. The kernel devices here are simulated parents
 * behind a fake sysfs and /dev; the kernel tier's blk-io step attaches the real VDUSE device.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { deviceSideFor } from '../../src/agent/attach-device-side.ts';
import { DeviceError } from '../../src/device/errors.ts';
import { openDevices } from '../../src/device/factory.ts';
import { SimulatedVdpa } from '../../src/device/sim-kernel.ts';
import type { Device } from '../../src/device/types.ts';
import type { VhostVdpaDevice } from '../../src/device/vhost-vdpa.ts';
import { FULL_IOVA_RANGE } from '../../src/iotlb/types.ts';
import { backendFeatureMask } from '../../src/uapi/constants.ts';
import { type TmpRegistry, tmpRegistry } from './device-helpers.ts';

/** What VDUSE and vdpa_sim offered on 6.12 without IOTLB_PERSIST (docs/kernel-notes.md). */
const NO_PERSIST = backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID');

let tmp: TmpRegistry;
let root: string;
before(() => {
  tmp = tmpRegistry();
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-attach-parent-'));
  // /sys/bus/vdpa/devices/<name> links to where the device sits in /sys/devices.
  const sys = path.join(root, 'sys');
  const bus = path.join(sys, 'bus');
  fs.mkdirSync(bus, { recursive: true });
  const sits = {
    // qemu-storage-daemon's VDUSE export: vduse_dev_init_vdpa under the VDUSE class device.
    blk0: path.join('devices', 'virtual', 'vduse', 'blk0', 'blk0'),
    // vdpa_sim: no parent device at all.
    sim0: path.join('devices', 'sim0'),
  };
  for (const [name, where] of Object.entries(sits)) {
    const i = name === 'blk0' ? 0 : 1;
    fs.mkdirSync(path.join(sys, where, `vhost-vdpa-${i}`), { recursive: true });
    fs.symlinkSync(path.join('..', where), path.join(bus, name));
  }
  fs.mkdirSync(path.join(root, 'dev'));
  for (const n of ['vhost-vdpa-0', 'vhost-vdpa-1']) fs.writeFileSync(path.join(root, 'dev', n), '');
});
after(() => {
  fs.rmSync(root, { recursive: true, force: true });
  tmp.cleanup();
});

const discovery = () => ({ devDir: path.join(root, 'dev'), sysDir: path.join(root, 'sys', 'bus') });

/** Both nodes opened as kernel devices; each is a simulated parent without IOTLB_PERSIST. */
async function openBoth(): Promise<Device[]> {
  const parent = (keepsMapOnReset: boolean) =>
    new SimulatedVdpa(
      {
        deviceId: 2,
        iommu: 'onchip',
        onchipMap: 'set_map',
        useVa: true,
        iovaRange: FULL_IOVA_RANGE,
        asNum: 1,
        groupNum: 1,
        vqCount: 1,
        configSize: 60,
        offeredFeatures: NO_PERSIST,
        pushDelayMs: 0,
        keepsMapOnReset,
      },
      tmp.registry,
    );
  // The VDUSE-like parent behaves as VDUSE; the agent learns that from sysfs only.
  const sims = new Map([
    [path.join(root, 'dev', 'vhost-vdpa-0'), parent(true)],
    [path.join(root, 'dev', 'vhost-vdpa-1'), parent(false)],
  ]);
  return openDevices(['kernel:auto'], tmp.registry, undefined, {
    discovery: discovery(),
    openTransport: (node) => sims.get(node)!.open(),
    readVmPin: () => 0n,
  });
}

test('attach takes a VDUSE parent without IOTLB_PERSIST and refuses any other parent without it', async () => {
  const devices = await openBoth();
  try {
    const [vduse, sim] = devices as [VhostVdpaDevice, VhostVdpaDevice];
    assert.deepEqual(
      devices.map((d) => [
        d.name,
        d.facts().negotiatedFeatures,
        (d as VhostVdpaDevice).parentKeepsMapOnReset,
      ]),
      [
        ['blk0', NO_PERSIST, true],
        ['sim0', NO_PERSIST, false],
      ],
    );
    const side = deviceSideFor(vduse, async () => {});
    assert.equal(side.queueCount, 1);
    assert.throws(
      () => deviceSideFor(sim, async () => {}),
      (e: unknown) =>
        e instanceof DeviceError && e.code === 'UNSUPPORTED' && /sim0.*IOTLB_PERSIST/.test(e.message),
    );
  } finally {
    await Promise.all(devices.map((d) => d.close()));
  }
});
