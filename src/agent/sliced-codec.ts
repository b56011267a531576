/**
 * Encoding and decoding big protobuf messages (a SetMemTable of 65,536 regions over gRPC) in
 * slices, giving the event loop back between them, so that one device's big table never holds up
 * another device's small request for the whole of a protobuf encode or decode; and the coding of
 * every agent method's messages (Apply's and ListMapped's answer by mapping-codec.ts, which slices
 * its own).
 *
 * It rests on a property of the protobuf wire format: a message is the concatenation of its
 * fields, so parts each holding some elements of a repeated field concatenate into one message
 * with all of them (and the same bytes split at field boundaries decode into parts that merge back).
 */
import { TimeSlices } from '../sys/next-turn.ts';
import {
  decodeApplyAnswer,
  decodeApplyRequest,
  decodeListMappedAnswer,
  encodeApplyAnswer,
  encodeApplyRequest,
  encodeListMappedAnswer,
} from './mapping-codec.ts';
import type { AgentMethod } from './proto.ts';

/**
 * Elements of the repeated field per part, and bytes per part when decoding: a small fraction of a
 * time slice each, so that the event loop is given back about every SLICE_MS (next-turn.ts)
 * whatever an element costs. Parts of 2,048 elements took 5-10 ms each to code with protobufjs, so
 * parts of 32 take 0.1-0.2 ms.
 */
const ELEMENTS_PER_PART = 32;
const BYTES_PER_PART = 2 << 10;

/** `message` encoded part by part: each part carries every field, and a run of `field`. */
export async function serializeInSlices<T extends object>(
  serialize: (message: T) => Buffer,
  message: T,
  field: keyof T & string,
): Promise<Buffer> {
  const all = message[field] as unknown[];
  if (all.length <= ELEMENTS_PER_PART) return serialize(message);
  const parts: Buffer[] = [];
  const slices = new TimeSlices(1);
  for (let at = 0; at < all.length; at += ELEMENTS_PER_PART) {
    if (slices.due()) await slices.next();
    parts.push(serialize({ ...message, [field]: all.slice(at, at + ELEMENTS_PER_PART) }));
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
  bytesPerPart = BYTES_PER_PART,
): Promise<T> {
  if (buf.length <= bytesPerPart) return deserialize(buf);
  const parts: T[] = [];
  const slices = new TimeSlices(1);
  for (const piece of splitFields(buf, bytesPerPart)) {
    if (slices.due()) await slices.next();
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

type Side = 'request' | 'response';

/** Methods whose messages are the library's types, coded straight to bytes (mapping-codec.ts). */
const DIRECT: Readonly<
  Record<
    string,
    Partial<Record<Side, { encode(m: never): Promise<Buffer>; decode(b: Buffer): Promise<object> }>>
  >
> = {
  Apply: {
    request: { encode: encodeApplyRequest, decode: decodeApplyRequest },
    response: { encode: encodeApplyAnswer, decode: decodeApplyAnswer },
  },
  ListMapped: { response: { encode: encodeListMappedAnswer, decode: decodeListMappedAnswer } },
};

/**
 * A method's request or answer as protobuf bytes: Apply's (ApplyRequest, ApplyAnswer) and
 * ListMapped's answer (ListMappedAnswer) by mapping-codec.ts, in slices; every other message
 * (wire.ts shapes) by protobufjs, in one go.
 */
export async function encodeMessage(method: AgentMethod, side: Side, message: object): Promise<Buffer> {
  const direct = DIRECT[method.name]?.[side];
  if (direct !== undefined) return direct.encode(message as never);
  return side === 'request' ? method.requestSerialize(message) : method.responseSerialize(message);
}

/** The inverse of encodeMessage. */
export async function decodeMessage(method: AgentMethod, side: Side, bytes: Buffer): Promise<object> {
  const direct = DIRECT[method.name]?.[side];
  if (direct !== undefined) return direct.decode(bytes);
  return side === 'request' ? method.requestDeserialize(bytes) : method.responseDeserialize(bytes);
}
