/**
 * The file of `vdpactl memtable apply -f FILE`: the body of REST `PUT /v1/devices/{device}/memtable`,
 *
 *   {"asid": 0, "regions": [{"iova": "0x100000", "size": "0x200000", "memory": "ram0", "offset": "0", "perm": "rw"}]}
 *
 * read as REST reads it: u64s are decimal or 0x hex (strings, or exactly representable JSON numbers),
 * with no K/M/G/T suffix, so that a file means the same to vdpactl and to curl. Unknown keys are
 * refused here: gRPC would drop them silently, and a misspelt "offset" must not quietly map offset 0.
 */
import { parseU32, parseU64 } from '../../src/core/u64.ts';
import { formatU64 } from '../../src/u64.ts';
import { ServiceError } from '../../src/core/errors.ts';
import { UsageError } from './values.ts';

/** A value as REST reads it, as a usage error naming the field. */
function asRest<T>(read: () => T): T {
  try {
    return read();
  } catch (e) {
    if (e instanceof ServiceError) throw new UsageError(e.message);
    throw e;
  }
}

function u64Field(value: unknown, where: string): string {
  return formatU64(asRest(() => parseU64(value, where)));
}

export interface MemTableRegion {
  iova: string;
  size: string;
  memory: string;
  offset?: string;
  perm?: string;
}

export interface MemTableFile {
  asid?: number;
  regions: MemTableRegion[];
}

const TOP_KEYS = ['asid', 'regions'];
const REGION_KEYS = ['iova', 'size', 'memory', 'offset', 'perm'];

function object(value: unknown, where: string, keys: readonly string[]): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new UsageError(`${where}: expected an object`);
  const unknown = Object.keys(value).filter((k) => !keys.includes(k));
  if (unknown.length > 0)
    throw new UsageError(`${where}: unknown key ${JSON.stringify(unknown[0])} (known: ${keys.join(', ')})`);
  return value as Record<string, unknown>;
}

function text(value: unknown, where: string): string {
  if (typeof value !== 'string' || value === '')
    throw new UsageError(`${where}: expected a non-empty string`);
  return value;
}

function region(value: unknown, where: string): MemTableRegion {
  const r = object(value, where, REGION_KEYS);
  return {
    iova: u64Field(r.iova, `${where}.iova`),
    size: u64Field(r.size, `${where}.size`),
    memory: text(r.memory, `${where}.memory`),
    ...(r.offset === undefined ? {} : { offset: u64Field(r.offset, `${where}.offset`) }),
    ...(r.perm === undefined ? {} : { perm: text(r.perm, `${where}.perm`) }),
  };
}

/** Parses the file's text; `name` (the path) prefixes every complaint. */
export function parseMemTableFile(content: string, name: string): MemTableFile {
  let json: unknown;
  try {
    json = JSON.parse(content);
  } catch (e) {
    throw new UsageError(`${name}: not JSON: ${(e as Error).message}`);
  }
  const top = object(json, name, TOP_KEYS);
  if (!Array.isArray(top.regions)) throw new UsageError(`${name}: "regions" must be an array`);
  return {
    ...(top.asid === undefined ? {} : { asid: asRest(() => parseU32(top.asid, `${name}: asid`)) }),
    regions: top.regions.map((r, i) => region(r, `${name}: regions[${i}]`)),
  };
}
