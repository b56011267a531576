/**
 * Command-line values: u64 quantities typed by a person (decimal, 0x hex, or with a K/M/G/T suffix)
 * become the wire's 0x hex strings; small counts become numbers. A bad value is a usage error.
 */
import { formatU64, sizeFromText, U32_LIMIT, u64FromText } from '../../src/u64.ts';

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** `1048576`, `0x100000` and `1M` are the same u64; answered as `0x100000`. */
export function u64Arg(text: string, name: string): string {
  const value = sizeFromText(text);
  if (value === undefined)
    throw new UsageError(
      `${name} ${JSON.stringify(text)}: expected a u64 (decimal, 0x hex, or with K/M/G/T)`,
    );
  return formatU64(value);
}

/** A non-negative integer that fits 32 bits (asid). */
export function u32Arg(text: string, name: string): number {
  const n = /^[0-9]+$/.test(text) ? u64FromText(text) : undefined;
  if (n === undefined || n >= U32_LIMIT)
    throw new UsageError(`${name} ${JSON.stringify(text)}: expected an integer 0..2^32-1`);
  return Number(n);
}

/** A positive count (`--count`), or seconds (`--timeout`) when `fraction` is allowed. */
export function positiveArg(text: string, name: string, fraction = false): number {
  const n = (fraction ? /^[0-9]+(\.[0-9]+)?$/ : /^[0-9]+$/).test(text) ? Number(text) : Number.NaN;
  if (!(n > 0) || !Number.isFinite(n))
    throw new UsageError(`${name} ${JSON.stringify(text)}: expected a positive number`);
  return n;
}
