/**
 * The journal and snapshot files of the state store, in one directory:
 *
 *   snapshot        one frame { magic, version, gen, seq, state }: the whole state through record
 *                   `seq`, as of the start of journal.<gen>
 *   journal.<gen>   empty, or a header frame { magic, version, gen, after: seq } (written with the
 *                   first record), then one frame per group commit { seq, changes }, numbered on
 *                   from the snapshot's seq without gaps; each durable before append() returns
 *                   (the file is opened O_DSYNC: the write returns once its data and the file's
 *                   new size are on disk, what write + fdatasync does in one system call)
 *
 * A record larger than `partBytes` (a 65,536-region table is about 10 MB) is written as parts
 * { seq, part, parts, changes }, one frame each, and other records may be written between its
 * parts: a small commit of another device waits for one part, not for the whole table. The
 * frames are written one at a time, in the order append() was called for them; a record takes
 * its number when its first frame is written. A record in parts counts once its last part is
 * there: one whose parts stop (a crash or a failed write on the way; it was never acknowledged)
 * is `unfinished`, skipped on replay and not damage, as long as no part of it comes out of turn.
 * Its number stays taken. At most one record in parts is written at a time (store.ts), so a
 * part 1 ends the one before it.
 *
 * Opening reads everything first and writes nothing unless all of it is sound: a torn tail (the
 * last frame short or partial, as a crash during an append leaves) is cut off; anything else bad
 * (a bad frame followed by anything, a frame that fails the schema, a gap in the sequence
 * numbers) is damage, refused with StateDamageError and left exactly as it is (see repair.ts).
 * Compaction writes the snapshot to a temporary name and fsyncs it while appends go on into
 * journal.<gen>; then, with appends held, creates journal.<gen+1> holding its header and every
 * frame appended since the snapshot's record, renames the snapshot over `snapshot` and fsyncs the
 * directory; only then is journal.<gen> deleted. Until that directory fsync has succeeded nothing
 * is appended to the new journal, so a crash at any point leaves either the old snapshot with its
 * whole journal or the new one with its. (repair.ts writes a generation offline: writeGeneration.)
 *
 * Files of before format versions (a snapshot `{ gen, state }`, bare `Change[]` records, no
 * header) are still read; the store compacts them into the current format as soon as it opens.
 */
import path from 'node:path';
import {
  type BadSpan,
  type Decoded,
  decodeJsonPayload,
  encodeElements,
  encodeJson,
  encodeJsonPieces,
  frame,
  framePieces,
  framePiecesInSlices,
  scanFrames,
} from './codec.ts';
import type { Change, StateSnapshot } from './desired.ts';
import { errnoCode, nodeStoreFs, type StoreFile, type StoreFs } from './fs.ts';
import {
  changesSchema,
  claimedVersion,
  FORMAT_VERSION,
  JOURNAL_MAGIC,
  type JournalHeader,
  type JournalPart,
  journalHeaderSchema,
  journalPartSchema,
  journalRecordSchema,
  legacySnapshotSchema,
  READ_VERSIONS,
  SNAPSHOT_MAGIC,
  schemaProblem,
  snapshotSchema,
} from './schema.ts';

export const SNAPSHOT = 'snapshot';
const SNAPSHOT_TMP = 'snapshot.tmp';
const JOURNAL_RE = /^journal\.(\d+)$/;
export const journalName = (gen: number): string => `journal.${gen}`;
/**
 * Records larger than this are written in parts of at most this size. A small commit waits for at
 * most one part's O_DSYNC write (about 0.3 ms here, idle): at 256 KiB its p99 during a 65,536-mapping
 * record was 8.8 ms, at 64 KiB 5.5 ms, at 32 KiB 4.3 ms, the record taking longer the smaller.
 */
export const RECORD_PART_BYTES = 64 * 1024;

/**
 * A record of at most this size may be written on the calling thread (appendEncoded's
 * `onCaller`): its O_DSYNC write holds the event loop about as long as one of the queues' time
 * slices (0.2-0.3 ms on a local disk), and only while no other write is in progress.
 */
export const WRITE_ON_CALLER_MAX_BYTES = 16 * 1024;

