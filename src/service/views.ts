/**
 * What the API reads: devices (the agent's facts and counters, refreshed when it is up, with what
 * the desired state maps and what is missing) and the desired mappings. Reads need only the store:
 * they keep working while the agent is down, with the last known facts.
 */
import type { AttachmentInfo } from '../agent/wire.ts';
import { fromAgentError } from '../core/agent-errors.ts';
import type { AgentPort } from '../core/agent-port.ts';
import type { CoreLogger } from '../core/logger.ts';
import type { DeviceView, ListedMapping } from '../core/types.ts';
import { sortedMappings } from '../state/desired.ts';
import type { StateStore } from '../state/store.ts';
import type { DeviceRegistry, Slot } from './devices.ts';
import { memoryRemedy } from './memory.ts';

export class Views {
  constructor(
    private readonly devices: DeviceRegistry,
    private readonly store: StateStore,
    private readonly port: Pick<AgentPort, 'describeDevice'>,
    private readonly agentUp: () => boolean,
    private readonly logger: CoreLogger | undefined,
  ) {}

  async listDevices(): Promise<DeviceView[]> {
    const views: DeviceView[] = [];
    for (const slot of this.devices.known()) views.push(await this.view(slot));
    return views;
  }

  getDevice(id: string): Promise<DeviceView> {
    return this.view(this.devices.withFacts(id));
  }

  listMappings(device: string, asid?: number): ListedMapping[] {
    const { queue } = this.devices.existing(device);
    const all = sortedMappings(this.store.state.devices.get(device), asid);
    if (queue.missingMemories.length === 0) return all;
    return all.map((m) => (queue.held(m) ? m : { ...m, missing: true }));
  }

  /** Per device and memory, the desired mappings the device lacks (their memory is unavailable). */
  degraded(): { device: string; memory: string; mappings: number }[] {
    return this.devices
      .all()
      .flatMap((s) =>
        s.queue.missing().map((m) => ({ device: s.name, memory: m.memory, mappings: m.mappings })),
      );
  }

  private async view(slot: Slot): Promise<DeviceView> {
    let attachment: AttachmentInfo | undefined;
    if (this.agentUp() && slot.present) {
      try {
        const d = await this.port.describeDevice(slot.name);
        slot.facts = d.facts;
        slot.counters = d.counters;
        attachment = d.attachment;
      } catch (e) {
        this.logger?.warn(
          { device: slot.name, err: fromAgentError(e, 'describe').message },
          'stale device facts',
        );
      }
    }
    let mappedBytes = 0n;
    let mappedEntries = 0;
    for (const m of this.store.state.devices.get(slot.name)?.mappings.values() ?? []) {
      if (!slot.queue.held(m)) continue;
      mappedBytes += m.size;
      mappedEntries++;
    }
    const degraded = slot.queue.missing().map((m) => ({
      ...m,
      remedy: memoryRemedy(m.memory, this.store.state.memory.get(m.memory)?.path ?? '(unknown path)'),
    }));
    return {
      ...slot.facts!,
      id: slot.name,
      ready: slot.queue.ready,
      mappedBytes,
      mappedEntries,
      degraded,
      queueDepth: slot.queue.depth,
      counters: slot.counters,
      ...(attachment === undefined ? {} : { attachment }),
    };
  }
}
