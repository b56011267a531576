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

const fieldAt = (prefix: string, field: string): string => (prefix ? `${prefix}.${field}` : field);

// Each check names its field only when it fails: a batch checks thousands that do not.

function u64(value: unknown, prefix: string, key: string): bigint {
  if (typeof value !== 'bigint') {
    const field = fieldAt(prefix, key);
    throw new ServiceError('INVALID_ARGUMENT', `${field} must be a u64`, { field });
  }
  return value;
}

function asidOf(value: unknown, prefix: string): number {
  if (typeof value !== 'number') {
    const field = fieldAt(prefix, 'asid');
    throw new ServiceError('INVALID_ARGUMENT', `${field} must be a number`, { field });
  }
  return value;
}

function text(value: unknown, prefix: string, key: string): string {
  if (typeof value !== 'string') {
    const field = fieldAt(prefix, key);
    throw new ServiceError('INVALID_ARGUMENT', `${field} must be a string`, { field });
  }
  return value;
}

function regionOf(r: Region, prefix: string): Region {
  return {
    iova: u64(r.iova, prefix, 'iova'),
    size: u64(r.size, prefix, 'size'),
    memory: text(r.memory, prefix, 'memory'),
    offset: u64(r.offset, prefix, 'offset'),
    perm: r.perm,
  };
}

export function mapSpecOf(r: MapSpec, prefix = ''): MapSpec {
  const asid = asidOf(r.asid, prefix);
  const iova = u64(r.iova, prefix, 'iova');
  const size = u64(r.size, prefix, 'size');
  const memory = text(r.memory, prefix, 'memory');
  return { asid, iova, size, memory, offset: u64(r.offset, prefix, 'offset'), perm: r.perm };
}

export function unmapSpecOf(r: UnmapSpec, prefix = ''): UnmapSpec {
  return {
    asid: asidOf(r.asid, prefix),
    iova: u64(r.iova, prefix, 'iova'),
    size: u64(r.size, prefix, 'size'),
    exact: r.exact === true,
  };
}

/** In time slices: a memory table has up to 65,536 regions. */
export function regionsOf(regions: readonly Region[]): Promise<Region[]> {
  if (!Array.isArray(regions))
    throw new ServiceError('INVALID_ARGUMENT', 'regions must be a list', { field: 'regions' });
  return mapInTimeSlices(regions, (r, i) => regionOf(r, `regions[${i}]`));
}

export function batchOpsOf(ops: readonly BatchOp[]): BatchOp[] {
  if (!Array.isArray(ops)) throw new ServiceError('INVALID_ARGUMENT', 'ops must be a list', { field: 'ops' });
  const out: BatchOp[] = new Array(ops.length);
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i]!;
    const prefix = `ops[${i}]`;
    if (op.op === 'map') out[i] = { op: 'map', ...mapSpecOf(op, prefix) };
    else if (op.op === 'unmap') out[i] = { op: 'unmap', ...unmapSpecOf(op, prefix) };
    else {
      throw new ServiceError('INVALID_ARGUMENT', `${prefix}.op must be map or unmap`, {
        field: `${prefix}.op`,
      });
    }
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
