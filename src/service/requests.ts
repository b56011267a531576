/**
 * Requests as the queue takes them: only the fields that matter (extra properties a transport may
 * leave on its objects are dropped, so they reach neither the journal nor the request digest), and
 * the types checked that the rules below assume (bigints for u64, numbers for asids).
 */
import type { Region } from '../iotlb/types.ts';
import type { WriteRequest } from '../queue/types.ts';
import { ServiceError } from '../core/errors.ts';
import { mapInTimeSlices } from '../sys/next-turn.ts';
import type { BatchOp, MapSpec, UnmapSpec } from '../core/types.ts';

// Each check names its field only when it fails: a batch checks thousands that do not. A field is
// `key` of the request itself (index < 0), or `key` of entry `index` of its `list` (`ops[3].iova`).

const fieldAt = (list: string, index: number, key: string): string =>
  index < 0 ? key : `${list}[${index}].${key}`;

function refuse(list: string, index: number, key: string, what: string): never {
  const field = fieldAt(list, index, key);
  throw new ServiceError('INVALID_ARGUMENT', `${field} must be ${what}`, { field });
}

function u64(value: unknown, list: string, index: number, key: string): bigint {
  if (typeof value !== 'bigint') refuse(list, index, key, 'a u64');
  return value;
}

function asidOf(value: unknown, list: string, index: number): number {
  if (typeof value !== 'number') refuse(list, index, 'asid', 'a number');
  return value;
}

function text(value: unknown, list: string, index: number, key: string): string {
  if (typeof value !== 'string') refuse(list, index, key, 'a string');
  return value;
}

function regionOf(r: Region, index: number): Region {
  return {
    iova: u64(r.iova, 'regions', index, 'iova'),
    size: u64(r.size, 'regions', index, 'size'),
    memory: text(r.memory, 'regions', index, 'memory'),
    offset: u64(r.offset, 'regions', index, 'offset'),
    perm: r.perm,
  };
}

export function mapSpecOf(r: MapSpec): MapSpec {
  const asid = asidOf(r.asid, '', -1);
  const iova = u64(r.iova, '', -1, 'iova');
  const size = u64(r.size, '', -1, 'size');
  const memory = text(r.memory, '', -1, 'memory');
  return { asid, iova, size, memory, offset: u64(r.offset, '', -1, 'offset'), perm: r.perm };
}

export function unmapSpecOf(r: UnmapSpec): UnmapSpec {
  return {
    asid: asidOf(r.asid, '', -1),
    iova: u64(r.iova, '', -1, 'iova'),
    size: u64(r.size, '', -1, 'size'),
    exact: r.exact === true,
  };
}

/** In time slices: a memory table has up to 65,536 regions. */
export function regionsOf(regions: readonly Region[]): Promise<Region[]> {
  if (!Array.isArray(regions))
    throw new ServiceError('INVALID_ARGUMENT', 'regions must be a list', { field: 'regions' });
  return mapInTimeSlices(regions, regionOf);
}

export function batchOpsOf(ops: readonly BatchOp[]): BatchOp[] {
  if (!Array.isArray(ops)) throw new ServiceError('INVALID_ARGUMENT', 'ops must be a list', { field: 'ops' });
  const out: BatchOp[] = new Array(ops.length);
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i]!;
    // The fields in the order a MapSpec and an UnmapSpec have them (the request digest reads them).
    if (op.op === 'map') {
      out[i] = {
        op: 'map',
        asid: asidOf(op.asid, 'ops', i),
        iova: u64(op.iova, 'ops', i, 'iova'),
        size: u64(op.size, 'ops', i, 'size'),
        memory: text(op.memory, 'ops', i, 'memory'),
        offset: u64(op.offset, 'ops', i, 'offset'),
        perm: op.perm,
      };
    } else if (op.op === 'unmap') {
      out[i] = {
        op: 'unmap',
        asid: asidOf(op.asid, 'ops', i),
        iova: u64(op.iova, 'ops', i, 'iova'),
        size: u64(op.size, 'ops', i, 'size'),
        exact: op.exact === true,
      };
    } else refuse('ops', i, 'op', 'map or unmap');
  }
  return out;
}

/** The memory ids a request maps (to pin while it is queued). */
export function memoriesOf(request: WriteRequest): string[] {
  switch (request.kind) {
    case 'map':
      return [request.spec.memory];
    case 'unmap':
      return [];
    case 'setMemTable':
      // Each once: a table names few memories in many regions.
      return [...new Set(request.regions.map((r) => r.memory))];
    case 'batch': {
      // Each once, as a table's.
      const ids = new Set<string>();
      for (const op of request.ops) if (op.op === 'map') ids.add(op.memory);
      return [...ids];
    }
  }
}
