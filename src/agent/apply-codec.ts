/**
 * Apply's two messages (ApplyRequest, ApplyResponse of agent.proto) coded straight between protobuf
 * bytes and the library's types (IotlbOp, AgentOpResult), with protobufjs' Reader and Writer: no
 * wire objects in between, and every uint64 read into a bigint without passing through text. Apply
 * carries one entry per IOTLB message, so this is the agent hop's per-op cost (wire.ts keeps the
 * object shapes of every other message).
 *
 * A decoded request means what protobufjs' decode + toObject + wire.ts would make of it: a field
 * absent is its default, an op carrying an `update` is that update (whatever else it carries), an
 * op with neither, or a perm outside ro/wo/rw, is a BAD_REQUEST naming the field. Big messages are
 * coded a slice of ops at a time, giving the event loop back between slices (sliced-codec.ts).
 */
import { status } from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import type { IotlbOp, Mapping, Perm } from '../iotlb/types.ts';
import { nextTurn } from '../sys/next-turn.ts';
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

/** Ops (or results) coded between two turns of the event loop. */
const OPS_PER_SLICE = 2048;

// Wire types, and the field numbers of agent.proto's ApplyRequest, IotlbOp, Mapping, InvalidateOp,
// OpResult and ApplyResponse (a test checks them against protobufjs' own coding).
const VARINT = 0;
const LEN = 2;
const tag = (field: number, wireType: number): number => (field << 3) | wireType;

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

function readU64(r: protobuf.Reader): bigint {
  const long = r.uint64() as unknown as { low: number; high: number };
  const low = BigInt(long.low >>> 0);
  return long.high === 0 ? low : (BigInt(long.high >>> 0) << 32n) | low;
}

/** The end of the length-delimited field the reader is at (its length read). */
function lengthEnd(r: protobuf.Reader): number {
  const end = r.uint32() + r.pos;
  if (end > r.len) throw new RangeError(`a field runs past the end of the message (at ${r.pos})`);
  return end;
}

/** The tag just read names a known field with another wire type: the bytes are no such message. */
function expect(t: number, wireType: number): void {
  if ((t & 7) !== wireType) throw new RangeError(`field ${t >>> 3} has wire type ${t & 7}, not ${wireType}`);
}

// ---- Mapping, IotlbOp ----

function writeMapping(w: protobuf.Writer, m: Mapping): void {
  w.uint32(tag(1, VARINT)).uint32(m.asid);
  w.uint32(tag(2, VARINT));
  writeU64(w, m.iova);
  w.uint32(tag(3, VARINT));
  writeU64(w, m.size);
  w.uint32(tag(4, LEN)).string(m.memory);
  w.uint32(tag(5, VARINT));
  writeU64(w, m.offset);
  w.uint32(tag(6, VARINT)).uint32(PERM_VALUE[m.perm]);
}

/** A Mapping; a bad perm is refused as `${list}[${index}].${name}.perm` (the name made only then). */
function readMapping(r: protobuf.Reader, end: number, list: string, index: number, name: 'update'): IotlbOp;
function readMapping(r: protobuf.Reader, end: number, list: string, index: number, name: 'conflict'): Mapping;
function readMapping(
  r: protobuf.Reader,
  end: number,
  list: string,
  index: number,
  name: 'update' | 'conflict',
): Mapping | IotlbOp {
  let asid = 0;
  let iova = 0n;
  let size = 0n;
  let memory = '';
  let offset = 0n;
  let perm = 0;
  while (r.pos < end) {
    const t = r.uint32();
    switch (t >>> 3) {
      case 1:
        expect(t, VARINT);
        asid = r.uint32();
        break;
      case 2:
        expect(t, VARINT);
        iova = readU64(r);
        break;
      case 3:
        expect(t, VARINT);
        size = readU64(r);
        break;
      case 4:
        expect(t, LEN);
        memory = r.string();
        break;
      case 5:
        expect(t, VARINT);
        offset = readU64(r);
        break;
      case 6:
        expect(t, VARINT);
        perm = r.int32();
        break;
      default:
        r.skipType(t & 7);
    }
  }
  const named = PERM_OF[perm];
  if (named === undefined) {
    const shown = perm === 0 ? 'PERM_UNSPECIFIED' : String(perm);
    throw badRequest(`${list}[${index}].${name}.perm`, `${JSON.stringify(shown)} is not a valid perm`);
  }
  // An update is made as the op it is: no second object spread from the first.
  if (name === 'update') return { type: 'update', asid, iova, size, memory, offset, perm: named };
  return { asid, iova, size, memory, offset, perm: named };
}

