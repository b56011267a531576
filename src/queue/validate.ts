/**
 * Semantic validation of one request (or one op of a non-atomic batch) against the working tables,
 * with the precise error the kernel cannot give: each check names the request field at fault.
 * A valid request's ops are applied to the working tables at once, so the next request of the
 * group is checked against the state this one produces. On error nothing is left applied.
 */
import {
  diffSortedInSlices,
  type Plan,
  PlanError,
  planUnmap,
  validateTargetInSlices,
} from '../iotlb/planner.ts';
import { checkRegionShape } from '../iotlb/table.ts';
import {
  describeRange,
  hex,
  type IotlbOp,
  type IotlbViolation,
  type Mapping,
  type Region,
} from '../iotlb/types.ts';
import { ServiceError } from '../core/errors.ts';
import type {
  BatchOp,
  BatchOpResult,
  BatchResult,
  MapResult,
  MapSpec,
  SetMemTableResult,
  UnmapResult,
  UnmapSpec,
} from '../core/types.ts';
import type { WriteRequest } from './types.ts';
import { forEachInTimeSlices, mapInTimeSlices } from '../sys/next-turn.ts';
import type { WorkingTables } from './working.ts';

/** The desired memory a request may map. */
export interface MemoryLookup {
  /** Size of memory `id`, or undefined when it is not registered (or is being unregistered). */
  sizeOf(id: string): bigint | undefined;
  /** Why registered memory `id` cannot be mapped now (the agent cannot open it), if it cannot. */
  unavailable?(id: string): string | undefined;
}

/** A validated unit: its ops, and its answer if the device applies them all. */
export interface StepPlan {
  ops: IotlbOp[];
  answer: MapResult | UnmapResult | SetMemTableResult | BatchOpResult | BatchResult;
  /** Atomic batch: where each batch op's ops start in `ops`. */
  opStarts?: number[];
}

/** Where an error is: the request field prefix (`ops[2]`) and a message prefix (`ops[2]: `). */
interface At {
  prefix: string;
  label: string;
}

const TOP: At = { prefix: '', label: '' };
const atOp = (i: number): At => ({ prefix: `ops[${i}]`, label: `ops[${i}]: ` });
const atRegion = (i: number): At => ({ prefix: `regions[${i}]`, label: `regions[${i}]: ` });
const fieldAt = (at: At, field: string): string => (at.prefix ? `${at.prefix}.${field}` : field);

function describeMapping(m: Mapping): string {
  return `asid ${m.asid} [${hex(m.iova)}, ${hex(m.iova + m.size)}) -> ${m.memory}+${hex(m.offset)} ${m.perm}`;
}

function violationError(v: IotlbViolation, at: At): ServiceError {
  const details = { field: fieldAt(at, v.field), errno: v.errno };
  if (v.reason === 'OVERLAP') {
    const what = v.conflict ? ` (existing mapping: ${describeMapping(v.conflict)})` : '';
    return new ServiceError('CONFLICT', `${at.label}${v.message}${what}`, details);
  }
  return new ServiceError('INVALID_ARGUMENT', `${at.label}${v.message}`, details);
}

function planError(e: unknown, at: At): unknown {
  if (!(e instanceof PlanError)) return e;
  const field = fieldAt(at, e.field);
  switch (e.code) {
    case 'INVALID_REGION':
    case 'UNALIGNED_SPLIT':
      return new ServiceError('INVALID_ARGUMENT', `${at.label}${e.message}`, {
        field,
        ...(e.errno ? { errno: e.errno } : {}),
      });
    case 'TARGET_OVERLAP':
      return new ServiceError('CONFLICT', `${at.label}${e.message}`, { field, errno: 'EEXIST' });
    case 'SPLIT_REFUSED':
      return new ServiceError('CONFLICT', `${at.label}${e.message}`, { field });
  }
}

function checkAsid(work: WorkingTables, asid: number, at: At): void {
  const bad = work.spaces.checkAsid(asid);
  if (bad) throw violationError(bad, at);
}

