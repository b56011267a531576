/** The vhost-user decoder refuses every malformed frame with an error naming the field. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  decodeHeader,
  decodeMessage,
  encodeHeader,
  encodeRequest,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  type MemoryRegion,
  MAX_PAYLOAD,
  memRegPayload,
  memTablePayload,
  Request,
  u64Payload,
  VERSION,
  vringAddrPayload,
  vringFdPayload,
  WireError,
} from '../../src/vhost-user/wire.ts';

const MiB = 1n << 20n;
const region = (guestAddr: bigint, size: bigint, userAddr: bigint, mmapOffset = 0n): MemoryRegion => ({
  guestAddr,
  size,
  userAddr,
  mmapOffset,
});

function decode(frame: Buffer, fds: number[] = []) {
  const header = decodeHeader(frame.subarray(0, 12));
  return decodeMessage(header, frame.subarray(12), fds);
}

function refused(fn: () => unknown, field: string, message: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof WireError, String(e));
    assert.equal(e.field, field);
    assert.match(e.message, message);
    return true;
  });
}

describe('vhost-user header', () => {
  it('accepts version 1 with or without NEED_REPLY', () => {
    assert.deepEqual(decodeHeader(encodeHeader(Request.SET_OWNER, VERSION, 0)), {
      request: Request.SET_OWNER,
      flags: 1,
      size: 0,
    });
    assert.equal(decodeHeader(encodeHeader(Request.SET_OWNER, VERSION | FLAG_NEED_REPLY, 0)).flags, 9);
  });

  it('refuses a short header, an unknown request, another version, reply or unknown flags, oversize', () => {
    refused(() => decodeHeader(Buffer.alloc(8)), 'header', /8 bytes, not 12/);
    refused(() => decodeHeader(encodeHeader(99, VERSION, 0)), 'header.request', /request 99/);
    refused(() => decodeHeader(encodeHeader(Request.SET_OWNER, 2, 0)), 'header.flags', /version 2/);
    refused(
      () => decodeHeader(encodeHeader(Request.SET_OWNER, VERSION | FLAG_REPLY, 0)),
      'header.flags',
      /0x5/,
    );
    refused(() => decodeHeader(encodeHeader(Request.SET_OWNER, VERSION | 0x100, 0)), 'header.flags', /0x101/);
    refused(
      () => decodeHeader(encodeHeader(Request.SET_MEM_TABLE, VERSION, MAX_PAYLOAD + 1)),
      'header.size',
      /exceeds/,
    );
  });
});

describe('vhost-user payloads', () => {
  it('decodes every u64 as a bigint', () => {
    const m = decode(encodeRequest(Request.SET_FEATURES, u64Payload(0xffff_ffff_ffff_fffen)));
    assert.deepEqual(m, { request: 'SET_FEATURES', needReply: false, value: 0xffff_ffff_ffff_fffen });
    const a = decode(
      encodeRequest(
        Request.SET_VRING_ADDR,
        vringAddrPayload({ index: 0, log: false, desc: 1n << 63n, used: 2n, avail: 3n, logAddr: 4n }),
      ),
    );
    assert.ok(a.request === 'SET_VRING_ADDR');
    assert.equal(a.addr.desc, 1n << 63n);
  });

  it('refuses wrong sizes and fd counts', () => {
    refused(
      () => decode(encodeRequest(Request.SET_FEATURES, Buffer.alloc(4))),
      'header.size',
      /8 bytes, got 4/,
    );
    refused(
      () => decode(encodeRequest(Request.SET_OWNER, Buffer.alloc(0)), [7]),
      'fds',
      /expects 0 fds, got 1/,
    );
    const table = memTablePayload([region(0n, MiB, 0x7f00_0000_0000n), region(MiB, MiB, 0x7f10_0000_0000n)]);
    refused(() => decode(encodeRequest(Request.SET_MEM_TABLE, table), [5]), 'fds', /expects 2 fds, got 1/);
    refused(
      () => decode(encodeRequest(Request.SET_MEM_TABLE, table.subarray(0, 40)), [5, 6]),
      'header.size',
      /must be 72 bytes/,
    );
    refused(
      () => decode(encodeRequest(Request.SET_VRING_KICK, vringFdPayload(0, false)), [5]),
      'fds',
      /0 fds/,
    );
    refused(() => decode(encodeRequest(Request.SET_VRING_CALL, vringFdPayload(0, true))), 'fds', /1 fds/);
    refused(
      () => decode(encodeRequest(Request.ADD_MEM_REG, memRegPayload(region(0n, MiB, 0n)))),
      'fds',
      /1 fds/,
    );
  });

  it('refuses too many regions, empty ones, wrapping ones and overlaps', () => {
    const nine = Buffer.alloc(8);
    nine.writeUInt32LE(9);
    refused(() => decode(encodeRequest(Request.SET_MEM_TABLE, nine)), 'nregions', /at most 8/);
    const one = (r: MemoryRegion) => decode(encodeRequest(Request.SET_MEM_TABLE, memTablePayload([r])), [3]);
    refused(() => one(region(0n, 0n, 0n)), 'regions[0].size', /size is 0/);
    refused(() => one(region(2n ** 64n - MiB, 2n * MiB, 0n)), 'regions[0].guestAddr', /past 2\^64/);
    refused(() => one(region(0n, MiB, 2n ** 64n - 1n)), 'regions[0].userAddr', /past 2\^64/);
    refused(() => one(region(0n, MiB, 0n, 2n ** 64n - 4096n)), 'regions[0].mmapOffset', /past 2\^64/);
    const two = (a: MemoryRegion, b: MemoryRegion) =>
      decode(encodeRequest(Request.SET_MEM_TABLE, memTablePayload([a, b])), [3, 4]);
    refused(
      () => two(region(0n, 2n * MiB, 0x1000_0000n), region(MiB, MiB, 0x2000_0000n)),
      'regions[1].guestAddr',
      /overlap in guestAddr/,
    );
    refused(
      () => two(region(0n, MiB, 0x1000_0000n), region(MiB, MiB, 0x1000_0000n)),
      'regions[1].userAddr',
      /overlap in userAddr/,
    );
    assert.doesNotThrow(() => two(region(MiB, MiB, 0x2000_0000n), region(0n, MiB, 0x1000_0000n)));
  });

  it('refuses unknown vring flags and config ranges past 256 bytes', () => {
    const addr = vringAddrPayload({ index: 0, log: false, desc: 0n, used: 0n, avail: 0n, logAddr: 0n });
    addr.writeUInt32LE(2, 4);
    refused(() => decode(encodeRequest(Request.SET_VRING_ADDR, addr)), 'flags', /unknown flags 0x2/);
    const kick = u64Payload(0x200n);
    refused(() => decode(encodeRequest(Request.SET_VRING_KICK, kick)), 'payload', /unknown bits/);
    const cfg = Buffer.alloc(12 + 8);
    cfg.writeUInt32LE(250, 0);
    cfg.writeUInt32LE(8, 4);
    refused(() => decode(encodeRequest(Request.GET_CONFIG, cfg)), 'offset', /past 256/);
    cfg.writeUInt32LE(0, 0);
    cfg.writeUInt32LE(60, 4);
    refused(() => decode(encodeRequest(Request.GET_CONFIG, cfg)), 'header.size', /must be 72 bytes/);
  });
});