/** The state directory holds damage: nothing was changed; see repair.ts for the way out. */
export class StateDamageError extends Error {
  constructor(
    message: string,
    readonly file: string,
    /** Where the first damage starts. */
    readonly offset: number,
    /** Intact records after that offset. */
    readonly intactAfter: number,
    /** Whether repair.ts can keep the intact part (not for a snapshot: it is one record). */
    readonly repairable: boolean,
  ) {
    super(message);
    this.name = 'StateDamageError';
  }
}

/** A file of the state directory is in a format version this code does not read. */
export class StateFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'StateFormatError';
  }
}

export interface SnapshotRead {
  gen: number;
  /** The sequence number of the last record the snapshot holds (0: none, or unversioned). */
  seq: bigint;
  state: StateSnapshot | undefined;
  legacy: boolean;
  /** Of an earlier format version: rewritten in the current one on open. */
  outdated: boolean;
}

/** One intact record of a journal. */
export interface RecordRead {
  /** Absent in unversioned journals. */
  seq: bigint | undefined;
  offset: number;
  length: number;
  changes: Change[];
}

/** A record in parts whose last part is not in the journal: never acknowledged, skipped. */
export interface UnfinishedRead {
  seq: bigint;
  /** Of its first part. */
  offset: number;
  /** How many of its parts are there. */
  written: number;
  parts: number;
  /** Where its last part there starts, and where the frame that ended it does (or the end of the file). */
  lastPartAt: number;
  endedAt: number;
}

/** What the intact records around a damaged span say about it. */
export interface DamageRead extends BadSpan {
  /** The last intact record before the span (absent: none, the snapshot's state is before it). */
  before: RecordRead | undefined;
  /** The first intact record after it. */
  after: RecordRead | undefined;
  /**
   * Sequence numbers of the records the span held, as its neighbours tell: `to` is absent when no
   * record follows (then at least `from` is lost). Absent in unversioned journals.
   */
  lost: { from: bigint; to: bigint | undefined } | undefined;
  /** Records in parts that stop before the span and no later: it may have held their next part. */
  partsLost: bigint[];
}

export interface JournalRead {
  /** In sequence order (a record in parts at its first part). */
  records: RecordRead[];
  unfinished: UnfinishedRead[];
  damage: DamageRead[];
  torn: BadSpan | undefined;
  /** Whether the journal is of before format versions (no header, no sequence numbers). */
  legacy: boolean;
  /** Of an earlier format version (its header says): rewritten in the current one on open. */
  outdated: boolean;
  /** The last sequence number taken, by an intact record or an unfinished one (or the snapshot's when there is none). */
  seq: bigint;
}

const readable = (version: unknown): boolean => READ_VERSIONS.includes(version as number);
const READS = `version ${READ_VERSIONS.join(' or ')}`;

/** Decodes and checks one frame of a journal: a header, a record, or an unversioned record. */
function decodeJournalFrame(payload: Buffer): Decoded {
  const decoded = decodeJsonPayload(payload);
  if ('problem' in decoded) return decoded;
  const v = decoded.value;
  const claimed = claimedVersion(v, JOURNAL_MAGIC);
  // Another version's header is not damage: parseJournal refuses it as a format.
  if (claimed !== undefined && !readable(claimed)) return decoded;
  const schema =
    claimed !== undefined
      ? journalHeaderSchema
      : Array.isArray(v)
        ? changesSchema
        : typeof v === 'object' && v !== null && 'part' in v
          ? journalPartSchema
          : journalRecordSchema;
  const problem = schemaProblem(schema, v);
  return problem === undefined ? decoded : { problem: `invalid record: ${problem}` };
}

/** Reads the snapshot file; a damaged one is refused (it is written whole and renamed into place). */
export function parseSnapshot(data: Buffer, file: string): SnapshotRead {
  const { frames, damage, torn } = scanFrames(data);
  const bad = damage[0] ?? torn;
  const value = frames[0]?.value;
  const claimed = claimedVersion(value, SNAPSHOT_MAGIC);
  if (claimed !== undefined && !readable(claimed)) {
    throw new StateFormatError(
      `state snapshot ${file} is of format version ${String(claimed)}; this vdpa-mapd reads ${READS} (and unversioned files): start the vdpa-mapd that wrote it`,
    );
  }
  const problem =
    bad !== undefined
      ? `at byte ${bad.offset}: ${bad.reason}`
      : frames.length !== 1
        ? `${frames.length} frames where one belongs`
        : schemaProblem(claimed === undefined ? legacySnapshotSchema : snapshotSchema, value);
  if (problem !== undefined) {
    throw new StateDamageError(
      `state snapshot ${file} is damaged (${problem}): it holds the whole state up to its journal, so no repair can keep it; nothing was changed. Restore the state directory from a backup, or move it aside to start with an empty state`,
      file,
      bad?.offset ?? 0,
      0,
      false,
    );
  }
  const snap = value as { gen: number; seq?: bigint; state: StateSnapshot };
  return {
    gen: snap.gen,
    seq: snap.seq ?? 0n,
    state: snap.state,
    legacy: claimed === undefined,
    outdated: claimed !== undefined && claimed !== FORMAT_VERSION,
  };
}

