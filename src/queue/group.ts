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
import { forEachInTimeSlices } from '../sys/next-turn.ts';
import { applyAtAgent, describeOp, NotDone, notDone } from './agent-apply.ts';
import { convergeAtAgent } from './converge.ts';
import { type Quota, quotaError, usageOf } from './quota.ts';
import type { WriteEntry } from './types.ts';
import { applyStep, batchOpAt, type MemoryLookup, type StepPlan, stepCount } from './validate.ts';
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

async function validate(ctx: GroupContext, step: Step): Promise<void> {
  step.mark = ctx.work.mark();
  step.plan = undefined;
  step.error = undefined;
  step.refusedOp = undefined;
  const before = usageOf(ctx.work.spaces);
  try {
    step.plan = await applyStep(ctx.work, ctx.memory, step.entry.request, step.index);
    const { request } = step.entry;
    const field = request.kind === 'batch' && !request.atomic ? `ops[${step.index}]` : undefined;
    const over = quotaError(ctx.device, ctx.quota, before, usageOf(ctx.work.spaces), field);
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
  const steps: Step[] = entries.flatMap((entry) =>
    Array.from({ length: stepCount(entry.request) }, (_, index) => ({
      entry,
      index,
      mark: base,
      end: base,
      plan: undefined,
      error: undefined,
      refusedOp: undefined,
    })),
  );
  try {
    let from = 0;
    while (from < steps.length) {
      const round = steps.slice(from);
      const ops: IotlbOp[] = [];
      const owner: { step: number; op: number }[] = [];
      for (const [k, step] of round.entries()) {
        await validate(ctx, step);
        await forEachInTimeSlices(step.plan?.ops ?? [], (op, i) => {
          ops.push(op);
          owner.push({ step: from + k, op: i });
        });
      }
      if (ops.length === 0) break;
      const results = await applyAtAgent(ctx, ops);
      const first = results.findIndex((r) => !r.ok);
      if (first < 0) break;
      const at = owner[first]!;
      const failed = steps[at.step]!;
      ctx.work.rollback(failed.mark);
      failed.end = failed.mark;
      failed.refusedOp = at.op;
      failed.error = refusal(ctx, failed, at.op, results[first]!);
      await compensate(ctx);
      from = at.step + 1;
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
