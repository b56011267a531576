/** Fan-out of applied changes to watchers (WatchMappings). A failing listener harms no one else. */
import type { CoreLogger } from './logger.ts';
import type { MappingEvent } from './types.ts';

interface Watcher {
  device: string | undefined;
  listener: (e: MappingEvent) => void;
}

export class WatchHub {
  private readonly watchers = new Set<Watcher>();

  constructor(private readonly logger: CoreLogger | undefined) {}

  /** `device` undefined: every device. Returns the unsubscribe function. */
  add(device: string | undefined, listener: (e: MappingEvent) => void): () => void {
    const w: Watcher = { device, listener };
    this.watchers.add(w);
    return () => {
      this.watchers.delete(w);
    };
  }

  emit(events: readonly MappingEvent[]): void {
    for (const e of events) {
      for (const w of this.watchers) {
        if (w.device !== undefined && w.device !== e.device) continue;
        try {
          w.listener(e);
        } catch (err) {
          this.logger?.warn({ device: e.device, err: String(err) }, 'watch listener failed');
        }
      }
    }
  }
}
