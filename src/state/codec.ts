/**
 * How state goes to disk: JSON in which every bigint is `{"$n":"<decimal>"}` (never a JS number),
 * framed as `u32 LE length | u32 LE crc32(payload) | payload`. A frame whose length runs past the
 * end of the data or whose CRC does not match ends the readable part (a torn or damaged tail).
 */
import { crc32 } from 'node:zlib';

export const FRAME_HEADER_BYTES = 8;
/** Larger lengths are garbage, not records (a 1 GiB record would be a bug elsewhere). */
const MAX_PAYLOAD_BYTES = 1 << 30;

interface TaggedBigint {
  $n: string;
}

function isTaggedBigint(v: unknown): v is TaggedBigint {
  if (typeof v !== 'object' || v === null) return false;
  const keys = Object.keys(v);
  return keys.length === 1 && keys[0] === '$n' && typeof (v as TaggedBigint).$n === 'string';
}

export function encodeJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => (typeof v === 'bigint' ? { $n: v.toString() } : v));
}

export function decodeJson(text: string): unknown {
  return JSON.parse(text, (_key, v: unknown) => (isTaggedBigint(v) ? BigInt(v.$n) : v));
}

export function frame(value: unknown): Buffer {
  const payload = Buffer.from(encodeJson(value), 'utf8');
  const out = Buffer.allocUnsafe(FRAME_HEADER_BYTES + payload.length);
  out.writeUInt32LE(payload.length, 0);
  out.writeUInt32LE(crc32(payload), 4);
  payload.copy(out, FRAME_HEADER_BYTES);
  return out;
}

export interface Unframed {
  values: unknown[];
  /** Bytes from the start that hold whole, intact frames. */
  validBytes: number;
}

/** Reads frames from the start of `data` until the end or the first bad frame. */
export function unframe(data: Buffer): Unframed {
  const values: unknown[] = [];
  let at = 0;
  while (data.length - at >= FRAME_HEADER_BYTES) {
    const length = data.readUInt32LE(at);
    const crc = data.readUInt32LE(at + 4);
    const end = at + FRAME_HEADER_BYTES + length;
    if (length > MAX_PAYLOAD_BYTES || end > data.length) break;
    const payload = data.subarray(at + FRAME_HEADER_BYTES, end);
    if (crc32(payload) !== crc) break;
    let value: unknown;
    try {
      value = decodeJson(payload.toString('utf8'));
    } catch {
      break;
    }
    values.push(value);
    at = end;
  }
  return { values, validBytes: at };
}
