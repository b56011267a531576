/**
 * Semantic validation of one request (or one op of a non-atomic batch) against the working tables,
 * with the precise error the kernel cannot give: each check names the request field at fault.
 * A valid request's ops are applied to the working tables at once, so the next request of the
 * group is checked against the state this one produces. On error nothing is left applied.
 */
import { diffSteps, type Plan, PlanError, planUnmap, validateTargetSteps } from '../iotlb/planner.ts';
import { checkRegionShape } from '../iotlb/table.ts';
import {
  describeRange,
  hex,
  IotlbError,
  type IotlbOp,
  type IotlbViolation,
  type Mapping,
  mappingOf,
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
import { runInTimeSlices } from '../sys/next-turn.ts';
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

/**
 * Where an error is: the request field prefix (`ops[2]`) and a message prefix (`ops[2]: `), made
 * only when an error needs them (a batch checks thousands of ops that are fine).
 */
class At {
  constructor(
    private readonly list: 'ops' | 'regions' | undefined,
    private readonly index = 0,
  ) {}

  get prefix(): string {
    return this.list === undefined ? '' : `${this.list}[${this.index}]`;
  }

  get label(): string {
    return this.list === undefined ? '' : `${this.prefix}: `;
  }
}

const TOP = new At(undefined);
const atOp = (i: number): At => new At('ops', i);
const atRegion = (i: number): At => new At('regions', i);
const fieldAt = (at: At, field: string): string => {
  const prefix = at.prefix;
  return prefix ? `${prefix}.${field}` : field;
};

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

type Update = Extract<IotlbOp, { type: 'update' }>;

/** Checks a map and applies its one UPDATE; returns it. */
function mapOp(work: WorkingTables, memory: MemoryLookup, spec: MapSpec, at: At): Update {
  checkAsid(work, spec.asid, at);
  const op: Update = {
    type: 'update',
    asid: spec.asid,
    iova: spec.iova,
    size: spec.size,
    memory: spec.memory,
    offset: spec.offset,
    perm: spec.perm,
  };
  const shape = checkRegionShape(op, work.spaces.range, work.spaces.pinPageSize);
  if (shape) throw violationError(shape, at);
  checkMemory(memory, op, at);
  // The table checks the UPDATE as it applies it (IovaTable.map): an overlap is refused there.
  try {
    work.apply(op);
  } catch (e) {
    throw e instanceof IotlbError ? violationError(e.violation, at) : e;
  }
  return op;
}

function applyMap(work: WorkingTables, memory: MemoryLookup, spec: MapSpec, at: At): MapResult {
  const op = mapOp(work, memory, spec, at);
  return { mapping: mappingOf(op.asid, op), ops: [op] };
}

/**
 * Items between two points where a sliced run may pause. The steps below nest deep (a group, its
 * unit, the unit's plan), so a unit of a few ops must not pause at all: each pause passes through
 * every level.
 */
const PAUSE_EVERY = 64;
const pauseAt = (i: number): boolean => i % PAUSE_EVERY === PAUSE_EVERY - 1;

/** The regions as mappings of `asid` (a table has up to 65,536). */
function* withAsid(regions: readonly Region[], asid: number): Generator<void, Mapping[]> {
  const out: Mapping[] = new Array(regions.length);
  for (let i = 0; i < regions.length; i++) {
    out[i] = mappingOf(asid, regions[i]!);
    if (pauseAt(i)) yield;
  }
  return out;
}

function* applyPlan(work: WorkingTables, plan: Plan): Generator<void, void> {
  for (let i = 0; i < plan.ops.length; i++) {
    work.apply(plan.ops[i]!);
    if (pauseAt(i)) yield;
  }
}

/** Checks an unmap and applies its plan; returns the plan. */
function* unmapPlan(work: WorkingTables, spec: UnmapSpec, at: At): Generator<void, Plan> {
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
  yield* applyPlan(work, plan);
  return plan;
}

function* applyUnmap(work: WorkingTables, spec: UnmapSpec, at: At): Generator<void, UnmapResult> {
  const plan = yield* unmapPlan(work, spec, at);
  return {
    removed: yield* withAsid(plan.invalidated, spec.asid),
    remapped: yield* withAsid(plan.mapped, spec.asid),
    ops: plan.ops,
  };
}

/** Validates a whole target table and applies the plan that gets there (same planner as reconcile). */
function* setMemTableSteps(
  work: WorkingTables,
  memory: MemoryLookup,
  asid: number,
  regions: readonly Region[],
): Generator<void, SetMemTableResult> {
  checkAsid(work, asid, TOP);
  let target: Region[];
  try {
    target = yield* validateTargetSteps(regions, work.spaces.range, work.spaces.pinPageSize);
  } catch (e) {
    throw planError(e, TOP);
  }
  for (let i = 0; i < regions.length; i++) {
    checkMemory(memory, regions[i]!, atRegion(i));
    if (pauseAt(i)) yield;
  }
  const plan = yield* diffSteps(yield* work.spaces.table(asid).entriesInSteps(), target, asid);
  yield* applyPlan(work, plan);
  return {
    dryRun: false,
    ops: plan.ops,
    invalidated: yield* withAsid(plan.invalidated, asid),
    mapped: yield* withAsid(plan.mapped, asid),
    unchanged: plan.unchanged,
  };
}

/** {@link setMemTableSteps} on its own, in time slices (a dry run's copy of the tables). */
export function applySetMemTable(
  work: WorkingTables,
  memory: MemoryLookup,
  asid: number,
  regions: readonly Region[],
): Promise<SetMemTableResult> {
  return runInTimeSlices(setMemTableSteps(work, memory, asid, regions));
}

function* applyBatchOp(
  work: WorkingTables,
  memory: MemoryLookup,
  op: BatchOp,
  at: At,
): Generator<void, IotlbOp[]> {
  // The transports' parse (src/api/parse.ts) is where `op` is checked; a BatchOp is one or the other.
  if (op.op === 'map') return [mapOp(work, memory, op, at)];
  return (yield* unmapPlan(work, op, at)).ops;
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
function* checkAvailable(
  memory: MemoryLookup,
  request: WriteRequest,
  index: number,
  plan: StepPlan,
): Generator<void, void> {
  if (memory.unavailable === undefined) return;
  for (let i = 0; i < plan.ops.length; i++) {
    const op = plan.ops[i]!;
    if (pauseAt(i)) yield;
    if (op.type !== 'update') continue;
    const why = memory.unavailable!(op.memory);
    if (why === undefined) continue;
    const field = fieldOfUpdate(request, index, plan, i);
    // An unmap asks for an UPDATE only to map again the rest of a mapping it covers in part.
    const split = field === 'iova' || field.endsWith('.iova');
    const hint = split ? ': unmapping part of one of its mappings maps the rest again; unmap it whole' : '';
    throw new ServiceError(
      'FAILED_PRECONDITION',
      `memory ${op.memory} is unavailable at the agent (${why})${hint}`,
      { field },
    );
  }
}

/**
 * Validates one unit and applies its ops to `work`: the whole request, or op `index` of a
 * non-atomic batch. Throws ServiceError with nothing left applied. In time slices.
 */
export function applyStep(
  work: WorkingTables,
  memory: MemoryLookup,
  request: WriteRequest,
  index: number,
): Promise<StepPlan> {
  return runInTimeSlices(stepSteps(work, memory, request, index));
}

/** {@link applyStep} as steps, for a caller that runs it inside its own sliced computation (a group). */
export function* stepSteps(
  work: WorkingTables,
  memory: MemoryLookup,
  request: WriteRequest,
  index: number,
): Generator<void, StepPlan> {
  const mark = work.mark();
  try {
    const plan = yield* planStep(work, memory, request, index);
    yield* checkAvailable(memory, request, index, plan);
    return plan;
  } catch (e) {
    work.rollback(mark);
    throw e;
  }
}

function* planStep(
  work: WorkingTables,
  memory: MemoryLookup,
  request: WriteRequest,
  index: number,
): Generator<void, StepPlan> {
  switch (request.kind) {
    case 'map': {
      const answer = applyMap(work, memory, request.spec, TOP);
      return { ops: answer.ops, answer };
    }
    case 'unmap': {
      const answer = yield* applyUnmap(work, request.spec, TOP);
      return { ops: answer.ops, answer };
    }
    case 'setMemTable': {
      const answer = yield* setMemTableSteps(work, memory, request.asid, request.regions);
      return { ops: answer.ops, answer };
    }
    case 'batch': {
      if (!request.atomic) {
        const ops = yield* applyBatchOp(work, memory, request.ops[index]!, atOp(index));
        return { ops, answer: { ok: true, ops } };
      }
      const opStarts: number[] = new Array(request.ops.length);
      const ops: IotlbOp[] = [];
      const results: BatchOpResult[] = new Array(request.ops.length);
      for (let i = 0; i < request.ops.length; i++) {
        opStarts[i] = ops.length;
        const own = yield* applyBatchOp(work, memory, request.ops[i]!, atOp(i));
        for (const op of own) ops.push(op);
        results[i] = { ok: true, ops: own };
        if (pauseAt(i)) yield;
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
