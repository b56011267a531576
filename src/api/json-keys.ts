/**
 * Duplicate keys in JSON text. JSON.parse (and fastify's secure-json-parse on top of it) keeps the
 * last of two equal keys, so `{"memory":"nope","memory":"ram0"}` would map ram0 while a reviewer of
 * the body sees nope. Neither reports duplicates, so this scan does, on text JSON.parse accepted.
 * It reads the body's UTF-8 bytes, never the body as one string (a large body is decoded a slice
 * at a time, json-body.ts): every byte it looks for is ASCII, and no byte of a multi-byte UTF-8
 * character is.
 */

type Frame = { keys: Set<string>; key: string | undefined } | { index: number };

/** The field path (`ops[2].memory`) of the first key that repeats in its object, or undefined. */
export function findDuplicateKey(text: string): string | undefined {
  const bytes = Buffer.from(text);
  return new DuplicateKeyScan(bytes).scanTo(bytes.length);
}

/** findDuplicateKey in steps: each scanTo() reads on from where the last one stopped. */
export class DuplicateKeyScan {
  private readonly stack: Frame[] = [];
  private expectKey = false;
  private at = 0;

  constructor(private readonly bytes: Buffer) {}

  get done(): boolean {
    return this.at >= this.bytes.length;
  }

  /** Objects and arrays opened and not closed yet, up to where the scan stopped. */
  get openDepth(): number {
    return this.stack.length;
  }

  /** Where the next scanTo() reads on from: after a comma between two values, or the end. */
  get position(): number {
    return this.at;
  }

  /**
   * Reads on to just after the first comma between two elements of an array at or past `until`,
   * or between any two values at or past `anyUntil` (or to the end): the first repeated key's
   * path, or undefined.
   */
  scanTo(until: number, anyUntil = until): string | undefined {
    const { bytes, stack } = this;
    for (let i = this.at; i < bytes.length; i++) {
      const c = bytes[i];
      if (c === 0x22 /* " */) {
        const end = stringEnd(bytes, i);
        const top = stack.at(-1);
        if (this.expectKey && top && 'keys' in top) {
          const raw = bytes.toString('utf8', i + 1, end);
          const key = raw.includes('\\') ? (JSON.parse(bytes.toString('utf8', i, end + 1)) as string) : raw;
          if (top.keys.has(key)) return pathOf(stack, key);
          top.keys.add(key);
          top.key = key;
          this.expectKey = false;
        }
        i = end;
      } else if (c === 0x7b /* { */) {
        stack.push({ keys: new Set(), key: undefined });
        this.expectKey = true;
      } else if (c === 0x5b /* [ */) {
        stack.push({ index: 0 });
      } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
        stack.pop();
        this.expectKey = false;
      } else if (c === 0x2c /* , */) {
        const top = stack.at(-1);
        const inArray = top !== undefined && 'index' in top;
        if (inArray) top.index++;
        else this.expectKey = true;
        if (i >= anyUntil || (inArray && i >= until)) {
          this.at = i + 1;
          return undefined;
        }
      }
    }
    this.at = bytes.length;
    return undefined;
  }
}

/** Index of the quote closing the string that opens at `start`. */
function stringEnd(bytes: Buffer, start: number): number {
  let i = start + 1;
  for (;;) {
    const quote = bytes.indexOf(0x22, i);
    if (quote < 0) return bytes.length;
    let backslashes = 0;
    while (bytes[quote - 1 - backslashes] === 0x5c) backslashes++;
    if (backslashes % 2 === 0) return quote;
    i = quote + 1;
  }
}

function pathOf(stack: readonly Frame[], key: string): string {
  let path = '';
  for (const frame of stack.slice(0, -1)) {
    if ('index' in frame) path += `[${frame.index}]`;
    else path += path === '' ? frame.key : `.${frame.key}`;
  }
  return path === '' ? key : `${path}.${key}`;
}
