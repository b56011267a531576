/**
 * The vhost-user backend over a real socketpair with real fds (memfds, eventfds): negotiation,
 * the memory table diffed by file (new fd numbers for the same memfd change nothing), vring
 * addresses translated to guest physical, refusals as error replies, and hostile frames: each
 * closes the connection with a clear error, leaves nothing mapped and leaks no fd.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { dupCloexec, EFD_CLOEXEC, EFD_NONBLOCK, eventfd, unixSocketPair } from '../../src/sys/libc.ts';
import {
  VhostUserBackend,
  type VhostUserDeviceSide,
  type VringConfig,
} from '../../src/vhost-user/backend.ts';
import type { MemoryDiff } from '../../src/vhost-user/memory-table.ts';
import { VhostUserConnection } from '../../src/vhost-user/transport.ts';
import {
  encodeHeader,
  encodeRequest,
  F_PROTOCOL_FEATURES,
  type MemoryRegion,
  memRegPayload,
  memTablePayload,
  protocolFeatureMask,
  Request,
  u64Payload,
  VERSION,
  vringAddrPayload,
  vringFdPayload,
} from '../../src/vhost-user/wire.ts';
import { FrontEnd, highRam, lowRam, memfd, passedFds } from '../vhost-user/front-end.ts';

const MiB = 1n << 20n;
const FEATURES = 1n << 32n;
const ALL_PROTOCOL = protocolFeatureMask('REPLY_ACK', 'CONFIG', 'MQ', 'CONFIGURE_MEM_SLOTS');

/** The device side: records every diff with the files' identities; can be told to refuse. */
class RecordingDevice implements VhostUserDeviceSide {
  readonly features = FEATURES | 1n;
  readonly queueCount = 1;
  readonly maxQueueSize = 256;
  readonly diffs: { added: string[]; removed: string[] }[] = [];
  /** guestAddr -> file key of what is mapped now. */
  readonly mapped = new Map<bigint, string>();
  readonly started: VringConfig[] = [];
  refuse: string | null = null;
  config() {
    return Buffer.from('0123456789');
  }
  featuresNegotiated() {}
  async memoryChanged(diff: MemoryDiff) {
    await new Promise((r) => setImmediate(r));
    if (this.refuse) throw new Error(this.refuse);
    // The fds of added regions are open during the call.
    for (const r of diff.added) assert.ok(fs.fstatSync(r.fd).isFile());
    const key = (r: { guestAddr: bigint; file: { ino: bigint } }) =>
      `${r.guestAddr.toString(16)}@${r.file.ino}`;
    this.diffs.push({ added: diff.added.map(key), removed: diff.removed.map(key) });
    for (const r of diff.removed) this.mapped.delete(r.guestAddr);
    for (const r of diff.added) this.mapped.set(r.guestAddr, `${r.file.ino}`);
  }
  startVring(v: VringConfig) {
    this.started.push(v);
  }
  stopVring() {
    return 7;
  }
}

let device: RecordingDevice;
let backend: VhostUserBackend;
let fe: FrontEnd;
let ram: number;
let fdsBefore: number;
const own: number[] = [];

beforeEach(() => {
  fdsBefore = passedFds();
  const [a, b] = unixSocketPair();
  device = new RecordingDevice();
  backend = new VhostUserBackend(new VhostUserConnection(a), device);
  fe = new FrontEnd(b);
  ram = memfd(16n * MiB);
  own.push(ram);
});
afterEach(async () => {
  fe.close();
  await backend.done;
  for (const fd of own.splice(0)) fs.closeSync(fd);
  assert.equal(device.mapped.size, 0, 'nothing stays mapped once the front-end is gone');
  assert.equal(passedFds(), fdsBefore, 'every fd received was closed');
});

async function negotiate(protocol = ALL_PROTOCOL): Promise<void> {
  fe.send(Request.GET_FEATURES, Buffer.alloc(0));
  assert.equal(await fe.u64(Request.GET_FEATURES), device.features | F_PROTOCOL_FEATURES);
  fe.send(Request.GET_PROTOCOL_FEATURES, Buffer.alloc(0));
  assert.equal(await fe.u64(Request.GET_PROTOCOL_FEATURES), ALL_PROTOCOL);
  fe.send(Request.SET_PROTOCOL_FEATURES, u64Payload(protocol), [], true);
  fe.send(Request.SET_FEATURES, u64Payload(FEATURES | F_PROTOCOL_FEATURES), [], true);
  fe.send(Request.SET_OWNER, Buffer.alloc(0), [], true);
  if ((protocol & protocolFeatureMask('REPLY_ACK')) === 0n) return;
  for (const r of [Request.SET_PROTOCOL_FEATURES, Request.SET_FEATURES, Request.SET_OWNER]) {
    assert.equal(await fe.u64(r), 0n, `ack of ${r}`);
  }
}

