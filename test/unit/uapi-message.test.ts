import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import {
  decodeVhostMsg,
  encodeMsgV1,
  encodeMsgV2,
  encodeVhostMsg,
  IotlbMsgType,
  UapiError,
  VHOST_ACCESS_RW,
  VHOST_MSG_SIZE,
  type VhostMsg,
} from '../../src/uapi/index.ts';
import { U64_MAX } from '../../src/u64.ts';

test('vhost_msg_v2 UPDATE has the kernel layout, byte for byte', () => {
  const buf = encodeMsgV2(1, {
    iova: 0x1122334455667788n,
    size: 0x200000n,
    uaddr: 0x7f0000001000n,
    perm: VHOST_ACCESS_RW,
    type: IotlbMsgType.UPDATE,
  });
  assert.equal(buf.length, 72);
  const expected = Buffer.alloc(72);
  expected.set([2, 0, 0, 0], 0); // type = VHOST_IOTLB_MSG_V2
  expected.set([1, 0, 0, 0], 4); // asid
  expected.set([0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11], 8); // iova, little-endian
  expected.set([0, 0, 0x20, 0, 0, 0, 0, 0], 16); // size
  expected.set([0, 0x10, 0, 0, 0, 0x7f, 0, 0], 24); // uaddr
  expected[32] = 3; // perm RW
  expected[33] = 2; // type UPDATE
  assert.deepEqual(buf, expected);
});

test('vhost_msg (v1) puts the iotlb union at offset 8 behind an int type', () => {
  const buf = encodeMsgV1({ iova: 1n, size: 2n, uaddr: 3n, perm: 1, type: IotlbMsgType.INVALIDATE });
  assert.equal(buf.readInt32LE(0), 1);
  assert.equal(buf.readUInt32LE(4), 0);
  assert.equal(buf.readBigUInt64LE(8), 1n);
  assert.equal(buf[33], IotlbMsgType.INVALIDATE);
  assert.deepEqual(decodeVhostMsg(buf), {
    version: 1,
    asid: 0,
    iotlb: { iova: 1n, size: 2n, uaddr: 3n, perm: 1, type: IotlbMsgType.INVALIDATE },
  });
});

const u64 = fc.bigInt({ min: 0n, max: U64_MAX });
const msgArb: fc.Arbitrary<VhostMsg> = fc.record(
  {
    version: fc.constantFrom(1 as const, 2 as const),
    asid: fc.integer({ min: 0, max: 0xffffffff }),
    iotlb: fc.record(
      {
        iova: u64,
        size: u64,
        uaddr: u64,
        perm: fc.integer({ min: 0, max: 255 }),
        type: fc.constantFrom(...Object.values(IotlbMsgType)),
      },
      { noNullPrototype: true },
    ),
  },
  { noNullPrototype: true },
);

test('property: decode(encode(m)) == m for every field value', () => {
  fc.assert(
    fc.property(msgArb, (msg) => {
      const expected = msg.version === 1 ? { ...msg, asid: 0 } : msg;
      assert.deepEqual(decodeVhostMsg(encodeVhostMsg(msg)), expected);
    }),
    { numRuns: 2000 },
  );
});

test('property: encode(decode(b)) == b for every well-formed record', () => {
  fc.assert(
    fc.property(msgArb, (msg) => {
      const bytes = encodeVhostMsg(msg);
      assert.deepEqual(encodeVhostMsg(decodeVhostMsg(bytes)), bytes);
    }),
  );
});

test('property: decoding arbitrary bytes never crashes: a message or a UapiError', () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 0, maxLength: 100 }), (bytes) => {
      try {
        const msg = decodeVhostMsg(bytes);
        assert.equal(bytes.length, VHOST_MSG_SIZE);
        assert.ok(msg.version === 1 || msg.version === 2);
      } catch (err) {
        assert.ok(err instanceof UapiError, String(err));
      }
    }),
    { numRuns: 3000 },
  );
});

test('decode refuses the wrong size, unknown message types and unknown IOTLB types', () => {
  const good = encodeMsgV2(0, { iova: 0n, size: 1n, uaddr: 0n, perm: 3, type: IotlbMsgType.UPDATE });
  assert.throws(() => decodeVhostMsg(good.subarray(0, 16)), { name: 'UapiError', code: 'BAD_LENGTH' });
  assert.throws(() => decodeVhostMsg(Buffer.concat([good, Buffer.alloc(1)])), { code: 'BAD_LENGTH' });
  const badType = Buffer.from(good);
  badType.writeUInt32LE(9, 0);
  assert.throws(() => decodeVhostMsg(badType), { code: 'UNKNOWN_MSG_TYPE', field: 'type' });
  const badIotlb = Buffer.from(good);
  badIotlb[33] = 7;
  assert.throws(() => decodeVhostMsg(badIotlb), { code: 'UNKNOWN_IOTLB_TYPE', field: 'iotlb.type' });
});

test('encode refuses values that do not fit their C type, naming the field', () => {
  const base = { iova: 0n, size: 1n, uaddr: 0n, perm: 3, type: IotlbMsgType.UPDATE };
  assert.throws(() => encodeMsgV2(0, { ...base, iova: 1n << 64n }), { code: 'FIELD_RANGE', field: 'iova' });
  assert.throws(() => encodeMsgV2(0, { ...base, size: -1n }), { code: 'FIELD_RANGE', field: 'size' });
  assert.throws(() => encodeMsgV2(0, { ...base, perm: 256 }), { code: 'FIELD_RANGE', field: 'perm' });
  assert.throws(() => encodeMsgV2(2 ** 32, base), { code: 'FIELD_RANGE', field: 'asid' });
  assert.throws(() => encodeMsgV2(0.5, base), { code: 'FIELD_RANGE', field: 'asid' });
});
