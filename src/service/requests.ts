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

function u64(value: unknown, field: string): bigint {
  if (typeof value !== 'bigint')
    throw new ServiceError('INVALID_ARGUMENT', `${field} must be a u64`, { field });
  return value;
}

function asidOf(value: unknown, field: string): number {
  if (typeof value !== 'number')
    throw new ServiceError('INVALID_ARGUMENT', `${field} must be a number`, { field });
  return value;
}

function text(value: unknown, field: string): string {
  if (typeof value !== 'string')
    throw new ServiceError('INVALID_ARGUMENT', `${field} must be a string`, { field });
  return value;
}

function regionOf(r: Region, prefix: string): Region {
  return {
    iova: u64(r.iova, fieldAt(prefix, 'iova')),
    size: u64(r.size, fieldAt(prefix, 'size')),
    memory: text(r.memory, fieldAt(prefix, 'memory')),
    offset: u64(r.offset, fieldAt(prefix, 'offset')),
    perm: r.perm,
  };
}

export function mapSpecOf(r: MapSpec, prefix = ''): MapSpec {
  return { asid: asidOf(r.asid, fieldAt(prefix, 'asid')), ...regionOf(r, prefix) };
}

export function unmapSpecOf(r: UnmapSpec, prefix = ''): UnmapSpec {
  return {
    asid: asidOf(r.asid, fieldAt(prefix, 'asid')),
    iova: u64(r.iova, fieldAt(prefix, 'iova')),
    size: u64(r.size, fieldAt(prefix, 'size')),
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
  return ops.map((op, i): BatchOp => {
    const prefix = `ops[${i}]`;
    if (op.op === 'map') return { op: 'map', ...mapSpecOf(op, prefix) };
    if (op.op === 'unmap') return { op: 'unmap', ...unmapSpecOf(op, prefix) };
    throw new ServiceError('INVALID_ARGUMENT', `${prefix}.op must be map or unmap`, {
      field: `${prefix}.op`,
    });
  });
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
    case 'batch':
      return request.ops.flatMap((op) => (op.op === 'map' ? [op.memory] : []));
  }
}