/**
 * Reads journal.<gen>, whose snapshot holds the state through record `seq`. Throws only for a
 * format version it does not read; damage is reported, not thrown.
 */
export function parseJournal(data: Buffer, snap: SnapshotRead, file: string): JournalRead {
  const scan = scanFrames(data, decodeJournalFrame);
  const first = scan.frames[0];
  const claimed = first?.offset === 0 ? claimedVersion(first.value, JOURNAL_MAGIC) : undefined;
  if (claimed !== undefined && !readable(claimed)) {
    throw new StateFormatError(
      `state journal ${file} is of format version ${String(claimed)}; this vdpa-mapd reads ${READS} (and unversioned files): start the vdpa-mapd that wrote it`,
    );
  }
  // Which format the journal is in: its header says; without one (damaged), the snapshot or the records.
  const legacy =
    claimed === undefined &&
    (snap.state !== undefined ? snap.legacy : first !== undefined && Array.isArray(first.value));

  const records: RecordRead[] = [];
  const unfinished: UnfinishedRead[] = [];
  const misfits: BadSpan[] = [];
  const misfit = (offset: number, length: number, reason: string) => misfits.push({ offset, length, reason });
  let expected = snap.seq + 1n;
  /** The record in parts being read: its parts so far. */
  let open: (Omit<UnfinishedRead, 'endedAt'> & { length: number; changes: Change[] }) | undefined;
  const leaveOpen = (endedAt: number) => {
    if (open !== undefined) {
      const { seq, offset, written, parts, lastPartAt } = open;
      unfinished.push({ seq, offset, written, parts, lastPartAt, endedAt });
    }
    open = undefined;
  };
  for (const f of scan.frames) {
    const v = f.value;
    if (claimedVersion(v, JOURNAL_MAGIC) !== undefined) {
      const h = v as JournalHeader;
      if (f.offset !== 0) misfit(f.offset, f.length, 'a journal header after the start');
      else if (h.gen !== snap.gen || h.after !== snap.seq)
        misfit(
          f.offset,
          f.length,
          `header of gen ${h.gen} after record ${h.after}, but the snapshot is of gen ${snap.gen} through record ${snap.seq}`,
        );
      continue;
    }
    if (legacy !== Array.isArray(v)) {
      misfit(
        f.offset,
        f.length,
        legacy
          ? 'a numbered record in an unversioned journal'
          : 'an unnumbered record in a versioned journal',
      );
      continue;
    }
    if (legacy) {
      records.push({ seq: undefined, offset: f.offset, length: f.length, changes: v as Change[] });
      continue;
    }
    if (f.offset === 0) misfit(0, 0, 'no journal header');
    const { seq, changes, part, parts } = v as { seq: bigint; changes: Change[] } & Partial<JournalPart>;
    if (part !== undefined && part > 1) {
      // The next part of the record in parts being read, or out of turn.
      if (open === undefined || open.seq !== seq || open.written + 1 !== part || open.parts !== parts) {
        const next =
          open === undefined
            ? 'no record in parts was open'
            : `part ${open.written + 1} of record ${open.seq} was next`;
        misfit(f.offset, f.length, `part ${part} of record ${seq} out of turn (${next})`);
        continue;
      }
      open.written = part;
      open.lastPartAt = f.offset;
      open.length += f.length;
      for (const c of changes) open.changes.push(c);
      if (part === parts) {
        records.push({ seq, offset: open.offset, length: open.length, changes: open.changes });
        open = undefined;
      }
      continue;
    }
    if (seq < expected) {
      misfit(f.offset, f.length, `record ${seq} repeats or goes back (record ${expected} was next)`);
      continue;
    }
    expected = seq + 1n;
    if (part === undefined) {
      records.push({ seq, offset: f.offset, length: f.length, changes });
      continue;
    }
    // Part 1: one record in parts is written at a time, so the one before it stopped for good.
    leaveOpen(f.offset);
    open = {
      seq,
      offset: f.offset,
      written: 1,
      parts: parts!,
      lastPartAt: f.offset,
      length: f.length,
      changes: [...changes],
    };
  }
  leaveOpen(data.length);
  // A record in parts is complete after records that came between its parts: in sequence order.
  records.sort(bySeq);

  // Every bad span, with what its neighbours say; a gap in the numbers with no bad bytes is damage too.
  const spans = [...scan.damage, ...misfits].sort((a, b) => a.offset - b.offset);
  const damage: DamageRead[] = spans.map((span) => neighbours(span, records, unfinished, snap.seq, legacy));
  let prev = snap.seq;
  // An unfinished record's number is taken: no gap.
  const numbered = [...records, ...unfinished].sort(bySeq);
  for (const r of legacy ? [] : numbered) {
    const seq = r.seq!;
    const explained = damage.some(
      (d) => d.lost !== undefined && d.lost.to !== undefined && d.lost.to + 1n === seq,
    );
    if (seq !== prev + 1n && !explained) {
      damage.push(
        neighbours(
          { offset: r.offset, length: 0, reason: `records ${prev + 1n}..${seq - 1n} are missing` },
          records,
          [],
          snap.seq,
          legacy,
        ),
      );
    }
    prev = seq;
  }
  damage.sort((a, b) => a.offset - b.offset);
  const last = numbered.at(-1)?.seq;
  const outdated = claimed !== undefined ? claimed !== FORMAT_VERSION : snap.outdated;
  return { records, unfinished, damage, torn: scan.torn, legacy, outdated, seq: last ?? snap.seq };
}

