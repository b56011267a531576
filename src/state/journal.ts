/**
 * The journal and snapshot files of the state store, in one directory:
 *
 *   snapshot        one frame { gen, state }: the whole state as of the start of journal.<gen>
 *   journal.<gen>   frames appended since that snapshot, each made durable (fdatasync) before
 *                   append() returns
 *
 * Opening reads the snapshot, replays journal.<gen> up to its first torn or damaged frame and cuts
 * the file there. Compaction creates journal.<gen+1>, writes the snapshot to a temporary name,
 * fsyncs it, renames it over `snapshot` and fsyncs the directory; only then is journal.<gen>
 * deleted. Until that directory fsync has succeeded nothing is appended to the new journal, so a
 * crash at any point leaves either the old snapshot with its whole journal or the new one.
 */
import path from 'node:path';
import { frame, unframe } from './codec.ts';
import { errnoCode, nodeStoreFs, type StoreFile, type StoreFs } from './fs.ts';

const SNAPSHOT = 'snapshot';
const SNAPSHOT_TMP = 'snapshot.tmp';
const JOURNAL_RE = /^journal\.(\d+)$/;
const journalName = (gen: number): string => `journal.${gen}`;

export interface JournalOpenResult {
  journal: Journal;
  /** The state stored by the last compaction, if any. */
  snapshot: unknown;
  /** Every intact record appended since, in order. */
  records: unknown[];
  /** Bytes of a torn or damaged tail that were cut off. */
  droppedBytes: number;
}

async function readOptional(fs: StoreFs, file: string): Promise<Buffer | undefined> {
  try {
    return await fs.readFile(file);
  } catch (e) {
    if (errnoCode(e) === 'ENOENT') return undefined;
    throw e;
  }
}

async function writeAll(file: StoreFile, data: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await file.write(data, done, data.length - done, position + done);
    if (bytesWritten <= 0) throw Object.assign(new Error('write made no progress'), { code: 'EIO' });
    done += bytesWritten;
  }
}

export class Journal {
  /** Set after a failed append whose bytes could not be cut off yet. */
  private dirtyTail = false;
  /** Set while a created or renamed directory entry is not known to be durable. */
  private dirSyncPending: boolean;
  /** The journal a compaction replaced, deleted once the directory is synced. */
  private staleJournal: string | undefined;

  private constructor(
    private readonly fs: StoreFs,
    private readonly dir: string,
    private gen: number,
    private file: StoreFile,
    private bytes: number,
    dirSyncPending: boolean,
  ) {
    this.dirSyncPending = dirSyncPending;
  }

  static async open(dir: string, fs: StoreFs = nodeStoreFs): Promise<JournalOpenResult> {
    await fs.mkdir(dir);
    let gen = 0;
    let snapshot: unknown;
    const snap = await readOptional(fs, path.join(dir, SNAPSHOT));
    if (snap !== undefined) {
      // Written whole and renamed into place: a damaged snapshot is not a torn write; refuse it.
      const { values, validBytes } = unframe(snap);
      const value = values[0] as { gen?: unknown; state?: unknown } | undefined;
      if (values.length !== 1 || validBytes !== snap.length || typeof value?.gen !== 'number') {
        throw new Error(`state snapshot ${path.join(dir, SNAPSHOT)} is damaged`);
      }
      gen = value.gen;
      snapshot = value.state;
    }

    const journalPath = path.join(dir, journalName(gen));
    const data = await readOptional(fs, journalPath);
    let records: unknown[] = [];
    let droppedBytes = 0;
    let file: StoreFile;
    if (data === undefined) {
      file = await fs.open(journalPath, 'w+');
    } else {
      const read = unframe(data);
      records = read.values;
      droppedBytes = data.length - read.validBytes;
      file = await fs.open(journalPath, 'r+');
      if (droppedBytes > 0) {
        await file.truncate(read.validBytes);
        await file.datasync();
      }
    }

    for (const name of await fs.readdir(dir)) {
      const m = JOURNAL_RE.exec(name);
      if ((m && Number(m[1]) !== gen) || name === SNAPSHOT_TMP) {
        await fs.unlink(path.join(dir, name)).catch(() => undefined);
      }
    }
    const journal = new Journal(
      fs,
      dir,
      gen,
      file,
      data === undefined ? 0 : data.length - droppedBytes,
      true,
    );
    return { journal, snapshot, records, droppedBytes };
  }

  /** Bytes in the current journal file. */
  get size(): number {
    return this.bytes;
  }

  /** Appends one record and makes it durable; on failure the file is as before and it throws. */
  async append(value: unknown): Promise<void> {
    if (this.dirSyncPending) await this.syncDir();
    if (this.dirtyTail) await this.cutTail();
    const data = frame(value);
    try {
      await writeAll(this.file, data, this.bytes);
      await this.file.datasync();
    } catch (e) {
      // The record may be partly (or, after a failed sync, wholly) in the file: cut it off so it
      // is neither replayed nor followed by later records. If that fails too, retry before the
      // next append.
      this.dirtyTail = true;
      await this.cutTail().catch(() => undefined);
      throw e;
    }
    this.bytes += data.length;
  }

  /** Replaces snapshot + journal by a snapshot of `state` and an empty journal. */
  async compact(state: unknown): Promise<void> {
    const nextGen = this.gen + 1;
    const nextPath = path.join(this.dir, journalName(nextGen));
    const tmpPath = path.join(this.dir, SNAPSHOT_TMP);
    const next = await this.fs.open(nextPath, 'w+');
    try {
      const tmp = await this.fs.open(tmpPath, 'w');
      try {
        await writeAll(tmp, frame({ gen: nextGen, state }), 0);
        await tmp.sync();
      } finally {
        await tmp.close();
      }
      await this.fs.rename(tmpPath, path.join(this.dir, SNAPSHOT));
    } catch (e) {
      await next.close().catch(() => undefined);
      await this.fs.unlink(nextPath).catch(() => undefined);
      await this.fs.unlink(tmpPath).catch(() => undefined);
      throw e;
    }
    // The new snapshot is in place: from now on the new journal is the one to append to.
    const old = this.file;
    this.staleJournal = path.join(this.dir, journalName(this.gen));
    this.file = next;
    this.gen = nextGen;
    this.bytes = 0;
    this.dirtyTail = false;
    this.dirSyncPending = true;
    await old.close().catch(() => undefined);
    // A failure here is retried before the next append, which cannot succeed without it.
    await this.syncDir().catch(() => undefined);
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
    const dir = await this.fs.open(this.dir, 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
    this.dirSyncPending = false;
    if (this.staleJournal !== undefined) {
      const stale = this.staleJournal;
      this.staleJournal = undefined;
      await this.fs.unlink(stale).catch(() => undefined);
    }
  }
}
