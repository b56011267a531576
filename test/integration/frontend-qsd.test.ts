/**
 * The test vhost-user-blk front-end (test/frontend) proven against QEMU's own back-end, Debian's
 * qemu-storage-daemon exporting a raw image: negotiation, the memory table, one split virtqueue;
 * writes at several sectors (one sector, several pages, a buffer at an odd guest address, the
 * last sectors), read back through other buffers, flush, GET_ID; a new front-end served after the
 * first closed; a request into memory the back-end was never given is a clear error, not a hang;
 * a buffer in memory added later with ADD_MEM_REG. After the daemon exits, the image holds exactly
 * the bytes written and nothing else changed.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, type TestContext, test } from 'node:test';
import { SECTOR } from '../../src/device/virtio-blk.ts';
import { type FrontendOptions, VhostUserBlkFrontend } from '../frontend/blk-frontend.ts';
import { STORAGE_DAEMON, StorageDaemon } from '../frontend/storage-daemon.ts';
import { TIER_BUDGET_MS } from './agent-harness.ts';

const IMAGE_BYTES = 16 << 20;
const BACKGROUND = 0x3c;
const MiB = 1n << 20n;
const PAGE = 4096n;
const OPTIONS: FrontendOptions = {
  memoryBytes: 4n * MiB,
  queueSize: 64,
  requestWaitMs: TIER_BUDGET_MS,
  replyWaitMs: TIER_BUDGET_MS,
};

const haveDaemon = fs.existsSync(STORAGE_DAEMON);

let work: string;
let image: string;
let daemon: StorageDaemon | null = null;
let fdsBefore: string;
const open = new Set<VhostUserBlkFrontend>();
/** What the image must hold once the daemon has exited. */
const expected = Buffer.alloc(IMAGE_BYTES, BACKGROUND);
let bytesVerified = 0;
let started = 0;

/** The kinds of fd a front-end opens (memfds, eventfds, sockets), counted in this process. */
function frontEndFds(): string {
  const count = { memfd: 0, eventfd: 0, socket: 0 };
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    let link: string;
    try {
      link = fs.readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      continue; // the directory's own fd, already closed
    }
    if (link.startsWith('/memfd:')) count.memfd++;
    else if (link === 'anon_inode:[eventfd]') count.eventfd++;
    else if (link.startsWith('socket:')) count.socket++;
  }
  return JSON.stringify(count);
}

/**
 * A front-end closed at the end of test `t` whatever happens: the daemon serves one front-end at a
 * time, so one left open would stall every later test.
 */
async function connect(t: TestContext, options: FrontendOptions = OPTIONS): Promise<VhostUserBlkFrontend> {
  assert.ok(daemon, 'the daemon runs');
  const fe = await VhostUserBlkFrontend.connect(daemon.socketPath, options);
  open.add(fe);
  t.after(async () => {
    if (open.has(fe)) await close(fe);
  });
  return fe;
}

async function close(fe: VhostUserBlkFrontend): Promise<number | null> {
  open.delete(fe);
  return fe.close();
}

/** Writes `data` at `sector`, records it for the image check, reads it back through `readAt`. */
async function writeAndCheck(
  fe: VhostUserBlkFrontend,
  sector: bigint,
  data: Buffer,
  writeAt: bigint | undefined,
  readAt: bigint | undefined,
): Promise<void> {
  await fe.write(sector, data, { guestAddr: writeAt });
  data.copy(expected, Number(sector) * SECTOR);
  const back = await fe.read(sector, data.byteLength, { guestAddr: readAt });
  assert.ok(back.equals(data), `sector ${sector}: ${data.byteLength} bytes read back as written`);
  bytesVerified += data.byteLength;
}

