/**
 * One pass after the agent answered: take its device listing, make its memory agree with the
 * desired memory, then reconcile every device it reports that is not ready with this agent (never
 * reconciled, reconciled with an agent of another boot id, or missing memory that is back).
 */
import type { AgentInfo } from '../agent/wire.ts';
import { fromAgentError } from '../core/agent-errors.ts';
import type { AgentPort } from '../core/agent-port.ts';
import type { CoreLogger } from '../core/logger.ts';
import type { Metrics } from '../metrics/metrics.ts';
import type { MissingMappings } from '../queue/device-queue.ts';
import { sortedMappings } from '../state/desired.ts';
import type { StateStore } from '../state/store.ts';
import type { DeviceRegistry, Slot } from './devices.ts';
import { type MemoryCatalog, memoryRemedy } from './memory.ts';
import { reconcileDevice } from './reconcile.ts';

export class AgentPass {
  constructor(
    private readonly devices: DeviceRegistry,
    private readonly store: StateStore,
    private readonly memory: MemoryCatalog,
    private readonly port: AgentPort,
    private readonly metrics: Metrics,
    private readonly logger: CoreLogger | undefined,
  ) {}

  /** True when every device is ready and every desired memory is open at the agent. */
  async run(info: AgentInfo): Promise<boolean> {
    // The device listing and the memory do not depend on each other: both are asked at once.
    const listing = this.port.listDevices().then(
      (facts) => this.devices.takeListing(facts),
      (e: unknown) => {
        throw fromAgentError(e, 'listing devices');
      },
    );
    const memory = this.memory.syncWithAgent().catch((e: unknown) => {
      throw fromAgentError(e, 'listing memory');
    });
    await Promise.all([listing, memory]);
    const slots = this.devices.present();
    const results = await Promise.all(slots.map((s) => this.reconcileSlot(s, info.bootId)));
    const notReady = slots.filter((_s, i) => !results[i]).map((s) => s.name);
    const summary = { bootId: info.bootId, devices: slots.length, ready: slots.length - notReady.length };
    if (notReady.length === 0) this.logger?.info(summary, 'agent link reconciled');
    else this.logger?.warn({ ...summary, notReady }, 'agent link reconciled in part');
    // While some memory is unavailable, passes go on (with backoff) to try it again.
    return results.every(Boolean) && !this.memory.degraded;
  }

  private reconcileSlot(slot: Slot, bootId: string): Promise<boolean> {
    return slot.queue.exclusive(async () => {
      const { queue } = slot;
      const back = queue.missingMemories.filter((id) => this.memory.unavailable(id) === undefined);
      if (queue.ready && queue.reconciledWith === bootId && back.length === 0) return true;
      const before = queue.missing();
      queue.setNotReady('it is being reconciled with the agent');
      try {
        const desired = sortedMappings(this.store.state.devices.get(slot.name));
        const { tables, ops, missing } = await reconcileDevice({
          port: this.port,
          facts: slot.facts!,
          desired,
          bootId,
          metrics: this.metrics,
          unavailable: (id) => this.memory.unavailable(id),
        });
        queue.setReady(tables, bootId, missing);
        this.logMissing(slot.name, before, queue.missing());
        this.metrics.reconciliations.inc({ result: 'ok' });
        this.metrics.mappedBytes.set({ device: slot.name }, Number(tables.bytes));
        this.metrics.mappedEntries.set({ device: slot.name }, tables.count);
        this.logger?.info({ device: slot.name, ops, entries: tables.count }, 'device reconciled');
        return true;
      } catch (e) {
        const err = fromAgentError(e, 'reconciling');
        slot.queue.setNotReady(`reconciliation failed: ${err.message}`);
        this.metrics.reconciliations.inc({ result: 'failed' });
        this.logger?.warn({ device: slot.name, err: err.message }, 'reconciliation failed');
        return false;
      }
    });
  }

  /** Says once per change which memories' mappings a device lacks, and when they are back. */
  private logMissing(device: string, before: MissingMappings[], after: MissingMappings[]): void {
    const now = new Map(after.map((m) => [m.memory, m]));
    for (const m of after) {
      const was = before.find((b) => b.memory === m.memory);
      if (was && was.reason === m.reason && was.mappings === m.mappings) continue;
      const path = this.store.state.memory.get(m.memory)?.path ?? '(unknown path)';
      this.logger?.warn(
        {
          device,
          memory: m.memory,
          mappings: m.mappings,
          err: m.reason,
          remedy: memoryRemedy(m.memory, path),
        },
        'device degraded: mappings of an unavailable memory are not restored',
      );
    }
    for (const m of before) {
      if (!now.has(m.memory)) {
        this.logger?.info({ device, memory: m.memory, mappings: m.mappings }, 'mappings restored');
      }
    }
  }
}
