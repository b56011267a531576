/**
 * The API server's side of attach (docs/vhost-user.md): Attach / Detach at the agent, and the
 * attached VMMs' memory tables. The agent holds no policy: it sends each VMM's whole asid-0 table
 * as a `memoryTable` request on WatchAttachments and replies to the VMM only once answered. Here
 * each one becomes a set-mem-table of asid 0 through the device's queue (ordered with every other
 * write, journaled, diffed by the planner, applied in one batch), answered ok once applied, or
 * with the refusal. While a device is attached its asid 0 is the VMM's (writes.ts refuses the
 * orchestrator's writes there).
 *
 * The subscription is made after every pass of the agent link that finds none live (a new agent, a
 * reconnection); the agent re-sends every request still waiting, so one an API server restart
 * left unanswered is answered by the next.
 *
 * Each attachment is kept in the desired state (what Attach asked for), so it outlives the agent
 * and the API server: when a subscription's `watching` lacks a recorded device (its agent died, or
 * an API server restarted meanwhile), the device is attached again at this agent on the same
 * socket, for the VMM to reconnect to. Before that, asid 0 is emptied: the VMM's connection died
 * with the old agent and the kernel unmapped everything its owner had mapped (vhost_vdpa_release
 * frees the IOTLB), so the device maps none of it; the VMM sends its whole table again when it
 * reconnects (vhost_user_blk_connect restarts a started device). While no VMM is connected asid 0
 * is therefore empty, and still the VMM's: the orchestrator is refused there until Detach.
 */
import { AgentError } from '../agent/errors.ts';
import type { AttachmentEvent, AttachmentInfo } from '../agent/wire.ts';
import { fromAgentError } from '../core/agent-errors.ts';
import type { AgentPort } from '../core/agent-port.ts';
import { ServiceError } from '../core/errors.ts';
import type { CoreLogger } from '../core/logger.ts';
import type { AttachDeviceRequest } from '../core/types.ts';
import type { Region } from '../iotlb/types.ts';
import type { AttachmentRecord } from '../state/desired.ts';
import type { StateStore } from '../state/store.ts';
import type { DeviceRegistry } from './devices.ts';
import type { MemoryCatalog } from './memory.ts';
import type { WritePath } from './writes.ts';

/** A table that meets a device not ready (being reconciled) is tried again this often... */
const NOT_READY_RETRY_MS = 250;
/** ...for at most this long: below the agent's default answer deadline (--attach-answer-ms, 30 s). */
const NOT_READY_PATIENCE_MS = 20_000;

type MemoryTableEvent = Extract<AttachmentEvent, { type: 'memoryTable' }>;

export class Attachments {
  /** Devices whose asid 0 is a VMM's: the recorded ones, and any the agent serves. */
  private readonly attached = new Set<string>();
  /** Attach, Detach and restores of one device, one after another. */
  private readonly turns = new Map<string, Promise<unknown>>();
  private watch: { cancel(): void } | undefined;
  private stopped = false;

  constructor(
    private readonly port: AgentPort,
    private readonly devices: DeviceRegistry,
    private readonly store: StateStore,
    private readonly writes: WritePath,
    private readonly memory: MemoryCatalog,
    private readonly logger: CoreLogger | undefined,
    /** The subscription failed: the link should run a pass (which subscribes again). */
    private readonly onEnded: () => void,
  ) {
    for (const device of store.state.attachments.keys()) this.attached.add(device);
  }

  /** Whether asid 0 of the device is an attached VMM's. */
  owns(device: string): boolean {
    return this.attached.has(device);
  }