describe('the vhost-user-blk test front-end against qemu-storage-daemon', {
  skip: !haveDaemon && `${STORAGE_DAEMON} is not installed (Debian package qemu-system-common)`,
}, () => {
  before(async () => {
    started = Date.now();
    fdsBefore = frontEndFds();
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-frontend-'));
    image = path.join(work, 'disk.img');
    fs.writeFileSync(image, expected);
    daemon = await StorageDaemon.start(image, path.join(work, 'vhost-user-blk.sock'), TIER_BUDGET_MS);
  });

  after(async () => {
    for (const fe of open) await fe.close();
    open.clear();
    await daemon?.stop(TIER_BUDGET_MS);
    if (work) fs.rmSync(work, { recursive: true, force: true });
  });

  let capacity = 0n;

  test('negotiates with QEMU 7.2 and reads the config', async (t) => {
    const fe = await connect(t);
    const n = fe.negotiated;
    const bit = (b: number) => 1n << BigInt(b);
    t.diagnostic(
      `features offered 0x${n.offeredFeatures.toString(16)} acked 0x${n.features.toString(16)}; ` +
        `protocol features offered 0x${n.offeredProtocolFeatures.toString(16)} acked 0x${n.protocolFeatures.toString(16)}; ` +
        `queues ${n.queueCount} (config num_queues ${n.configNumQueues}); mem slots ${n.maxMemSlots}; ` +
        `capacity ${n.capacity} sectors, seg_max ${n.segMax}, size_max ${n.sizeMax}, blk_size ${n.blkSize}`,
    );
    assert.ok(n.features & bit(32), 'VIRTIO_F_VERSION_1');
    assert.ok(n.features & bit(30), 'VHOST_USER_F_PROTOCOL_FEATURES');
    assert.ok(!(n.offeredFeatures & bit(5)), 'a writable export does not offer VIRTIO_BLK_F_RO');
    assert.equal(n.capacity, BigInt(IMAGE_BYTES / SECTOR), 'capacity is the image size in sectors');
    assert.equal(n.queueCount, 1n, 'one queue (MQ negotiated)');
    assert.equal(await fe.getId().then((id) => id.length > 0), true, 'GET_ID answers a serial');
    capacity = n.capacity;
    assert.equal(await close(fe), 1, 'GET_VRING_BASE: the one request was consumed');
  });

  test('writes at several sectors, reads them back through other buffers, flushes', async (t) => {
    const fe = await connect(t);
    const data = fe.dataArea;
    // One sector at sector 0, the default buffer.
    await writeAndCheck(fe, 0n, crypto.randomBytes(SECTOR), undefined, data + PAGE);
    // Several pages (13 KiB): written from a page-aligned buffer, read into one at an odd address.
    await writeAndCheck(fe, 9n, crypto.randomBytes(13 * 1024), data + 8n * PAGE, data + 20n * PAGE + 0x123n);
    // 2.5 KiB from a buffer that starts at an odd address and crosses a page boundary.
    await writeAndCheck(fe, 777n, crypto.randomBytes(2560), data + 3n * PAGE - 0x235n, undefined);
    // The last 8 sectors of the disk.
    await writeAndCheck(fe, capacity - 8n, crypto.randomBytes(8 * SECTOR), undefined, data + 40n * PAGE + 7n);
    await fe.flush();
    // Neighbours of a write are untouched.
    const around = await fe.read(8n, 28 * SECTOR);
    assert.ok(
      around.subarray(0, SECTOR).equals(expected.subarray(8 * SECTOR, 9 * SECTOR)),
      'sector 8 unchanged',
    );
    assert.ok(around.equals(expected.subarray(8 * SECTOR, 36 * SECTOR)), 'sectors 8..35 as expected');
    assert.equal(await close(fe), 10, 'GET_VRING_BASE: all 10 requests were consumed');
  });

  test('a new front-end is served after the first closed, and sees its data', async (t) => {
    const fe = await connect(t);
    const back = await fe.read(9n, 13 * 1024);
    assert.ok(back.equals(expected.subarray(9 * SECTOR, 9 * SECTOR + 13 * 1024)), 'the earlier write');
    await writeAndCheck(fe, 4000n, crypto.randomBytes(3 * SECTOR), undefined, undefined);
    assert.equal(await close(fe), 3);
  });

  test('a request into memory the back-end was never given is an error naming it, not a hang', async (t) => {
    const fe = await connect(t);
    const unknown = fe.memory.add(1n << 30n, MiB, 'never-announced');
    // libvhost-user cannot translate the buffer: it logs a panic and drops the connection.
    await assert.rejects(
      fe.write(5000n, Buffer.alloc(SECTOR, 0xee), { guestAddr: unknown.guestAddr }),
      /WRITE of 512 bytes at sector 5000 \(avail index 0\): the vhost-user back-end closed the connection/,
    );
    await assert.rejects(fe.read(0n, SECTOR), /the virtqueue is wedged: .*WRITE of 512 bytes at sector 5000/);
    assert.equal(await close(fe), null, 'a wedged ring is not asked for its base');
    await daemon!.waitForOutput(/vu_panic: virtio: invalid address for buffers/, TIER_BUDGET_MS);
    // The daemon serves the next front-end.
    const next = await connect(t);
    const first = await next.read(0n, SECTOR);
    assert.ok(first.equals(expected.subarray(0, SECTOR)), 'served again');
    await close(next);
  });

  test('a request the device never completes is an error naming it after the bound, not a hang', async (t) => {
    // A short bound is enough: a stopped daemon completes nothing, however loaded the machine is.
    const fe = await connect(t, { ...OPTIONS, requestWaitMs: 2000 });
    daemon!.freeze();
    try {
      await assert.rejects(
        fe.read(100n, 2 * SECTOR),
        /READ of 1024 bytes at sector 100 \(avail index 0\): no used entry within 2000 ms/,
      );
    } finally {
      daemon!.thaw();
    }
    assert.equal(await close(fe), null, 'a wedged ring is not asked for its base');
    const next = await connect(t);
    assert.ok((await next.read(0n, SECTOR)).equals(expected.subarray(0, SECTOR)), 'served again');
    await close(next);
  });

  test('ADD_MEM_REG: a buffer in memory added later', async (t) => {
    const fe = await connect(t);
    if (fe.negotiated.maxMemSlots === null) {
      t.skip('the back-end does not offer CONFIGURE_MEM_SLOTS');
      await close(fe);
      return;
    }
    const region = await fe.addMemory(2n * MiB);
    assert.equal(region.guestAddr, OPTIONS.memoryBytes, 'placed just above the boot memory');
    // Written from the new region, read into a buffer that straddles both regions.
    await writeAndCheck(
      fe,
      6000n,
      crypto.randomBytes(4 * 4096),
      region.guestAddr + 0x801n,
      region.guestAddr - 3000n,
    );
    assert.equal(await close(fe), 2);
  });

  test('the daemon exits cleanly and the image holds exactly what was written', async (t) => {
    assert.ok(daemon);
    assert.equal(
      await daemon.stop(TIER_BUDGET_MS),
      0,
      `qemu-storage-daemon exit; its output:\n${daemon.log}`,
    );
    const onDisk = fs.readFileSync(image);
    assert.equal(onDisk.byteLength, IMAGE_BYTES);
    assert.ok(onDisk.equals(expected), 'every byte of the image as expected');
    assert.equal(frontEndFds(), fdsBefore, 'every fd the front-ends opened is closed');
    t.diagnostic(
      `bytes written and read back: ${bytesVerified}; image bytes checked: ${IMAGE_BYTES}; ` +
        `elapsed ${Date.now() - started} ms; daemon output: ${JSON.stringify(daemon.log)}`,
    );
  });
});
