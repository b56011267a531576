/**
 * The vdpa relay end to end without a VMM: a scripted vhost-user front-end lays a split ring and
 * buffers out in a memfd, hands its memory table, vring and eventfds to the backend, and does
 * real block I/O that the simulated blk vhost-vdpa device serves by DMA through its IOTLB.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { DeviceError } from '../../src/device/errors.ts';
import { IOVA_RANGE_39_BITS, SimulatedDevice } from '../../src/device/simulated.ts';
import {
  SECTOR,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from '../../src/device/virtio-blk.ts';
import {
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  eventfd,
  ftruncate,
  MFD_CLOEXEC,
  memfdCreate,
  unixSocketPair,
} from '../../src/sys/libc.ts';
import { backendFeatureMask, DeviceStatus } from '../../src/uapi/constants.ts';
import type { VhostUserBackend } from '../../src/vhost-user/backend.ts';
import { VhostUserConnection } from '../../src/vhost-user/transport.ts';
import { VdpaRelay } from '../../src/vhost-user/vdpa-relay.ts';
import {
  F_PROTOCOL_FEATURES,
  type MemoryRegion,
  memTablePayload,
  protocolFeatureMask,
  Request,
  u64Payload,
  vringAddrPayload,
  vringFdPayload,
  vringStatePayload,
} from '../../src/vhost-user/wire.ts';
import { FrontEnd } from '../vhost-user/front-end.ts';
import { RelayBlkBackend } from '../vhost-user/relay-blk.ts';
import { tmpRegistry } from './device-helpers.ts';
import { TIER_BUDGET_MS } from './tier.ts';

const MiB = 1n << 20n;
const RAM: MemoryRegion = {
  guestAddr: 0x4000_0000n,
  size: 2n * MiB,
  userAddr: 0x7f12_0000_0000n,
  mmapOffset: 0n,
};
const QSIZE = 16;
const DESC = 0x0n;
const AVAIL = 0x1000n;
const USED = 0x2000n;
const HDR = 0x10000n;
const DATA = 0x20000n;
const STATUS = 0x30000n;
const DISK_SECTORS = 2048;
const F_NEXT = 1;
const F_WRITE = 2;
const PROTOCOL = protocolFeatureMask('REPLY_ACK', 'CONFIG');

let dir: string;
let diskPath: string;
let sim: RelayBlkBackend;
let backend: VhostUserBackend;
let fe: FrontEnd;
let ram: number;
let kick: number;
let call: number;
let availIdx: number;

/** The guest's memory, by guest physical address. */
const poke = (gpa: bigint, data: Uint8Array) =>
  fs.writeSync(ram, data, 0, data.byteLength, Number(gpa - RAM.guestAddr));
const peek = (gpa: bigint, length: number) => {
  const b = Buffer.alloc(length);
  fs.readSync(ram, b, 0, length, Number(gpa - RAM.guestAddr));
  return b;
};
const ring = (off: bigint) => RAM.guestAddr + off;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-relay-'));
  diskPath = path.join(dir, 'disk.img');
  fs.writeFileSync(diskPath, Buffer.alloc(DISK_SECTORS * SECTOR));
  sim = new RelayBlkBackend({ diskPath });
  const [a, b] = unixSocketPair();
  backend = sim.serve(new VhostUserConnection(a));
  fe = new FrontEnd(b);
  ram = memfdCreate('relay-test', MFD_CLOEXEC);
  ftruncate(ram, RAM.size);
  kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  availIdx = 0;
});
afterEach(async () => {
  fe.close();
  await backend.done;
  await sim.close();
  for (const fd of [ram, kick, call]) fs.closeSync(fd);
  fs.rmSync(dir, { recursive: true, force: true });
});

/** What QEMU's vhost-user-blk sends to start the device, up to the ring running. */
async function start(lastAvail = 0): Promise<void> {
  fe.send(Request.GET_FEATURES, Buffer.alloc(0));
  const offered = await fe.u64(Request.GET_FEATURES);
  assert.equal(offered & (1n << 33n), 0n, 'ACCESS_PLATFORM is the relay own, never offered');
  fe.send(Request.SET_PROTOCOL_FEATURES, u64Payload(PROTOCOL));
  fe.send(Request.SET_OWNER, Buffer.alloc(0));
  fe.send(Request.SET_FEATURES, u64Payload((offered & ~F_PROTOCOL_FEATURES) | F_PROTOCOL_FEATURES), [], true);
  assert.equal(await fe.u64(Request.SET_FEATURES), 0n);
  fe.send(Request.SET_MEM_TABLE, memTablePayload([RAM]), [ram], true);
  assert.equal(await fe.u64(Request.SET_MEM_TABLE), 0n);
  await startRing(lastAvail);
}

