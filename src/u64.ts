/**
 * The one home of the u64 and u32 limits and of reading a u64 from text, for every layer (the
 * agent's wire, the devices' and the mains' options, the core's request parse). Text is decimal or
 * `0x` hex; callers say what a refusal means in their own error type.
 */

/** 2^64: one past the largest u64 (and the end of the full IOVA space). */
export const U64_LIMIT = 1n << 64n;
export const U64_MAX = U64_LIMIT - 1n;
/** 2^32: one past the largest u32 (asid). */
export const U32_LIMIT = 1n << 32n;
/** The largest u32, as a number (u32s are numbers in code). */
export const U32_MAX = 0xffff_ffff;

/** The public API's u64 text as a JSON Schema / RegExp pattern: decimal without leading zeros, or `0x` hex. */
export const U64_TEXT_PATTERN = '^(0|[1-9][0-9]*|0[xX][0-9a-fA-F]+)$';

const CANONICAL_TEXT = new RegExp(U64_TEXT_PATTERN);
const DECIMAL = /^[0-9]+$/;
const HEX = /^0[xX][0-9a-fA-F]+$/;
/** Long enough for 2^64-1 in either base with a few leading zeros; refuses huge strings cheaply. */
const MAX_TEXT = 40;

/** Decimal written as the public API wants it: no leading zeros (`007` is refused). */
export const CANONICAL = { leadingZeros: false } as const;

/** Whether `text` is a number in decimal or `0x` hex, short enough to be a u64 (its value unchecked). */
export function isU64Text(text: string, { leadingZeros = true }: { leadingZeros?: boolean } = {}): boolean {
  return (
    text.length <= MAX_TEXT &&
    (leadingZeros ? HEX.test(text) || DECIMAL.test(text) : CANONICAL_TEXT.test(text))
  );
}

/** A u64 from decimal or `0x` hex text; undefined for anything else, or for 2^64 or more. */
export function u64FromText(text: string, options: { leadingZeros?: boolean } = {}): bigint | undefined {
  if (!isU64Text(text, options)) return undefined;
  const value = BigInt(text);
  return value < U64_LIMIT ? value : undefined;
}

/** A u64 as the service answers it: `0x` hex. */
export function formatU64(value: bigint): string {
  return `0x${value.toString(16)}`;
}

const SIZE = /^(0[xX][0-9a-fA-F]+|[0-9]+)([kmgtKMGT]?)$/;
const SHIFT: Record<string, bigint> = { '': 0n, k: 10n, m: 20n, g: 30n, t: 40n };

/** A size typed by a person: a u64 as above, optionally with a K/M/G/T (binary) suffix. */
export function sizeFromText(text: string): bigint | undefined {
  const m = text.length <= MAX_TEXT ? SIZE.exec(text) : null;
  if (!m) return undefined;
  const value = BigInt(m[1]!) << SHIFT[m[2]!.toLowerCase()]!;
  return value < U64_LIMIT ? value : undefined;
}