  attach(req: AttachDeviceRequest): Promise<AttachmentInfo> {
    const slot = this.devices.withFacts(req.device);
    return this.inTurn(slot.name, async () => {
      const asid0 = [...(this.store.state.devices.get(slot.name)?.mappings.values() ?? [])].filter(
        (m) => m.asid === 0,
      ).length;
      if (asid0 > 0 && !this.attached.has(slot.name)) {
        throw new ServiceError(
          'FAILED_PRECONDITION',
          `address space 0 of device ${slot.name} holds ${asid0} mapping(s): an attached VMM's memory ` +
            'table replaces the whole of it, so unmap them first',
          { field: 'device' },
        );
      }
      const record: AttachmentRecord = {
        device: slot.name,
        socketPath: req.socketPath,
        ...(req.group === undefined ? {} : { group: req.group }),
      };
      let info: AttachmentInfo;
      try {
        info = await this.port.attach(record);
      } catch (e) {
        const unrecorded = await this.unrecorded(e, record);
        if (unrecorded === undefined) throw fromAgentError(e, `attaching device ${slot.name}`);
        info = unrecorded;
      }
      this.attached.add(slot.name);
      try {
        await this.store.commit([{ t: 'attachment.put', attachment: record }]);
      } catch (e) {
        // Not durable, so not acknowledged: the agent stops serving it.
        await this.port.detach(slot.name).catch(() => undefined);
        if (!this.store.state.attachments.has(slot.name)) this.attached.delete(slot.name);
        throw e;
      }
      return info;
    });
  }

  /**
   * The agent's own attachment of the device when it is exactly `record` and the desired state
   * lacks it: an Attach whose answer an API server crash lost (served, never journaled). Its retry
   * journals it instead of being refused.
   */
  private async unrecorded(e: unknown, record: AttachmentRecord): Promise<AttachmentInfo | undefined> {
    if (!(e instanceof AgentError && e.code === 'ALREADY_ATTACHED')) return undefined;
    if (this.store.state.attachments.has(record.device)) return undefined;
    const { attachment } = await this.port
      .describeDevice(record.device)
      .catch(() => ({ attachment: undefined }));
    const same = attachment?.socketPath === record.socketPath && attachment.group === record.group;
    return same ? attachment : undefined;
  }

  detach(device: string): Promise<void> {
    const slot = this.devices.existing(device);
    return this.inTurn(slot.name, async () => {
      const recorded = this.store.state.attachments.has(slot.name);
      try {
        await this.port.detach(slot.name);
      } catch (e) {
        // A recorded attachment the agent no longer serves (it could not be restored) is removed all the same.
        const notServed = e instanceof AgentError && e.code === 'NOT_ATTACHED';
        if (!(recorded && notServed)) throw fromAgentError(e, `detaching device ${slot.name}`);
      }
      if (recorded) await this.store.commit([{ t: 'attachment.delete', device: slot.name }]);
      // asid 0 stays the VMM's until its last table (empty, on the disconnect) is applied.
      this.attached.delete(slot.name);
    });
  }

  /** Subscribes to the agent's WatchAttachments unless a subscription is live. */
  follow(): void {
    if (this.stopped || this.watch !== undefined) return;
    const watch = this.port.watchAttachments(
      (e) => this.event(e),
      (error: AgentError | undefined) => {
        if (this.watch === watch) this.watch = undefined;
        if (this.stopped) return;
        this.logger?.warn(
          { err: error?.message ?? 'the stream ended' },
          'attachment watch ended: subscribing again',
        );
        this.onEnded();
      },
    );
    this.watch = watch;
  }

  stop(): void {
    this.stopped = true;
    this.watch?.cancel();
    this.watch = undefined;
  }

  private event(e: AttachmentEvent): void {
    switch (e.type) {
      case 'watching': {
        // An attachment this agent does not serve was lost with the agent before it (its VMM's
        // connection and memory are gone): the VMM's table goes too, and a recorded one is served again.
        const recorded = this.store.state.attachments;
        const lost = [...this.attached].filter((d) => !e.attached.includes(d));
        this.attached.clear();
        for (const d of [...e.attached, ...recorded.keys()]) this.attached.add(d);
        this.logger?.info({ attached: e.attached }, 'following attachments');
        for (const device of lost) {
          void this.inTurn(device, async () => {
            await this.dropLost(device);
            await this.restore(device);
          });
        }
        return;
      }
      case 'connected':
        this.logger?.info({ device: e.device }, 'a VMM connected');
        return;
      case 'disconnected':
        this.logger?.info({ device: e.device, reason: e.reason }, 'the VMM disconnected');
        return;
      case 'memoryTable':
        void this.answer(e);
        return;
    }
  }

