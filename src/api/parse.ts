/**
 * Strict parsing of request bodies into the core's requests, shared by REST and gRPC. Every object
 * is read field by field into a new plain object (user input is never spread or merged), unknown
 * fields are refused, and each error is an INVALID_ARGUMENT naming the field (`regions[3].size`).
 */
import { ID_RULE, isValidId } from '../id.ts';
import type { Perm, Region } from '../iotlb/types.ts';
import {
  type AttachDeviceRequest,
  type BatchOp,
  type BatchRequest,
  MAX_REQUEST_ID,
  type MapRequest,
  type RegisterMemoryRequest,
  type SetMemTableRequest,
  type UnmapRequest,
} from '../core/types.ts';
import { invalid, parseU32, parseU64, typeName } from '../core/u64.ts';
import { mapInTimeSlices } from '../sys/next-turn.ts';
import { U64_LIMIT } from '../u64.ts';

export interface ApiLimits {
  /** Largest request body (REST) or message (gRPC), in bytes. */
  bodyLimit: number;
  /** Most ops in one batch or submit. */
  maxBatchOps: number;
  /** Most regions in one memory table. */
  maxRegions: number;
  /** Most bytes of request bodies (REST) and messages (gRPC) processed at once; at least bodyLimit. */
  maxInflightBytes: number;
}

/** The body limit holds a memory table of maxRegions regions in their longest JSON form (about 12 MiB). */
export const DEFAULT_LIMITS: ApiLimits = {
  bodyLimit: 16 * 1024 * 1024,
  maxBatchOps: 4096,
  maxRegions: 65536,
  // A parsed batch takes about 25 times its body in memory until it is answered (300 batches of
  // 1000 ops, 33 MB of JSON, took the server to 900 MiB); 16 MiB of bodies keeps it near 400 MiB.
  maxInflightBytes: 16 * 1024 * 1024,
};

/** The longest idempotency key (requestId) taken. */
const PERM_VALUES: readonly Perm[] = ['ro', 'wo', 'rw'];

/** A JSON object's own fields, checked against the fields the message has. */
class Fields {
  private constructor(
    private readonly source: object,
    private readonly path: string,
  ) {}

  /**
   * `value`'s fields, all of them among `allowed`. With `narrower` (a subset of `allowed`): also
   * all among `narrower`, an unknown field of `allowed` named before one only `narrower` refuses.
   */
  static of(value: unknown, path: string, allowed: readonly string[], narrower?: readonly string[]): Fields {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) {
      throw invalid(path || 'body', `must be an object, got ${typeName(value)}`);
    }
    let outside: string | undefined;
    for (const key of Object.keys(value)) {
      if (!allowed.includes(key)) throw invalid(join(path, key), 'unknown field');
      if (outside === undefined && narrower !== undefined && !narrower.includes(key)) outside = key;
    }
    if (outside !== undefined) throw invalid(join(path, outside), 'unknown field');
    return new Fields(value, path);
  }

  field(key: string): string {
    return join(this.path, key);
  }

  /** The field's own value; never an inherited one (`constructor`, `__proto__`). */
  get(key: string): unknown {
    return Object.hasOwn(this.source, key) ? (this.source as Record<string, unknown>)[key] : undefined;
  }

  required(key: string): unknown {
    const value = this.get(key);
    if (value === undefined) throw invalid(this.field(key), 'is required');
    return value;
  }

  u64(key: string, fallback?: bigint): bigint {
    const value = this.get(key);
    if (value === undefined && fallback !== undefined) return fallback;
    return parseU64(this.required(key), this.field(key));
  }

  asid(): number {
    const value = this.get('asid');
    return value === undefined ? 0 : parseU32(value, this.field('asid'));
  }

  id(key: string): string {
    return parseId(this.required(key), this.field(key));
  }

  perm(): Perm {
    const value = this.get('perm');
    if (value === undefined) return 'rw';
    const perm = PERM_VALUES.find((p) => p === value);
    if (perm === undefined) throw invalid(this.field('perm'), `must be one of ro, wo, rw`);
    return perm;
  }

  bool(key: string): boolean {
    const value = this.get(key);
    if (value === undefined) return false;
    if (typeof value !== 'boolean')
      throw invalid(this.field(key), `must be a boolean, got ${typeName(value)}`);
    return value;
  }

  requestId(): { requestId?: string } {
    const value = this.get('requestId');
    return value === undefined ? {} : { requestId: parseRequestId(value, this.field('requestId')) };
  }

  array(key: string, max: number): unknown[] {
    const value = this.required(key);
    if (!Array.isArray(value)) throw invalid(this.field(key), `must be an array, got ${typeName(value)}`);
    if (value.length > max)
      throw invalid(this.field(key), `has ${value.length} entries, at most ${max} allowed`);
    return value;
  }

  /** `size` of a range at `iova`: size > 0 and iova + size <= 2^64, else an error on `size`. */
  rangeSize(iova: bigint): bigint {
    const size = this.u64('size');
    if (size === 0n) throw invalid(this.field('size'), 'must be greater than 0');
    if (iova + size > U64_LIMIT) throw invalid(this.field('size'), 'iova + size exceeds 2^64');
    return size;
  }
}

