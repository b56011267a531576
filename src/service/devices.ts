/**
 * The devices the core knows: one slot per device (its queue, the agent's last facts and counters,
 * whether the agent's last listing had it), from the desired state and from the agent's listings.
 * The names of unknown devices are answered here (NOT_FOUND, or UNAVAILABLE before the agent was
 * ever reached: until then no device is unknown).
 */
import type { AgentPort } from '../core/agent-port.ts';
import { ERROR_CATALOG, ServiceError } from '../core/errors.ts';
import type { CoreLogger } from '../core/logger.ts';
import { ZERO_COUNTERS } from '../device/counters.ts';
import type { DeviceCounters, DeviceFacts } from '../device/types.ts';
import type { Metrics } from '../metrics/metrics.ts';
import { DeviceQueue } from '../queue/device-queue.ts';
import { type QuotaConfig, quotaOf } from '../queue/quota.ts';
import type { MappingEvent } from '../core/types.ts';
import type { StateStore } from '../state/store.ts';
import { recordOf } from './idempotency.ts';
import type { MemoryCatalog } from './memory.ts';

export interface Slot {
  name: string;
  /** Last facts the agent reported; undefined for a device known only from the desired state. */
  facts: DeviceFacts | undefined;
  /** Whether the agent's last listing had it. */
  present: boolean;
  counters: DeviceCounters;
  queue: DeviceQueue;
}

export interface DeviceRegistryOptions {
  port: AgentPort;
  store: StateStore;
  memory: MemoryCatalog;
  metrics: Metrics;
  logger: CoreLogger | undefined;
  maxQueued: number;
  maxGroup: number;
  quotas: QuotaConfig | undefined;
  /** Applied and durable changes of any device, in order per device. */
  onApplied: (events: MappingEvent[]) => Promise<void> | void;
  /** A device's group could not be done: it must be reconciled. */
  onTrouble: () => void;
}

export class DeviceRegistry {
  private readonly slots = new Map<string, Slot>();
  /** Whether the agent listed its devices at least once. */
  private listed = false;

  constructor(private readonly opts: DeviceRegistryOptions) {}

  get everListed(): boolean {
    return this.listed;
  }

  all(): Slot[] {
    return [...this.slots.values()];
  }

  /** Devices the agent has reported at some time (those with facts), as the API lists them. */
  known(): Slot[] {
    return this.all().filter((s) => s.facts);
  }

  /** The slots of devices in the agent's last listing. */
  present(): Slot[] {
    return this.all().filter((s) => s.present);
  }

  /** The slot of `name`, made (with its queue) the first time. */
  slotOf(name: string): Slot {
    let slot = this.slots.get(name);
    if (slot) return slot;
    const { opts } = this;
    const queue = new DeviceQueue({
      device: name,
      port: opts.port,
      store: opts.store,
      memory: opts.memory,
      metrics: opts.metrics,
      maxQueued: opts.maxQueued,
      maxGroup: opts.maxGroup,
      quota: quotaOf(opts.quotas, name),
      remember: (entry, outcome) =>
        entry.mode === 'sync' && entry.requestId !== undefined && entry.digest !== undefined
          ? recordOf(entry.requestId, entry.digest, outcome)
          : undefined,
      onApplied: opts.onApplied,
      onTrouble: (error) => {
        opts.logger?.warn({ device: name, err: error.message }, 'device needs reconciling');
        opts.onTrouble();
      },
    });
    slot = { name, facts: undefined, present: false, counters: ZERO_COUNTERS, queue };
    this.slots.set(name, slot);
    return slot;
  }

  /** The slot of a device the caller named; INVALID_ARGUMENT, NOT_FOUND or UNAVAILABLE if none. */
  existing(device: string): Slot {
    if (typeof device !== 'string' || device === '') {
      throw new ServiceError('INVALID_ARGUMENT', 'device is required', { field: 'device' });
    }
    const slot = this.slots.get(device);
    if (slot) return slot;
    throw this.unknown(device);
  }

  /** A device the agent reported facts of (what views and dry runs need). */
  withFacts(device: string): Slot & { facts: DeviceFacts } {
    const slot = this.existing(device);
    if (!slot.facts) throw this.unknown(device);
    return slot as Slot & { facts: DeviceFacts };
  }

  /** Takes the agent's listing: devices it lacks are not ready until it reports them again. */
  takeListing(facts: readonly DeviceFacts[]): void {
    const present = new Set(facts.map((f) => f.name));
    for (const f of facts) {
      const slot = this.slotOf(f.name);
      slot.facts = f;
      slot.present = true;
    }
    for (const slot of this.slots.values()) {
      if (!present.has(slot.name)) {
        slot.present = false;
        slot.queue.setNotReady('the agent does not report this device');
      }
    }
    this.listed = true;
  }

  /** Stops writes on every device until it is reconciled again. */
  setAllNotReady(reason: string): void {
    for (const slot of this.slots.values()) slot.queue.setNotReady(reason);
  }

  async close(): Promise<void> {
    await Promise.all(this.all().map((s) => s.queue.close()));
  }

  private unknown(device: string): ServiceError {
    if (!this.listed) {
      return new ServiceError('UNAVAILABLE', `device ${device} is unknown until the agent has been reached`, {
        retryAfterMs: ERROR_CATALOG.UNAVAILABLE.retryAfterMs,
      });
    }
    const known = this.present().map((s) => s.name);
    return new ServiceError('NOT_FOUND', `no device ${device} (known: ${known.join(', ') || 'none'})`, {
      field: 'device',
    });
  }
}
