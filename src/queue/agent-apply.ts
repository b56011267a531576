/** One apply() at the agent, checked (same agent, one result per op) and measured. */
import type { AgentOpResult } from '../agent/wire.ts';
import { describeRange, type IotlbOp } from '../iotlb/types.ts';
import { type Metrics, observeTimes } from '../metrics/metrics.ts';
import type { AgentPort } from '../core/agent-port.ts';
import { ERROR_CATALOG, ServiceError } from '../core/errors.ts';
import { forEachInTimeSlices } from '../sys/next-turn.ts';

/** How long callers are told to wait after a change could not be done. */
export const NOT_DONE_RETRY_AFTER_MS = ERROR_CATALOG.UNAVAILABLE.retryAfterMs;

/** The device's state is unknown (agent gone or restarted, ...): nothing may be acknowledged. */
export class NotDone extends Error {
  constructor(readonly error: ServiceError) {
    super(error.message);
  }
}

export function notDone(device: string, why: string): NotDone {
  return new NotDone(
    new ServiceError('UNAVAILABLE', `device ${device}: ${why}; nothing was changed, retry later`, {
      retryAfterMs: NOT_DONE_RETRY_AFTER_MS,
    }),
  );
}

export function describeOp(op: IotlbOp): string {
  const kind = op.type === 'update' ? 'UPDATE' : 'INVALIDATE';
  return `${kind} asid ${op.asid} ${describeRange(op.iova, op.size)}`;
}

export interface ApplyContext {
  device: string;
  port: Pick<AgentPort, 'apply'>;
  /** The agent the device was reconciled with: an answer from another one means a restart. */
  bootId: string;
  metrics: Metrics;
}

/**
 * The restart check, made on every answer that says which agent gave it: an agent other than the
 * one the device was reconciled with started empty (the kernel dropped every mapping with the old
 * agent's fds, vhost_vdpa_release), so nothing that answer says about the device may be trusted.
 */
export function expectSameAgent(ctx: Pick<ApplyContext, 'device' | 'bootId'>, bootId: string): void {
  if (bootId !== ctx.bootId) throw notDone(ctx.device, 'the agent restarted');
}

/** Sends `ops` as one apply(); throws NotDone when the outcome cannot be trusted. */
export async function applyAtAgent(ctx: ApplyContext, ops: readonly IotlbOp[]): Promise<AgentOpResult[]> {
  const started = process.hrtime.bigint();
  let res: Awaited<ReturnType<AgentPort['apply']>>;
  try {
    res = await ctx.port.apply(ctx.device, ops);
  } catch (e) {
    throw notDone(ctx.device, `the agent did not apply the ops (${(e as Error).message})`);
  }
  expectSameAgent(ctx, res.bootId);
  if (res.results.length !== ops.length) {
    throw notDone(ctx.device, `the agent answered ${res.results.length} results for ${ops.length} ops`);
  }
  await countOps(ctx, ops, res.results, Number(process.hrtime.bigint() - started) / 1e9 / ops.length);
  return res.results;
}

/**
 * The metrics of one apply(): the ops counted by outcome (one inc per outcome, not per op) and
 * each op's share of the round trip observed once per op (observeTimes: as many observations, for
 * the cost of one).
 */
async function countOps(
  { metrics, device }: ApplyContext,
  ops: readonly IotlbOp[],
  results: readonly AgentOpResult[],
  perOp: number,
): Promise<void> {
  metrics.batchOps.observe({ device }, ops.length);
  observeTimes(metrics.iotlbMessageWrite, { device }, perOp, ops.length);
  type Outcome = { labels: { type: string; result: string; errno: string }; n: number };
  const outcomes = new Map<string, Outcome>();
  // Ops come in runs of one outcome (all ok, mostly): the map is looked at when the outcome changes.
  let last: Outcome | undefined;
  await forEachInTimeSlices(ops, (op, i) => {
    const r = results[i]!;
    const result = r.ok ? 'ok' : 'device_error';
    const errno = r.ok ? '' : r.errno;
    if (last?.labels.type !== op.type || last.labels.result !== result || last.labels.errno !== errno) {
      const key = `${op.type} ${result} ${errno}`;
      last = outcomes.get(key);
      if (last === undefined) {
        last = { labels: { type: op.type, result, errno }, n: 0 };
        outcomes.set(key, last);
      }
    }
    last.n++;
  });
  for (const { labels, n } of outcomes.values()) metrics.ops.inc(labels, n);
}