function join(path: string, key: string): string {
  return path === '' ? key : `${path}.${key}`;
}

/** Device and memory ids (src/id.ts). */
export function parseId(value: unknown, field: string): string {
  if (!isValidId(value)) throw invalid(field, ID_RULE);
  return value;
}

export function parseRequestId(value: unknown, field: string): string {
  if (typeof value !== 'string' || value.length === 0 || value.length > MAX_REQUEST_ID) {
    throw invalid(field, `must be a string of 1 to ${MAX_REQUEST_ID} characters`);
  }
  return value;
}

/** The optional `asid` filter of ListMappings (a query string value or a number). */
export function parseAsidFilter(value: unknown): number | undefined {
  return value === undefined ? undefined : parseU32(value, 'asid');
}

/** `?dryRun=true|false` (as text, or as the boolean the query's schema made of it). */
export function parseBoolParam(value: unknown, field: string): boolean {
  if (value === undefined || value === false || value === 'false') return false;
  if (value === true || value === 'true') return true;
  throw invalid(field, 'must be true or false');
}

const MAP_FIELDS = ['iova', 'size', 'memory', 'offset', 'perm', 'asid'] as const;
const UNMAP_FIELDS = ['iova', 'size', 'asid', 'exact'] as const;
const REGION_FIELDS = ['iova', 'size', 'memory', 'offset', 'perm'] as const;

// The fields in the order they are read (and their errors found): asid, iova, size, the rest.
function region(f: Fields): Region {
  const iova = f.u64('iova');
  const size = f.rangeSize(iova);
  return { iova, size, memory: f.id('memory'), offset: f.u64('offset', 0n), perm: f.perm() };
}

const MAP_REQUEST_FIELDS = [...MAP_FIELDS, 'requestId'];
const UNMAP_REQUEST_FIELDS = [...UNMAP_FIELDS, 'requestId'];

export function parseMap(device: string, body: unknown): MapRequest {
  const f = Fields.of(body, '', MAP_REQUEST_FIELDS);
  const asid = f.asid();
  const { iova, size, memory, offset, perm } = region(f);
  return { device, asid, iova, size, memory, offset, perm, ...f.requestId() };
}

export function parseUnmap(device: string, body: unknown): UnmapRequest {
  const f = Fields.of(body, '', UNMAP_REQUEST_FIELDS);
  const asid = f.asid();
  const iova = f.u64('iova');
  const size = f.rangeSize(iova);
  return { device, asid, iova, size, exact: f.bool('exact'), ...f.requestId() };
}

const SET_MEM_TABLE_FIELDS = ['asid', 'regions', 'requestId'] as const;

const tableRegion = (r: unknown, i: number): Region => region(Fields.of(r, `regions[${i}]`, REGION_FIELDS));

/**
 * Body of SetMemTable, read in time slices that give the event loop back (65,536 regions take
 * over 100 ms to read); the first bad region is the error.
 */