async function hostile(send: () => void, reason: RegExp): Promise<void> {
  send();
  await fe.eof();
  await backend.done;
  assert.match(String(backend.error?.message), reason);
}

describe('vhost-user backend: negotiation and memory', () => {
  it('diffs a re-sent table by file: new fd numbers for the same memfd change nothing', async () => {
    await negotiate();
    fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam, highRam]), [ram, ram], true);
    assert.equal(await fe.u64(Request.SET_MEM_TABLE), 0n);
    const ino = fs.fstatSync(ram).ino;
    assert.deepEqual(device.diffs, [{ added: [`0@${ino}`, `100000000@${ino}`], removed: [] }]);
    // Hotplug: the whole table again, fresh fds for the same file, and one new region.
    const dimm = memfd(4n * MiB);
    own.push(dimm);
    const dimmRegion = {
      guestAddr: 0x2_0000_0000n,
      size: 4n * MiB,
      userAddr: 0x7f00_8000_0000n,
      mmapOffset: 0n,
    };
    const [d1, d2] = [dupCloexec(ram), dupCloexec(ram)];
    fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam, highRam, dimmRegion]), [d1, d2, dimm], true);
    fs.closeSync(d1);
    fs.closeSync(d2);
    assert.equal(await fe.u64(Request.SET_MEM_TABLE), 0n);
    const dimmIno = fs.fstatSync(dimm).ino;
    assert.deepEqual(device.diffs[1], { added: [`200000000@${dimmIno}`], removed: [] });
    // Unplug: exactly that region goes.
    fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam, highRam]), [ram, ram], true);
    assert.equal(await fe.u64(Request.SET_MEM_TABLE), 0n);
    assert.deepEqual(device.diffs[2], { added: [], removed: [`200000000@${dimmIno}`] });
    assert.equal(backend.memoryTable().length, 2);
  });

  it('ADD_MEM_REG / REM_MEM_REG change one region each', async () => {
    await negotiate();
    fe.send(Request.ADD_MEM_REG, memRegPayload(lowRam), [ram], true);
    assert.equal(await fe.u64(Request.ADD_MEM_REG), 0n);
    fe.send(Request.ADD_MEM_REG, memRegPayload(highRam), [ram], true);
    assert.equal(await fe.u64(Request.ADD_MEM_REG), 0n);
    fe.send(Request.REM_MEM_REG, memRegPayload(lowRam), [], true);
    assert.equal(await fe.u64(Request.REM_MEM_REG), 0n);
    assert.deepEqual(
      device.diffs.map((d) => [d.added.length, d.removed.length]),
      [
        [1, 0],
        [1, 0],
        [0, 1],
      ],
    );
    // Removing what is not there is refused with an error reply; the connection stays.
    fe.send(Request.REM_MEM_REG, memRegPayload(lowRam), [], true);
    assert.notEqual(await fe.u64(Request.REM_MEM_REG), 0n);
    fe.send(Request.GET_QUEUE_NUM, Buffer.alloc(0));
    assert.equal(await fe.u64(Request.GET_QUEUE_NUM), 1n);
  });

  it('a device refusal is an error reply and leaves the table as it was', async () => {
    await negotiate();
    device.refuse = 'EFAULT: no room';
    fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [ram], true);
    assert.equal(await fe.u64(Request.SET_MEM_TABLE), 1n);
    assert.deepEqual(backend.memoryTable(), []);
    assert.equal(backend.stats.refusals, 1);
    device.refuse = null;
    fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [ram], true);
    assert.equal(await fe.u64(Request.SET_MEM_TABLE), 0n);
  });

  it('a refusal the front-end asked no reply for closes the connection', async () => {
    await negotiate(protocolFeatureMask('CONFIG'));
    device.refuse = 'EFAULT: no room';
    await hostile(
      () => fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [ram], true),
      /refused and the front-end asked for no reply/,
    );
  });

  it('vring addresses are translated to guest physical; the ring starts on kick + enable', async () => {
    await negotiate();
    fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam, highRam]), [ram, ram], true);
    await fe.u64(Request.SET_MEM_TABLE);
    const kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    const call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    own.push(kick, call);
    const va = (r: MemoryRegion, off: bigint) => r.userAddr + off;
    fe.send(Request.SET_VRING_NUM, Buffer.from([0, 0, 0, 0, 128, 0, 0, 0]));
    fe.send(Request.SET_VRING_BASE, Buffer.from([0, 0, 0, 0, 5, 0, 0, 0]));
    fe.send(
      Request.SET_VRING_ADDR,
      vringAddrPayload({
        index: 0,
        log: false,
        desc: va(highRam, 0x1000n),
        avail: va(highRam, 0x2000n),
        used: va(lowRam, 0x3000n),
        logAddr: 0n,
      }),
    );
    fe.send(Request.SET_VRING_CALL, vringFdPayload(0, true), [call]);
    fe.send(Request.SET_VRING_KICK, vringFdPayload(0, true), [kick]);
    fe.send(Request.SET_VRING_ENABLE, Buffer.from([0, 0, 0, 0, 1, 0, 0, 0]));
    fe.send(Request.GET_VRING_BASE, Buffer.from([0, 0, 0, 0, 0, 0, 0, 0]));
    const base = await fe.reply(Request.GET_VRING_BASE);
    assert.deepEqual([...(base ?? [])], [0, 0, 0, 0, 7, 0, 0, 0], 'the device said where it stopped');
    assert.equal(device.started.length, 1);
    const v = device.started[0]!;
    assert.equal(v.size, 128);
    assert.equal(v.lastAvail, 5);
    assert.equal(v.desc, 0x1_0000_1000n);
    assert.equal(v.avail, 0x1_0000_2000n);
    assert.equal(v.used, 0x3000n);
    assert.notEqual(v.callFd(), null);
    assert.ok(fs.fstatSync(v.callFd()!).dev === fs.fstatSync(call).dev);
  });

  it('GET_CONFIG answers the device config at the asked offset', async () => {
    await negotiate();
    const req = Buffer.alloc(12 + 4);
    req.writeUInt32LE(2, 0);
    req.writeUInt32LE(4, 4);
    fe.send(Request.GET_CONFIG, req);
    const r = await fe.reply(Request.GET_CONFIG);
    assert.equal(r?.subarray(12).toString(), '2345');
    // SET_CONFIG is refused, with an error reply.
    fe.send(Request.SET_CONFIG, req, [], true);
    assert.equal(await fe.u64(Request.SET_CONFIG), 1n);
  });
});

