/**
 * The durable desired state of the API server.
 *
 * Why a hand-written journal: the state is small (memory records, mappings, sequence numbers, a
 * bounded idempotency table) and changes in groups that must be durable before they are answered.
 * An embedded database would need a native build (better-sqlite3; npm install scripts do not run
 * here) and would give us more than we need; an append-only journal of CRC-framed records with one
 * fdatasync per group commit, plus a snapshot written by rename, is a few hundred lines whose
 * crash behaviour we can state exactly (see journal.ts) and test by injecting failures.
 *
 * Contract:
 * - `commit(changes)` resolves only after the record holding them is on disk (fdatasync returned);
 *   commits that arrive while a write is in flight are written together as the next record (group
 *   commit: one fdatasync for all of them). Each commit's changes are encoded as it is made, in
 *   slices that yield (a large table never holds the event loop), and written in commit order.
 * - A failed write (ENOSPC, EIO, ...) rejects every commit of that record with UNAVAILABLE and
 *   leaves the in-memory state untouched: changes are applied in memory only after the sync.
 * - The journal is compacted into a snapshot when it grows past `compactBytes`.
 * - Opening refuses a damaged state directory (StateDamageError, nothing written): starting from
 *   part of the acknowledged state would reconcile the devices down to it. Only a torn tail (a
 *   crash during an append) is cut off, and `droppedBytes` says how much.
 */
import { ERROR_CATALOG, ServiceError } from '../core/errors.ts';
import {
  applyChange,
  type Change,
  type DesiredState,
  replayState,
  type StateLimits,
  stateLimits,
  toSnapshot,
} from './desired.ts';
import { errnoCode, nodeStoreFs, type StoreFs } from './fs.ts';
import { type EncodedChanges, encodeChanges, Journal } from './journal.ts';

export interface StateStoreOptions {
  dir: string;
  fs?: StoreFs;
  /** Compact when the journal grows past this many bytes (default 64 MiB). */
  compactBytes?: number;
  limits?: Partial<StateLimits>;
  /** Called with the seconds each group write (write + fdatasync) took. */
  onWrite?: (seconds: number, ok: boolean) => void;
  /** Called when a compaction fails (the store keeps working on the old journal). */
  onCompactionError?: (err: unknown) => void;
}

export interface OpenedStore {
  store: StateStore;
  /** Bytes of a torn journal tail that were cut off when opening. */
  droppedBytes: number;
}

interface Waiter {
  changes: Change[];
  encoded: Promise<EncodedChanges>;
  resolve: () => void;
  reject: (err: ServiceError) => void;
}

/** How long a caller should wait before retrying after a failed write. */
export const STORE_RETRY_AFTER_MS = ERROR_CATALOG.UNAVAILABLE.retryAfterMs;

export class StateStore {
  private waiting: Waiter[] = [];
  private writing: Promise<void> | undefined;
  private closed = false;

  private constructor(
    private readonly journal: Journal,
    private readonly desired: DesiredState,
    private readonly opts: StateStoreOptions,
  ) {}

  static async open(opts: StateStoreOptions): Promise<OpenedStore> {
    const limits = stateLimits(opts.limits);
    const { journal, snapshot, records, droppedBytes, legacy } = await Journal.open(
      opts.dir,
      opts.fs ?? nodeStoreFs,
    );
    const state = replayState(snapshot, records, limits);
    // Files of before format versions are rewritten in the current one before anything is appended.
    if (legacy)
      await journal.compact(toSnapshot(state)).catch(async (e: unknown) => {
        await journal.close();
        throw e;
      });
    return { store: new StateStore(journal, state, opts), droppedBytes };
  }

  /** The acknowledged state. Read it freely; change it only through commit(). */
  get state(): DesiredState {
    return this.desired;
  }

  /** Makes `changes` durable, then applies them to `state`. Rejects with UNAVAILABLE on failure. */
  commit(changes: Change[]): Promise<void> {
    if (this.closed) return Promise.reject(new ServiceError('UNAVAILABLE', 'the state store is closed'));
    const encoded = encodeChanges(changes);
    // Awaited by the write loop; a failure there rejects the commit, never the process.
    encoded.catch(() => undefined);
    return new Promise((resolve, reject) => {
      this.waiting.push({ changes, encoded, resolve, reject });
      this.writing ??= this.writeLoop();
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.writing;
    await this.journal.close();
  }

  private async writeLoop(): Promise<void> {
    while (this.waiting.length > 0) {
      const group = this.waiting;
      this.waiting = [];
      let started = process.hrtime.bigint();
      try {
        const commits = await Promise.all(group.map((w) => w.encoded));
        started = process.hrtime.bigint();
        await this.journal.appendEncoded(commits);
      } catch (e) {
        this.opts.onWrite?.(elapsed(started), false);
        const err = new ServiceError(
          'UNAVAILABLE',
          `the state store cannot write (${errnoCode(e) ?? String(e)}): nothing was changed`,
          { ...(errnoCode(e) ? { errno: errnoCode(e) } : {}), retryAfterMs: STORE_RETRY_AFTER_MS },
        );
        for (const w of group) w.reject(err);
        continue;
      }
      this.opts.onWrite?.(elapsed(started), true);
      for (const w of group) {
        for (const change of w.changes) applyChange(this.desired, change);
        w.resolve();
      }
      if (this.journal.size > (this.opts.compactBytes ?? 64 << 20)) {
        await this.journal
          .compact(toSnapshot(this.desired))
          .catch((e: unknown) => this.opts.onCompactionError?.(e));
      }
    }
    this.writing = undefined;
  }
}

function elapsed(started: bigint): number {
  return Number(process.hrtime.bigint() - started) / 1e9;
}
