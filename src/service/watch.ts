/**
 * Fan-out of applied changes to watchers (WatchMappings), with a bounded history per device so a
 * watcher can resume after a sequence it saw. A failing listener harms no one else.
 *
 * Events reach the hub in sequence order per device (each device's queue applies its requests in
 * the order their sequences were allocated), several events sharing the sequence of one request.
 * A device's history holds every event with a sequence above its `floor`: the floor starts where
 * the desired state left off (events before a restart are gone) and rises as old sequences are
 * dropped, whole sequences at a time, to keep at most `limit` events.
 */
import { ServiceError } from '../core/errors.ts';
import type { CoreLogger } from '../core/logger.ts';
import type { MappingEvent, WatchPosition, WatchSubscription } from '../core/types.ts';
import { forEachInTimeSlices } from '../sys/next-turn.ts';

/** Events kept per device unless configured otherwise. */
export const DEFAULT_WATCH_HISTORY = 4096;

interface Watcher {
  device: string | undefined;
  listener: (e: MappingEvent) => void;
}

class History {
  private events: MappingEvent[] = [];
  /** Index of the oldest kept event in `events`. */
  private head = 0;

  constructor(public floor: bigint) {}

  get latest(): bigint {
    return this.events.length > this.head ? this.events.at(-1)!.sequence : this.floor;
  }

  push(e: MappingEvent, limit: number): void {
    this.events.push(e);
    while (this.events.length - this.head > limit) {
      const dropped = this.events[this.head]!.sequence;
      while (this.head < this.events.length && this.events[this.head]!.sequence === dropped) this.head++;
      this.floor = dropped;
    }
    if (this.head > 1024 && this.head * 2 > this.events.length) {
      this.events = this.events.slice(this.head);
      this.head = 0;
    }
  }

  /** Kept events with a sequence above `sequence`, oldest first. */
  after(sequence: bigint): MappingEvent[] {
    let i = this.events.length;
    while (i > this.head && this.events[i - 1]!.sequence > sequence) i--;
    return this.events.slice(i);
  }
}

export class WatchHub {
  private readonly watchers = new Set<Watcher>();
  private readonly histories = new Map<string, History>();

  constructor(
    private readonly logger: CoreLogger | undefined,
    private readonly limit = DEFAULT_WATCH_HISTORY,
  ) {}

  /** Where `device`'s history starts: it had events up to `sequence` before the hub existed. */
  startAt(device: string, sequence: bigint): void {
    this.histories.set(device, new History(sequence));
  }

  /**
   * Watches `device` (undefined: every device; `devices` are those whose positions are reported).
   * With `fromSequence` (one device only), the kept events after it are returned to be sent first;
   * FAILED_PRECONDITION when some of them are no longer kept.
   */
  subscribe(
    device: string | undefined,
    devices: readonly string[],
    fromSequence: bigint | undefined,
    listener: (e: MappingEvent) => void,
  ): WatchSubscription {
    let replay: MappingEvent[] = [];
    if (fromSequence !== undefined) {
      if (device === undefined) {
        throw new ServiceError(
          'INVALID_ARGUMENT',
          'from_sequence: needs a device (sequences are per device)',
          {
            field: 'from_sequence',
          },
        );
      }
      replay = this.replay(device, fromSequence);
    }
    const positions: WatchPosition[] = devices.map((d) => ({ device: d, sequence: this.history(d).latest }));
    const w: Watcher = { device, listener };
    this.watchers.add(w);
    return {
      positions,
      replay,
      close: () => {
        this.watchers.delete(w);
      },
    };
  }

  /**
   * Records and fans out `events`, in order, giving the event loop back every slice: a table of
   * 65,536 regions is as many events. Resolves once every watcher has been handed every event.
   */
  async emit(events: readonly MappingEvent[]): Promise<void> {
    await forEachInTimeSlices(events, (e) => {
      this.history(e.device).push(e, this.limit);
      for (const w of this.watchers) {
        if (w.device !== undefined && w.device !== e.device) continue;
        try {
          w.listener(e);
        } catch (err) {
          this.logger?.warn({ device: e.device, err: String(err) }, 'watch listener failed');
        }
      }
    });
  }

  private replay(device: string, from: bigint): MappingEvent[] {
    const history = this.history(device);
    if (from > history.latest) {
      throw new ServiceError(
        'INVALID_ARGUMENT',
        `from_sequence: ${from} is ahead of device ${device}'s latest sequence ${history.latest}`,
        { field: 'from_sequence' },
      );
    }
    if (from < history.floor) {
      throw new ServiceError(
        'FAILED_PRECONDITION',
        `from_sequence: ${from} is too old, re-list: device ${device} keeps its events after sequence ${history.floor} only (the oldest from_sequence it resumes from); list the mappings again (ListMappings) and watch without from_sequence`,
        { field: 'from_sequence' },
      );
    }
    return history.after(from);
  }

  private history(device: string): History {
    let history = this.histories.get(device);
    if (history === undefined) {
      history = new History(0n);
      this.histories.set(device, history);
    }
    return history;
  }
}
