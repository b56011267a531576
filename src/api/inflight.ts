/**
 * The bytes of request bodies being processed, REST and gRPC together, bounded: a parsed request
 * takes many times its body's size in memory until it is answered, so beyond the bound a request
 * is refused with RESOURCE_EXHAUSTED (HTTP 429, Retry-After) before it is parsed, not queued.
 */
import { ERROR_CATALOG, ServiceError } from '../core/errors.ts';

const RETRY_AFTER_MS = ERROR_CATALOG.RESOURCE_EXHAUSTED.retryAfterMs;

export class InFlightBytes {
  private used = 0;

  constructor(readonly limit: number) {}

  get bytes(): number {
    return this.used;
  }

  /** Holds `bytes` until the returned release is called (once is enough; more calls do nothing). */
  acquire(bytes: number): () => void {
    if (this.used + bytes > this.limit) {
      throw new ServiceError(
        'RESOURCE_EXHAUSTED',
        `${this.used} bytes of requests are being processed; this one (${bytes} bytes) would exceed the limit of ${this.limit}`,
        { retryAfterMs: RETRY_AFTER_MS },
      );
    }
    this.used += bytes;
    let held = bytes;
    return () => {
      this.used -= held;
      held = 0;
    };
  }
}