/** Sequence order of numbered records (parseJournal's records are numbered unless legacy). */
function bySeq(a: { seq: bigint | undefined }, b: { seq: bigint | undefined }): number {
  return a.seq! < b.seq! ? -1 : a.seq! > b.seq! ? 1 : 0;
}

function neighbours(
  span: BadSpan,
  records: RecordRead[],
  unfinished: UnfinishedRead[],
  snapSeq: bigint,
  legacy: boolean,
): DamageRead {
  const before = records.filter((r) => r.offset < span.offset).at(-1);
  const after = records.find((r) => r.offset >= span.offset + span.length);
  const from = (before?.seq ?? snapSeq) + 1n;
  const to = after?.seq !== undefined ? after.seq - 1n : undefined;
  // A record in parts whose parts stop before the span, and that nothing ended before it: the
  // span may have held its next part (it was complete, and acknowledged, before the damage).
  const partsLost = unfinished
    .filter((u) => u.lastPartAt < span.offset && span.offset < u.endedAt)
    .map((u) => u.seq);
  return { ...span, before, after, lost: legacy ? undefined : { from, to }, partsLost };
}

/**
 * The records a damaged span held, by sequence number: "7..9", "7.." (none follows it), "none",
 * and any record in parts it may have held a part of ("none, and record 4 in parts"); undefined when unknown.
 */
export function lostRecords(d: DamageRead): string | undefined {
  if (d.lost === undefined) return undefined;
  const { from, to } = d.lost;
  const numbered = to === undefined ? `${from}..` : to < from ? 'none' : `${from}..${to}`;
  const parts = d.partsLost.map((seq) => `record ${seq} in parts`).join(', ');
  return parts === '' ? numbered : `${numbered}, and ${parts}`;
}

/** The refusal for a damaged journal: the file, the offset, and how many intact records follow. */
export function damageError(file: string, read: JournalRead): StateDamageError {
  const d = read.damage[0]!;
  const intactAfter = read.records.filter((r) => r.offset >= d.offset).length;
  const lost = lostRecords(d);
  const more = read.damage.length > 1 ? ` (and ${read.damage.length - 1} more damaged spans)` : '';
  return new StateDamageError(
    `state journal ${file} is damaged at byte ${d.offset} (${d.reason}; ${d.length} bytes${lost === undefined ? '' : `, records lost: ${lost}`})${more}; ${intactAfter} intact records follow it. Nothing was changed: the file is as it was`,
    file,
    d.offset,
    intactAfter,
    true,
  );
}

