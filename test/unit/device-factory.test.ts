/** Device specs, discovery over fake /dev and /sys trees, and openDevices. */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  describeNode,
  discoverVhostVdpa,
  listVdpaDevices,
  listVhostVdpaNodes,
} from '../../src/device/discovery.ts';
import { DeviceError } from '../../src/device/errors.ts';
import { openDevices, parseDeviceSpec } from '../../src/device/factory.ts';
import { SimulatedVdpa } from '../../src/device/sim-kernel.ts';
import { TransportError } from '../../src/device/transport.ts';
import { VhostVdpaDevice } from '../../src/device/vhost-vdpa.ts';
import { FULL_IOVA_RANGE } from '../../src/iotlb/types.ts';
import { RecordingTransport, type TmpRegistry, tmpRegistry } from './device-helpers.ts';

describe('parseDeviceSpec', () => {
  test('a simulated device with every option', () => {
    assert.deepEqual(
      parseDeviceSpec(
        'sim:vdpa0,iommu=onchip,asnum=2,range=0x1000-0xffffffff,features=MSG_V2|iotlb_batch|0x100,pushDelayMs=5,deviceId=2,vqs=4',
      ),
      {
        kind: 'simulated',
        options: {
          name: 'vdpa0',
          iommu: 'onchip',
          asNum: 2,
          iovaRange: { first: 0x1000n, last: 0xffff_ffffn },
          features: 0x106n,
          pushDelayMs: 5,
          deviceId: 2,
          vqCount: 4,
        },
      },
    );
    assert.deepEqual(parseDeviceSpec('sim:a'), { kind: 'simulated', options: { name: 'a' } });
    assert.deepEqual(parseDeviceSpec('sim:b,iommu=onchip,disk=/var/lib/disk.img,deviceId=blk'), {
      kind: 'simulated',
      options: { name: 'b', iommu: 'onchip', disk: '/var/lib/disk.img', deviceId: 2 },
    });
    assert.deepEqual(parseDeviceSpec('sim:a,features=none'), {
      kind: 'simulated',
      options: { name: 'a', features: 0n },
    });
  });

  test('kernel devices', () => {
    assert.deepEqual(parseDeviceSpec('kernel:auto'), { kind: 'kernel', node: 'auto' });
    assert.deepEqual(parseDeviceSpec('kernel:/dev/vhost-vdpa-0'), {
      kind: 'kernel',
      node: '/dev/vhost-vdpa-0',
    });
    assert.deepEqual(parseDeviceSpec('kernel:/dev/vhost-vdpa-1,name=net1'), {
      kind: 'kernel',
      node: '/dev/vhost-vdpa-1',
      name: 'net1',
    });
  });

  const bad: [string, string, RegExp][] = [
    ['vdpa0', 'kind', /expected sim:/],
    ['usb:x', 'kind', /unknown kind "usb"/],
    ['sim:', 'name', /name ""/],
    ['sim:a b', 'name', /name "a b"/],
    ['sim:a,iommu=smmu', 'iommu', /iommu=smmu: must be platform or onchip/],
    ['sim:a,asnum=0', 'asnum', /asnum=0/],
    ['sim:a,asnum=two', 'asnum', /asnum=two/],
    ['sim:a,range=0x2000-0x1000', 'range', /range=0x2000-0x1000/],
    ['sim:a,range=0x2000', 'range', /FIRST-LAST/],
    ['sim:a,range=0-0x10000000000000000', 'range', /range=/],
    ['sim:a,features=MSG_V2|TURBO', 'features', /unknown feature "TURBO"/],
    ['sim:a,pushDelayMs=-1', 'pushdelayms', /pushDelayMs=-1/],
    ['sim:a,color=red', 'color', /unknown key "color"/],
    ['sim:a,iommu', 'iommu', /"iommu" is not key=value/],
    ['sim:a,asnum=1,ASNUM=2', 'asnum', /asnum given twice/],
    ['sim:a,disk=disk.img', 'disk', /disk=disk.img: must be an absolute path/],
    ['sim:a,disk=/d.img,deviceId=net', 'disk', /disk needs deviceId=blk/],
    ['sim:a,deviceId=gpu', 'deviceid', /must be blk, net or a u32/],
    ['kernel:vhost-vdpa-0', 'node', /neither auto nor an absolute device path/],
    ['kernel:auto,name=x', 'name', /kernel:auto takes no options/],
    ['kernel:/dev/vhost-vdpa-0,iommu=onchip', 'iommu', /unknown key "iommu"/],
  ];
  for (const [spec, field, message] of bad) {
    test(`refuses ${spec}, naming ${field}`, () => {
      assert.throws(
        () => parseDeviceSpec(spec),
        (e: unknown) =>
          e instanceof DeviceError &&
          e.code === 'INVALID_SPEC' &&
          e.field === field &&
          message.test(e.message) &&
          e.message.includes(`"${spec}"`),
      );
    });
  }
});

