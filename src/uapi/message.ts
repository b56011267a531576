/**
 * Encode/decode of `struct vhost_msg` (v1) and `struct vhost_msg_v2`: the 72-byte records written
 * to /dev/vhost-vdpa-N. The only place that knows their byte offsets.
 *
 *   struct vhost_iotlb_msg { u64 iova; u64 size; u64 uaddr; u8 perm; u8 type; }
 *   struct vhost_msg    { int type;            union { vhost_iotlb_msg iotlb; u8 padding[64]; } }
 *   struct vhost_msg_v2 { u32 type; u32 asid;  union { vhost_iotlb_msg iotlb; u8 padding[64]; } }
 *
 * vhost_iotlb_msg is not packed: 26 bytes of fields, then tail padding to 32 (its u64 alignment);
 * perm and type sit at iotlb offsets 24 and 25. The union holds u64s, so it is 8-byte aligned and
 * starts at offset 8 in both: 8 + 64 = 72 bytes (include/uapi/linux/vhost_types.h).
 * Little-endian (x86_64, arm64).
 */
import { IotlbMsgType, VHOST_IOTLB_MSG, VHOST_IOTLB_MSG_V2 } from './constants.ts';
import { U32_MAX, U64_MAX } from '../u64.ts';

export const VHOST_MSG_SIZE = 72;

const OFF_TYPE = 0;
const OFF_ASID = 4;
const OFF_IOTLB = 8;
const OFF_IOVA = OFF_IOTLB + 0;
const OFF_SIZE = OFF_IOTLB + 8;
const OFF_UADDR = OFF_IOTLB + 16;
const OFF_PERM = OFF_IOTLB + 24;
const OFF_IOTLB_TYPE = OFF_IOTLB + 25;

/** `struct vhost_iotlb_msg` with 64-bit fields as bigint. */
export interface IotlbMsg {
  iova: bigint;
  size: bigint;
  uaddr: bigint;
  perm: number;
  type: IotlbMsgType;
}

/** A decoded record: v1 carries no asid (the kernel uses address space 0), shown here as 0. */
export interface VhostMsg {
  version: 1 | 2;
  asid: number;
  iotlb: IotlbMsg;
}

export type UapiErrorCode = 'BAD_LENGTH' | 'UNKNOWN_MSG_TYPE' | 'UNKNOWN_IOTLB_TYPE' | 'FIELD_RANGE';

/** A record that cannot be encoded or decoded; `field` names the offending field. */
export class UapiError extends Error {
  constructor(
    readonly code: UapiErrorCode,
    message: string,
    readonly field?: string,
  ) {
    super(message);
    this.name = 'UapiError';
  }
}

const IOTLB_TYPES = new Set<number>(Object.values(IotlbMsgType));

function checkU64(field: string, value: bigint): void {
  if (typeof value !== 'bigint' || value < 0n || value > U64_MAX) {
    throw new UapiError('FIELD_RANGE', `${field} must be a u64 bigint, got ${String(value)}`, field);
  }
}

function checkUint(field: string, value: number, bits: 8 | 32): void {
  const max = bits === 8 ? 0xff : U32_MAX;
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new UapiError('FIELD_RANGE', `${field} must be a u${bits}, got ${String(value)}`, field);
  }
}

function writeIotlb(buf: Buffer, iotlb: IotlbMsg): void {
  checkU64('iova', iotlb.iova);
  checkU64('size', iotlb.size);
  checkU64('uaddr', iotlb.uaddr);
  checkUint('perm', iotlb.perm, 8);
  checkUint('type', iotlb.type, 8);
  buf.writeBigUInt64LE(iotlb.iova, OFF_IOVA);
  buf.writeBigUInt64LE(iotlb.size, OFF_SIZE);
  buf.writeBigUInt64LE(iotlb.uaddr, OFF_UADDR);
  buf.writeUInt8(iotlb.perm, OFF_PERM);
  buf.writeUInt8(iotlb.type, OFF_IOTLB_TYPE);
}

/**
 * A zeroed record from Buffer's shared pool: a device writes one per op, and a fresh ArrayBuffer
 * for each 72 bytes costs more than encoding them.
 */
function newRecord(): Buffer {
  return Buffer.allocUnsafe(VHOST_MSG_SIZE).fill(0);
}

/** `struct vhost_msg` (v1): used when VHOST_BACKEND_F_IOTLB_MSG_V2 was not negotiated. */
export function encodeMsgV1(iotlb: IotlbMsg): Buffer {
  const buf = newRecord();
  buf.writeInt32LE(VHOST_IOTLB_MSG, OFF_TYPE);
  writeIotlb(buf, iotlb);
  return buf;
}

/** `struct vhost_msg_v2`: `asid` is honoured by the kernel only with VHOST_BACKEND_F_IOTLB_ASID. */
export function encodeMsgV2(asid: number, iotlb: IotlbMsg): Buffer {
  checkUint('asid', asid, 32);
  const buf = newRecord();
  buf.writeUInt32LE(VHOST_IOTLB_MSG_V2, OFF_TYPE);
  buf.writeUInt32LE(asid, OFF_ASID);
  writeIotlb(buf, iotlb);
  return buf;
}

export function encodeVhostMsg(msg: VhostMsg): Buffer {
  return msg.version === 2 ? encodeMsgV2(msg.asid, msg.iotlb) : encodeMsgV1(msg.iotlb);
}

/** Decodes one record; any malformed input is a UapiError, never a crash or a silent default. */
export function decodeVhostMsg(buf: Uint8Array): VhostMsg {
  if (buf.byteLength !== VHOST_MSG_SIZE) {
    throw new UapiError('BAD_LENGTH', `a vhost message is ${VHOST_MSG_SIZE} bytes, got ${buf.byteLength}`);
  }
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  const msgType = b.readUInt32LE(OFF_TYPE);
  if (msgType !== VHOST_IOTLB_MSG && msgType !== VHOST_IOTLB_MSG_V2) {
    throw new UapiError('UNKNOWN_MSG_TYPE', `unknown vhost message type ${msgType}`, 'type');
  }
  const type = b.readUInt8(OFF_IOTLB_TYPE);
  if (!IOTLB_TYPES.has(type)) {
    throw new UapiError('UNKNOWN_IOTLB_TYPE', `unknown IOTLB message type ${type}`, 'iotlb.type');
  }
  return {
    version: msgType === VHOST_IOTLB_MSG_V2 ? 2 : 1,
    asid: msgType === VHOST_IOTLB_MSG_V2 ? b.readUInt32LE(OFF_ASID) : 0,
    iotlb: {
      iova: b.readBigUInt64LE(OFF_IOVA),
      size: b.readBigUInt64LE(OFF_SIZE),
      uaddr: b.readBigUInt64LE(OFF_UADDR),
      perm: b.readUInt8(OFF_PERM),
      type: type as IotlbMsgType,
    },
  };
}
