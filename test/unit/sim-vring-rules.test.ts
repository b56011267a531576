/**
 * The simulated kernel's vring, feature, config and status ioctls refuse misuse with the errno
 * drivers/vhost/vdpa.c and vhost.c give (vhost_vdpa_vring_ioctl, vhost_vring_ioctl,
 * vhost_vdpa_set_features, vhost_vdpa_set_status, vhost_vdpa_config_validate), and a simulated
 * blk device serves its ring only from DRIVER_OK on, until it is disabled or reset.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { SimulatedVdpa } from '../../src/device/sim-kernel.ts';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import type { VhostTransport } from '../../src/device/transport.ts';
import { EFD_CLOEXEC, EFD_NONBLOCK, eventfd } from '../../src/sys/libc.ts';
import { DeviceStatus, Ioctl } from '../../src/uapi/index.ts';
import {
  decodeVringState,
  encodeVdpaConfig,
  encodeVringAddr,
  encodeVringFile,
  encodeVringState,
} from '../../src/uapi/vring.ts';
import { errnoOf, type TmpRegistry, tmpRegistry, vpVdpaConfig } from './device-helpers.ts';

const ACCESS_PLATFORM = 1n << 33n;
const VERSION_1 = 1n << 32n;

let tmp: TmpRegistry;
let parent: SimulatedVdpa;
let t: VhostTransport;
const fds: number[] = [];

function efd(): number {
  const fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  fds.push(fd);
  return fd;
}
const state = (index: number, num: number) => encodeVringState({ index, num });
const addr = (index: number, desc: bigint, avail: bigint, used: bigint, flags = 0) =>
  encodeVringAddr({ index, flags, desc, avail, used, log: 0n });
const u64 = (v: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
};
const status = (s: number) => t.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(s));

beforeEach(() => {
  tmp = tmpRegistry();
  parent = new SimulatedVdpa(vpVdpaConfig({ vqCount: 2, configSize: 16 }), tmp.registry);
  t = parent.open();
});
afterEach(() => {
  t.close();
  for (const fd of fds.splice(0)) fs.closeSync(fd);
  tmp.cleanup();
});

describe('simulated kernel: vring ioctls', () => {
  it('refuses every vring ioctl before VHOST_SET_OWNER with EPERM (vhost_dev_check_owner)', () => {
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_NUM, state(0, 256))),
      'EPERM',
    );
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_GET_VRING_BASE, state(0, 0))),
      'EPERM',
    );
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_SET_VRING_ENABLE, state(0, 1))),
      'EPERM',
    );
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_KICK, encodeVringFile({ index: 0, fd: efd() }))),
      'EPERM',
    );
    // Features, config and status are vhost_vdpa_unlocked_ioctl's own: no owner needed.
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_GET_FEATURES, Buffer.alloc(8))),
      undefined,
    );
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_GET_VRING_NUM, Buffer.alloc(2))),
      undefined,
    );
  });

  describe('once owned', () => {
    beforeEach(() => t.ioctl(Ioctl.VHOST_SET_OWNER));

    it('an index past the device vqs is ENOBUFS', () => {
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_NUM, state(2, 256))),
        'ENOBUFS',
      );
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_CALL, encodeVringFile({ index: 7, fd: -1 }))),
        'ENOBUFS',
      );
    });

    it('SET_VRING_NUM takes powers of two up to 32768 only (vhost_vring_set_num)', () => {
      for (const bad of [0, 3, 100, 0x10000, 0x20000]) {
        assert.equal(
          errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_NUM, state(0, bad))),
          'EINVAL',
          `size ${bad}`,
        );
      }
      // Not checked against the device's maximum: that is userspace's (GET_VRING_NUM) job.
      for (const good of [1, 256, 1024, 0x8000]) {
        assert.equal(
          errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_NUM, state(0, good))),
          undefined,
        );
      }
      const max = Buffer.alloc(2);
      t.ioctl(Ioctl.VHOST_VDPA_GET_VRING_NUM, max);
      assert.equal(max.readUInt16LE(0), 256);
    });

    it('SET_VRING_ADDR: unknown flags EOPNOTSUPP, misaligned avail/used EINVAL (vhost_vring_set_addr)', () => {
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_ADDR, addr(0, 0n, 0x1000n, 0x2000n, 2))),
        'EOPNOTSUPP',
      );
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_ADDR, addr(0, 0n, 0x1001n, 0x2000n))),
        'EINVAL',
      );
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_ADDR, addr(0, 0n, 0x1000n, 0x2002n))),
        'EINVAL',
      );
      // The descriptor table's alignment is not checked.
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_ADDR, addr(0, 0x8n, 0x1002n, 0x2004n))),
        undefined,
      );
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_ADDR, Buffer.alloc(16))),
        'EFAULT',
      );
    });

    it('SET_VRING_BASE takes a u16 and GET_VRING_BASE answers it', () => {
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_BASE, state(1, 0x10000))),
        'EINVAL',
      );
      t.ioctl(Ioctl.VHOST_SET_VRING_BASE, state(1, 0xfffe));
      const s = state(1, 0);
      t.ioctl(Ioctl.VHOST_GET_VRING_BASE, s);
      assert.deepEqual(decodeVringState(s), { index: 1, num: 0xfffe });
    });

    it('a parent without vq state (vp_vdpa): GET_VRING_BASE EOPNOTSUPP, SET only 0 after FEATURES_OK', () => {
      const vp = new SimulatedVdpa(vpVdpaConfig({ vqCount: 2, lacksVqState: true }), tmp.registry);
      const f = vp.open();
      const setStatus = (s: number) => f.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(s));
      const errno = (request: number, index: number, num: number) =>
        errnoOf(() => f.ioctl(request, state(index, num)));
      try {
        f.ioctl(Ioctl.VHOST_SET_OWNER);
        // vp_vdpa_get_vq_state: the virtio spec has no way to read the avail index.
        assert.equal(errno(Ioctl.VHOST_GET_VRING_BASE, 0, 0), 'EOPNOTSUPP');
        // vp_vdpa_set_vq_state: before FEATURES_OK not even 0.
        assert.equal(errno(Ioctl.VHOST_SET_VRING_BASE, 0, 0), 'EOPNOTSUPP');
        setStatus(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER);
        f.ioctl(Ioctl.VHOST_SET_FEATURES, u64(ACCESS_PLATFORM | VERSION_1));
        setStatus(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK);
        assert.equal(errno(Ioctl.VHOST_SET_VRING_BASE, 0, 0), undefined);
        assert.equal(errno(Ioctl.VHOST_SET_VRING_BASE, 0, 5), 'EOPNOTSUPP');
        f.ioctl(Ioctl.VHOST_VDPA_SET_VRING_ENABLE, state(0, 1));
        assert.equal(errno(Ioctl.VHOST_SET_VRING_BASE, 0, 0), 'EOPNOTSUPP', 'the queue is enabled');
        assert.equal(errno(Ioctl.VHOST_SET_VRING_BASE, 1, 0), undefined);
      } finally {
        f.close();
      }
    });

    it('KICK/CALL take an eventfd or -1: a closed fd is EBADF, another file EINVAL', () => {
      const closed = eventfd(0, EFD_CLOEXEC);
      fs.closeSync(closed);
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_KICK, encodeVringFile({ index: 0, fd: closed }))),
        'EBADF',
      );
      const file = fs.openSync('/dev/null', 'r');
      fds.push(file);
      assert.equal(
        errnoOf(() => t.ioctl(Ioctl.VHOST_SET_VRING_CALL, encodeVringFile({ index: 0, fd: file }))),
        'EINVAL',
      );
      t.ioctl(Ioctl.VHOST_SET_VRING_KICK, encodeVringFile({ index: 0, fd: efd() }));
      t.ioctl(Ioctl.VHOST_SET_VRING_KICK, encodeVringFile({ index: 0, fd: -1 }));
    });

    it('holds its own reference to an eventfd until replaced or released', () => {
      const count = () => fs.readdirSync('/proc/self/fd').length;
      const before = count();
      const fd = eventfd(0, EFD_CLOEXEC);
      t.ioctl(Ioctl.VHOST_SET_VRING_CALL, encodeVringFile({ index: 0, fd }));
      fs.closeSync(fd);
      assert.equal(count(), before + 1, 'the kernel keeps the eventfd');
      t.ioctl(Ioctl.VHOST_SET_VRING_CALL, encodeVringFile({ index: 0, fd: -1 }));
      assert.equal(count(), before);
    });
  });
});

describe('simulated kernel: features, config, status', () => {
  it('SET_FEATURES needs ACCESS_PLATFORM (EINVAL) and is EBUSY once FEATURES_OK is set', () => {
    const offered = Buffer.alloc(8);
    t.ioctl(Ioctl.VHOST_GET_FEATURES, offered);
    assert.equal(offered.readBigUInt64LE() & (ACCESS_PLATFORM | VERSION_1), ACCESS_PLATFORM | VERSION_1);
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_SET_FEATURES, u64(VERSION_1))),
      'EINVAL',
    );
    t.ioctl(Ioctl.VHOST_SET_FEATURES, u64(VERSION_1 | ACCESS_PLATFORM));
    status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK);
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_SET_FEATURES, u64(VERSION_1 | ACCESS_PLATFORM))),
      'EBUSY',
    );
    // Bits may only be added; 0 resets, and then the features may be set again.
    assert.equal(
      errnoOf(() => status(DeviceStatus.ACKNOWLEDGE)),
      'EINVAL',
    );
    status(0);
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_SET_FEATURES, u64(VERSION_1 | ACCESS_PLATFORM))),
      undefined,
    );
  });

  it('GET/SET_CONFIG: empty or starting past the space EINVAL, running past it E2BIG', () => {
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_GET_CONFIG, encodeVdpaConfig(0, 0))),
      'EINVAL',
    );
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_GET_CONFIG, encodeVdpaConfig(17, 1))),
      'EINVAL',
    );
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_GET_CONFIG, encodeVdpaConfig(8, 9))),
      'E2BIG',
    );
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_SET_CONFIG, encodeVdpaConfig(15, 2))),
      'E2BIG',
    );
    // A header announcing more bytes than the argument holds fails the copy.
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_GET_CONFIG, encodeVdpaConfig(0, 8).subarray(0, 12))),
      'EFAULT',
    );
    t.ioctl(Ioctl.VHOST_VDPA_SET_CONFIG, encodeVdpaConfig(4, 3, Buffer.from('abc')));
    const got = encodeVdpaConfig(3, 5);
    t.ioctl(Ioctl.VHOST_VDPA_GET_CONFIG, got);
    assert.deepEqual([...got.subarray(8)], [0, 0x61, 0x62, 0x63, 0]);
  });
});

describe('simulated blk device: the data path', () => {
  const BASE = 0x200000n;
  const QSIZE = 8;
  let reg: TmpRegistry;
  let dir: string;
  let dev: SimulatedDevice;
  let kick: number;

  beforeEach(async () => {
    reg = tmpRegistry();
    reg.registry.create({ id: 'ram', size: 0x100000n, kind: 'memfd' });
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-simblk-'));
    fs.writeFileSync(path.join(dir, 'disk.img'), Buffer.alloc(64 * 512, 0xab));
    dev = new SimulatedDevice(
      { name: 'b0', disk: path.join(dir, 'disk.img'), iommu: 'onchip' },
      reg.registry,
    );
    const [r] = await dev.apply([
      { type: 'update', asid: 0, iova: BASE, size: 0x100000n, memory: 'ram', offset: 0n, perm: 'rw' },
    ]);
    assert.deepEqual(r, { ok: true });
    kick = efd();
    // One read of sector 0 into BASE+0x8000, published in the avail ring at BASE+0x1000.
    const desc = Buffer.alloc(48);
    const hdr = Buffer.alloc(16);
    hdr.writeUInt32LE(0, 0); // VIRTIO_BLK_T_IN
    reg.registry.write('ram', 0x4000n, hdr);
    for (const [i, addr, len, flags] of [
      [0, 0x4000n, 16, 1],
      [1, 0x8000n, 512, 3],
      [2, 0x9000n, 1, 2],
    ] as const) {
      desc.writeBigUInt64LE(BASE + addr, 16 * i);
      desc.writeUInt32LE(len, 16 * i + 8);
      desc.writeUInt16LE(flags, 16 * i + 12);
      desc.writeUInt16LE(i + 1, 16 * i + 14);
    }
    reg.registry.write('ram', 0n, desc);
    reg.registry.write('ram', 0x1000n, Buffer.from([0, 0, 1, 0, 0, 0]));
    const v = dev.vrings;
    v.setSize(0, QSIZE);
    v.setAddresses(0, { desc: BASE, avail: BASE + 0x1000n, used: BASE + 0x2000n });
    v.setKick(0, kick);
    v.enable(0, true);
    v.addStatus(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER);
    v.setFeatures(VERSION_1 | ACCESS_PLATFORM);
    v.addStatus(DeviceStatus.FEATURES_OK);
  });
  afterEach(async () => {
    await dev.close();
    reg.cleanup();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const usedIdx = () => reg.registry.read('ram', 0x2002n, 2).readUInt16LE(0);
  const settle = () => new Promise((r) => setTimeout(r, 20));

  it('serves nothing before DRIVER_OK or while suspended, nothing once disabled', async () => {
    const blk = dev.simulator.vrings.blk!;
    fs.writeSync(kick, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
    await settle();
    assert.equal(blk.counters.requests, 0, 'not DRIVER_OK yet');
    dev.vrings.addStatus(DeviceStatus.DRIVER_OK);
    assert.equal(blk.counters.requests, 1);
    assert.equal(usedIdx(), 1);
    assert.deepEqual([...reg.registry.read('ram', 0x8000n, 4)], [0xab, 0xab, 0xab, 0xab]);
    assert.equal(reg.registry.read('ram', 0x9000n, 1)[0], 0, 'VIRTIO_BLK_S_OK');
    assert.equal(dev.vrings.base(0), 1);

    // Suspended (vdpasim_suspend): kicks wait; resumed: the pending request is served.
    await dev.suspend();
    reg.registry.write('ram', 0x1000n, Buffer.from([0, 0, 2, 0, 0, 0]));
    fs.writeSync(kick, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
    await settle();
    assert.equal(blk.counters.requests, 1, 'a suspended device serves nothing');
    await dev.resume();
    assert.equal(blk.counters.requests, 2);
    assert.equal(dev.vrings.base(0), 2);

    dev.vrings.enable(0, false);
    reg.registry.write('ram', 0x1000n, Buffer.from([0, 0, 3, 0, 0, 0]));
    fs.writeSync(kick, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
    await settle();
    assert.equal(blk.counters.requests, 2, 'a disabled ring is not served');
    assert.equal(dev.vrings.base(0), 2);
    // A reset forgets the ring: its base is 0 again.
    dev.vrings.resetKeepingMappings();
    assert.equal(dev.vrings.base(0), 0);
    assert.equal(dev.simulator.deviceTable(0)?.count, 1, 'IOTLB_PERSIST: the parent keeps its mapping');
  });
});
