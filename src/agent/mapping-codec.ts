/**
 * The agent's messages that carry one entry per mapping or IOTLB message, coded straight between
 * protobuf bytes and the library's types (IotlbOp, Mapping, AgentOpResult) with protobufjs' Reader
 * and Writer: Apply's request and answer (ApplyRequest, ApplyResponse of agent.proto) and
 * ListMapped's answer (ListMappedResponse). No wire objects in between, and every uint64 read into
 * a bigint without passing through text: these are the agent hop's per-op and per-mapping cost
 * (wire.ts keeps the object shapes of every other message).
 *
 * A decoded message means what protobufjs' decode + toObject + wire.ts would make of it: a field
 * absent is its default, an op carrying an `update` is that update (whatever else it carries), an
 * op with neither, or a perm outside ro/wo/rw, is a BAD_REQUEST naming the field. Big messages are
 * coded a slice of entries at a time, giving the event loop back between slices (sliced-codec.ts).
 */
import { status } from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import type { IotlbOp, Mapping, Perm } from '../iotlb/types.ts';
import { TimeSlices } from '../sys/next-turn.ts';
import { expectWireType, LEN, lengthEnd, tag, VARINT } from '../sys/protobuf-fields.ts';
import { AgentError } from './errors.ts';
import type { AgentOpResult } from './wire.ts';

/** Apply's request as the handler takes it. */
export interface ApplyRequest {
  device: string;
  ops: readonly IotlbOp[];
}

/** Apply's answer: one result per op, in order, and the boot id of the agent that applied them. */
export interface ApplyAnswer {
  results: AgentOpResult[];
  bootId: string;
}

/**
 * A message whose elements are written a time slice at a time: each slice by a Writer of its own,
 * finished into bytes before the event loop is given back. One Writer for the whole message would
 * hold a linked op per field written (about 16 per IotlbOp) until its finish: a million small
 * objects for a 65,536-op Apply, all surviving every scavenge on the way. Protobuf messages are the
 * concatenation of their fields, so the parts joined are the message.
 */
async function writeInSlices<T>(
  items: readonly T[],
  writeOne: (w: protobuf.Writer, item: T) => void,
  head?: (w: protobuf.Writer) => void,
  tail?: (w: protobuf.Writer) => void,
): Promise<Buffer> {
  // protobufjs' Writer under Node is its BufferWriter: finish() gives a Buffer.
  const parts: Buffer[] = [];
  const slices = new TimeSlices();
  let w = Writer.create();
  head?.(w);
  for (let i = 0; i < items.length; i++) {
    if (slices.due()) {
      parts.push(w.finish() as Buffer);
      await slices.next();
      w = Writer.create();
    }
    writeOne(w, items[i]!);
  }
  tail?.(w);
  parts.push(w.finish() as Buffer);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/**
 * The reading side of {@link writeInSlices} for the messages here, each one string field beside one
 * repeated message field: the elements are read a time slice at a time, each by `readOne` from
 * the reader at its length prefix. Other fields are skipped.
 */
async function readInSlices<T>(
  bytes: Buffer,
  fields: { text: number; list: number },
  readOne: (r: protobuf.Reader, index: number) => T,
): Promise<{ text: string; list: T[] }> {
  const r = Reader.create(bytes);
  let text = '';
  const list: T[] = [];
  const slices = new TimeSlices();
  while (r.pos < r.len) {
    const t = r.uint32();
    const n = t >>> 3;
    if (n === fields.list) {
      expectWireType(t, LEN);
      if (slices.due()) await slices.next();
      list.push(readOne(r, list.length));
    } else if (n === fields.text) {
      expectWireType(t, LEN);
      text = r.string();
    } else r.skipType(t & 7);
  }
  return { text, list };
}

// The field numbers below are agent.proto's ApplyRequest, IotlbOp, Mapping, InvalidateOp, OpResult
// and ApplyResponse (a test checks them against protobufjs' own coding).

/** The proto's Perm enum values (the kernel's VHOST_ACCESS_*). */
const PERM_VALUE: Record<Perm, number> = { ro: 1, wo: 2, rw: 3 };
const PERM_OF: readonly (Perm | undefined)[] = [undefined, 'ro', 'wo', 'rw'];

const OK: AgentOpResult = Object.freeze({ ok: true });

const { Reader, Writer } = protobuf;

function badRequest(field: string, message: string): AgentError {
  return new AgentError(status.INVALID_ARGUMENT, 'BAD_REQUEST', `${field}: ${message}`, field);
}

// ---- uint64 <-> bigint ----

/** As a number up to 2^53 (exact), as its decimal text beyond (protobufjs reads that through Long). */
function writeU64(w: protobuf.Writer, value: bigint): void {
  w.uint64(value <= 0x1f_ffff_ffff_ffffn ? Number(value) : value.toString());
}

/** Varint bytes read as a number before readU64 leaves it to protobufjs: 7 bytes are 49 bits, exact. */
const U64_NUMBER_BYTES = 7;

function readU64(r: protobuf.Reader): bigint {
  // IOVAs, sizes and offsets below 2^49 (nearly all) straight from the bytes: protobufjs' uint64()
  // makes a LongBits and a Long per value, most of a big Apply's garbage at the agent.
  const { buf, len } = r;
  let pos = r.pos;
  let value = 0;
  let scale = 1;
  for (let i = 0; i < U64_NUMBER_BYTES && pos < len; i++) {
    const byte = buf[pos++]!;
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) {
      r.pos = pos;
      return BigInt(value);
    }
    scale *= 0x80;
  }
  // Longer, or cut short: protobufjs reads it (and refuses bytes that end inside it).
  const long = r.uint64() as unknown as { low: number; high: number };
  const low = BigInt(long.low >>> 0);
  return long.high === 0 ? low : (BigInt(long.high >>> 0) << 32n) | low;
}

