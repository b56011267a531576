/**
 * Reconciliation of one device: make what the agent has mapped equal the desired state, with the
 * same planner as set-mem-table (diffSorted per address space), then read it back to verify.
 * Runs on start and whenever the agent comes back or restarted, inside the device's queue (no
 * group is at the agent meanwhile), before the device takes writes again.
 */
import { type DeviceFacts, pinPageSize } from '../device/types.ts';
import { AddressSpaces } from '../iotlb/address-spaces.ts';
import type { Mapping } from '../iotlb/types.ts';
import type { Metrics } from '../metrics/metrics.ts';
import { applyAtAgent, describeOp, NotDone } from '../queue/agent-apply.ts';
import { planConverge } from '../queue/converge.ts';
import type { AgentPort } from '../core/agent-port.ts';
import { fromAgentError } from '../core/agent-errors.ts';
import { ServiceError } from '../core/errors.ts';

export interface ReconcileInput {
  port: Pick<AgentPort, 'apply' | 'listMapped'>;
  facts: DeviceFacts;
  /** The desired mappings of the device. */
  desired: readonly Mapping[];
  bootId: string;
  metrics: Metrics;
  /** Why a memory cannot be mapped now (the agent does not hold it), if it cannot. */
  unavailable?: (memory: string) => string | undefined;
}

export interface Reconciled {
  /** The desired tables, checked against the device's rules: the queue's working tables from now. */
  tables: AddressSpaces;
  /** Ops it took. */
  ops: number;
  /** Memories whose desired mappings were left off the device, with why. */
  missing: Map<string, string>;
}

async function mapped(input: ReconcileInput): Promise<Mapping[]> {
  const device = input.facts.name;
  let snapshot: Awaited<ReturnType<AgentPort['listMapped']>>;
  try {
    snapshot = await input.port.listMapped(device);
  } catch (e) {
    throw fromAgentError(e, `reading the mappings of ${device}`);
  }
  if (snapshot.bootId !== input.bootId)
    throw new ServiceError('UNAVAILABLE', 'the agent restarted meanwhile');
  return snapshot.mappings;
}

export async function reconcileDevice(input: ReconcileInput): Promise<Reconciled> {
  const { facts, desired } = input;
  const device = facts.name;
  const tables = new AddressSpaces(facts.asNum, facts.iovaRange, pinPageSize(facts));
  for (const m of desired) {
    const op = { type: 'update' as const, ...m };
    const bad = tables.check(op);
    if (bad) {
      throw new ServiceError(
        'FAILED_PRECONDITION',
        `a desired mapping no longer fits ${device}: ${bad.message}`,
        {
          errno: bad.errno,
        },
      );
    }
    tables.apply(op);
  }

  const missing = new Map<string, string>();
  const restorable = desired.filter((m) => {
    const why = missing.get(m.memory) ?? input.unavailable?.(m.memory);
    if (why === undefined) return true;
    missing.set(m.memory, why);
    return false;
  });

  const ops = planConverge(await mapped(input), restorable);
  if (ops.length > 0) {
    let results: Awaited<ReturnType<typeof applyAtAgent>>;
    try {
      results = await applyAtAgent(
        { device, port: input.port, bootId: input.bootId, metrics: input.metrics },
        ops,
      );
    } catch (e) {
      throw e instanceof NotDone ? e.error : e;
    }
    const i = results.findIndex((r) => !r.ok);
    const r = results[i];
    if (r && !r.ok) {
      throw new ServiceError('DEVICE_ERROR', `${device} refused ${describeOp(ops[i]!)}: ${r.message}`, {
        errno: r.errno,
      });
    }
  }
  const left = planConverge(await mapped(input), restorable);
  if (left.length > 0) {
    throw new ServiceError(
      'INTERNAL',
      `${device} still differs from the desired state by ${left.length} op(s)`,
    );
  }
  return { tables, ops: ops.length, missing };
}
