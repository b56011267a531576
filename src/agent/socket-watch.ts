/**
 * Notice of a unix socket's name changing in its directory (inotify, through fs.watch): a new
 * agent removing a stale socket, binding its own, or setting its mode. A client waiting for the
 * agent tries again at once on such a change instead of at its next backoff step, so the wait
 * between a new agent serving and the API server reaching it is one connect(2), not up to a
 * backoff delay. Where the directory cannot be watched, only the timer paces the attempts.
 */
import fs from 'node:fs';
import path from 'node:path';

export class SocketWatch {
  private watcher: fs.FSWatcher | undefined;
  /** A change came since the last wait began. */
  private changed = false;
  private wake: (() => void) | undefined;

  constructor(socketPath: string) {
    const name = path.basename(socketPath);
    try {
      this.watcher = fs.watch(path.dirname(socketPath), { persistent: false }, (_event, changed) => {
        // Linux names the entry; a null name may be any entry, this one included.
        if (changed !== null && changed !== name) return;
        this.changed = true;
        this.wake?.();
      });
      this.watcher.on('error', () => this.close());
    } catch {
      // No directory yet (or no inotify): the timer alone paces the attempts.
      this.watcher = undefined;
    }
  }

  /** Resolves after `ms`, or sooner once the socket's name changed (at once if it did since the last wait). */
  async wait(ms: number): Promise<void> {
    if (!this.changed) {
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.wake = undefined;
          resolve();
        };
        const timer = setTimeout(done, ms);
        this.wake = done;
      });
    }
    this.changed = false;
  }

  close(): void {
    this.watcher?.close();
    this.watcher = undefined;
    this.wake?.();
  }
}