async function startRing(lastAvail: number): Promise<void> {
  const va = (off: bigint) => RAM.userAddr + off;
  fe.send(Request.SET_VRING_NUM, vringStatePayload(0, QSIZE));
  fe.send(Request.SET_VRING_BASE, vringStatePayload(0, lastAvail));
  fe.send(
    Request.SET_VRING_ADDR,
    vringAddrPayload({ index: 0, log: false, desc: va(DESC), avail: va(AVAIL), used: va(USED), logAddr: 0n }),
  );
  fe.send(Request.SET_VRING_KICK, vringFdPayload(0, true), [kick]);
  fe.send(Request.SET_VRING_CALL, vringFdPayload(0, true), [call]);
  fe.send(Request.SET_VRING_ENABLE, vringStatePayload(0, 1), [], true);
  assert.equal(await fe.u64(Request.SET_VRING_ENABLE), 0n);
}

/** One request: header, then data (device-readable for a write), then the status byte. */
async function request(type: number, sector: bigint, data: { gpa: bigint; len: number }): Promise<number> {
  const head = (availIdx * 3) % QSIZE;
  const hdr = Buffer.alloc(16);
  hdr.writeUInt32LE(type, 0);
  hdr.writeBigUInt64LE(sector, 8);
  poke(ring(HDR), hdr);
  poke(ring(STATUS), Uint8Array.of(0xff));
  const segs = [
    { addr: ring(HDR), len: 16, flags: F_NEXT },
    { addr: data.gpa, len: data.len, flags: F_NEXT | (type === VIRTIO_BLK_T_IN ? F_WRITE : 0) },
    { addr: ring(STATUS), len: 1, flags: F_WRITE },
  ];
  segs.forEach((s, i) => {
    const d = Buffer.alloc(16);
    d.writeBigUInt64LE(s.addr, 0);
    d.writeUInt32LE(s.len, 8);
    d.writeUInt16LE(s.flags, 12);
    d.writeUInt16LE((head + i + 1) % QSIZE, 14);
    poke(ring(DESC) + BigInt(16 * ((head + i) % QSIZE)), d);
  });
  const slot = Buffer.alloc(2);
  slot.writeUInt16LE(head);
  poke(ring(AVAIL) + 4n + BigInt(2 * (availIdx % QSIZE)), slot);
  availIdx = (availIdx + 1) & 0xffff;
  const idx = Buffer.alloc(2);
  idx.writeUInt16LE(availIdx);
  poke(ring(AVAIL) + 2n, idx);
  fs.writeSync(kick, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
  // The device signals the call eventfd once it put the request in the used ring. Bounded by
  // the unit tier's whole budget, not by the speed of a loaded machine.
  const got = Buffer.alloc(8);
  for (let waited = 0; ; waited += 5) {
    if (waited > TIER_BUDGET_MS) throw new Error('the device never signalled a completion');
    try {
      fs.readSync(call, got);
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
      await new Promise((r) => setTimeout(r, 5));
    }
  }
  assert.equal(peek(ring(USED) + 2n, 2).readUInt16LE(0), availIdx, 'the used index follows');
  return peek(ring(STATUS), 1)[0]!;
}

describe('vdpa relay over a simulated blk vhost-vdpa device', () => {
  it('relays the vring: the device writes and reads the disk by DMA, and reports its base at stop', async () => {
    await start();
    const status = sim.device.simulator.deviceStatus;
    assert.equal(
      status,
      DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK,
    );
    const pattern = Buffer.alloc(8192);
    for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7 + 3) & 0xff;
    poke(ring(DATA), pattern);
    assert.equal(
      await request(VIRTIO_BLK_T_OUT, 16n, { gpa: ring(DATA), len: pattern.length }),
      VIRTIO_BLK_S_OK,
    );
    const onDisk = Buffer.alloc(pattern.length);
    const disk = fs.openSync(diskPath, 'r');
    fs.readSync(disk, onDisk, 0, onDisk.length, 16 * SECTOR);
    fs.closeSync(disk);
    assert.ok(onDisk.equals(pattern), 'the bytes are on the disk');

    poke(ring(DATA), Buffer.alloc(pattern.length));
    assert.equal(
      await request(VIRTIO_BLK_T_IN, 16n, { gpa: ring(DATA), len: pattern.length }),
      VIRTIO_BLK_S_OK,
    );
    assert.ok(peek(ring(DATA), pattern.length).equals(pattern), 'read back into guest memory');
    assert.equal(sim.blk.counters.bytesWritten, 8192);
    assert.equal(sim.blk.counters.bytesRead, 8192);

    // Stop: the base is the device's; the device is reset, the mappings stay (IOTLB_PERSIST).
    fe.send(Request.GET_VRING_BASE, vringStatePayload(0, 0));
    const base = await fe.reply(Request.GET_VRING_BASE);
    assert.deepEqual([...(base ?? [])], [0, 0, 0, 0, 2, 0, 0, 0]);
    assert.equal(sim.device.simulator.deviceStatus, 0);
    assert.equal(sim.mappings().length, 1);
    // A kick now is not served.
    const before = sim.blk.counters.requests;
    fs.writeSync(kick, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(sim.blk.counters.requests, before);

    // Restart from the saved base: negotiated again, served again.
    await startRing(2);
    assert.ok(sim.device.simulator.deviceStatus & DeviceStatus.DRIVER_OK);
    assert.equal(await request(VIRTIO_BLK_T_IN, 16n, { gpa: ring(DATA), len: 512 }), VIRTIO_BLK_S_OK);
  });

  it('a new call eventfd of a running ring reaches the device: completions signal it', async () => {
    await start();
    assert.equal(await request(VIRTIO_BLK_T_IN, 0n, { gpa: ring(DATA), len: 512 }), VIRTIO_BLK_S_OK);
    const old = call;
    call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    fe.send(Request.SET_VRING_CALL, vringFdPayload(0, true), [call], true);
    assert.equal(await fe.u64(Request.SET_VRING_CALL), 0n);
    assert.equal(await request(VIRTIO_BLK_T_IN, 0n, { gpa: ring(DATA), len: 512 }), VIRTIO_BLK_S_OK);
    assert.throws(() => fs.readSync(old, Buffer.alloc(8)), /EAGAIN/, 'the old eventfd was not signalled');
    fs.closeSync(old);
  });

  it('a buffer at an unmapped IOVA is an I/O error for that request, counted; the ring goes on', async () => {
    await start();
    const outside = RAM.guestAddr + RAM.size + 0x1000n;
    assert.equal(await request(VIRTIO_BLK_T_IN, 0n, { gpa: outside, len: 512 }), VIRTIO_BLK_S_IOERR);
    assert.ok(sim.blk.counters.dmaFaults >= 1);
    assert.equal(sim.blk.counters.errors, 1);
    assert.equal(await request(VIRTIO_BLK_T_IN, 0n, { gpa: ring(DATA), len: 512 }), VIRTIO_BLK_S_OK);
  });

  it('the front-end hanging up stops and resets the device and unmaps its memory', async () => {
    await start();
    assert.equal(sim.mappings().length, 1);
    fe.close();
    await backend.done;
    assert.equal(backend.error, undefined);
    assert.equal(sim.device.simulator.deviceStatus, 0);
    assert.deepEqual(sim.mappings(), []);
  });

  it('refuses a device without IOTLB_PERSIST: its reset at stop would drop the guest memory', async () => {
    const tmp = tmpRegistry();
    const features = backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH');
    const dev = new SimulatedDevice({ name: 'np0', disk: diskPath, iommu: 'onchip', features }, tmp.registry);
    try {
      assert.throws(
        () => new VdpaRelay(dev, async () => {}),
        (e: unknown) =>
          e instanceof DeviceError && e.code === 'UNSUPPORTED' && /IOTLB_PERSIST/.test(e.message),
      );
    } finally {
      await dev.close();
      tmp.cleanup();
    }
  });

  it('takes a device without IOTLB_PERSIST whose parent keeps its mappings at reset (VDUSE-like)', async () => {
    const tmp = tmpRegistry();
    const features = backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID');
    const dev = new SimulatedDevice(
      { name: 'vd0', disk: diskPath, iommu: 'onchip', useVa: true, keepsMapOnReset: true, features },
      tmp.registry,
    );
    try {
      assert.equal(dev.parentKeepsMapOnReset, true);
      const relay = new VdpaRelay(dev, async () => {});
      assert.equal(relay.queueCount, dev.facts().vqCount);
    } finally {
      await dev.close();
      tmp.cleanup();
    }
  });

  it('a device that cannot tell a vring base (vp_vdpa: EOPNOTSUPP) is answered with the used index', async () => {
    // The vp_vdpa-like parent: platform IOMMU (PA mode, IOTLB_PERSIST offered), no get_vq_state.
    fe.close();
    await backend.done;
    await sim.close();
    sim = new RelayBlkBackend({
      openDevice: (registry) =>
        new SimulatedDevice(
          {
            name: 'vpb0',
            disk: diskPath,
            iommu: 'platform',
            iovaRange: IOVA_RANGE_39_BITS,
            lacksVqState: true,
          },
          registry,
        ),
    });
    const [a, b] = unixSocketPair();
    backend = sim.serve(new VhostUserConnection(a));
    fe = new FrontEnd(b);
    await start();
    for (let i = 0; i < 3; i++) {
      assert.equal(await request(VIRTIO_BLK_T_IN, 0n, { gpa: ring(DATA), len: 512 }), VIRTIO_BLK_S_OK);
    }
    assert.equal(sim.relay.stats.basesFromUsedIndex, 0);
    fe.send(Request.GET_VRING_BASE, vringStatePayload(0, 0));
    const base = await fe.reply(Request.GET_VRING_BASE);
    // QEMU's vhost_virtqueue_stop() answers for such a device with the used index: 3 requests.
    assert.deepEqual([...(base ?? [])], [0, 0, 0, 0, 3, 0, 0, 0]);
    assert.equal(sim.relay.stats.basesFromUsedIndex, 1);
    assert.equal(backend.closed, false, 'the relay did not hang up');
    assert.equal(sim.device.simulator.deviceStatus, 0, 'the last ring stopped: the device was reset');
    assert.equal(sim.mappings().length, 1, 'the mappings stay (IOTLB_PERSIST)');
  });
});
