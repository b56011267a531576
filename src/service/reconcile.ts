/**
 * Reconciliation of one device: check the desired state against the device's rules, leave off the
 * mappings of memory the agent cannot open, and make the device equal the rest with the converge
 * routine (queue/converge.ts, the same one a group uses to put a device back). Runs inside the
 * device's queue (no group is at the agent meanwhile), before the device takes writes again.
 */
import type { AgentPort } from '../core/agent-port.ts';
import { ServiceError } from '../core/errors.ts';
import { type DeviceFacts, pinPageSize } from '../device/types.ts';
import { AddressSpaces } from '../iotlb/address-spaces.ts';
import type { Mapping } from '../iotlb/types.ts';
import type { Metrics } from '../metrics/metrics.ts';
import { describeOp, NotDone } from '../queue/agent-apply.ts';
import { convergeAtAgent } from '../queue/converge.ts';
import { nextTurn } from '../sys/next-turn.ts';

export interface ReconcileInput {
  port: Pick<AgentPort, 'apply' | 'listMapped'>;
  facts: DeviceFacts;
  /** The desired mappings of the device. */
  desired: readonly Mapping[];
  /** The agent to reconcile with: an answer from another one means it restarted meanwhile. */
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

/** The desired state as the device's tables; FAILED_PRECONDITION when a mapping no longer fits. */
function desiredTables(facts: DeviceFacts, desired: readonly Mapping[]): AddressSpaces {
  const tables = new AddressSpaces(facts.asNum, facts.iovaRange, pinPageSize(facts));
  for (const m of desired) {
    const op = { type: 'update' as const, ...m };
    const bad = tables.check(op);
    if (bad) {
      throw new ServiceError(
        'FAILED_PRECONDITION',
        `a desired mapping no longer fits ${facts.name}: ${bad.message}`,
        { errno: bad.errno },
      );
    }
    tables.apply(op);
  }
  return tables;
}

export async function reconcileDevice(input: ReconcileInput): Promise<Reconciled> {
  const { facts, desired } = input;
  const device = facts.name;
  // What the agent has mapped is asked first, and read by the converge routine: the agent lists it
  // while the desired tables are checked here (a refused check leaves the answer unread).
  const mapped = input.port.listMapped(device);
  mapped.catch(() => undefined);
  await nextTurn(); // the request is on its way before the check holds the event loop
  const tables = desiredTables(facts, desired);

  const missing = new Map<string, string>();
  const restorable = desired.filter((m) => {
    const why = missing.get(m.memory) ?? input.unavailable?.(m.memory);
    if (why === undefined) return true;
    missing.set(m.memory, why);
    return false;
  });

  let converged: Awaited<ReturnType<typeof convergeAtAgent>>;
  try {
    const port = { apply: input.port.apply.bind(input.port), listMapped: () => mapped };
    converged = await convergeAtAgent(
      { device, port, bootId: input.bootId, metrics: input.metrics },
      restorable,
    );
  } catch (e) {
    throw e instanceof NotDone ? e.error : e;
  }
  const { ops, results } = converged;
  const i = results.findIndex((r) => !r.ok);
  const r = results[i];
  if (r && !r.ok) {
    throw new ServiceError('DEVICE_ERROR', `${device} refused ${describeOp(ops[i]!)}: ${r.message}`, {
      errno: r.errno,
    });
  }
  return { tables, ops: ops.length, missing };
}
