/**
 * Encoding and decoding the agent's big messages (an Apply of 65,536 ops, its 65,536 results) in
 * slices, giving the event loop back between them, so that one device's big table never holds up
 * another device's small request for the whole of a protobuf encode or decode.
 *
 * It rests on a property of the protobuf wire format: a message is the concatenation of its
 * fields, so parts each holding some elements of a repeated field concatenate into one message
 * with all of them (and the same bytes split at field boundaries decode into parts that merge back).
 */
import { nextTurn } from '../sys/next-turn.ts';
import type { AgentMethod } from './proto.ts';

/** Elements of the repeated field per slice. */
const ELEMENTS_PER_SLICE = 2048;

/** `message` encoded slice by slice: each part carries every field, and a slice of `field`. */
export async function serializeInSlices<T extends object>(
  serialize: (message: T) => Buffer,
  message: T,
  field: keyof T & string,
): Promise<Buffer> {
  const all = message[field] as unknown[];
  if (all.length <= ELEMENTS_PER_SLICE) return serialize(message);
  const parts: Buffer[] = [];
  for (let at = 0; at < all.length; at += ELEMENTS_PER_SLICE) {
    if (at > 0) await nextTurn();
    parts.push(serialize({ ...message, [field]: all.slice(at, at + ELEMENTS_PER_SLICE) }));
  }
  return Buffer.concat(parts);
}

/** Splits an encoded message at top-level field boundaries into parts of about `bytes` each. */
function splitFields(buf: Buffer, bytes: number): Buffer[] {
  const parts: Buffer[] = [];
  let start = 0;
  let at = 0;
  const varint = (): number => {
    let value = 0;
    let shift = 1;
    for (let i = 0; i < 10; i++) {
      if (at >= buf.length) throw new RangeError('truncated varint');
      const b = buf[at++]!;
      value += (b & 0x7f) * shift;
      if (b < 0x80) return value;
      shift *= 128;
    }
    throw new RangeError('varint too long');
  };
  while (at < buf.length) {
    const wireType = varint() % 8;
    if (wireType === 0) varint();
    else if (wireType === 1) at += 8;
    else if (wireType === 2) {
      const length = varint(); // read before `at` is: `at += varint()` would add to the old `at`
      at += length;
    } else if (wireType === 5) at += 4;
    else throw new RangeError(`wire type ${wireType} is not used by the agent protocol`);
    if (at > buf.length) throw new RangeError('truncated field');
    if (at - start >= bytes) {
      parts.push(buf.subarray(start, at));
      start = at;
    }
  }
  if (start < buf.length || parts.length === 0) parts.push(buf.subarray(start));
  return parts;
}

/**
 * `buf` decoded part by part and merged: the elements of `field` in order; every other field from
 * the first part that has it set (decoding fills in defaults: '' for an absent string).
 */
export async function deserializeInSlices<T extends object>(
  deserialize: (buf: Buffer) => T,
  buf: Buffer,
  field: keyof T & string,
  bytesPerSlice = 64 << 10,
): Promise<T> {
  if (buf.length <= bytesPerSlice) return deserialize(buf);
  const parts: T[] = [];
  for (const [i, piece] of splitFields(buf, bytesPerSlice).entries()) {
    if (i > 0) await nextTurn();
    parts.push(deserialize(piece));
  }
  const merged = { ...parts[0]! } as Record<string, unknown>;
  // A field may come after the repeated one (in a later part only): the keys of every part.
  for (const key of new Set(parts.flatMap((p) => Object.keys(p)))) {
    if (key === field) continue;
    const set = parts.find((p) => {
      const v = (p as Record<string, unknown>)[key];
      return v !== '' && v !== undefined && v !== null;
    });
    if (set) merged[key] = (set as Record<string, unknown>)[key];
  }
  merged[field] = parts.flatMap((p) => p[field] as unknown[]);
  return merged as T;
}

/** The agent methods whose messages are coded in slices, with their repeated fields. */
export const SLICED_METHODS: Readonly<Record<string, { request: string; response: string }>> = {
  Apply: { request: 'ops', response: 'results' },
};

type Side = 'request' | 'response';

/** A method's request or answer as protobuf bytes: in slices for SLICED_METHODS, in one go otherwise. */
export async function encodeMessage(method: AgentMethod, side: Side, message: object): Promise<Buffer> {
  const serialize = side === 'request' ? method.requestSerialize : method.responseSerialize;
  const field = SLICED_METHODS[method.name]?.[side];
  if (field === undefined) return serialize(message);
  return serializeInSlices(serialize, message, field as never);
}

/** The inverse of encodeMessage. */
export async function decodeMessage(method: AgentMethod, side: Side, bytes: Buffer): Promise<object> {
  const deserialize = side === 'request' ? method.requestDeserialize : method.responseDeserialize;
  const field = SLICED_METHODS[method.name]?.[side];
  if (field === undefined) return deserialize(bytes);
  return deserializeInSlices(deserialize, bytes, field as never);
}