function checkMemory(memory: MemoryLookup, r: Region, at: At): void {
  const size = memory.sizeOf(r.memory);
  if (size === undefined) {
    throw new ServiceError('NOT_FOUND', `${at.label}memory ${JSON.stringify(r.memory)} is not registered`, {
      field: fieldAt(at, 'memory'),
    });
  }
  if (r.offset < 0n || r.offset >= size) {
    throw new ServiceError(
      'INVALID_ARGUMENT',
      `${at.label}offset ${hex(r.offset)} is outside memory ${r.memory} (size ${hex(size)})`,
      { field: fieldAt(at, 'offset') },
    );
  }
  if (r.offset + r.size > size) {
    throw new ServiceError(
      'INVALID_ARGUMENT',
      `${at.label}offset ${hex(r.offset)} + size ${hex(r.size)} runs past the end of memory ${r.memory} (size ${hex(size)})`,
      { field: fieldAt(at, 'size') },
    );
  }
}

function applyMap(work: WorkingTables, memory: MemoryLookup, spec: MapSpec, at: At): MapResult {
  checkAsid(work, spec.asid, at);
  const region: Region = {
    iova: spec.iova,
    size: spec.size,
    memory: spec.memory,
    offset: spec.offset,
    perm: spec.perm,
  };
  const shape = checkRegionShape(region, work.spaces.range, work.spaces.pinPageSize);
  if (shape) throw violationError(shape, at);
  checkMemory(memory, region, at);
  const op: IotlbOp = { type: 'update', asid: spec.asid, ...region };
  const clash = work.spaces.check(op);
  if (clash) throw violationError(clash, at);
  work.apply(op);
  return { mapping: { asid: spec.asid, ...region }, ops: [op] };
}

/** In time slices, as everything here that walks a whole table (of up to 65,536 entries). */
function withAsid(regions: readonly Region[], asid: number): Promise<Mapping[]> {
  return mapInTimeSlices(regions, (r) => ({ asid, ...r }));
}

function applyPlan(work: WorkingTables, plan: Plan): Promise<void> {
  return forEachInTimeSlices(plan.ops, (op) => {
    work.apply(op);
  });
}

async function applyUnmap(work: WorkingTables, spec: UnmapSpec, at: At): Promise<UnmapResult> {
  checkAsid(work, spec.asid, at);
  let plan: Plan;
  try {
    plan = planUnmap(work.spaces.table(spec.asid), spec.iova, spec.size, spec.exact ?? false);
  } catch (e) {
    throw planError(e, at);
  }
  // exact asks for precisely the mappings in the range: none there is as wrong as a partial one.
  if (spec.exact && plan.invalidated.length === 0) {
    throw new ServiceError(
      'NOT_FOUND',
      `${at.label}no mapping in ${describeRange(spec.iova, spec.size)} of address space ${spec.asid} and exact was requested`,
      { field: fieldAt(at, 'iova') },
    );
  }
  await applyPlan(work, plan);
  return {
    removed: await withAsid(plan.invalidated, spec.asid),
    remapped: await withAsid(plan.mapped, spec.asid),
    ops: plan.ops,
  };
}

/** Validates a whole target table and applies the plan that gets there (same planner as reconcile). */
export async function applySetMemTable(
  work: WorkingTables,
  memory: MemoryLookup,
  asid: number,
  regions: readonly Region[],
): Promise<SetMemTableResult> {
  checkAsid(work, asid, TOP);
  let target: Region[];
  try {
    target = await validateTargetInSlices(regions, work.spaces.range, work.spaces.pinPageSize);
  } catch (e) {
    throw planError(e, TOP);
  }
  await forEachInTimeSlices(regions, (r, i) => {
    checkMemory(memory, r, atRegion(i));
  });
  const plan = await diffSortedInSlices([...work.spaces.table(asid).entries()], target, asid);
  await applyPlan(work, plan);
  return {
    dryRun: false,
    ops: plan.ops,
    invalidated: await withAsid(plan.invalidated, asid),
    mapped: await withAsid(plan.mapped, asid),
    unchanged: plan.unchanged,
  };
}

async function applyBatchOp(
  work: WorkingTables,
  memory: MemoryLookup,
  op: BatchOp,
  at: At,
): Promise<IotlbOp[]> {
  // The transports' parse (src/api/parse.ts) is where `op` is checked; a BatchOp is one or the other.
  return op.op === 'map' ? applyMap(work, memory, op, at).ops : (await applyUnmap(work, op, at)).ops;
}

