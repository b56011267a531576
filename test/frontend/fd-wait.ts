/**
 * A bounded wait for an fd to become readable (or hung up), on Node's event loop through the
 * project's watcher. The watch is paused between waits, so an fd that stays readable (an eventfd
 * not yet drained, a socket at EOF) costs nothing while nobody waits.
 */
import { type FdWatch, watchReadable } from '../../src/sys/libc.ts';

export class FdWaiter {
  private readonly watch: FdWatch;
  private wake: (() => void) | null = null;
  private error: Error | null = null;

  constructor(fd: number) {
    this.watch = watchReadable(
      fd,
      () => this.wake?.(),
      (e) => {
        this.error = e instanceof Error ? e : new Error(String(e));
        this.wake?.();
      },
    );
    this.watch.pause();
  }

  /** Resolves when the fd is readable or after `ms`, whichever comes first; the caller re-checks. */
  wait(ms: number): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.wake = null;
        this.watch.pause();
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.wake = done;
      this.watch.resume();
    });
  }

  /** Ends the watch; call before closing the fd. */
  stop(): void {
    this.wake?.();
    this.watch.stop();
  }
}