export interface StateDirRead {
  gen: number;
  snapshot: SnapshotRead;
  journalPath: string;
  /** The journal's bytes; absent when there is no journal file. */
  data: Buffer | undefined;
  journal: JournalRead;
}

async function readOptional(fs: StoreFs, file: string): Promise<Buffer | undefined> {
  try {
    return await fs.readFile(file);
  } catch (e) {
    if (errnoCode(e) === 'ENOENT') return undefined;
    throw e;
  }
}

/**
 * Without a snapshot the state starts at journal.0. A later generation's journal without its
 * snapshot means the snapshot was lost (a crashed compaction leaves journal.0 beside it): starting
 * from the journal alone would start from a fraction of the state.
 */
async function refuseLostSnapshot(dir: string, snapPath: string, fs: StoreFs): Promise<void> {
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch (e) {
    if (errnoCode(e) === 'ENOENT') return;
    throw e;
  }
  const gens = names.flatMap((n) => {
    const m = JOURNAL_RE.exec(n);
    return m ? [Number(m[1])] : [];
  });
  if (gens.length === 0 || gens.includes(0)) return;
  throw new StateDamageError(
    `state snapshot ${snapPath} is missing, but ${journalName(Math.min(...gens))} (which follows a snapshot) is there: nothing was changed. Restore the snapshot, or move the directory aside to start with an empty state`,
    snapPath,
    0,
    0,
    false,
  );
}

/** Reads snapshot and journal without changing anything; throws for a damaged snapshot or an unknown format. */
export async function readStateDir(dir: string, fs: StoreFs = nodeStoreFs): Promise<StateDirRead> {
  const snapPath = path.join(dir, SNAPSHOT);
  const snapData = await readOptional(fs, snapPath);
  if (snapData === undefined) await refuseLostSnapshot(dir, snapPath, fs);
  const snapshot: SnapshotRead =
    snapData === undefined
      ? { gen: 0, seq: 0n, state: undefined, legacy: false, outdated: false }
      : parseSnapshot(snapData, snapPath);
  const journalPath = path.join(dir, journalName(snapshot.gen));
  const data = await readOptional(fs, journalPath);
  const journal: JournalRead =
    data === undefined
      ? {
          records: [],
          unfinished: [],
          damage: [],
          torn: undefined,
          legacy: snapshot.legacy,
          outdated: snapshot.outdated,
          seq: snapshot.seq,
        }
      : parseJournal(data, snapshot, journalPath);
  return { gen: snapshot.gen, snapshot, journalPath, data, journal };
}

export interface JournalOpenResult {
  journal: Journal;
  /** The state stored by the last compaction, if any. */
  snapshot: StateSnapshot | undefined;
  /** The changes of every record appended since, in order. */
  records: Change[][];
  /** Bytes of a torn tail that were cut off. */
  droppedBytes: number;
  /** Records in parts whose parts stop (never acknowledged): skipped. */
  unfinished: number;
  /** Whether the files are of before format versions: compact() before append(). */
  legacy: boolean;
}

async function writeAll(file: StoreFile, data: Buffer, position: number, onCaller = false): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await file.write(data, done, data.length - done, position + done, onCaller);
    if (bytesWritten <= 0) throw Object.assign(new Error('write made no progress'), { code: 'EIO' });
    done += bytesWritten;
  }
}

/** Creates `file` (0600) holding exactly `data`, synced. */
export async function writeFileSynced(fs: StoreFs, file: string, data: Buffer): Promise<void> {
  const f = await fs.open(file, 'w');
  try {
    await writeAll(f, data, 0);
    await f.sync();
  } finally {
    await f.close();
  }
}