export async function parseSetMemTable(
  device: string,
  body: unknown,
  dryRun: boolean,
  limits: ApiLimits,
): Promise<SetMemTableRequest> {
  const f = Fields.of(body, '', SET_MEM_TABLE_FIELDS);
  const regions = await mapInTimeSlices(f.array('regions', limits.maxRegions), tableRegion);
  return { device, asid: f.asid(), regions, dryRun, ...f.requestId() };
}

const BATCH_OP_FIELDS = ['op', ...MAP_FIELDS, 'exact'];
const BATCH_MAP_FIELDS = ['op', ...MAP_FIELDS];
const BATCH_UNMAP_FIELDS = ['op', ...UNMAP_FIELDS];

function batchOp(value: unknown, path: string): BatchOp {
  const kind =
    typeof value === 'object' && value !== null && Object.hasOwn(value, 'op')
      ? (value as { op: unknown }).op
      : undefined;
  if (kind === 'map') {
    const f = Fields.of(value, path, BATCH_OP_FIELDS, BATCH_MAP_FIELDS);
    const asid = f.asid();
    const { iova, size, memory, offset, perm } = region(f);
    return { op: 'map', asid, iova, size, memory, offset, perm };
  }
  if (kind === 'unmap') {
    const f = Fields.of(value, path, BATCH_OP_FIELDS, BATCH_UNMAP_FIELDS);
    const asid = f.asid();
    const iova = f.u64('iova');
    const size = f.rangeSize(iova);
    return { op: 'unmap', asid, iova, size, exact: f.bool('exact') };
  }
  Fields.of(value, path, BATCH_OP_FIELDS);
  throw invalid(join(path, 'op'), 'must be map or unmap');
}

/** Body of Batch and Submit: `{ops: [{op: 'map'|'unmap', ...}], atomic?, requestId?}`. */
export function parseBatch(device: string, body: unknown, limits: ApiLimits): BatchRequest {
  const f = Fields.of(body, '', ['ops', 'atomic', 'requestId']);
  const list = f.array('ops', limits.maxBatchOps);
  const ops: BatchOp[] = new Array(list.length);
  for (let i = 0; i < list.length; i++) ops[i] = batchOp(list[i], `ops[${i}]`);
  return { device, ops, atomic: f.bool('atomic'), ...f.requestId() };
}

/** `{id, path}` to open a file under the allowed roots, or `{id, size}` to create one. */
export function parseRegisterMemory(body: unknown): RegisterMemoryRequest {
  const f = Fields.of(body, '', ['id', 'path', 'size']);
  const id = f.id('id');
  const path = f.get('path');
  const hasSize = f.get('size') !== undefined;
  if (path !== undefined) {
    if (hasSize) throw invalid('size', 'give either path or size, not both');
    if (typeof path !== 'string' || path.length === 0 || path.length > 4096 || path.includes('\0')) {
      throw invalid('path', 'must be a non-empty file path');
    }
    return { id, path };
  }
  if (!hasSize) throw invalid('path', 'give either path (open a file) or size (create memory)');
  const size = f.u64('size');
  if (size === 0n) throw invalid('size', 'must be greater than 0');
  return { id, size };
}

/** `{socketPath, group?}` of AttachDevice (the agent checks the path is under its attach directory). */
export function parseAttach(device: string, body: unknown): AttachDeviceRequest {
  const f = Fields.of(body, '', ['socketPath', 'group']);
  const socketPath = f.get('socketPath');
  if (typeof socketPath !== 'string' || socketPath.length === 0 || socketPath.length > 4096) {
    throw invalid('socketPath', 'must be a non-empty socket path');
  }
  if (socketPath.includes('\0')) throw invalid('socketPath', 'must not contain NUL');
  const group = f.get('group');
  // proto3: an empty group is no group.
  if (group === undefined || group === '') return { device, socketPath };
  if (typeof group !== 'string') throw invalid('group', 'must be a group name');
  return { device, socketPath, group };
}
