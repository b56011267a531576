/** Scenario 1: vhost_msg_v2 encode + decode vs a bare Buffer write of the same 72 bytes. */
import { decodeVhostMsg, encodeMsgV2, IotlbMsgType } from '../../src/uapi/index.ts';
import { type BenchContext, compare, rate, scaled } from '../harness.ts';

export function benchCodec(ctx: BenchContext): void {
  const n = scaled(ctx, 500_000, 1000);
  const msg = {
    iova: 0x100000n,
    size: 0x200000n,
    uaddr: 0x7f0000000000n,
    perm: 3,
    type: IotlbMsgType.UPDATE,
  };
  let sink = 0n;
  const bare = rate(n, (i) => {
    const b = Buffer.alloc(72);
    b.writeUInt32LE(2, 0);
    b.writeBigUInt64LE(msg.iova + BigInt(i & 0xff), 8);
    b.writeBigUInt64LE(msg.size, 16);
    b.writeBigUInt64LE(msg.uaddr, 24);
    b[32] = 3;
    b[33] = 2;
    sink ^= b.readBigUInt64LE(8);
  });
  const codec = rate(n, (i) => {
    const m = decodeVhostMsg(encodeMsgV2(0, { ...msg, iova: msg.iova + BigInt(i & 0xff) }));
    sink ^= m.iotlb.iova;
  });
  if (sink === -1n) ctx.log('unreachable');
  compare(
    ctx,
    { scenario: 'codec', case: 'encode+decode v2', metric: 'msgs/s', value: codec, unit: 'msg/s' },
    'bare Buffer write',
    bare,
  );
}
