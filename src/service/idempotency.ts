/**
 * Idempotency keys: a request with a requestId already answered on that device gets the recorded
 * answer (nothing is applied again); the same id with another request body is refused. Records
 * are written in the same durable commit as the change they answer, so they survive restarts.
 * A retry that arrives while the first attempt is still queued waits for that attempt's answer.
 *
 * Only final answers are recorded: a refusal that asks for a retry (UNAVAILABLE, RESOURCE_EXHAUSTED)
 * never gets here. A full queue or a device that is not ready refuses before anything is queued,
 * and a group that could not be done answers its callers without committing (no record), so the
 * retry can do what the first attempt did not.
 */
import { createHash } from 'node:crypto';
import type { IdempotencyRecord } from '../state/desired.ts';
import { encodeJson } from '../state/codec.ts';
import type { StateStore } from '../state/store.ts';
import { ServiceError, type ServiceErrorInfo } from '../core/errors.ts';
import { MAX_REQUEST_ID } from '../core/types.ts';

/** How an answer is kept: the result, or the error's info. */
export type StoredAnswer = { ok: unknown } | { error: ServiceErrorInfo };

function canonical(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(canonical);
  if (typeof value === 'object' && value !== null) {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined);
    return Object.fromEntries(
      entries.sort(([a], [b]) => (a < b ? -1 : 1)).map(([k, v]) => [k, canonical(v)]),
    );
  }
  return value;
}

/** sha256 of the method and the body (without device and requestId), keys sorted. */
export function requestDigest(method: string, body: unknown): string {
  return createHash('sha256')
    .update(encodeJson(canonical({ method, body })))
    .digest('hex');
}

/** The record that keeps an answer. */
export function recordOf(
  requestId: string,
  digest: string,
  outcome: { ok: true; answer: unknown } | { ok: false; error: ServiceError },
): IdempotencyRecord {
  const answer: StoredAnswer = outcome.ok ? { ok: outcome.answer } : { error: outcome.error.toInfo() };
  return { requestId, digest, answer };
}

function replay<T>(answer: StoredAnswer): T {
  if ('error' in answer) {
    const { code, message, field, errno } = answer.error;
    throw new ServiceError(code, message, {
      ...(field !== undefined ? { field } : {}),
      ...(errno !== undefined ? { errno } : {}),
    });
  }
  return answer.ok as T;
}

export class Idempotency {
  private readonly inflight = new Map<string, { digest: string; answer: Promise<unknown> }>();

  constructor(private readonly store: StateStore) {}

  /**
   * Runs `execute(digest)` unless `requestId` was answered (or is being answered) on `device`.
   * Without a requestId it just runs.
   */
  async run<T>(
    device: string,
    requestId: string | undefined,
    method: string,
    body: unknown,
    execute: (digest: string | undefined) => Promise<T>,
  ): Promise<T> {
    if (requestId === undefined) return execute(undefined);
    if (typeof requestId !== 'string' || requestId === '' || requestId.length > MAX_REQUEST_ID) {
      throw new ServiceError('INVALID_ARGUMENT', `requestId must be 1 to ${MAX_REQUEST_ID} characters`, {
        field: 'requestId',
      });
    }
    const digest = requestDigest(method, body);
    const mismatch = () =>
      new ServiceError(
        'INVALID_ARGUMENT',
        `requestId ${JSON.stringify(requestId)} was already used on device ${device} for a different request`,
        { field: 'requestId' },
      );
    const recorded = this.store.state.devices.get(device)?.idempotency.get(requestId);
    if (recorded) {
      if (recorded.digest !== digest) throw mismatch();
      return replay<T>(recorded.answer as StoredAnswer);
    }
    const key = `${device}\u0000${requestId}`;
    const running = this.inflight.get(key);
    if (running) {
      if (running.digest !== digest) throw mismatch();
      return running.answer as Promise<T>;
    }
    const answer = execute(digest);
    this.inflight.set(key, { digest, answer });
    try {
      return await answer;
    } finally {
      this.inflight.delete(key);
    }
  }
}
