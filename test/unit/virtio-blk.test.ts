/**
 * The virtio-blk model against a driver written here: a split ring laid out in shared memory that
 * a simulated device maps at IOVA 0x100000, kicked through an eventfd. Every access goes through
 * the device's IOTLB: a buffer at an unmapped IOVA is an I/O error for that request, unreachable
 * descriptors or status drop it; both are counted and neither throws.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, before, beforeEach, describe, it } from 'node:test';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import {
  SECTOR,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VirtioBlk,
} from '../../src/device/virtio-blk.ts';
import { EFD_CLOEXEC, EFD_NONBLOCK, eventfd, watchReadable } from '../../src/sys/libc.ts';
import { VirtioDeviceId } from '../../src/uapi/constants.ts';
import { type TmpRegistry, tmpRegistry } from './device-helpers.ts';
import { until } from './tier.ts';

const BASE = 0x100000n; // IOVA where the ring memory is mapped
const RAM = 0x100000n; // 1 MiB
const QSIZE = 16;
const DESC = 0x0n;
const AVAIL = 0x1000n;
const USED = 0x2000n;
const BUFS = 0x10000n;
const DISK_SECTORS = 256;
const F_NEXT = 1;
const F_WRITE = 2;

let tmp: TmpRegistry;
let diskPath: string;
let diskFd: number;
let dev: SimulatedDevice;
let blk: VirtioBlk;
let kick: number;
let call: number;
let calls: number;
let callWatch: { stop(): void };
let availIdx: number;
const warnings: string[] = [];

before(() => {
  tmp = tmpRegistry();
  tmp.registry.create({ id: 'ram', size: RAM, kind: 'memfd' });
  diskPath = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-blk-')), 'disk.img');
});
after(() => {
  tmp.cleanup();
  fs.rmSync(path.dirname(diskPath), { recursive: true, force: true });
});

beforeEach(async () => {
  fs.writeFileSync(diskPath, Buffer.alloc(DISK_SECTORS * SECTOR));
  diskFd = fs.openSync(diskPath, 'r+');
  tmp.registry.write('ram', 0n, Buffer.alloc(Number(RAM)));
  dev = new SimulatedDevice({ name: 'blk0', deviceId: VirtioDeviceId.BLOCK, vqCount: 1 }, tmp.registry);
  const [r] = await dev.apply([
    { type: 'update', asid: 0, iova: BASE, size: RAM, memory: 'ram', offset: 0n, perm: 'rw' },
  ]);
  assert.deepEqual(r, { ok: true });
  warnings.length = 0;
  blk = new VirtioBlk({
    diskFd,
    dma: dev,
    serial: 'blk-serial-1',
    logger: { info: () => {}, warn: (_o, msg) => warnings.push(msg) },
  });
  blk.setFeatures(blk.features);
  kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  calls = 0;
  callWatch = watchReadable(
    call,
    () => {
      const n = Buffer.alloc(8);
      fs.readSync(call, n);
      calls += Number(n.readBigUInt64LE());
    },
    () => {},
  );
  availIdx = 0;
  blk.start({
    index: 0,
    size: QSIZE,
    desc: BASE + DESC,
    avail: BASE + AVAIL,
    used: BASE + USED,
    lastAvail: 0,
    kickFd: kick,
    notify: () => fs.writeSync(call, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0])),
  });
});
afterEach(async () => {
  blk.stopAll();
  callWatch.stop();
  fs.closeSync(kick);
  fs.closeSync(call);
  fs.closeSync(diskFd);
  await dev.close();
});

interface Seg {
  /** IOVA of the buffer (absolute). */
  iova: bigint;
  len: number;
  write?: boolean;
}

const ram = (iova: bigint, data: Uint8Array) => tmp.registry.write('ram', iova - BASE, data);
const ramRead = (iova: bigint, length: number) => tmp.registry.read('ram', iova - BASE, length);

/** Writes a descriptor chain starting at `head` and publishes it in the avail ring. */
function submit(head: number, segs: Seg[], nextOf?: (i: number) => number): void {
  segs.forEach((s, i) => {
    const d = Buffer.alloc(16);
    d.writeBigUInt64LE(s.iova, 0);
    d.writeUInt32LE(s.len, 8);
    const last = i === segs.length - 1;
    d.writeUInt16LE((last && !nextOf ? 0 : F_NEXT) | (s.write ? F_WRITE : 0), 12);
    d.writeUInt16LE(nextOf ? nextOf(i) : head + i + 1, 14);
    ram(BASE + DESC + BigInt(16 * (head + i)), d);
  });
  const slot = Buffer.alloc(2);
  slot.writeUInt16LE(head);
  ram(BASE + AVAIL + 4n + BigInt(2 * (availIdx % QSIZE)), slot);
  availIdx++;
  const idx = Buffer.alloc(2);
  idx.writeUInt16LE(availIdx);
  ram(BASE + AVAIL + 2n, idx);
}

function header(type: number, sector: bigint): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32LE(type, 0);
  h.writeBigUInt64LE(sector, 8);
  return h;
}

/** Kicks and waits until the device has taken `n` more requests off the ring. */
async function kickAndServe(n: number): Promise<void> {
  const target = blk.counters.requests + n;
  fs.writeSync(kick, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));
  await until(`${n} requests served`, () => blk.counters.requests >= target);
}

function used(i: number): { id: number; len: number; idx: number } {
  const e = ramRead(BASE + USED + 4n + BigInt(8 * i), 8);
  return { id: e.readUInt32LE(0), len: e.readUInt32LE(4), idx: ramRead(BASE + USED + 2n, 2).readUInt16LE(0) };
}