describe('vhost-user backend: hostile frames close the connection and map nothing', () => {
  it('a header cut short by a hang-up', async () => {
    fe.raw(encodeHeader(Request.SET_MEM_TABLE, VERSION, 40).subarray(0, 8), [ram]);
    fe.close();
    await backend.done;
    assert.match(String(backend.error?.message), /EOF inside a message/);
  });

  it('a payload cut short by a hang-up', async () => {
    await negotiate();
    fe.raw(encodeRequest(Request.SET_MEM_TABLE, memTablePayload([lowRam])).subarray(0, 30), [ram]);
    fe.close();
    await backend.done;
    assert.match(String(backend.error?.message), /EOF inside a message/);
  });

  it('an oversized payload', async () => {
    await hostile(() => fe.raw(encodeHeader(Request.SET_MEM_TABLE, VERSION, 1 << 20)), /exceeds 268/);
  });

  it('an unknown request, with an fd that must not leak', async () => {
    await hostile(() => fe.raw(encodeHeader(77, VERSION, 0), [ram]), /unknown or unsupported request 77/);
  });

  it('fewer fds than regions', async () => {
    await negotiate();
    await hostile(
      () => fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam, highRam]), [ram], true),
      /expects 2 fds, got 1/,
    );
  });

  it('more fds than a message may carry', async () => {
    const many = Array.from({ length: 9 }, () => ram);
    await hostile(() => fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), many, true), /more fds/);
  });

  it('overlapping regions', async () => {
    await negotiate();
    const overlapping = { ...highRam, guestAddr: 4n * MiB };
    await hostile(
      () => fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam, overlapping]), [ram, ram], true),
      /overlap in guestAddr/,
    );
  });

  it('an offset past the end of the file, after a good table: everything is unmapped', async () => {
    await negotiate();
    fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [ram], true);
    assert.equal(await fe.u64(Request.SET_MEM_TABLE), 0n);
    assert.equal(device.mapped.size, 1);
    const pastEnd = { ...highRam, mmapOffset: 12n * MiB };
    await hostile(
      () => fe.send(Request.ADD_MEM_REG, memRegPayload(pastEnd), [ram], true),
      /runs past the end of its file/,
    );
    assert.equal(device.diffs.length, 2, 'the bad region never reached the device');
    assert.deepEqual(device.diffs[1]?.added, []);
  });

  it('an fd that is not a file', async () => {
    await negotiate();
    const efd = eventfd(0, EFD_CLOEXEC);
    own.push(efd);
    await hostile(
      () => fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [efd], true),
      /not a regular file/,
    );
  });

  it('features never offered', async () => {
    await negotiate();
    await hostile(() => fe.send(Request.SET_FEATURES, u64Payload(1n << 40n)), /never offered/);
  });

  it('a vring index past the device', async () => {
    await hostile(() => fe.send(Request.SET_VRING_NUM, Buffer.from([3, 0, 0, 0, 128, 0, 0, 0])), /vring 3/);
  });

  it('a ring address in no region', async () => {
    await negotiate();
    await hostile(
      () =>
        fe.send(
          Request.SET_VRING_ADDR,
          vringAddrPayload({ index: 0, log: false, desc: 0x1234n, avail: 0n, used: 0n, logAddr: 0n }),
        ),
      /desc address 0x1234 is in no memory region/,
    );
  });
});