/** The request field of the unit that asked for `op`, an UPDATE (for an error naming it). */
function fieldOfUpdate(request: WriteRequest, index: number, plan: StepPlan, opIndex: number): string {
  switch (request.kind) {
    case 'map':
      return 'memory';
    case 'unmap':
      return 'iova';
    case 'setMemTable': {
      const op = plan.ops[opIndex]!;
      const i = request.regions.findIndex(
        (r) => op.type === 'update' && r.iova === op.iova && r.memory === op.memory,
      );
      return i < 0 ? 'regions' : `regions[${i}].memory`;
    }
    case 'batch': {
      const i = request.atomic ? batchOpAt(plan.opStarts ?? [], opIndex) : index;
      return `ops[${i}].${request.ops[i]?.op === 'map' ? 'memory' : 'iova'}`;
    }
  }
}

/**
 * Every UPDATE a unit sends must be into memory the agent holds: one whose file cannot be opened
 * again is refused by name (mappings already in it stay desired; unmapping them needs no memory).
 */
async function checkAvailable(
  memory: MemoryLookup,
  request: WriteRequest,
  index: number,
  plan: StepPlan,
): Promise<void> {
  if (memory.unavailable === undefined) return;
  await forEachInTimeSlices(plan.ops, (op, i) => {
    if (op.type !== 'update') return;
    const why = memory.unavailable!(op.memory);
    if (why === undefined) return;
    const field = fieldOfUpdate(request, index, plan, i);
    // An unmap asks for an UPDATE only to map again the rest of a mapping it covers in part.
    const split = field === 'iova' || field.endsWith('.iova');
    const hint = split ? ': unmapping part of one of its mappings maps the rest again; unmap it whole' : '';
    throw new ServiceError(
      'FAILED_PRECONDITION',
      `memory ${op.memory} is unavailable at the agent (${why})${hint}`,
      { field },
    );
  });
}

/**
 * Validates one unit and applies its ops to `work`: the whole request, or op `index` of a
 * non-atomic batch. Throws ServiceError with nothing left applied.
 */
export async function applyStep(
  work: WorkingTables,
  memory: MemoryLookup,
  request: WriteRequest,
  index: number,
): Promise<StepPlan> {
  const mark = work.mark();
  try {
    const plan = await planStep(work, memory, request, index);
    await checkAvailable(memory, request, index, plan);
    return plan;
  } catch (e) {
    work.rollback(mark);
    throw e;
  }
}

async function planStep(
  work: WorkingTables,
  memory: MemoryLookup,
  request: WriteRequest,
  index: number,
): Promise<StepPlan> {
  switch (request.kind) {
    case 'map': {
      const answer = applyMap(work, memory, request.spec, TOP);
      return { ops: answer.ops, answer };
    }
    case 'unmap': {
      const answer = await applyUnmap(work, request.spec, TOP);
      return { ops: answer.ops, answer };
    }
    case 'setMemTable': {
      const answer = await applySetMemTable(work, memory, request.asid, request.regions);
      return { ops: answer.ops, answer };
    }
    case 'batch': {
      if (!request.atomic) {
        const ops = await applyBatchOp(work, memory, request.ops[index]!, atOp(index));
        return { ops, answer: { ok: true, ops } };
      }
      const opStarts: number[] = [];
      const ops: IotlbOp[] = [];
      const results: BatchOpResult[] = [];
      for (const [i, op] of request.ops.entries()) {
        opStarts.push(ops.length);
        const own = await applyBatchOp(work, memory, op, atOp(i));
        ops.push(...own);
        results.push({ ok: true, ops: own });
      }
      return { ops, opStarts, answer: { atomic: true, committed: true, results } };
    }
  }
}

/** Atomic batch: the batch op that op `opIndex` of the unit's ops belongs to. */
export function batchOpAt(opStarts: readonly number[], opIndex: number): number {
  let found = 0;
  opStarts.forEach((start, i) => {
    if (start <= opIndex) found = i;
  });
  return found;
}

/** How many units a request is made of: one per op for a non-atomic batch, else one. */
export function stepCount(request: WriteRequest): number {
  return request.kind === 'batch' && !request.atomic ? request.ops.length : 1;
}