const HDR = BASE + BUFS;
const DATA = BASE + BUFS + 0x1000n;
const STATUS = BASE + BUFS + 0x3000n;

describe('virtio-blk model', () => {
  it('writes, reads back, GET_ID, FLUSH, refuses an unknown type; completions are signalled', async () => {
    const data = Buffer.alloc(2 * SECTOR, 0x5a);
    data.write('hello disk');
    ram(HDR, header(VIRTIO_BLK_T_OUT, 3n));
    ram(DATA, data);
    submit(0, [
      { iova: HDR, len: 16 },
      { iova: DATA, len: data.length },
      { iova: STATUS, len: 1, write: true },
    ]);
    await kickAndServe(1);
    assert.equal(ramRead(STATUS, 1)[0], VIRTIO_BLK_S_OK);
    assert.deepEqual(used(0), { id: 0, len: 1, idx: 1 });
    const onDisk = Buffer.alloc(data.length);
    fs.readSync(diskFd, onDisk, 0, data.length, 3 * SECTOR);
    assert.ok(onDisk.equals(data), 'the bytes reached the disk file');

    const back = DATA + 0x1000n;
    ram(HDR + 0x100n, header(VIRTIO_BLK_T_IN, 3n));
    submit(3, [
      { iova: HDR + 0x100n, len: 16 },
      { iova: back, len: data.length, write: true },
      { iova: STATUS + 1n, len: 1, write: true },
    ]);
    ram(HDR + 0x200n, header(VIRTIO_BLK_T_GET_ID, 0n));
    submit(6, [
      { iova: HDR + 0x200n, len: 16 },
      { iova: back + 0x800n, len: 20, write: true },
      { iova: STATUS + 2n, len: 1, write: true },
    ]);
    ram(HDR + 0x300n, header(VIRTIO_BLK_T_FLUSH, 0n));
    submit(9, [
      { iova: HDR + 0x300n, len: 16 },
      { iova: STATUS + 3n, len: 1, write: true },
    ]);
    ram(HDR + 0x400n, header(99, 0n));
    submit(11, [
      { iova: HDR + 0x400n, len: 16 },
      { iova: STATUS + 4n, len: 1, write: true },
    ]);
    await kickAndServe(4);
    assert.ok(ramRead(back, data.length).equals(data));
    assert.equal(ramRead(back + 0x800n, 12).toString(), 'blk-serial-1');
    assert.deepEqual([...ramRead(STATUS + 1n, 4)], [0, 0, 0, VIRTIO_BLK_S_UNSUPP]);
    assert.deepEqual(used(1), { id: 3, len: data.length + 1, idx: 5 });
    assert.deepEqual(used(2), { id: 6, len: 21, idx: 5 });
    assert.deepEqual(blk.counters, {
      requests: 5,
      bytesRead: data.length,
      bytesWritten: data.length,
      errors: 1,
      dmaFaults: 0,
      dropped: 0,
    });
    await until('both completions signalled', () => calls >= 2);
  });

  it('a data buffer at an unmapped IOVA is an I/O error for that request, counted and logged', async () => {
    ram(HDR, header(VIRTIO_BLK_T_IN, 0n));
    submit(0, [
      { iova: HDR, len: 16 },
      { iova: 0x4000_0000n, len: SECTOR, write: true },
      { iova: STATUS, len: 1, write: true },
    ]);
    ram(HDR + 0x100n, header(VIRTIO_BLK_T_OUT, 0n));
    submit(3, [
      { iova: HDR + 0x100n, len: 16 },
      { iova: BASE - 0x1000n, len: SECTOR },
      { iova: STATUS + 1n, len: 1, write: true },
    ]);
    await kickAndServe(2);
    assert.deepEqual([...ramRead(STATUS, 2)], [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR]);
    assert.equal(used(1).idx, 2, 'both completed');
    assert.equal(blk.counters.dmaFaults, 2);
    assert.equal(blk.counters.errors, 2);
    assert.equal(blk.counters.bytesWritten, 0, 'nothing reached the disk');
    assert.equal(warnings.length, 2);
  });

  it('an unreachable status byte or a looping chain drops the request; the next one works', async () => {
    ram(HDR, header(VIRTIO_BLK_T_FLUSH, 0n));
    submit(0, [
      { iova: HDR, len: 16 },
      { iova: 0x4000_0000n, len: 1, write: true },
    ]);
    submit(
      2,
      [
        { iova: HDR, len: 16 },
        { iova: HDR, len: 16 },
      ],
      () => 2,
    ); // 2 -> 2 -> ...
    // A request past the disk's end is an error, not a drop.
    ram(HDR + 0x100n, header(VIRTIO_BLK_T_IN, BigInt(DISK_SECTORS)));
    submit(4, [
      { iova: HDR + 0x100n, len: 16 },
      { iova: DATA, len: SECTOR, write: true },
      { iova: STATUS, len: 1, write: true },
    ]);
    await kickAndServe(3);
    assert.equal(blk.counters.dropped, 2);
    assert.equal(ramRead(STATUS, 1)[0], VIRTIO_BLK_S_IOERR);
    assert.deepEqual(used(0), { id: 4, len: 1, idx: 1 });
  });

  it('rings at an unmapped IOVA stop the queue without throwing', async () => {
    blk.stopAll();
    blk.start({
      index: 0,
      size: QSIZE,
      desc: 0x9000_0000n,
      avail: 0x9000_1000n,
      used: 0x9000_2000n,
      lastAvail: 0,
      kickFd: kick,
      notify: () => {},
    });
    assert.ok(warnings.some((w) => /rings are unreachable/.test(w)));
    assert.equal(blk.counters.dmaFaults, 1);
  });
});
