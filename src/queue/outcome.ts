/** The answer each request of a group gets from the outcome of its units. */
import type { SubmitFailure } from '../state/desired.ts';
import type { BatchOpResult, BatchResult } from '../core/types.ts';
import type { Step } from './group.ts';
import type { Outcome, WriteAnswer, WriteEntry } from './types.ts';
import { batchOpAt } from './validate.ts';

/** An atomic batch the device refused part of: the device was put back, nothing is committed. */
function rolledBack(step: Step): BatchResult {
  const plan = step.plan!;
  const starts = plan.opStarts ?? [];
  const error = step.error!;
  const refused = batchOpAt(starts, step.refusedOp!);
  const results = starts.map((start, i): BatchOpResult => {
    const ops = plan.ops.slice(start, starts[i + 1] ?? plan.ops.length);
    if (i === refused) return { ok: false, error: error.toInfo(), ops };
    const message = `rolled back: ops[${refused}] was refused by the device`;
    return { ok: false, error: { code: 'CONFLICT', message }, ops };
  });
  return { atomic: true, committed: false, results };
}

/** `steps` are the entry's own units, in order. */
export function outcomeOf(entry: WriteEntry, steps: readonly Step[]): Outcome {
  const { request } = entry;
  if (request.kind === 'batch' && !request.atomic) {
    const results = steps.map(
      (s): BatchOpResult =>
        s.error ? { ok: false, error: s.error.toInfo(), ops: [] } : (s.plan!.answer as BatchOpResult),
    );
    return { ok: true, answer: { atomic: false, committed: true, results } };
  }
  const step = steps[0]!;
  if (step.error === undefined) return { ok: true, answer: step.plan!.answer as WriteAnswer };
  if (request.kind === 'batch' && step.refusedOp !== undefined) return { ok: true, answer: rolledBack(step) };
  return { ok: false, error: step.error };
}

/** What flush reports for a submitted request: one failure per failed unit. */
export function failuresOf(entry: WriteEntry, steps: readonly Step[]): SubmitFailure[] {
  return steps.flatMap((s) => (s.error ? [{ sequence: entry.sequence, error: s.error.toInfo() }] : []));
}
