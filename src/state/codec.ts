/**
 * How state goes to disk: JSON in which every bigint is `{"$n":"<decimal>"}` (never a JS number),
 * framed as `u32 LE length | u32 LE crc32(payload) | payload`. `scanFrames` tells the frames
 * apart: intact ones, a torn tail (a crash during an append), and damage (anything else).
 */
import { crc32 } from 'node:zlib';
import { runInTimeSlices, runWhole, TimeSlices } from '../sys/next-turn.ts';

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
  return framePieces([Buffer.from(encodeJson(value), 'utf8')]);
}

/**
 * One frame whose payload is `pieces` one after another: frame() of their concatenation, after
 * `lead` (bytes that go before the frame in the same write) when given.
 */
export function framePieces(pieces: readonly Buffer[], lead?: Buffer): Buffer {
  return runWhole(frameSteps(pieces, lead));
}

/** framePieces giving the event loop back between pieces (a snapshot of large tables is many MB). */
export function framePiecesInSlices(pieces: readonly Buffer[]): Promise<Buffer> {
  return runInTimeSlices(frameSteps(pieces));
}

function* frameSteps(pieces: readonly Buffer[], lead: Buffer = Buffer.alloc(0)): Generator<void, Buffer> {
  let length = 0;
  let crc = 0;
  for (const piece of pieces) {
    length += piece.length;
    crc = crc32(piece, crc);
    yield;
  }
  const out = Buffer.allocUnsafe(lead.length + FRAME_HEADER_BYTES + length);
  out.set(lead, 0);
  out.writeUInt32LE(length, lead.length);
  out.writeUInt32LE(crc, lead.length + 4);
  let at = lead.length + FRAME_HEADER_BYTES;
  for (const piece of pieces) {
    out.set(piece, at);
    at += piece.length;
    yield;
  }
  return out;
}

/** JSON text of a bigint, as encodeJson writes it. */
const taggedBigint = (v: bigint): string => `{"$n":"${v}"}`;

/** A container being written: the next element or key to write. */
type Open =
  | { array: readonly unknown[]; next: number }
  | { object: Record<string, unknown>; keys: string[]; next: number; wrote: boolean };

/**
 * encodeJson in steps: `write(budget)` writes on about `budget` characters of JSON, without the
 * replacer's allocation per bigint. For the plain data the state holds; a value of another kind
 * (a toJSON, a boxed primitive) is left to encodeJson in one piece.
 */
class JsonWriter {
  private parts: string[] = [];
  private readonly open: Open[] = [];
  private readonly containers = new Set<object>();

  constructor(value: unknown) {
    const text = this.start(value);
    if (text !== undefined) this.parts.push(text);
  }

  /** Writes on for about `budget` characters; the JSON written since the last call; done when nothing is left. */
  write(budget: number): { text: string; done: boolean } {
    const { parts, open } = this;
    let chars = 0;
    while (open.length > 0 && chars < budget) {
      const top = open[open.length - 1]!;
      let text: string | undefined;
      if ('array' in top) {
        if (top.next === top.array.length) {
          text = ']';
          this.close();
        } else {
          const at = top.next++;
          text = (at > 0 ? ',' : '') + (this.start(top.array[at]) ?? 'null');
        }
      } else if (top.next === top.keys.length) {
        text = '}';
        this.close();
      } else {
        const key = top.keys[top.next++]!;
        const value = top.object[key];
        if (!written(value)) continue;
        const comma = top.wrote ? ',' : '';
        top.wrote = true;
        text = `${comma}${JSON.stringify(key)}:${this.start(value)}`;
      }
      parts.push(text);
      chars += text.length;
    }
    const text = parts.join('');
    this.parts = [];
    return { text, done: open.length === 0 };
  }

  /** The JSON of `value`, or its opening bracket (the rest comes from write()); undefined for nothing. */
  private start(value: unknown): string | undefined {
    if (typeof value !== 'object') return scalarJson(value);
    if (value === null) return 'null';
    const whole = smallJson(value);
    if (whole !== undefined) return whole;
    if (!plain(value)) return encodeJson(value);
    if (this.containers.has(value)) throw new TypeError('Converting circular structure to JSON');
    this.containers.add(value);
    if (Array.isArray(value)) {
      this.open.push({ array: value, next: 0 });
      return '[';
    }
    const object = value as Record<string, unknown>;
    this.open.push({ object, keys: Object.keys(object), next: 0, wrote: false });
    return '{';
  }

  private close(): void {
    const top = this.open.pop()!;
    this.containers.delete('array' in top ? top.array : top.object);
  }
}

/** The JSON of a bigint, string, number or boolean, as encodeJson writes it; undefined for any other value. */
function scalarJson(value: unknown): string | undefined {
  switch (typeof value) {
    case 'bigint':
      return taggedBigint(value);
    case 'string':
    case 'number':
      return JSON.stringify(value);
    case 'boolean':
      return value ? 'true' : 'false';
    default:
      return undefined;
  }
}