describe('discovery', () => {
  let root: string;
  before(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-discovery-'));
    const dev = path.join(root, 'dev');
    const sys = path.join(root, 'sys');
    fs.mkdirSync(dev);
    for (const n of ['vhost-vdpa-10', 'vhost-vdpa-2', 'vhost-net', 'vhost-vdpa-x'])
      fs.writeFileSync(path.join(dev, n), '');
    fs.mkdirSync(path.join(sys, 'drivers', 'vhost_vdpa'), { recursive: true });
    fs.mkdirSync(path.join(sys, 'devices', 'vdpa0', 'vhost-vdpa-2'), { recursive: true });
    fs.symlinkSync('../../drivers/vhost_vdpa', path.join(sys, 'devices', 'vdpa0', 'driver'));
    fs.mkdirSync(path.join(sys, 'devices', 'vdpa1'), { recursive: true });
    // A VDUSE device: the bus entry links to /sys/devices/virtual/vduse/<name>/<vdpa device>.
    fs.mkdirSync(path.join(sys, 'virtual', 'vduse', 'blk0', 'vdpa2', 'vhost-vdpa-10'), { recursive: true });
    fs.symlinkSync('../virtual/vduse/blk0/vdpa2', path.join(sys, 'devices', 'vdpa2'));
    // vp_vdpa: the vdpa device's parent is a PCI function in an IOMMU group.
    const pci = path.join(sys, 'pci0000:00', '0000:00:03.0');
    fs.mkdirSync(path.join(pci, 'vdpa3'), { recursive: true });
    fs.symlinkSync('../../../kernel/iommu_groups/4', path.join(pci, 'iommu_group'));
    fs.symlinkSync('../pci0000:00/0000:00:03.0/vdpa3', path.join(sys, 'devices', 'vdpa3'));
    // mlx5: under an auxiliary device, which has no IOMMU group of its own.
    fs.mkdirSync(path.join(pci, 'mlx5_core.vnet.0', 'vdpa4'), { recursive: true });
    fs.symlinkSync('../pci0000:00/0000:00:03.0/mlx5_core.vnet.0/vdpa4', path.join(sys, 'devices', 'vdpa4'));
  });
  after(() => fs.rmSync(root, { recursive: true, force: true }));
  const roots = () => ({ devDir: path.join(root, 'dev'), sysDir: path.join(root, 'sys', 'devices') });

  test('nodes in numeric order; vdpa devices with their node and driver', () => {
    assert.deepEqual(listVhostVdpaNodes(roots().devDir), [
      path.join(root, 'dev', 'vhost-vdpa-2'),
      path.join(root, 'dev', 'vhost-vdpa-10'),
    ]);
    // No parent device (vdpa_sim) or VDUSE: onchip; a parent in an IOMMU group: platform.
    assert.deepEqual(listVdpaDevices(roots()), [
      {
        name: 'vdpa0',
        node: path.join(root, 'dev', 'vhost-vdpa-2'),
        driver: 'vhost_vdpa',
        vduse: false,
        iommu: 'onchip',
      },
      { name: 'vdpa1', node: null, driver: null, vduse: false, iommu: 'onchip' },
      {
        name: 'vdpa2',
        node: path.join(root, 'dev', 'vhost-vdpa-10'),
        driver: null,
        vduse: true,
        iommu: 'onchip',
      },
      { name: 'vdpa3', node: null, driver: null, vduse: false, iommu: 'platform' },
      { name: 'vdpa4', node: null, driver: null, vduse: false, iommu: 'unknown' },
    ]);
    // VDUSE maps in VA mode (nothing pinned) and keeps its mappings at reset; sysfs takes any
    // other parent to pin (openDevices asks the kernel) and to drop them.
    const node = (n: number) => path.join(root, 'dev', `vhost-vdpa-${n}`);
    assert.deepEqual(discoverVhostVdpa(roots()), [
      { node: node(2), name: 'vdpa0', pinned: true, iommu: 'onchip', keepsMapOnReset: false },
      { node: node(10), name: 'vdpa2', pinned: false, iommu: 'onchip', keepsMapOnReset: true },
    ]);
    assert.deepEqual(describeNode(node(3), roots()), {
      node: node(3),
      name: 'vhost-vdpa-3',
      pinned: true,
      iommu: 'unknown',
      keepsMapOnReset: false,
    });
  });

  test('missing directories mean no devices', () => {
    const none = { devDir: path.join(root, 'nodev'), sysDir: path.join(root, 'nosys') };
    assert.deepEqual(discoverVhostVdpa(none), []);
    assert.deepEqual(listVdpaDevices(none), []);
  });
});

