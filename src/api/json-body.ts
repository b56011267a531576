/**
 * JSON request bodies, parsed as fastify's own parser does (secure-json-parse refusing
 * `__proto__` and `constructor.prototype` keys) and refused when a key repeats in its object
 * (json-keys.ts). A large body (a 65,536-region memory table is about 6.5 MB) parsed in one
 * piece would hold the event loop for about 100 ms, and every other device's requests with it:
 * one that large is parsed in slices (json-ext's parseChunked) and scanned for repeated keys in
 * slices, yielding to the event loop between them. A large body that is not plain JSON of the
 * API's kind (a syntax error, a key spelled with \u escapes, any `__proto__` or `constructor`)
 * is judged by the one-piece parser, so every refusal reads the same whatever the body's size.
 */
import { bulkTurn } from '../sys/next-turn.ts';
import { parseChunked } from '@discoveryjs/json-ext';
import secureJson from 'secure-json-parse';
import { invalid } from '../core/u64.ts';
import { DuplicateKeyScan } from './json-keys.ts';

/** Bodies of at least this many bytes are parsed in slices. */
export const SLICED_BODY_BYTES = 256 * 1024;
/** Bytes per slice: well under a millisecond of parsing each. */
const SLICE_BYTES = 16 * 1024;
/**
 * How far a slice may run on to end between two elements of an array rather than inside one.
 * json-ext keeps slices of elements of one array aside and joins them once; a slice that ends
 * inside an element makes it grow the array by assignment to its length (parse-chunked.js
 * `append`), which copies the whole array each time: a 65,536-region table (400 slices) took
 * 200-260 ms to parse instead of 90-135 ms.
 */
const ELEMENT_END_SLACK_BYTES = 16 * 1024;

const POISONING = { protoAction: 'error', constructorAction: 'error' } as const;

/** What fastify's JSON parser errors carry: a 4xx status, so that the API answers INVALID_ARGUMENT. */
function badRequest(e: unknown): Error {
  const err = e instanceof Error ? e : new Error(String(e));
  return Object.assign(err, { statusCode: 400 });
}

/** The whole body in one piece, as fastify's default JSON parser and then the duplicate check. */
function parseWhole(bytes: Buffer): unknown {
  let value: unknown;
  try {
    value = secureJson.parse(bytes, POISONING);
  } catch (e) {
    throw badRequest(e);
  }
  const duplicate = new DuplicateKeyScan(bytes).scanTo(bytes.length);
  if (duplicate !== undefined) throw invalid(duplicate, 'given twice');
  return value;
}

/** Bodies the sliced parse leaves to parseWhole: a key it cannot see plainly may be one to refuse. */
const needsWhole = (text: string): boolean =>
  text.includes('__proto__') || text.includes('constructor') || text.includes('\\u');

/** The longest text needsWhole looks for, less one: what a slice's look starts before the slice. */
const NEEDS_WHOLE_OVERLAP = 'constructor'.length - 1;

/** Whether the first byte at or after `at` that is not JSON whitespace may follow a comma between two values (json-ext would let `,]` and `,}` pass at a slice's end). */
function valueFollows(bytes: Buffer, at: number): boolean {
  for (let i = at; i < bytes.length; i++) {
    const c = bytes[i]!;
    if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) continue;
    return c !== 0x5d /* ] */ && c !== 0x7d /* } */;
  }
  return false;
}

/** A refusal found on the way: parseWhole words it. */
class Refused extends Error {}

/**
 * Slices of the body, as text, that each end just after a comma between two values, one between
 * two elements of an array where there is one near (json-ext joins the pieces; a cut anywhere else
 * could let invalid text through, and a comma is never part of a multi-byte character), scanned
 * for repeated keys first.
 */
async function* slices(bytes: Buffer, start: number, keys: DuplicateKeyScan): AsyncGenerator<string> {
  let from = start;
  const began = performance.now();
  while (from < bytes.length) {
    if (from > start) await bulkTurn(began);
    const until = from + SLICE_BYTES;
    if (keys.scanTo(until, until + ELEMENT_END_SLACK_BYTES) !== undefined) throw new Refused();
    const to = keys.position;
    const text = bytes.toString('utf8', from, to);
    const before =
      from === start ? '' : bytes.toString('utf8', Math.max(start, from - NEEDS_WHOLE_OVERLAP), from);
    if (needsWhole(before + text)) throw new Refused();
    if (to < bytes.length && !valueFollows(bytes, to)) throw new Refused();
    // json-ext takes a text that stops inside an object or array as if it were closed there.
    if (to === bytes.length && keys.openDepth !== 0) throw new Refused();
    yield text;
    from = to;
  }
}

/** secure-json-parse skips a byte order mark; so do the slices. */
const BOM = Buffer.from([0xef, 0xbb, 0xbf]);

async function parseInSlices(bytes: Buffer): Promise<unknown> {
  const start = bytes.subarray(0, BOM.length).equals(BOM) ? BOM.length : 0;
  try {
    return await parseChunked(slices(bytes, start, new DuplicateKeyScan(bytes)));
  } catch {
    // Refused: in one piece, for the words (and the verdict) a small body gets.
    return parseWhole(bytes);
  }
}

/**
 * A fastify content-type parser's work for `application/json` (`parseAs: 'buffer'`): the parsed
 * body, or an error fastify hands to the error handler. An empty body is no body.
 */
export function parseJsonBody(
  _request: unknown,
  body: string | Buffer,
  done: (err: Error | null, value?: unknown) => void,
): void {
  const bytes = typeof body === 'string' ? Buffer.from(body) : body;
  if (bytes.length === 0) {
    done(null, undefined);
    return;
  }
  // A large one that needsWhole is refused by the slices as they meet it, and then parsed whole.
  if (bytes.length < SLICED_BODY_BYTES) {
    let value: unknown;
    try {
      value = parseWhole(bytes);
    } catch (e) {
      done(e as Error);
      return;
    }
    done(null, value);
    return;
  }
  parseInSlices(bytes).then(
    (value) => done(null, value),
    (e: unknown) => done(e as Error),
  );
}
