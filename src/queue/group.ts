/**
 * The device work of one group: validate every unit in order against the working tables, send the
 * valid ops of the whole group as ONE apply() (one BATCH_BEGIN/END per address space at the
 * device), and map the per-op results back to the units.
 *
 * A unit is a request, or one op of a non-atomic batch; its ops are all or nothing. When the
 * device refuses an op, the units before the refusing unit stand; the refusing unit fails with
 * DEVICE_ERROR; the device is put back to the working tables as they were before that unit (the
 * converge routine, converge.ts: this also takes back the units after it, which the same apply()
 * carried); and the units after it are validated and applied again. Every round settles at least
 * one unit, so the loop ends.
 *
 * Anything that leaves the device's state unknown (the agent unreachable or restarted, a failed
 * compensation) takes back the whole group from the working tables and returns it as not done:
 * nothing of it was acknowledged, and reconciliation puts the device back to the desired state.
 */
import type { AgentOpResult } from '../agent/wire.ts';
import type { IotlbOp, Mapping } from '../iotlb/types.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { AgentPort } from '../core/agent-port.ts';
import { ServiceError } from '../core/errors.ts';
import { runInTimeSlices } from '../sys/next-turn.ts';
import { applyAtAgent, describeOp, NotDone, notDone } from './agent-apply.ts';
import { convergeAtAgent } from './converge.ts';
import { type Quota, quotaError, usageOf } from './quota.ts';
import type { WriteEntry } from './types.ts';
import { batchOpAt, type MemoryLookup, type StepPlan, stepCount, stepSteps } from './validate.ts';
import type { WorkingTables } from './working.ts';

export interface GroupContext {
  device: string;
  port: Pick<AgentPort, 'apply' | 'listMapped'>;
  memory: MemoryLookup;
  work: WorkingTables;
  /** The agent the device was reconciled with: an answer from another one means a restart. */
  bootId: string;
  metrics: Metrics;
  quota: Quota;
  /** Whether the device holds a desired mapping (false for one left off: its memory is unavailable). */
  held?: (m: Mapping) => boolean;
}

export interface Step {
  entry: WriteEntry;
  /** Op index of a non-atomic batch; 0 otherwise. */
  index: number;
  /** Working-table marks around this unit's ops. */
  mark: number;
  end: number;
  /** Where this unit's ops start in the ops its round sent. */
  opsAt: number;
  /** Set when validation passed (kept when the device then refused an op). */
  plan: StepPlan | undefined;
  error: ServiceError | undefined;
  /** Index in `plan.ops` of the op the device refused. */
  refusedOp: number | undefined;
}

export type GroupRun = { done: true; base: number; steps: Step[] } | { done: false; error: ServiceError };

/** Puts the device back to the working tables (after it refused an op mid-group). */
async function compensate(ctx: GroupContext): Promise<void> {
  const held = ctx.held;
  const wanted = ctx.work.spaces.mappings();
  const { results } = await convergeAtAgent(ctx, held ? wanted.filter(held) : wanted);
  const refused = results.find((r) => !r.ok);
  if (refused && !refused.ok) {
    throw notDone(ctx.device, `cannot put the device back after a refused op (${refused.message})`);
  }
}

/** The batch op a refused op belongs to, or undefined when the request is not a batch. */
function batchOpOf(step: Step, opIndex: number): number | undefined {
  const { request } = step.entry;
  if (request.kind !== 'batch') return undefined;
  return request.atomic ? batchOpAt(step.plan?.opStarts ?? [], opIndex) : step.index;
}

function refusal(ctx: GroupContext, step: Step, opIndex: number, r: AgentOpResult): ServiceError {
  const op = step.plan!.ops[opIndex]!;
  const batchOp = batchOpOf(step, opIndex);
  const label = batchOp === undefined ? '' : `ops[${batchOp}]: `;
  const message = r.ok ? 'refused' : r.message;
  return new ServiceError(
    'DEVICE_ERROR',
    `${label}device ${ctx.device} refused ${describeOp(op)}: ${message}`,
    {
      ...(r.ok ? {} : { errno: r.errno }),
      ...(batchOp === undefined ? {} : { field: `ops[${batchOp}]` }),
    },
  );
}

/** Whether the quota limits anything (if not, usage need not be taken around every unit). */
function limits(quota: Quota): boolean {
  return quota.maxBytes !== undefined || quota.maxEntries !== undefined;
}