describe('openDevices', () => {
  let tmp: TmpRegistry;
  let root: string;
  before(() => {
    tmp = tmpRegistry();
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-open-'));
    fs.mkdirSync(path.join(root, 'dev'));
    for (const n of ['vhost-vdpa-0', 'vhost-vdpa-1']) fs.writeFileSync(path.join(root, 'dev', n), '');
    fs.mkdirSync(path.join(root, 'sys', 'vdpa-a', 'vhost-vdpa-1'), { recursive: true });
  });
  after(() => {
    tmp.cleanup();
    fs.rmSync(root, { recursive: true, force: true });
  });

  /** Every kernel node is a simulated kernel behind a recording transport. */
  const transports = new Map<string, RecordingTransport>();
  const openTransport = (node: string) => {
    const sim = new SimulatedVdpa(
      {
        deviceId: 1,
        iommu: 'platform',
        iovaRange: FULL_IOVA_RANGE,
        asNum: 1,
        groupNum: 1,
        vqCount: 2,
        configSize: 12,
        offeredFeatures: 0xen,
        pushDelayMs: 0,
      },
      tmp.registry,
    );
    const t = new RecordingTransport(new Map(), sim.open());
    transports.set(node, t);
    return t;
  };
  const discovery = () => ({ devDir: path.join(root, 'dev'), sysDir: path.join(root, 'sys') });

  test('sim:NAME,disk=/PATH opens a vdpa_sim_blk-like device that serves that disk', async () => {
    const disk = path.join(root, 'disk.img');
    fs.writeFileSync(disk, Buffer.alloc(64 * 512));
    const [dev] = await openDevices([`sim:b0,iommu=onchip,disk=${disk}`], tmp.registry);
    try {
      assert.ok(dev instanceof VhostVdpaDevice);
      const facts = dev.facts();
      assert.deepEqual([facts.deviceId, facts.vqCount, facts.configSize], [2, 1, 60]);
      // struct virtio_blk_config.capacity, in 512-byte sectors.
      assert.equal(dev.vrings.config(0, 8).readBigUInt64LE(0), 64n);
    } finally {
      await dev?.close();
    }
  });

  test('simulated and auto-discovered kernel devices, named uniquely', async () => {
    const devices = await openDevices(['sim:s0,iommu=onchip', 'kernel:auto'], tmp.registry, undefined, {
      discovery: discovery(),
      openTransport,
    });
    assert.deepEqual(
      devices.map((d) => [d.name, d.facts().kind, d.facts().node]),
      [
        ['s0', 'simulated', null],
        ['vhost-vdpa-0', 'kernel', path.join(root, 'dev', 'vhost-vdpa-0')],
        ['vdpa-a', 'kernel', path.join(root, 'dev', 'vhost-vdpa-1')],
      ],
    );
    assert.equal(devices[0]?.facts().iommu, 'onchip');
    assert.equal(devices[0]?.facts().asNum, 2);
    await Promise.all(devices.map((d) => d.close()));
  });

  test('duplicate names or nodes are refused before anything opens', async () => {
    await assert.rejects(
      openDevices(['sim:x', 'sim:x'], tmp.registry),
      (e: unknown) => e instanceof DeviceError && e.code === 'DUPLICATE_NAME' && /x/.test(e.message),
    );
    transports.clear();
    await assert.rejects(
      openDevices(
        ['kernel:auto', `kernel:${path.join(root, 'dev')}/../dev/vhost-vdpa-0,name=other`],
        tmp.registry,
        undefined,
        { discovery: discovery(), openTransport },
      ),
      (e: unknown) =>
        e instanceof DeviceError && e.code === 'DUPLICATE_NAME' && /given twice/.test(e.message),
    );
    assert.equal(transports.size, 0);
  });

  test('a device that fails to open closes those already open', async () => {
    transports.clear();
    const failing = (node: string) => {
      if (node.endsWith('-1')) throw new TransportError('EBUSY', 'busy');
      return openTransport(node);
    };
    await assert.rejects(
      openDevices(['kernel:/dev/vhost-vdpa-0', 'kernel:/dev/vhost-vdpa-1'], tmp.registry, undefined, {
        openTransport: failing,
      }),
      (e: unknown) => e instanceof DeviceError && e.code === 'BUSY' && /vhost-vdpa-1/.test(e.message),
    );
    assert.equal(transports.get('/dev/vhost-vdpa-0')?.closed, 1);
  });

  test('a bad spec is reported before anything opens', async () => {
    transports.clear();
    await assert.rejects(
      openDevices(['kernel:/dev/vhost-vdpa-0', 'sim:a,iommu=none'], tmp.registry, undefined, {
        openTransport,
      }),
      (e: unknown) => e instanceof DeviceError && e.code === 'INVALID_SPEC',
    );
    assert.equal(transports.size, 0);
  });
});
