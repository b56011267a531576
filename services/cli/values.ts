/**
 * Command-line values: u64 quantities typed by a person (decimal, 0x hex, or with a K/M/G/T suffix)
 * become the wire's 0x hex strings; small counts become numbers. A bad value is a usage error.
 */

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

const U64 = /^(0x[0-9a-f]+|[0-9]+)([kmgt]?)$/i;
const SHIFT: Record<string, bigint> = { '': 0n, k: 10n, m: 20n, g: 30n, t: 40n };
const U64_LIMIT = 1n << 64n;

/** `1048576`, `0x100000` and `1M` are the same u64; answered as `0x100000`. */
export function u64Arg(text: string, name: string): string {
  const m = U64.exec(text);
  const value = m ? BigInt(m[1]!) << SHIFT[m[2]!.toLowerCase()]! : undefined;
  if (value === undefined || value >= U64_LIMIT)
    throw new UsageError(
      `${name} ${JSON.stringify(text)}: expected a u64 (decimal, 0x hex, or with K/M/G/T)`,
    );
  return `0x${value.toString(16)}`;
}

/** A non-negative integer that fits 32 bits (asid). */
export function u32Arg(text: string, name: string): number {
  const n = /^[0-9]{1,10}$/.test(text) ? Number(text) : Number.NaN;
  if (!(n <= 0xffffffff))
    throw new UsageError(`${name} ${JSON.stringify(text)}: expected an integer 0..2^32-1`);
  return n;
}

/** A positive count (`--count`), or seconds (`--timeout`) when `fraction` is allowed. */
export function positiveArg(text: string, name: string, fraction = false): number {
  const n = (fraction ? /^[0-9]+(\.[0-9]+)?$/ : /^[0-9]+$/).test(text) ? Number(text) : Number.NaN;
  if (!(n > 0) || !Number.isFinite(n))
    throw new UsageError(`${name} ${JSON.stringify(text)}: expected a positive number`);
  return n;
}