// ---- Mapping, IotlbOp ----

/** An InvalidateOp's fields, which are also a Mapping's first three. */
function writeRange(w: protobuf.Writer, m: { asid: number; iova: bigint; size: bigint }): void {
  w.uint32(tag(1, VARINT)).uint32(m.asid);
  w.uint32(tag(2, VARINT));
  writeU64(w, m.iova);
  w.uint32(tag(3, VARINT));
  writeU64(w, m.size);
}

function writeMapping(w: protobuf.Writer, m: Mapping): void {
  writeRange(w, m);
  w.uint32(tag(4, LEN)).string(m.memory);
  w.uint32(tag(5, VARINT));
  writeU64(w, m.offset);
  w.uint32(tag(6, VARINT)).uint32(PERM_VALUE[m.perm]);
}

/**
 * The fields of a Mapping read into `FIELDS` (reused: no object per op), absent ones their
 * defaults. InvalidateOp's fields are a Mapping's first three, under the same numbers: `last` is
 * the last field the message has (the ones after it are unknown to it, and skipped as such).
 */
const FIELDS = { asid: 0, iova: 0n, size: 0n, memory: '', offset: 0n, perm: 0 };

function readFields(r: protobuf.Reader, end: number, last: number): typeof FIELDS {
  const f = FIELDS;
  f.asid = 0;
  f.iova = 0n;
  f.size = 0n;
  f.memory = '';
  f.offset = 0n;
  f.perm = 0;
  while (r.pos < end) {
    const t = r.uint32();
    const n = t >>> 3;
    if (n > last) {
      r.skipType(t & 7);
      continue;
    }
    expectWireType(t, n === 4 ? LEN : VARINT);
    if (n === 1) f.asid = r.uint32();
    else if (n === 2) f.iova = readU64(r);
    else if (n === 3) f.size = readU64(r);
    else if (n === 4) f.memory = r.string();
    else if (n === 5) f.offset = readU64(r);
    else if (n === 6) f.perm = r.int32();
    else r.skipType(t & 7);
  }
  return f;
}

/**
 * A Mapping; a bad perm is refused as `${list}[${index}].${name}.perm`, or `${list}[${index}].perm`
 * for an element of the list itself (the name made only then).
 */
function readMapping(r: protobuf.Reader, end: number, list: string, index: number, name: 'update'): IotlbOp;
function readMapping(
  r: protobuf.Reader,
  end: number,
  list: string,
  index: number,
  name?: 'conflict',
): Mapping;
function readMapping(
  r: protobuf.Reader,
  end: number,
  list: string,
  index: number,
  name?: 'update' | 'conflict',
): Mapping | IotlbOp {
  const { asid, iova, size, memory, offset, perm } = readFields(r, end, 6);
  const named = PERM_OF[perm];
  if (named === undefined) {
    const shown = perm === 0 ? 'PERM_UNSPECIFIED' : String(perm);
    const field = name === undefined ? `${list}[${index}].perm` : `${list}[${index}].${name}.perm`;
    throw badRequest(field, `${JSON.stringify(shown)} is not a valid perm`);
  }
  // An update is made as the op it is: no second object spread from the first.
  if (name === 'update') return { type: 'update', asid, iova, size, memory, offset, perm: named };
  return { asid, iova, size, memory, offset, perm: named };
}

function readInvalidate(r: protobuf.Reader, end: number): IotlbOp {
  const { asid, iova, size } = readFields(r, end, 3);
  return { type: 'invalidate', asid, iova, size };
}

function writeOp(w: protobuf.Writer, op: IotlbOp): void {
  w.fork();
  if (op.type === 'update') {
    w.uint32(tag(1, LEN)).fork();
    writeMapping(w, op);
  } else {
    w.uint32(tag(2, LEN)).fork();
    writeRange(w, op);
  }
  w.ldelim().ldelim();
}

