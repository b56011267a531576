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
 * - `commit(changes)` resolves only after the record holding them is on disk (the append returned
 *   durable) and they are applied to `state`. Each commit's changes are encoded as it is made, in
 *   slices that yield (a large table never holds the event loop); commits whose encoding is done
 *   when the journal is free are written together as one record (group commit: one durable write
 *   for all of them), in commit order.
 * - Two records are written at a time at most, one per lane: a large one (over the journal's
 *   part size: written in parts) and a small one (one frame), whose frames the journal writes
 *   between the large one's parts. So a small commit of one device waits for one part of another
 *   device's 10 MB table, not for all of it. Dependent commits never share the lanes (Order).
 * - Order: two commits depend on each other when they write the records of a common device, or
 *   when either writes records every device depends on (memory). Of two dependent commits the
 *   later one is written in the same record after the earlier one or in a later record, is
 *   applied to `state` only after the earlier one was, and so resolves after it. Independent
 *   commits keep no order: a small commit of one device is written, applied and resolved while a
 *   large one of another device is still being encoded or applied. This is sound because
 *   commits of different devices commute (desired.ts deviceOf): the file's order and any order
 *   of applying them lead to the same state, and every state `state` passes through is one that
 *   applying the commits one by one in some order that keeps the dependent ones in order reaches.
 *   Replay applies the records in sequence order, another such order.
 *   (A device's queue is the only writer of its mappings and awaits each commit before the next.)
 * - A large commit is staged on copies of its devices' tables in slices (desired.ts stageChanges)
 *   once it is encoded and every commit it depends on is applied, overlapping its write, and
 *   installed in one step once durable: `state` never shows a table half applied.
 * - A failed write (ENOSPC, EIO, ...) rejects every commit of that record with UNAVAILABLE and
 *   leaves `state` untouched: nothing is installed before its record is durable. Commits in other
 *   records go on.
 * - A commit of no changes resolves at once: there is nothing to make durable.
 * - The journal is compacted into a snapshot when it grows past `compactBytes`, once both lanes
 *   are done and every written record is applied (the snapshot holds the state through the last
 *   record; records go on while it is written), and when the store is closed with at least
 *   `compactOnCloseBytes` of journal: after a clean stop the next start reads the state, not its
 *   history. A failed compaction leaves the files as they were.
 * - Opening refuses a damaged state directory (StateDamageError, nothing written): starting from
 *   part of the acknowledged state would reconcile the devices down to it. Only a torn tail (a
 *   crash during an append) is cut off, and `droppedBytes` says how much; a record whose parts
 *   stop (never acknowledged) is skipped, and `unfinished` counts them.
 */
import { ERROR_CATALOG, ServiceError } from '../core/errors.ts';
import {
  type Change,
  type DesiredState,
  deviceOf,
  replayState,
  type StagedChanges,
  type StateLimits,
  stageChanges,
  stateLimits,
  toSnapshot,
} from './desired.ts';
import { errnoCode, nodeStoreFs, type StoreFs } from './fs.ts';
import { type EncodedChanges, encodeChanges, Journal, joinedBytes, RECORD_PART_BYTES } from './journal.ts';

export interface StateStoreOptions {
  dir: string;
  fs?: StoreFs;
  /** Compact when the journal grows past this many bytes (default 64 MiB). */
  compactBytes?: number;
  /** Compact on close when the journal holds at least this many bytes (default 1 MiB). */
  compactOnCloseBytes?: number;
  /** Records larger than this are written in parts, in the large lane (default RECORD_PART_BYTES). */
  recordPartBytes?: number;
  limits?: Partial<StateLimits>;
  /**
   * Whether nothing but the commit at hand waits for this thread (no other request in progress):
   * its record, when small, is then written on it (Journal.appendEncoded's `onCaller`). Default: never.
   */
  quiet?: () => boolean;
  /** Called with the seconds each group write (the durable append) took. */
  onWrite?: (seconds: number, ok: boolean) => void;
  /** Called when a compaction fails (the store keeps working on the old journal). */
  onCompactionError?: (err: unknown) => void;
}

export interface OpenedStore {
  store: StateStore;
  /** Bytes of a torn journal tail that were cut off when opening. */
  droppedBytes: number;
  /** Records in parts whose parts stop (never acknowledged), skipped when opening. */
  unfinished: number;
}

/** One commit on its way to disk and into `state`. */
interface Commit {
  readonly changes: Change[];
  /** The devices whose records it writes; undefined when it writes records all devices depend on. */
  readonly devices: ReadonlySet<string> | undefined;
  /** Set when its encoding is done: it may be written. */
  encoded: EncodedChanges | undefined;
  /** Whether its staging has begun (once it is encoded and every commit it depends on is applied). */
  staging: boolean;
  staged: StagedChanges | undefined;
  /** Its record is on disk. */
  durable: boolean;
  resolve: () => void;
  reject: (err: ServiceError) => void;
}

/** The devices of the commits met so far, in commit order, that a later commit must not overtake. */
class Held {
  private all = false;
  private readonly devices = new Set<string>();

  /** Whether `c` depends on one of them. */
  holds(c: Commit): boolean {
    if (this.all) return true;
    if (c.devices === undefined) return this.devices.size > 0;
    for (const d of c.devices) if (this.devices.has(d)) return true;
    return false;
  }

  add(c: Commit): void {
    if (c.devices === undefined) this.all = true;
    else for (const d of c.devices) this.devices.add(d);
  }
}

function devicesOf(changes: readonly Change[]): Set<string> | undefined {
  const devices = new Set<string>();
  let last: string | undefined;
  for (const c of changes) {
    const device = deviceOf(c);
    if (device === undefined) return undefined;
    if (device !== last) devices.add(device);
    last = device;
  }
  return devices;
}

/** How long a caller should wait before retrying after a failed write. */
export const STORE_RETRY_AFTER_MS = ERROR_CATALOG.UNAVAILABLE.retryAfterMs;

/** The commits of the record being written in each lane. */
interface Lanes {
  large: Commit[] | undefined;
  small: Commit[] | undefined;
}

export class StateStore {
  /** Commits not written yet, in commit order. */
  private unwritten: Commit[] = [];
  /** Commits not applied yet (written or not), in commit order. */
  private unapplied: Commit[] = [];
  private readonly lanes: Lanes = { large: undefined, small: undefined };
  /** Set while the journal is past compactBytes: no record is begun until it is compacted. */
  private compactDue = false;
  private compacting: Promise<void> | undefined;
  /** Called once no written commit is left to apply. */
  private whenApplied: (() => void)[] = [];
  /** Called once nothing is left to write. */
  private whenWritten: (() => void)[] = [];
  private closed = false;
  private readonly partBytes: number;

  private constructor(
    private readonly journal: Journal,
    private readonly desired: DesiredState,
    private readonly opts: StateStoreOptions,
  ) {
    this.partBytes = opts.recordPartBytes ?? RECORD_PART_BYTES;
  }

  static async open(opts: StateStoreOptions): Promise<OpenedStore> {
    const limits = stateLimits(opts.limits);
    const { journal, snapshot, records, droppedBytes, unfinished, legacy } = await Journal.open(
      opts.dir,
      opts.fs ?? nodeStoreFs,
      opts.recordPartBytes,
    );
    const state = replayState(snapshot, records, limits);
    // Files of before format versions are rewritten in the current one before anything is appended.
    if (legacy)
      await journal.compact(toSnapshot(state)).catch(async (e: unknown) => {
        await journal.close();
        throw e;
      });
    return { store: new StateStore(journal, state, opts), droppedBytes, unfinished };
  }

  /** The acknowledged state. Read it freely; change it only through commit(). */
  get state(): DesiredState {
    return this.desired;
  }

  /** Makes `changes` durable, then applies them to `state`. Rejects with UNAVAILABLE on failure. */
  commit(changes: Change[]): Promise<void> {
    if (this.closed) return Promise.reject(new ServiceError('UNAVAILABLE', 'the state store is closed'));
    if (changes.length === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const c: Commit = {
        changes,
        devices: devicesOf(changes),
        encoded: undefined,
        staging: false,
        staged: undefined,
        durable: false,
        resolve,
        reject,
      };
      this.unwritten.push(c);
      this.unapplied.push(c);
      encodeChanges(changes).then(
        (encoded) => {
          c.encoded = encoded;
          this.applyReady();
          this.pump();
        },
        (e: unknown) => {
          this.drop(c);
          c.reject(writeError(e));
        },
      );
      this.applyReady();
      this.pump();
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.written();
    await this.applied();
    if (this.journal.size >= (this.opts.compactOnCloseBytes ?? 1 << 20)) {
      await this.journal
        .compact(toSnapshot(this.desired))
        .catch((e: unknown) => this.opts.onCompactionError?.(e));
    }
    await this.journal.close();
  }

  /**
   * Begins the next record of each free lane: the encoded commits that overtake no commit they
   * depend on (nor one being written), the large ones together in the large lane, the small ones
   * together in the small lane as long as they fit in one frame. A commit that depends on one
   * taken into the other lane waits: two records in flight may be written in either order.
   */
  private pump(): void {
    if (!this.compactDue) {
      const held = new Held();
      for (const c of [...(this.lanes.large ?? []), ...(this.lanes.small ?? [])]) held.add(c);
      const large: Commit[] = [];
      const small: Commit[] = [];
      const inLarge = new Held();
      const inSmall = new Held();
      let smallBytes = 0;
      const later: Commit[] = [];
      for (const c of this.unwritten) {
        const bytes = c.encoded?.bytes;
        if (bytes !== undefined && !held.holds(c)) {
          if (bytes > this.partBytes) {
            if (this.lanes.large === undefined && !inSmall.holds(c)) {
              large.push(c);
              inLarge.add(c);
              continue;
            }
          } else {
            const more = joinedBytes(smallBytes, bytes);
            if (this.lanes.small === undefined && more <= this.partBytes && !inLarge.holds(c)) {
              small.push(c);
              inSmall.add(c);
              smallBytes = more;
              continue;
            }
          }
        }
        held.add(c);
        later.push(c);
      }
      this.unwritten = later;
      if (large.length > 0) this.write('large', large);
      if (small.length > 0) this.write('small', small);
    }
    this.checkWritten();
  }

  private write(lane: keyof Lanes, record: Commit[]): void {
    this.lanes[lane] = record;
    const started = process.hrtime.bigint();
    const onCaller = this.opts.quiet?.() === true;
    this.journal
      .appendEncoded(
        record.map((c) => c.encoded!),
        { onCaller },
      )
      .then(
        () => {
          this.opts.onWrite?.(elapsed(started), true);
          for (const c of record) c.durable = true;
          this.lanes[lane] = undefined;
          this.applyReady();
          this.afterWrite();
        },
        (e: unknown) => {
          this.opts.onWrite?.(elapsed(started), false);
          this.lanes[lane] = undefined;
          const err = writeError(e);
          for (const c of record) this.drop(c);
          for (const c of record) c.reject(err);
          this.afterWrite();
        },
      );
  }

  private afterWrite(): void {
    const compactBytes = this.opts.compactBytes ?? 64 << 20;
    if (this.compacting === undefined && this.journal.size > compactBytes) this.compactDue = true;
    const idle = this.lanes.large === undefined && this.lanes.small === undefined;
    if (this.compactDue && idle && this.compacting === undefined) this.compacting = this.compact();
    this.pump();
  }

  /**
   * Compacts once both lanes are done and every written record is applied: the snapshot is the
   * state through the last record written. Records go on meanwhile (journal.ts compact).
   */
  private async compact(): Promise<void> {
    await this.applied();
    const compaction = this.journal.compact(toSnapshot(this.desired));
    this.compactDue = false;
    this.pump();
    await compaction.catch((e: unknown) => this.opts.onCompactionError?.(e));
    this.compacting = undefined;
    this.pump();
  }

  /** Resolves once nothing is left to write (and no compaction runs). */
  private written(): Promise<void> {
    return new Promise((resolve) => {
      this.whenWritten.push(resolve);
      this.checkWritten();
    });
  }

  private checkWritten(): void {
    const busy =
      this.unwritten.length > 0 ||
      this.lanes.large !== undefined ||
      this.lanes.small !== undefined ||
      this.compacting !== undefined;
    if (!busy) for (const done of this.whenWritten.splice(0)) done();
  }

  /**
   * Stages every commit whose dependencies are applied and installs (then resolves) those of
   * them that are staged and durable, in commit order.
   */
  private applyReady(): void {
    const held = new Held();
    const left: Commit[] = [];
    for (const c of this.unapplied) {
      if (!held.holds(c)) {
        // After its encoding: one sliced task at a time, and the staging overlaps the write.
        if (!c.staging && c.encoded !== undefined) this.stage(c);
        if (c.staged !== undefined && c.durable) {
          c.staged.install();
          c.resolve();
          continue;
        }
      }
      held.add(c);
      left.push(c);
    }
    this.unapplied = left;
    if (!left.some((c) => c.durable)) for (const done of this.whenApplied.splice(0)) done();
  }

  private stage(c: Commit): void {
    c.staging = true;
    void stageChanges(this.desired, c.changes).then((staged) => {
      c.staged = staged;
      this.applyReady();
    });
  }

  /** Resolves once no written commit is left to apply. */
  private applied(): Promise<void> {
    if (!this.unapplied.some((c) => c.durable)) return Promise.resolve();
    return new Promise((resolve) => this.whenApplied.push(resolve));
  }

  /** Forgets a commit that will not be written: nothing waits for it any more. */
  private drop(c: Commit): void {
    this.unwritten = this.unwritten.filter((w) => w !== c);
    this.unapplied = this.unapplied.filter((w) => w !== c);
    this.applyReady();
    this.pump();
  }
}

function writeError(e: unknown): ServiceError {
  return new ServiceError(
    'UNAVAILABLE',
    `the state store cannot write (${errnoCode(e) ?? String(e)}): nothing was changed`,
    { ...(errnoCode(e) ? { errno: errnoCode(e) } : {}), retryAfterMs: STORE_RETRY_AFTER_MS },
  );
}

function elapsed(started: bigint): number {
  return Number(process.hrtime.bigint() - started) / 1e9;
}