/** Values a container may hold to be written in one piece by smallJson: about one change of a record. */
const SMALL_VALUES = 64;
let smallValuesLeft = 0;

/**
 * The JSON of a small container (at most SMALL_VALUES values in all, each plain data), as
 * encodeJson writes it, in one piece: a record's changes one by one, without the writer's stack
 * of open containers per key. Undefined for anything larger or of another kind (a circular one
 * too, as it runs out of values): the writer takes it value by value.
 */
function smallJson(value: object): string | undefined {
  smallValuesLeft = SMALL_VALUES;
  return smallValue(value);
}

function smallValue(value: unknown): string | undefined {
  if (--smallValuesLeft < 0) return undefined;
  // `null` for a value that is not written: what an array element of it reads.
  if (typeof value !== 'object') return scalarJson(value) ?? 'null';
  if (value === null) return 'null';
  if (!plain(value)) return undefined;
  if (Array.isArray(value)) {
    let text = '[';
    for (let i = 0; i < value.length; i++) {
      const element = smallValue(value[i]);
      if (element === undefined) return undefined;
      text += i > 0 ? `,${element}` : element;
    }
    return `${text}]`;
  }
  let text = '{';
  let wrote = false;
  for (const key of Object.keys(value)) {
    const member = (value as Record<string, unknown>)[key];
    if (!written(member)) continue;
    const json = smallValue(member);
    if (json === undefined) return undefined;
    text += `${wrote ? ',' : ''}${quotedKey(key)}:${json}`;
    wrote = true;
  }
  return `${text}}`;
}

/** JSON.stringify of object keys met before: the state's keys are few and come again in every change. */
const quotedKeys = new Map<string, string>();
const QUOTED_KEYS_MAX = 1024;

function quotedKey(key: string): string {
  let quoted = quotedKeys.get(key);
  if (quoted === undefined) {
    quoted = JSON.stringify(key);
    if (quotedKeys.size < QUOTED_KEYS_MAX) quotedKeys.set(key, quoted);
  }
  return quoted;
}

/** Whether JSON.stringify writes an object's property holding `value` (it skips these). */
function written(value: unknown): boolean {
  return value !== undefined && typeof value !== 'function' && typeof value !== 'symbol';
}

/** An array or object JSON.stringify writes member by member (no toJSON, no boxed primitive). */
function plain(value: object): boolean {
  if (typeof (value as { toJSON?: unknown }).toJSON === 'function') return false;
  return !(
    value instanceof Number ||
    value instanceof String ||
    value instanceof Boolean ||
    value instanceof BigInt
  );
}

/** Characters of JSON per step of {@link encodeJsonPieces}: a small fraction of a time slice. */
const STEP_CHARS = 8 * 1024;

/**
 * encodeJson(value) as UTF-8 pieces, written a step at a time, giving the event loop back every
 * SLICE_MS (src/sys/next-turn.ts), so that a large record or snapshot (a 65,536-region table is
 * about 10 MB) never holds it for long, however loaded the machine. Byte for byte what encodeJson
 * writes.
 */
export async function encodeJsonPieces(value: unknown): Promise<Buffer[]> {
  const writer = new JsonWriter(value);
  const pieces: Buffer[] = [];
  // One step is a lot of work: the clock is read after each.
  const slices = new TimeSlices(1);
  for (;;) {
    const { text, done } = writer.write(STEP_CHARS);
    pieces.push(Buffer.from(text, 'utf8'));
    if (done) return pieces;
    if (slices.due()) await slices.next();
  }
}

/**
 * The elements of encodeJson(items) in pieces of whole elements (about STEP_CHARS each), giving
 * the event loop back as encodeJsonPieces does: joined by commas, the pieces are what it writes
 * between the brackets. Whole elements, so that a large record can be cut into parts at any
 * piece (journal.ts).
 */
export async function encodeElements(items: readonly unknown[]): Promise<Buffer[]> {
  const pieces: Buffer[] = [];
  const slices = new TimeSlices(1);
  let run: string[] = [];
  let chars = 0;
  for (const item of items) {
    const text = elementJson(item);
    run.push(text);
    chars += text.length;
    if (chars < STEP_CHARS) continue;
    pieces.push(Buffer.from(run.join(','), 'utf8'));
    run = [];
    chars = 0;
    if (slices.due()) await slices.next();
  }
  if (run.length > 0) pieces.push(Buffer.from(run.join(','), 'utf8'));
  return pieces;
}

/** The JSON of `item` as an element of an array (`null` for what JSON.stringify skips). */
function elementJson(item: unknown): string {
  if (typeof item === 'object' && item !== null) {
    const text = smallJson(item) ?? new JsonWriter(item).write(Number.POSITIVE_INFINITY).text;
    return text === '' ? 'null' : text;
  }
  return item === null ? 'null' : (scalarJson(item) ?? 'null');
}

