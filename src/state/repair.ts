/**
 * The explicit way out of a damaged journal (the API server's --repair-state): keep every intact
 * record, before and after the damage, in file order, drop the damaged bytes, and make the result
 * a clean generation (snapshot + empty journal). The damaged journal is first copied aside,
 * byte for byte, as `journal.<gen>.damaged-<time>`; the old one is deleted only once the new
 * snapshot is in place, so a crash during the repair leaves the damage where it was (and the
 * next start refuses it again).
 *
 * Records after the damage are kept because each is a complete group commit, numbered: the
 * numbers of the intact neighbours say exactly which records the damaged bytes held, and the
 * records after them apply on top as they did the first time (puts and deletes of whole keys;
 * the sequence counters only grow). What the lost records did is not known: what they mapped is
 * no longer desired (reconcile removes it from the device), what they unmapped is desired again.
 * The report names them, with the damaged bytes as text, for the operator to do them again.
 */
import path from 'node:path';
import { replayState, type StateLimits, stateLimits, toSnapshot } from './desired.ts';
import { nodeStoreFs, type StoreFs } from './fs.ts';
import {
  type DamageRead,
  journalName,
  lostRecords,
  type RecordRead,
  readStateDir,
  syncDir,
  writeFileSynced,
  writeGeneration,
} from './journal.ts';

/** One damaged span as the repair dropped it. */
export interface DroppedSpan {
  offset: number;
  length: number;
  reason: string;
  /** Sequence numbers of the records it held ("7..9", "7.." when none follows, "none"). */
  lostRecords: string;
  /** The intact records around it: sequence number, offset, and what they changed. */
  before: string;
  after: string;
  /** The damaged bytes as text (cut at 512 characters): what the lost records most likely said. */
  text: string;
}

export interface RepairReport {
  /** The journal that held the damage. */
  file: string;
  /** Where its bytes are now kept. */
  aside: string;
  kept: number;
  dropped: DroppedSpan[];
  /** Records in parts whose parts stop: not kept, as on a normal open (one the damage took a part of is named in `dropped`). */
  unfinished: number;
}

const TEXT_LIMIT = 512;
/** More sequence numbers than any lost records can have handed out (one per submitted request). */
export const SEQUENCE_SKIP = 1n << 32n;

function describe(r: RecordRead | undefined, none: string): string {
  if (r === undefined) return none;
  const kinds = new Map<string, number>();
  for (const c of r.changes) {
    const key = 'device' in c ? `${c.t} ${c.device}` : c.t;
    kinds.set(key, (kinds.get(key) ?? 0) + 1);
  }
  const what = [...kinds].map(([k, n]) => (n > 1 ? `${n}x ${k}` : k)).join(', ');
  return `${r.seq === undefined ? 'record' : `record ${r.seq}`} at byte ${r.offset} (${what})`;
}

function dropped(d: DamageRead, data: Buffer): DroppedSpan {
  const text = data
    .subarray(d.offset, d.offset + d.length)
    .toString('utf8')
    .replace(/[^\x20-\x7e]/g, '.');
  return {
    offset: d.offset,
    length: d.length,
    reason: d.reason,
    lostRecords: lostRecords(d) ?? 'unknown (unversioned journal)',
    before: describe(d.before, 'the snapshot'),
    after: describe(d.after, 'nothing (the end of the journal)'),
    text: text.length > TEXT_LIMIT ? `${text.slice(0, TEXT_LIMIT)}...` : text,
  };
}

/**
 * Repairs the state directory if its journal is damaged; resolves undefined when there is nothing
 * to repair. A damaged snapshot or an unknown format is refused (thrown), as on a normal open.
 */
export async function repairStateDir(
  dir: string,
  limits?: Partial<StateLimits>,
  fs: StoreFs = nodeStoreFs,
  now: Date = new Date(),
): Promise<RepairReport | undefined> {
  const read = await readStateDir(dir, fs);
  const { journal: j, data } = read;
  if (j.damage.length === 0 || data === undefined) return undefined;
  const state = replayState(
    read.snapshot.state,
    j.records.map((r) => r.changes),
    stateLimits(limits),
  );
  for (const d of state.devices.values()) d.nextSequence += SEQUENCE_SKIP;
  const aside = path.join(dir, `${journalName(read.gen)}.damaged-${now.toISOString().replaceAll(':', '-')}`);
  await writeFileSynced(fs, aside, data);
  const next = await writeGeneration(fs, dir, read.gen + 1, j.seq, toSnapshot(state));
  await next.close();
  await syncDir(fs, dir);
  // Stale now: if this fails, the next open deletes it (its bytes are aside in any case).
  await fs.unlink(read.journalPath).catch(() => undefined);
  return {
    file: read.journalPath,
    aside,
    kept: j.records.length,
    unfinished: j.unfinished.length,
    dropped: [
      ...j.damage.map((d) => dropped(d, data)),
      ...(j.torn
        ? [
            dropped(
              { ...j.torn, before: j.records.at(-1), after: undefined, lost: undefined, partsLost: [] },
              data,
            ),
          ]
        : []),
    ],
  };
}
