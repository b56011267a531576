/**
 * 64-bit quantities on the wire: strings in decimal or `0x` hex (JSON numbers only when they are
 * safe integers), always bigint in code, answered as `0x` hex.
 */
import { CANONICAL, isU64Text, U32_LIMIT, U64_LIMIT } from '../u64.ts';
import { ServiceError } from './errors.ts';

export function invalid(field: string, message: string): ServiceError {
  return new ServiceError('INVALID_ARGUMENT', `${field}: ${message}`, { field });
}

/** Parses one wire u64; throws INVALID_ARGUMENT naming `field` on anything but a value in [0, 2^64). */
export function parseU64(value: unknown, field: string): bigint {
  let parsed: bigint;
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw invalid(field, `must be a non-negative integer (as a number at most 2^53-1; use a string)`);
    }
    parsed = BigInt(value);
  } else if (typeof value === 'string') {
    if (!isU64Text(value, CANONICAL)) {
      throw invalid(field, `must be a u64 as a decimal or 0x hex string, got ${JSON.stringify(clip(value))}`);
    }
    parsed = BigInt(value);
  } else {
    throw invalid(field, `must be a u64 as a decimal or 0x hex string, got ${typeName(value)}`);
  }
  if (parsed >= U64_LIMIT) throw invalid(field, 'exceeds 2^64-1');
  return parsed;
}

/** A u32 (asid): a u64 as above that also fits 32 bits. */
export function parseU32(value: unknown, field: string): number {
  const parsed = parseU64(value, field);
  if (parsed >= U32_LIMIT) throw invalid(field, 'exceeds 2^32-1');
  return Number(parsed);
}

export function typeName(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  return typeof value;
}

function clip(text: string): string {
  return text.length > 24 ? `${text.slice(0, 24)}…` : text;
}