/** The request field a unit's quota refusal names: its op of a non-atomic batch, else none. */
function fieldOf(step: Step): string | undefined {
  const { request } = step.entry;
  return request.kind === 'batch' && !request.atomic ? `ops[${step.index}]` : undefined;
}

function* validate(ctx: GroupContext, step: Step): Generator<void, void> {
  step.mark = ctx.work.mark();
  step.plan = undefined;
  step.error = undefined;
  step.refusedOp = undefined;
  const before = limits(ctx.quota) ? usageOf(ctx.work.spaces) : undefined;
  try {
    step.plan = yield* stepSteps(ctx.work, ctx.memory, step.entry.request, step.index);
    const over = before && quotaError(ctx.device, ctx.quota, before, usageOf(ctx.work.spaces), fieldOf(step));
    if (over) {
      step.plan = undefined;
      ctx.work.rollback(step.mark);
      throw over;
    }
  } catch (e) {
    step.error =
      e instanceof ServiceError
        ? e
        : new ServiceError('INTERNAL', `validation failed: ${(e as Error).message}`);
  }
  step.end = ctx.work.mark();
}

/**
 * Validates `steps[from..]` in order (each against what the ones before it left) and gathers the
 * valid ones' ops: each step's ops start at its `opsAt` in them.
 */
function* validateRound(ctx: GroupContext, steps: readonly Step[], from: number): Generator<void, IotlbOp[]> {
  const ops: IotlbOp[] = [];
  for (let k = from; k < steps.length; k++) {
    const step = steps[k]!;
    yield* validate(ctx, step);
    step.opsAt = ops.length;
    const own = step.plan?.ops ?? [];
    for (let i = 0; i < own.length; i++) {
      ops.push(own[i]!);
      if (i % 64 === 63) yield;
    }
    yield;
  }
  return ops;
}

/** The step of `steps[from..]` that op `opIndex` of the round's ops belongs to. */
function ownerOf(steps: readonly Step[], from: number, opIndex: number): number {
  for (let k = from; k < steps.length; k++) {
    const { opsAt, plan } = steps[k]!;
    if (plan !== undefined && opsAt <= opIndex && opIndex < opsAt + plan.ops.length) return k;
  }
  throw new Error(`no unit sent op ${opIndex}`);
}

function countRefusals(ctx: GroupContext, steps: Step[]): void {
  for (const s of steps) {
    if (s.error === undefined || s.refusedOp !== undefined) continue;
    const { request } = s.entry;
    const unmap =
      request.kind === 'unmap' ||
      (request.kind === 'batch' && !request.atomic && request.ops[s.index]?.op === 'unmap');
    ctx.metrics.ops.inc({
      type: unmap ? 'invalidate' : 'update',
      result: 'refused',
      errno: s.error.errno ?? '',
    });
  }
}

export async function runGroup(ctx: GroupContext, entries: readonly WriteEntry[]): Promise<GroupRun> {
  const base = ctx.work.mark();
  const steps: Step[] = [];
  for (const entry of entries) {
    const count = stepCount(entry.request);
    for (let index = 0; index < count; index++) {
      steps.push({
        entry,
        index,
        mark: base,
        end: base,
        opsAt: 0,
        plan: undefined,
        error: undefined,
        refusedOp: undefined,
      });
    }
  }
  try {
    let from = 0;
    while (from < steps.length) {
      const ops = await runInTimeSlices(validateRound(ctx, steps, from));
      if (ops.length === 0) break;
      const results = await applyAtAgent(ctx, ops);
      const first = results.findIndex((r) => !r.ok);
      if (first < 0) break;
      const at = ownerOf(steps, from, first);
      const failed = steps[at]!;
      const refusedOp = first - failed.opsAt;
      ctx.work.rollback(failed.mark);
      failed.end = failed.mark;
      failed.refusedOp = refusedOp;
      failed.error = refusal(ctx, failed, refusedOp, results[first]!);
      await compensate(ctx);
      from = at + 1;
    }
  } catch (e) {
    ctx.work.rollback(base);
    if (e instanceof NotDone) return { done: false, error: e.error };
    return {
      done: false,
      error: new ServiceError('INTERNAL', `device ${ctx.device}: ${(e as Error).message}`),
    };
  }
  countRefusals(ctx, steps);
  return { done: true, base, steps };
}
