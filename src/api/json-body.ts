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
import { setImmediate as nextTurn } from 'node:timers/promises';
import { parseChunked } from '@discoveryjs/json-ext';
import secureJson from 'secure-json-parse';
import { invalid } from '../core/u64.ts';
import { DuplicateKeyScan } from './json-keys.ts';

/** Bodies of at least this many characters are parsed in slices. */
export const SLICED_BODY_CHARS = 256 * 1024;
/** Characters per slice: well under a millisecond of parsing each. */
const SLICE_CHARS = 16 * 1024;

const POISONING = { protoAction: 'error', constructorAction: 'error' } as const;

/** What fastify's JSON parser errors carry: a 4xx status, so that the API answers INVALID_ARGUMENT. */
function badRequest(e: unknown): Error {
  const err = e instanceof Error ? e : new Error(String(e));
  return Object.assign(err, { statusCode: 400 });
}

/** The whole body in one piece, as fastify's default JSON parser and then the duplicate check. */
function parseWhole(text: string): unknown {
  let value: unknown;
  try {
    value = secureJson.parse(text, POISONING);
  } catch (e) {
    throw badRequest(e);
  }
  const duplicate = new DuplicateKeyScan(text).scanTo(text.length);
  if (duplicate !== undefined) throw invalid(duplicate, 'given twice');
  return value;
}

/** Bodies the sliced parse leaves to parseWhole: a key it cannot see plainly may be one to refuse. */
const needsWhole = (text: string): boolean =>
  text.includes('__proto__') || text.includes('constructor') || text.includes('\\u');

/** The longest text needsWhole looks for, less one: what a slice's look starts before the slice. */
const NEEDS_WHOLE_OVERLAP = 'constructor'.length - 1;

/** Characters that may follow a comma between two values (json-ext would let `,]` and `,}` pass at a slice's end). */
const AFTER_COMMA = /\s*[^\s\]}]/y;

/** A refusal found on the way: parseWhole words it. */
class Refused extends Error {}

/**
 * Slices of `text` that each end just after a comma between two values (json-ext joins the
 * pieces; a cut anywhere else could let invalid text through), scanned for repeated keys first.
 */
async function* slices(text: string, keys: DuplicateKeyScan): AsyncGenerator<string> {
  let from = 0;
  while (from < text.length) {
    if (from > 0) await nextTurn();
    if (keys.scanTo(from + SLICE_CHARS) !== undefined) throw new Refused();
    const to = keys.position;
    if (needsWhole(text.slice(Math.max(0, from - NEEDS_WHOLE_OVERLAP), to))) throw new Refused();
    AFTER_COMMA.lastIndex = to;
    if (to < text.length && !AFTER_COMMA.test(text)) throw new Refused();
    // json-ext takes a text that stops inside an object or array as if it were closed there.
    if (to === text.length && keys.openDepth !== 0) throw new Refused();
    yield text.slice(from, to);
    from = to;
  }
}

async function parseInSlices(text: string): Promise<unknown> {
  try {
    return await parseChunked(slices(text, new DuplicateKeyScan(text)));
  } catch {
    // Refused: in one piece, for the words (and the verdict) a small body gets.
    return parseWhole(text);
  }
}

/**
 * A fastify content-type parser's work for `application/json` (`parseAs: 'string'`): the parsed
 * body, or an error fastify hands to the error handler. An empty body is no body.
 */
export function parseJsonBody(
  _request: unknown,
  body: string | Buffer,
  done: (err: Error | null, value?: unknown) => void,
): void {
  let text = body.toString();
  if (text === '') {
    done(null, undefined);
    return;
  }
  // A large one that needsWhole is refused by the slices as they meet it, and then parsed whole.
  if (text.length < SLICED_BODY_CHARS) {
    let value: unknown;
    try {
      value = parseWhole(text);
    } catch (e) {
      done(e as Error);
      return;
    }
    done(null, value);
    return;
  }
  // secure-json-parse skips a byte order mark; so does this.
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  parseInSlices(text).then(
    (value) => done(null, value),
    (e: unknown) => done(e as Error),
  );
}