function writeOp(w: protobuf.Writer, op: IotlbOp): void {
  w.fork();
  if (op.type === 'update') {
    w.uint32(tag(1, LEN)).fork();
    writeMapping(w, op);
  } else {
    w.uint32(tag(2, LEN)).fork();
    w.uint32(tag(1, VARINT)).uint32(op.asid);
    w.uint32(tag(2, VARINT));
    writeU64(w, op.iova);
    w.uint32(tag(3, VARINT));
    writeU64(w, op.size);
  }
  w.ldelim().ldelim();
}

function readInvalidate(r: protobuf.Reader, end: number): IotlbOp {
  let asid = 0;
  let iova = 0n;
  let size = 0n;
  while (r.pos < end) {
    const t = r.uint32();
    switch (t >>> 3) {
      case 1:
        expect(t, VARINT);
        asid = r.uint32();
        break;
      case 2:
        expect(t, VARINT);
        iova = readU64(r);
        break;
      case 3:
        expect(t, VARINT);
        size = readU64(r);
        break;
      default:
        r.skipType(t & 7);
    }
  }
  return { type: 'invalidate', asid, iova, size };
}

function readOp(r: protobuf.Reader, end: number, index: number): IotlbOp {
  let update: IotlbOp | undefined;
  let invalidate: IotlbOp | undefined;
  while (r.pos < end) {
    const t = r.uint32();
    const n = t >>> 3;
    if (n === 1) {
      expect(t, LEN);
      update = readMapping(r, lengthEnd(r), 'ops', index, 'update');
    } else if (n === 2) {
      expect(t, LEN);
      invalidate = readInvalidate(r, lengthEnd(r));
    } else r.skipType(t & 7);
  }
  const op = update ?? invalidate;
  if (op === undefined) throw badRequest(`ops[${index}]`, 'needs update or invalidate');
  return op;
}

// ---- ApplyRequest ----

export async function encodeApplyRequest({ device, ops }: ApplyRequest): Promise<Buffer> {
  const w = Writer.create();
  w.uint32(tag(1, LEN)).string(device);
  for (let i = 0; i < ops.length; i++) {
    if (i > 0 && i % OPS_PER_SLICE === 0) await nextTurn();
    w.uint32(tag(2, LEN));
    writeOp(w, ops[i]!);
  }
  return w.finish() as Buffer;
}

/** Throws RangeError for bytes that are no ApplyRequest, BAD_REQUEST (naming the field) for a bad op. */
export async function decodeApplyRequest(bytes: Buffer): Promise<ApplyRequest> {
  const r = Reader.create(bytes);
  let device = '';
  const ops: IotlbOp[] = [];
  while (r.pos < r.len) {
    const t = r.uint32();
    const n = t >>> 3;
    if (n === 1) {
      expect(t, LEN);
      device = r.string();
    } else if (n === 2) {
      expect(t, LEN);
      if (ops.length > 0 && ops.length % OPS_PER_SLICE === 0) await nextTurn();
      ops.push(readOp(r, lengthEnd(r), ops.length));
    } else r.skipType(t & 7);
  }
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

export async function encodeApplyAnswer({ results, bootId }: ApplyAnswer): Promise<Buffer> {
  const w = Writer.create();
  for (let i = 0; i < results.length; i++) {
    if (i > 0 && i % OPS_PER_SLICE === 0) await nextTurn();
    writeResult(w, results[i]!);
  }
  w.uint32(tag(2, LEN)).string(bootId);
  return w.finish() as Buffer;
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
        expect(t, VARINT);
        ok = r.bool();
        break;
      case 2:
        expect(t, LEN);
        errno = r.string();
        break;
      case 3:
        expect(t, LEN);
        code = r.string();
        break;
      case 4:
        expect(t, LEN);
        message = r.string();
        break;
      case 5:
        expect(t, LEN);
        at = r.string();
        break;
      case 6:
        expect(t, LEN);
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
  const r = Reader.create(bytes);
  let bootId = '';
  const results: AgentOpResult[] = [];
  while (r.pos < r.len) {
    const t = r.uint32();
    const n = t >>> 3;
    if (n === 1) {
      expect(t, LEN);
      if (results.length > 0 && results.length % OPS_PER_SLICE === 0) await nextTurn();
      // An OpResult of 2 bytes that sets ok (the answer of almost every op) needs no look inside.
      if (bytes[r.pos] === 2 && bytes[r.pos + 1] === tag(1, VARINT) && bytes[r.pos + 2] === 1) {
        r.pos += 3;
        results.push(OK);
      } else results.push(readResult(r, lengthEnd(r), results.length));
    } else if (n === 2) {
      expect(t, LEN);
      bootId = r.string();
    } else r.skipType(t & 7);
  }
  return { results, bootId };
}