/** One frame whose CRC matched and whose content `decode` accepted. */
export interface IntactFrame {
  offset: number;
  /** Header and payload. */
  length: number;
  value: unknown;
}

/** Bytes that hold no intact frame, and why the first frame there is bad. */
export interface BadSpan {
  offset: number;
  length: number;
  reason: string;
}

export interface FrameScan {
  frames: IntactFrame[];
  /**
   * Bad bytes that a crash during an append cannot explain: a bad frame followed by anything
   * (an intact frame further on, or bytes past its own declared end), or a frame whose CRC
   * matches but whose content `decode` refuses. In file order.
   */
  damage: BadSpan[];
  /** A short or partial last frame (what a crash during an append leaves), with nothing after it. */
  torn: BadSpan | undefined;
}

/** What `decode` says of a payload whose CRC matched: its value, or why it cannot be one. */
export type Decoded = { value: unknown } | { problem: string };

type FrameAt =
  | { ok: true; end: number; value: unknown }
  /** `end`: where the frame says it ends (may be past the data); `partial`: what a torn append leaves. */
  | { ok: false; end: number; reason: string; partial: boolean };

function frameAt(data: Buffer, at: number, decode: (payload: Buffer) => Decoded): FrameAt {
  if (data.length - at < FRAME_HEADER_BYTES) {
    return { ok: false, end: data.length, reason: 'frame header cut short', partial: true };
  }
  const length = data.readUInt32LE(at);
  const end = at + FRAME_HEADER_BYTES + length;
  if (length > MAX_PAYLOAD_BYTES) return { ok: false, end, reason: `bad length ${length}`, partial: false };
  if (end > data.length) {
    return { ok: false, end, reason: `length ${length} runs past the end of the file`, partial: true };
  }
  const payload = data.subarray(at + FRAME_HEADER_BYTES, end);
  // A CRC mismatch in the last frame is what an append whose data never fully reached the disk leaves.
  if (crc32(payload) !== data.readUInt32LE(at + 4)) {
    return { ok: false, end, reason: 'CRC mismatch', partial: end === data.length };
  }
  const decoded = decode(payload);
  if ('problem' in decoded) return { ok: false, end, reason: decoded.problem, partial: false };
  return { ok: true, end, value: decoded.value };
}

/** The first offset after `from` where an intact frame starts, or undefined. */
function resync(data: Buffer, from: number, decode: (payload: Buffer) => Decoded): number | undefined {
  for (let at = from; at + FRAME_HEADER_BYTES <= data.length; at++) {
    const length = data.readUInt32LE(at);
    // Cheap refusals first: most offsets inside a payload (JSON text) read as huge lengths.
    if (length > data.length - at - FRAME_HEADER_BYTES) continue;
    if (frameAt(data, at, decode).ok) return at;
  }
  return undefined;
}

/** JSON payloads, bigints restored; anything that does not parse is a problem, not an exception. */
export function decodeJsonPayload(payload: Buffer): Decoded {
  try {
    return { value: decodeJson(payload.toString('utf8')) };
  } catch (e) {
    return { problem: `undecodable: ${(e as Error).message}` };
  }
}

/**
 * Reads every frame of `data`. After a bad frame it looks for the next intact frame at every
 * byte offset (the bad frame's own length cannot be trusted), so the frames after damage are
 * still found and counted. Only bad bytes at the very end, with no intact frame after them, that
 * a torn append can leave (a cut header, a length past the end, a CRC mismatch in a frame that
 * ends the file; zero bytes, as a file extended by a crash holds, are ignored at the end) are a
 * torn tail; every other bad span is damage.
 */
export function scanFrames(
  data: Buffer,
  decode: (payload: Buffer) => Decoded = decodeJsonPayload,
): FrameScan {
  const frames: IntactFrame[] = [];
  const damage: BadSpan[] = [];
  let torn: BadSpan | undefined;
  let at = 0;
  while (at < data.length) {
    const here = frameAt(data, at, decode);
    if (here.ok) {
      frames.push({ offset: at, length: here.end - at, value: here.value });
      at = here.end;
      continue;
    }
    const next = resync(data, at + 1, decode);
    const span = { offset: at, length: (next ?? data.length) - at, reason: here.reason };
    if (next === undefined && tornAppend(data, at, here)) torn = span;
    else damage.push(span);
    if (next === undefined) break;
    at = next;
  }
  return { frames, damage, torn };
}

/** Whether the bad frame at `at`, with nothing intact after it, is what a torn append leaves. */
function tornAppend(data: Buffer, at: number, bad: FrameAt & { ok: false }): boolean {
  let end = data.length;
  while (end > at && data[end - 1] === 0) end--;
  if (end === at) return true;
  if (bad.partial) return true;
  // Zeros after a frame that ends in them: judge it as if the file ended where the zeros begin.
  return bad.reason === 'CRC mismatch' && bad.end >= end;
}