  private async answer(e: MemoryTableEvent): Promise<void> {
    let answer: { ok: true } | { ok: false; code: string; message: string };
    try {
      const result = await this.apply(e);
      this.logger?.info(
        {
          device: e.device,
          entries: e.entries.length,
          mapped: result.mapped.length,
          invalidated: result.invalidated.length,
        },
        'VMM memory table applied',
      );
      answer = { ok: true };
    } catch (err) {
      const refusal = err instanceof ServiceError ? err : fromAgentError(err, 'applying the memory table');
      this.logger?.warn({ device: e.device, err: refusal.message }, 'VMM memory table refused');
      answer = { ok: false, code: refusal.code, message: refusal.message };
    }
    try {
      await this.port.answerMemoryTable({ requestId: e.requestId, ...answer });
    } catch (err) {
      // The agent is gone or forgot the request (it refuses the VMM on its own); a new agent re-sends.
      this.logger?.warn(
        { device: e.device, err: fromAgentError(err, 'answering').message },
        'memory table answer lost',
      );
    }
  }

  private async dropLost(device: string): Promise<void> {
    try {
      await this.applyTable(device, []);
      this.logger?.warn(
        { device },
        this.store.state.attachments.has(device)
          ? 'the agent no longer serves the attachment (it restarted): the VMM memory is unmapped until the VMM reconnects'
          : 'the agent no longer serves the attachment (it restarted): the VMM memory is unmapped; attach the device again',
      );
    } catch (err) {
      const why = err instanceof ServiceError ? err.message : String(err);
      this.logger?.warn({ device, err: why }, 'the memory of a lost attachment is still mapped');
    }
  }

  /** Asks the agent to serve a recorded attachment again (after its table was emptied). */
  private async restore(device: string): Promise<void> {
    const record = this.store.state.attachments.get(device);
    if (record === undefined || this.stopped) return;
    try {
      await this.port.attach(record);
      this.logger?.info({ device, socket: record.socketPath }, 'attachment restored at the agent');
    } catch (e) {
      const err = fromAgentError(e, `attaching device ${device} again`);
      // Unreachable: the next subscription's `watching` tries again. Anything else stays as it is:
      // the device stays reserved for its VMM until it is detached or attached again.
      this.logger?.[err.code === 'UNAVAILABLE' ? 'warn' : 'error'](
        { device, socket: record.socketPath, err: err.message },
        'the attachment was not restored: detach the device, or attach it again',
      );
    }
  }

  /** Runs `job` after every earlier Attach, Detach or restore of `device`. */
  private inTurn<T>(device: string, job: () => Promise<T>): Promise<T> {
    const before = this.turns.get(device) ?? Promise.resolve();
    const run = before.then(job, job);
    const settled = run.catch(() => undefined);
    this.turns.set(device, settled);
    void settled.then(() => {
      if (this.turns.get(device) === settled) this.turns.delete(device);
    });
    return run;
  }

  private apply(e: MemoryTableEvent) {
    const regions: Region[] = e.entries.map((m) => ({
      iova: m.iova,
      size: m.size,
      memory: m.memory,
      offset: m.offset,
      perm: m.perm,
    }));
    return this.applyTable(e.device, regions);
  }

  /** Makes asid 0 of `device` hold exactly `regions`; forgets the VMM memory it no longer names. */
  private async applyTable(device: string, regions: Region[]) {
    await this.memory.learnFromAgent(regions.map((r) => r.memory));
    const before = new Set(
      [...(this.store.state.devices.get(device)?.mappings.values() ?? [])]
        .filter((m) => m.asid === 0)
        .map((m) => m.memory),
    );
    const deadline = Date.now() + NOT_READY_PATIENCE_MS;
    for (;;) {
      try {
        const result = await this.writes.vmmMemoryTable(device, regions);
        const kept = new Set(regions.map((r) => r.memory));
        await this.memory.forgetVmmMemory([...before].filter((id) => !kept.has(id)));
        return result;
      } catch (err) {
        const retry = err instanceof ServiceError && err.code === 'UNAVAILABLE' && Date.now() < deadline;
        if (!retry || this.stopped) throw err;
        await new Promise((resolve) => setTimeout(resolve, NOT_READY_RETRY_MS));
      }
    }
  }
}