export async function syncDir(fs: StoreFs, dir: string): Promise<void> {
  const d = await fs.open(dir, 'r');
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

/**
 * The changes of one commit, encoded ahead of the append (in slices that yield: see
 * encodeElements); a record of several is the record of their changes one after another.
 */
export interface EncodedChanges {
  /** The changes as runs of whole JSON array elements, in UTF-8, joined by commas in the record; none for no changes. */
  readonly pieces: readonly Buffer[];
  /** Of the pieces joined by commas. */
  readonly bytes: number;
}

export async function encodeChanges(changes: readonly Change[]): Promise<EncodedChanges> {
  const pieces = await encodeElements(changes);
  return { pieces, bytes: pieces.reduce((sum, p) => joinedBytes(sum, p.length), 0) };
}

/** Bytes of two runs of elements joined by a comma (none when either is empty). */
export const joinedBytes = (a: number, b: number): number => (a === 0 ? b : b === 0 ? a : a + 1 + b);

/**
 * Bytes of the changes of `commits` as one record holds them: over `partBytes`, the record goes
 * in parts (store.ts sums them with joinedBytes as it fills a record, by the same rule).
 */
function recordBytes(commits: readonly EncodedChanges[]): number {
  return commits.reduce((sum, c) => joinedBytes(sum, c.bytes), 0);
}

const COMMA = Buffer.from(',');
const RECORD_END = Buffer.from(']}');

/**
 * The changes of a record, as the pieces of each of its frames: one frame when they fit in
 * `partBytes`, else parts of at most `partBytes` (or one piece, when a piece is larger).
 */
function framesOf(commits: readonly EncodedChanges[], partBytes: number): Buffer[][] {
  const pieces = commits.flatMap((c) => c.pieces);
  if (recordBytes(commits) <= partBytes) return [pieces];
  const frames: Buffer[][] = [];
  let current: Buffer[] = [];
  let bytes = 0;
  for (const piece of pieces) {
    if (current.length > 0 && joinedBytes(bytes, piece.length) > partBytes) {
      frames.push(current);
      current = [];
      bytes = 0;
    }
    bytes = joinedBytes(bytes, piece.length);
    current.push(piece);
  }
  frames.push(current);
  return frames;
}

/** The payload of one frame of record `seq`, in pieces: `{ seq, changes }`, or part `part` of `parts`. */
function framePayload(seq: bigint, pieces: readonly Buffer[], part: number, parts: number): Buffer[] {
  const head =
    parts === 1
      ? `{"seq":${encodeJson(seq)},"changes":[`
      : `{"seq":${encodeJson(seq)},"part":${part},"parts":${parts},"changes":[`;
  const out: Buffer[] = [Buffer.from(head)];
  for (const [i, piece] of pieces.entries()) {
    if (i > 0) out.push(COMMA);
    out.push(piece);
  }
  out.push(RECORD_END);
  return out;
}

/**
 * The frames of record `seq` holding the changes of `commits` in order: one frame (frame() of
 * `{ seq, changes }`, byte for byte) when they fit in `partBytes`, else its parts.
 */
export function recordFrames(
  seq: bigint,
  commits: readonly EncodedChanges[],
  partBytes = RECORD_PART_BYTES,
): Buffer[] {
  const frames = framesOf(commits, partBytes);
  return frames.map((pieces, i) => framePieces(framePayload(seq, pieces, i + 1, frames.length)));
}

const header = (gen: number, after: bigint): Buffer =>
  frame({ magic: JOURNAL_MAGIC, version: FORMAT_VERSION, gen, after } satisfies JournalHeader);

/**
 * Makes `state` (through record `seq`) the snapshot of generation `gen` with an empty
 * journal.<gen> (its header comes with its first record), returned open. Once it returns the new snapshot is in place (the directory is
 * not synced yet); on failure nothing of the new generation is left.
 */
export async function writeGeneration(
  fs: StoreFs,
  dir: string,
  gen: number,
  seq: bigint,
  state: StateSnapshot,
): Promise<StoreFile> {
  const nextPath = path.join(dir, journalName(gen));
  const tmpPath = path.join(dir, SNAPSHOT_TMP);
  const next = await fs.open(nextPath, 'w+', DURABLE_WRITES);
  try {
    await writeFileSynced(fs, tmpPath, await snapshotFrame(gen, seq, state));
    await fs.rename(tmpPath, path.join(dir, SNAPSHOT));
  } catch (e) {
    await next.close().catch(() => undefined);
    await fs.unlink(nextPath).catch(() => undefined);
    await fs.unlink(tmpPath).catch(() => undefined);
    throw e;
  }
  return next;
}

/** The snapshot file's frame: the state through record `seq`, the start of journal.<gen>. */
async function snapshotFrame(gen: number, seq: bigint, state: StateSnapshot): Promise<Buffer> {
  const snapshot = { magic: SNAPSHOT_MAGIC, version: FORMAT_VERSION, gen, seq, state };
  // Encoded in slices: a snapshot of large tables must not hold the event loop either.
  return framePiecesInSlices(await encodeJsonPieces(snapshot));
}

/** How the journal files are opened: every write durable when it returns (see StoreFs.open). */
const DURABLE_WRITES = { durableWrites: true };

export class Journal {
  /** Set after a failed append whose bytes could not be cut off yet. */
  private dirtyTail = false;
  /** Set while a created or renamed directory entry is not known to be durable. */
  private dirSyncPending: boolean;
  /** The journal a compaction replaced, deleted once the directory is synced. */
  private staleJournal: string | undefined;
  /** Settles once every frame write begun so far is done: frames are written one at a time. */
  private frameWrites: Promise<void> = Promise.resolve();
  /** While a compaction runs: the frames written since its snapshot, for the next journal. */
  private since: Buffer[] | undefined;

  private constructor(
    private readonly fs: StoreFs,
    private readonly dir: string,
    private gen: number,
    private file: StoreFile,
    private bytes: number,
    /** The sequence number of the last record written (or begun, in parts). */
    private seq: bigint,
    private legacy: boolean,
    private readonly partBytes: number,
  ) {
    this.dirSyncPending = true;
  }

  /**
   * Opens the journal for appending; throws StateDamageError (having written nothing) on damage.
   * `partBytes`: records larger than this are written in parts (RECORD_PART_BYTES).
   */
  static async open(
    dir: string,
    fs: StoreFs = nodeStoreFs,
    partBytes = RECORD_PART_BYTES,
  ): Promise<JournalOpenResult> {
    await fs.mkdir(dir);
    const read = await readStateDir(dir, fs);
    const { gen, journal: j, journalPath, data } = read;
    if (j.damage.length > 0) throw damageError(journalPath, j);

    // Sound: from here on the directory may be written.
    let bytes = data?.length ?? 0;
    let file: StoreFile;
    if (data === undefined) {
      file = await fs.open(journalPath, 'w+', DURABLE_WRITES);
    } else {
      file = await fs.open(journalPath, 'r+', DURABLE_WRITES);
      if (j.torn !== undefined) {
        bytes = j.torn.offset;
        await file.truncate(bytes);
        await file.datasync();
      }
    }
    // Files of before 0600 was the rule are tightened (the directory may be shared: left as it is).
    await fs.restrict(journalPath);
    if (read.snapshot.state !== undefined) await fs.restrict(path.join(dir, SNAPSHOT));

    for (const name of await fs.readdir(dir)) {
      const m = JOURNAL_RE.exec(name);
      if ((m && Number(m[1]) !== gen) || name === SNAPSHOT_TMP) {
        await fs.unlink(path.join(dir, name)).catch(() => undefined);
      }
    }
    const legacy = j.legacy || j.outdated || read.snapshot.legacy || read.snapshot.outdated;
    const journal = new Journal(fs, dir, gen, file, bytes, j.seq, legacy, partBytes);
    return {
      journal,
      snapshot: read.snapshot.state,
      records: j.records.map((r) => r.changes),
      droppedBytes: j.torn?.length ?? 0,
      unfinished: j.unfinished.length,
      legacy,
    };
  }

  /** Bytes in the current journal file. */
  get size(): number {
    return this.bytes;
  }

  /** Appends one record and makes it durable; on failure the file is as before and it throws. */
  async append(changes: Change[]): Promise<void> {
    await this.appendEncoded([await encodeChanges(changes)]);
  }

  /**
   * append() of the changes of `commits`, one after another, encoded already (encodeChanges).
   * Calls may overlap: their frames are written one at a time, in call order, so frames of a
   * later call come between the parts of a large record. Overlap at most one call whose record
   * goes in parts (over partBytes) with others: a part 1 ends the record in parts before it.
   * `onCaller`: nothing else waits for this thread, so a record of one frame of at most
   * WRITE_ON_CALLER_MAX_BYTES is written on it (StoreFile.write).
   */
  async appendEncoded(commits: readonly EncodedChanges[], opts?: { onCaller?: boolean }): Promise<void> {
    if (this.legacy) throw new Error('a journal of an earlier format takes no records: compact it first');
    const frames = framesOf(commits, this.partBytes);
    let seq = 0n;
    for (const [i, pieces] of frames.entries()) {
      await this.inTurn(async () => {
        if (this.dirSyncPending) await this.syncDir();
        if (this.dirtyTail) await this.cutTail();
        // The number is taken by the first frame: a record that fails there leaves no gap.
        if (i === 0) seq = this.seq + 1n;
        // The header goes with the first record: an empty journal is a sound one.
        const lead = this.bytes === 0 ? header(this.gen, this.seq) : undefined;
        const data = framePieces(framePayload(seq, pieces, i + 1, frames.length), lead);
        try {
          // Durable when it returns (O_DSYNC): no fdatasync after it.
          const onCaller =
            opts?.onCaller === true && frames.length === 1 && data.length <= WRITE_ON_CALLER_MAX_BYTES;
          await writeAll(this.file, data, this.bytes, onCaller);
        } catch (e) {
          // The frame may be partly (or, after a failed sync of its data, wholly) in the file: cut
          // it off so it is neither replayed nor followed by later frames. If that fails too,
          // retry before the next write. A record in parts that stops here is unfinished.
          this.dirtyTail = true;
          await this.cutTail().catch(() => undefined);
          throw e;
        }
        this.bytes += data.length;
        if (i === 0) this.seq = seq;
        this.since?.push(lead === undefined ? data : data.subarray(lead.length));
      });
    }
  }

  /** Runs `write` once every frame write begun before it is done. */
  private inTurn(write: () => Promise<void>): Promise<void> {
    const run = this.frameWrites.then(write);
    this.frameWrites = run.catch(() => undefined);
    return run;
  }

  /**
   * Replaces snapshot + journal by a snapshot of `state` and a journal of the records appended
   * since. `state` must be the state through every record written when it is called, with no
   * append in flight; appends may go on while it runs. They go into this journal while the
   * snapshot is encoded and written (a 65,536-mapping state takes hundreds of ms), and their
   * frames are kept: at the switch, with the frames held, the next journal is created holding
   * them, the snapshot renamed into place and the directory synced (a few ms). So a crash at any
   * point leaves either the old snapshot with this journal, which holds every record, or the new
   * snapshot with the next journal, which holds every record after it. On failure nothing of the
   * new generation is left and appends go on here.
   */
  async compact(state: StateSnapshot): Promise<void> {
    const gen = this.gen + 1;
    const seq = this.seq;
    const since: Buffer[] = [];
    this.since = since;
    const nextPath = path.join(this.dir, journalName(gen));
    const tmpPath = path.join(this.dir, SNAPSHOT_TMP);
    try {
      await writeFileSynced(this.fs, tmpPath, await snapshotFrame(gen, seq, state));
      await this.inTurn(async () => {
        let next: StoreFile | undefined;
        let bytes = 0;
        try {
          next = await this.fs.open(nextPath, 'w+', DURABLE_WRITES);
          if (since.length > 0) {
            // The header goes with the first record, as in any journal.
            const data = Buffer.concat([header(gen, seq), ...since]);
            await writeAll(next, data, 0);
            bytes = data.length;
          }
          await this.fs.rename(tmpPath, path.join(this.dir, SNAPSHOT));
        } catch (e) {
          await next?.close().catch(() => undefined);
          await this.fs.unlink(nextPath).catch(() => undefined);
          throw e;
        }
        // The new snapshot is in place: from now on the new journal is the one to append to.
        const old = this.file;
        this.staleJournal = path.join(this.dir, journalName(this.gen));
        this.file = next;
        this.gen = gen;
        this.bytes = bytes;
        this.legacy = false;
        this.dirtyTail = false;
        this.dirSyncPending = true;
        await old.close().catch(() => undefined);
        // Before the next frame: the new journal holds records only its directory entry makes
        // durable. A failure here is retried before the next append, which cannot succeed without it.
        await this.syncDir().catch(() => undefined);
      });
    } catch (e) {
      await this.fs.unlink(tmpPath).catch(() => undefined);
      throw e;
    } finally {
      this.since = undefined;
    }
  }

  async close(): Promise<void> {
    await this.file.close();
  }

  private async cutTail(): Promise<void> {
    await this.file.truncate(this.bytes);
    await this.file.datasync();
    this.dirtyTail = false;
  }

  private async syncDir(): Promise<void> {
    await syncDir(this.fs, this.dir);
    this.dirSyncPending = false;
    if (this.staleJournal !== undefined) {
      const stale = this.staleJournal;
      this.staleJournal = undefined;
      await this.fs.unlink(stale).catch(() => undefined);
    }
  }
}
