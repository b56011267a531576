/**
 * The one routine that makes a device equal a table: read what the agent has mapped, plan the
 * difference per address space with the same planner as set-mem-table (diffSorted), and send the
 * plan as one apply(). Reconciliation uses it to put a device back to the desired state, and a group
 * uses it to put the device back to the working tables after the device refused an op mid-group.
 *
 * What the agent reports as mapped is its own record of the writes the kernel accepted (the kernel
 * has no way to read an IOTLB back), so the plan's per-op results are the proof that it took: the
 * table is not read again afterwards.
 */
import type { AgentOpResult } from '../agent/wire.ts';
import type { AgentPort } from '../core/agent-port.ts';
import { diffSorted } from '../iotlb/planner.ts';
import type { IotlbOp, Mapping, Region } from '../iotlb/types.ts';
import { type ApplyContext, applyAtAgent, expectSameAgent, notDone } from './agent-apply.ts';

const byIova = (a: Region, b: Region): number => (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0);

function byAsid(mappings: readonly Mapping[]): Map<number, Region[]> {
  const out = new Map<number, Region[]>();
  for (const { asid, ...region } of mappings) {
    const list = out.get(asid);
    if (list) list.push(region);
    else out.set(asid, [region]);
  }
  for (const list of out.values()) list.sort(byIova);
  return out;
}

/** Plans `actual` → `desired`; both may be in any order. */
export function planConverge(actual: readonly Mapping[], desired: readonly Mapping[]): IotlbOp[] {
  const have = byAsid(actual);
  const want = byAsid(desired);
  const asids = [...new Set([...have.keys(), ...want.keys()])].sort((a, b) => a - b);
  return asids.flatMap((asid) => diffSorted(have.get(asid) ?? [], want.get(asid) ?? [], asid).ops);
}

export interface ConvergeContext extends ApplyContext {
  port: Pick<AgentPort, 'apply' | 'listMapped'>;
}

export interface Converged {
  /** The plan that was sent (empty when the device already matched). */
  ops: IotlbOp[];
  /** One per op. */
  results: AgentOpResult[];
}

/**
 * Makes the device equal `wanted`. Throws NotDone when the outcome cannot be trusted (the agent
 * unreachable, or another agent than the one of `ctx.bootId`); a refused op is in `results`.
 */
export async function convergeAtAgent(ctx: ConvergeContext, wanted: readonly Mapping[]): Promise<Converged> {
  let snapshot: Awaited<ReturnType<AgentPort['listMapped']>>;
  try {
    snapshot = await ctx.port.listMapped(ctx.device);
  } catch (e) {
    throw notDone(ctx.device, `cannot read what the agent has mapped (${(e as Error).message})`);
  }
  expectSameAgent(ctx, snapshot.bootId);
  const ops = planConverge(snapshot.mappings, wanted);
  if (ops.length === 0) return { ops, results: [] };
  return { ops, results: await applyAtAgent(ctx, ops) };
}