function readOp(r: protobuf.Reader, end: number, index: number): IotlbOp {
  let update: IotlbOp | undefined;
  let invalidate: IotlbOp | undefined;
  while (r.pos < end) {
    const t = r.uint32();
    const n = t >>> 3;
    if (n === 1) {
      expectWireType(t, LEN);
      update = readMapping(r, lengthEnd(r), 'ops', index, 'update');
    } else if (n === 2) {
      expectWireType(t, LEN);
      invalidate = readInvalidate(r, lengthEnd(r));
    } else r.skipType(t & 7);
  }
  const op = update ?? invalidate;
  if (op === undefined) throw badRequest(`ops[${index}]`, 'needs update or invalidate');
  return op;
}

// ---- ApplyRequest ----

export function encodeApplyRequest({ device, ops }: ApplyRequest): Promise<Buffer> {
  return writeInSlices(
    ops,
    (w, op) => writeOp(w.uint32(tag(2, LEN)), op),
    (w) => w.uint32(tag(1, LEN)).string(device),
  );
}

/** Throws RangeError for bytes that are no ApplyRequest, BAD_REQUEST (naming the field) for a bad op. */
export async function decodeApplyRequest(bytes: Buffer): Promise<ApplyRequest> {
  const { text: device, list: ops } = await readInSlices(bytes, { text: 1, list: 2 }, (r, index) =>
    readOp(r, lengthEnd(r), index),
  );
  return { device, ops };
}

// ---- ApplyResponse ----

function writeResult(w: protobuf.Writer, result: AgentOpResult): void {
  if (result.ok) {
    w.uint32(tag(1, LEN)).uint32(2).uint32(tag(1, VARINT)).uint32(1);
    return;
  }
  w.uint32(tag(1, LEN)).fork();
  w.uint32(tag(2, LEN)).string(result.errno);
  w.uint32(tag(3, LEN)).string(result.code);
  w.uint32(tag(4, LEN)).string(result.message);
  if (result.field) w.uint32(tag(5, LEN)).string(result.field);
  if (result.conflict) {
    w.uint32(tag(6, LEN)).fork();
    writeMapping(w, result.conflict);
    w.ldelim();
  }
  w.ldelim();
}

export function encodeApplyAnswer({ results, bootId }: ApplyAnswer): Promise<Buffer> {
  return writeInSlices(results, writeResult, undefined, (w) => w.uint32(tag(2, LEN)).string(bootId));
}

function readResult(r: protobuf.Reader, end: number, index: number): AgentOpResult {
  let ok = false;
  let errno = '';
  let code = '';
  let message = '';
  let at = '';
  let conflict: Mapping | undefined;
  while (r.pos < end) {
    const t = r.uint32();
    switch (t >>> 3) {
      case 1:
        expectWireType(t, VARINT);
        ok = r.bool();
        break;
      case 2:
        expectWireType(t, LEN);
        errno = r.string();
        break;
      case 3:
        expectWireType(t, LEN);
        code = r.string();
        break;
      case 4:
        expectWireType(t, LEN);
        message = r.string();
        break;
      case 5:
        expectWireType(t, LEN);
        at = r.string();
        break;
      case 6:
        expectWireType(t, LEN);
        conflict = readMapping(r, lengthEnd(r), 'results', index, 'conflict');
        break;
      default:
        r.skipType(t & 7);
    }
  }
  if (ok) return OK;
  return {
    ok: false,
    errno,
    code,
    message,
    ...(at ? { field: at } : {}),
    ...(conflict ? { conflict } : {}),
  };
}

/** Throws for bytes that are no ApplyResponse (or carry a conflict with a bad perm). */
export async function decodeApplyAnswer(bytes: Buffer): Promise<ApplyAnswer> {
  const { text: bootId, list: results } = await readInSlices(bytes, { text: 2, list: 1 }, (r, index) => {
    // An OpResult of 2 bytes that sets ok (the answer of almost every op) needs no look inside.
    if (bytes[r.pos] === 2 && bytes[r.pos + 1] === tag(1, VARINT) && bytes[r.pos + 2] === 1) {
      r.pos += 3;
      return OK;
    }
    return readResult(r, lengthEnd(r), index);
  });
  return { results, bootId };
}

// ---- ListMappedResponse ----

/** ListMapped's answer: the device's mappings (by asid, then iova) and the agent's boot id. */
export interface ListMappedAnswer {
  mappings: Mapping[];
  bootId: string;
}

export function encodeListMappedAnswer({ mappings, bootId }: ListMappedAnswer): Promise<Buffer> {
  return writeInSlices(
    mappings,
    (w, m) => {
      w.uint32(tag(1, LEN)).fork();
      writeMapping(w, m);
      w.ldelim();
    },
    undefined,
    (w) => w.uint32(tag(2, LEN)).string(bootId),
  );
}

/** Throws for bytes that are no ListMappedResponse, BAD_REQUEST (naming the field) for a bad perm. */
export async function decodeListMappedAnswer(bytes: Buffer): Promise<ListMappedAnswer> {
  const { text: bootId, list: mappings } = await readInSlices(bytes, { text: 2, list: 1 }, (r, index) =>
    readMapping(r, lengthEnd(r), 'mappings', index),
  );
  return { mappings, bootId };
}
