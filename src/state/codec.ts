/**
 * How state goes to disk: JSON in which every bigint is `{"$n":"<decimal>"}` (never a JS number),
 * framed as `u32 LE length | u32 LE crc32(payload) | payload`. `scanFrames` tells the frames
 * apart: intact ones, a torn tail (a crash during an append), and damage (anything else).
 */
import { setImmediate as nextTurn } from 'node:timers/promises';
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
  return framePieces([Buffer.from(encodeJson(value), 'utf8')]);
}

/** One frame whose payload is `pieces` one after another: frame() of their concatenation. */
export function framePieces(pieces: readonly Buffer[]): Buffer {
  let length = 0;
  let crc = 0;
  for (const piece of pieces) {
    length += piece.length;
    crc = crc32(piece, crc);
  }
  const head = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  head.writeUInt32LE(length, 0);
  head.writeUInt32LE(crc, 4);
  return Buffer.concat([head, ...pieces], FRAME_HEADER_BYTES + length);
}

/** Items per slice of {@link encodeElements}: a few milliseconds of encoding at most. */
const ITEMS_PER_SLICE = 512;

/**
 * The elements of encodeJson(items), byte for byte what it writes between the brackets, in
 * UTF-8 pieces of a slice of items each. Between slices it yields to the event loop, so that
 * encoding a large record (a 65,536-region table is about 10 MB) never holds it for long.
 */
export async function encodeElements(items: readonly unknown[]): Promise<Buffer[]> {
  const pieces: Buffer[] = [];
  for (let start = 0; start < items.length; start += ITEMS_PER_SLICE) {
    if (start > 0) await nextTurn();
    const slice = items.slice(start, start + ITEMS_PER_SLICE).map((item) => encodeJson(item) ?? 'null');
    pieces.push(Buffer.from(`${start > 0 ? ',' : ''}${slice.join(',')}`, 'utf8'));
  }
  return pieces;
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
