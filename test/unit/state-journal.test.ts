import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { decodeJson, encodeJson, type FrameScan, frame, scanFrames } from '../../src/state/codec.ts';
import { type Change, sortedMappings, toSnapshot } from '../../src/state/desired.ts';
import { nodeStoreFs } from '../../src/state/fs.ts';
import {
  encodeChanges,
  Journal,
  StateDamageError,
  StateFormatError,
  WRITE_ON_CALLER_MAX_BYTES,
} from '../../src/state/journal.ts';
import { repairStateDir, SEQUENCE_SKIP } from '../../src/state/repair.ts';
import { FORMAT_VERSION, JOURNAL_MAGIC, SNAPSHOT_MAGIC } from '../../src/state/schema.ts';
import { StateStore } from '../../src/state/store.ts';
import { ServiceError } from '../../src/core/errors.ts';
import { FaultyFs, frameOffsets, storeFsWithWrites } from './core-harness.ts';

const BIG = (1n << 64n) - 1n;

const put = (iova: bigint, device = 'vdpa0'): Change => ({
  t: 'mapping.put',
  device,
  mapping: { asid: 0, iova, size: 0x1000n, memory: 'm0', offset: iova, perm: 'rw' },
});

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-state-'));
});
afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const journalFile = () => path.join(dir, fs.readdirSync(dir).find((n) => n.startsWith('journal.'))!);

describe('codec', () => {
  test('bigints survive JSON exactly, as decimal strings', () => {
    const value = { a: BIG, b: [0n, 1n << 63n], c: 'x', d: 7 };
    const text = encodeJson(value);
    assert.match(text, /"18446744073709551615"/);
    assert.deepEqual(decodeJson(text), value);
  });

  test('a short or partial last frame is a torn tail; a bad frame with frames after it is damage', () => {
    const [a, b, c] = [frame({ n: 1n }), frame({ n: 2n }), frame({ n: 3n })];
    const values = (scan: FrameScan) => scan.frames.map((f) => f.value);

    const cut = scanFrames(Buffer.concat([a, b.subarray(0, b.length - 3)]));
    assert.deepEqual(values(cut), [{ n: 1n }]);
    assert.deepEqual(cut.damage, []);
    assert.equal(cut.torn?.offset, a.length);
    assert.equal(scanFrames(Buffer.concat([a, b.subarray(0, 5)])).torn?.offset, a.length, 'a cut header');
    const zeros = scanFrames(Buffer.concat([a, Buffer.alloc(100)]));
    assert.deepEqual([zeros.damage, zeros.torn?.offset], [[], a.length], 'zeros a crash left');

    const flipped = Buffer.concat([a, b, c]);
    flipped[a.length + 10]! ^= 0x01;
    const scan = scanFrames(flipped);
    assert.deepEqual(values(scan), [{ n: 1n }, { n: 3n }], 'the frame after the damage is found');
    assert.deepEqual(scan.damage, [{ offset: a.length, length: b.length, reason: 'CRC mismatch' }]);
    assert.equal(scan.torn, undefined);

    // A length that points past the end is torn only when nothing intact follows.
    const longer = Buffer.concat([a, b, c]);
    longer.writeUInt32LE(1 << 20, a.length);
    assert.equal(scanFrames(longer).damage[0]?.offset, a.length);
    assert.deepEqual(values(scanFrames(longer)), [{ n: 1n }, { n: 3n }]);
  });
});

/** A change of this test's kind: a page of m0 at `iova`. */
const at = (iova: bigint): Change[] => [put(iova)];

const journalFrames = () => frameOffsets(fs.readFileSync(journalFile()));

/** Every file of the directory and its bytes. */
function dirBytes(): Map<string, Buffer> {
  return new Map(fs.readdirSync(dir).map((n) => [n, fs.readFileSync(path.join(dir, n))]));
}

async function journalWith(iovas: bigint[]): Promise<void> {
  const { journal } = await Journal.open(dir);
  for (const iova of iovas) await journal.append(at(iova));
  await journal.close();
}

describe('journal', () => {
  test('appended records replay in order after reopening', async () => {
    const { journal } = await Journal.open(dir);
    await journal.append(at(0x1000n));
    await journal.append(at(BIG - 0xfffn));
    await journal.close();
    const again = await Journal.open(dir);
    assert.deepEqual(again.records, [at(0x1000n), at(BIG - 0xfffn)]);
    assert.equal(again.droppedBytes, 0);
    await again.journal.close();
  });

  test('a torn tail is cut off on open, and appends continue after the last whole record', async () => {
    await journalWith([0x1000n]);
    const whole = fs.statSync(journalFile()).size;
    fs.appendFileSync(journalFile(), frame({ seq: 2n, changes: at(0x2000n) }).subarray(0, 10));
    const reopened = await Journal.open(dir);
    assert.deepEqual(reopened.records, [at(0x1000n)]);
    assert.equal(reopened.droppedBytes, 10);
    assert.equal(fs.statSync(journalFile()).size, whole);
    await reopened.journal.append(at(0x3000n));
    await reopened.journal.close();
    const again = await Journal.open(dir);
    assert.deepEqual(again.records, [at(0x1000n), at(0x3000n)]);
    await again.journal.close();
  });

  test('compaction: snapshot replaces the journal; leftovers of a crashed compaction are ignored', async () => {
    const { journal } = await Journal.open(dir);
    await journal.append(at(0x1000n));
    const state = { memory: [], devices: [] };
    await journal.compact(state);
    await journal.append(at(0x2000n));
    await journal.close();
    assert.deepEqual(fs.readdirSync(dir).sort(), ['journal.1', 'snapshot']);
    // A crash during a later compaction: the next journal and the temp snapshot were written,
    // the rename never happened.
    fs.writeFileSync(path.join(dir, 'journal.2'), frame('never acknowledged'));
    fs.writeFileSync(path.join(dir, 'snapshot.tmp'), 'garbage');
    const reopened = await Journal.open(dir);
    assert.deepEqual(reopened.snapshot, state);
    assert.deepEqual(reopened.records, [at(0x2000n)]);
    assert.deepEqual(fs.readdirSync(dir).sort(), ['journal.1', 'snapshot']);
    await reopened.journal.close();
  });

  test('a damaged snapshot is refused rather than silently dropped, and repair refuses it too', async () => {
    const { journal } = await Journal.open(dir);
    await journal.compact({ memory: [], devices: [] });
    await journal.close();
    const snap = path.join(dir, 'snapshot');
    const bytes = fs.readFileSync(snap);
    bytes[bytes.length - 1]! ^= 0xff;
    fs.writeFileSync(snap, bytes);
    await assert.rejects(Journal.open(dir), /snapshot .* is damaged/);
    await assert.rejects(repairStateDir(dir), /snapshot .* is damaged .* no repair can keep it/);
    assert.deepEqual(fs.readFileSync(snap), bytes);
  });

  test('a lost snapshot is refused, not taken for an empty state', async () => {
    const { journal } = await Journal.open(dir);
    await journal.append(at(0x1000n));
    await journal.compact({ memory: [], devices: [] });
    await journal.append(at(0x2000n));
    await journal.close();
    fs.rmSync(path.join(dir, 'snapshot'));
    await assert.rejects(
      Journal.open(dir),
      /snapshot is missing, but journal\.1 .* is there: nothing was changed/,
    );
    assert.deepEqual(fs.readdirSync(dir), ['journal.1']);
  });

  test('a flipped byte in an early record is damage: refused with file, offset and count, nothing written', async () => {
    const iovas = Array.from({ length: 10 }, (_, i) => BigInt(i + 1) * 0x1000n);
    await journalWith(iovas);
    const offsets = journalFrames();
    assert.equal(offsets.length, 11, 'a header and ten records');
    const bytes = fs.readFileSync(journalFile());
    bytes[offsets[3]! + 20]! ^= 0x04;
    fs.writeFileSync(journalFile(), bytes);
    const before = dirBytes();
    await assert.rejects(StateStore.open({ dir }), (e: unknown) => {
      assert.ok(e instanceof StateDamageError);
      assert.equal(e.file, journalFile());
      assert.equal(e.offset, offsets[3]);
      assert.equal(e.intactAfter, 7);
      const length = offsets[4]! - offsets[3]!;
      const says = `journal.0 is damaged at byte ${offsets[3]} (CRC mismatch; ${length} bytes, records lost: 3..3); 7 intact records follow it`;
      assert.ok(e.message.includes(says), e.message);
      return true;
    });
    assert.deepEqual(dirBytes(), before, 'the directory is as it was');
  });

  test('a record whose CRC matches but whose content fails the schema is damage, even at the end', async () => {
    await journalWith([0x1000n, 0x2000n]);
    const change = put(0x3000n) as Extract<Change, { t: 'mapping.put' }>;
    const bad = { seq: 3n, changes: [{ ...change, mapping: { ...change.mapping, iova: 1n << 64n } }] };
    fs.appendFileSync(journalFile(), frame(bad));
    await assert.rejects(Journal.open(dir), (e: unknown) => {
      assert.ok(e instanceof StateDamageError);
      assert.match(e.message, /invalid record: changes\.0\.mapping\.iova: Too big/);
      assert.equal(e.intactAfter, 0);
      return true;
    });
  });

  test('a record missing from the sequence is damage, though every frame is intact', async () => {
    await journalWith([0x1000n, 0x2000n, 0x3000n]);
    const data = fs.readFileSync(journalFile());
    const offsets = journalFrames();
    fs.writeFileSync(journalFile(), Buffer.concat([data.subarray(0, offsets[2]), data.subarray(offsets[3])]));
    await assert.rejects(
      Journal.open(dir),
      /damaged at byte \d+ \(records 2\.\.2 are missing; 0 bytes, records lost: 2\.\.2\); 1 intact records follow it/,
    );
  });

  test('another format version is refused, snapshot or journal, and repair does not touch it', async () => {
    const header = { magic: JOURNAL_MAGIC, version: 3, gen: 0, after: 0n };
    fs.writeFileSync(path.join(dir, 'journal.0'), Buffer.concat([frame(header), frame({ future: true })]));
    await assert.rejects(
      Journal.open(dir),
      /journal\.0 is of format version 3; this vdpa-mapd reads version 1 or 2/,
    );
    await assert.rejects(repairStateDir(dir), StateFormatError);
    fs.rmSync(path.join(dir, 'journal.0'));
    fs.writeFileSync(path.join(dir, 'snapshot'), frame({ magic: SNAPSHOT_MAGIC, version: 9, gen: 0 }));
    await assert.rejects(Journal.open(dir), /snapshot is of format version 9/);
  });

  test('unversioned files (before the header) are read and rewritten in the current format', async () => {
    const state = {
      memory: [],
      devices: [
        { name: 'vdpa0', nextSequence: 5n, mappings: [], pending: [], failures: [], idempotency: [] },
      ],
    };
    fs.writeFileSync(path.join(dir, 'snapshot'), frame({ gen: 3, state }));
    fs.writeFileSync(path.join(dir, 'journal.3'), Buffer.concat([frame(at(0x1000n)), frame(at(0x2000n))]));
    const { store } = await StateStore.open({ dir });
    assert.deepEqual(
      sortedMappings(store.state.devices.get('vdpa0')).map((m) => m.iova),
      [0x1000n, 0x2000n],
    );
    await store.commit(at(0x3000n));
    await store.close();
    assert.deepEqual(fs.readdirSync(dir).sort(), ['journal.4', 'snapshot']);
    const header = scanFrames(fs.readFileSync(path.join(dir, 'journal.4'))).frames[0]?.value;
    assert.deepEqual(header, { magic: JOURNAL_MAGIC, version: FORMAT_VERSION, gen: 4, after: 0n });
    const { store: again } = await StateStore.open({ dir });
    assert.equal(again.state.devices.get('vdpa0')?.mappings.size, 3);
    assert.equal(again.state.devices.get('vdpa0')?.nextSequence, 5n);
    await again.close();
  });

  test('version 1 files (no records in parts) are read and rewritten in version 2 before anything is appended', async () => {
    const state = {
      memory: [],
      devices: [
        { name: 'vdpa0', nextSequence: 5n, mappings: [], pending: [], failures: [], idempotency: [] },
      ],
    };
    fs.writeFileSync(
      path.join(dir, 'snapshot'),
      frame({ magic: SNAPSHOT_MAGIC, version: 1, gen: 3, seq: 4n, state }),
    );
    fs.writeFileSync(
      path.join(dir, 'journal.3'),
      Buffer.concat([
        frame({ magic: JOURNAL_MAGIC, version: 1, gen: 3, after: 4n }),
        frame({ seq: 5n, changes: at(0x1000n) }),
      ]),
    );
    const { store } = await StateStore.open({ dir });
    assert.deepEqual(fs.readdirSync(dir).sort(), ['journal.4', 'snapshot']);
    const snapshot = scanFrames(fs.readFileSync(path.join(dir, 'snapshot'))).frames[0]?.value as {
      version: number;
      seq: bigint;
    };
    assert.equal(snapshot.version, 2);
    assert.equal(snapshot.seq, 5n);
    await store.commit(at(0x2000n));
    await store.close();
    const header = scanFrames(fs.readFileSync(path.join(dir, 'journal.4'))).frames[0]?.value;
    assert.deepEqual(header, { magic: JOURNAL_MAGIC, version: 2, gen: 4, after: 5n });
    const { store: again } = await StateStore.open({ dir });
    assert.deepEqual(
      sortedMappings(again.state.devices.get('vdpa0')).map((m) => m.iova),
      [0x1000n, 0x2000n],
    );
    await again.close();
  });

  test('the journal is opened O_DSYNC, after compaction too: an append is durable when its write returns', async () => {
    const { store } = await StateStore.open({ dir, compactBytes: 1 });
    /** The open flags of this process's descriptors of the current journal (Linux: /proc/self/fdinfo). */
    const journalFlags = () =>
      fs.readdirSync('/proc/self/fd').flatMap((fd) => {
        let target: string;
        try {
          target = fs.readlinkSync(`/proc/self/fd/${fd}`);
        } catch {
          return [];
        }
        if (target !== journalFile()) return [];
        const info = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
        return [Number.parseInt(/^flags:\s+([0-7]+)/m.exec(info)![1]!, 8)];
      });
    await store.commit(at(0x1000n));
    await store.commit(at(0x2000n));
    // The compaction runs beside the commits: wait for its switch (bounded by steps, not by time).
    for (let i = 0; i < 600_000 && fs.existsSync(path.join(dir, 'journal.0')); i++) await sleep(1);
    assert.notEqual(journalFile(), path.join(dir, 'journal.0'), 'compacted');
    const flags = journalFlags();
    assert.equal(flags.length, 1);
    assert.equal(flags[0]! & fs.constants.O_DSYNC, fs.constants.O_DSYNC);
    await store.close();
    const { store: again } = await StateStore.open({ dir });
    assert.deepEqual(
      journalFlags().map((f) => f & fs.constants.O_DSYNC),
      [fs.constants.O_DSYNC],
    );
    await again.close();
  });

  test('state files are 0600 in a 0700 directory; a looser journal or snapshot is tightened on open', async () => {
    const sub = path.join(dir, 'state');
    const { store } = await StateStore.open({ dir: sub, compactBytes: 1 });
    await store.commit(at(0x1000n));
    await store.commit(at(0x2000n));
    await store.close();
    const mode = (name: string) => fs.statSync(path.join(sub, name)).mode & 0o777;
    assert.equal(mode('.'), 0o700);
    for (const name of fs.readdirSync(sub)) assert.equal(mode(name), 0o600, name);
    for (const name of fs.readdirSync(sub)) fs.chmodSync(path.join(sub, name), 0o644);
    const { store: again } = await StateStore.open({ dir: sub });
    await again.close();
    for (const name of fs.readdirSync(sub)) assert.equal(mode(name), 0o600, name);
  });
});

/** Changes of `n` pages of `device` from `base`: a record of about 150 bytes per page. */
const pages = (device: string, n: number, base = 0n): Change[] =>
  Array.from({ length: n }, (_, k) => put(base + BigInt(k) * 0x1000n, device));

/** The frames of the journal as a plain reading of the format gives them: JSON, bigints restored. */
function plainFrames(data: Buffer): { offset: number; end: number; value: Record<string, unknown> }[] {
  return frameOffsets(data).map((offset) => {
    const end = offset + 8 + data.readUInt32LE(offset);
    return {
      offset,
      end,
      value: decodeJson(data.subarray(offset + 8, end).toString('utf8')) as Record<string, unknown>,
    };
  });
}

/**
 * The reference reading of a journal cut at `length` (a crash there): the changes of every record
 * whose frames all lie before the cut (a record in parts: all of its parts), in sequence order.
 */
function completeRecords(data: Buffer, length: number): Change[] {
  const parts = new Map<bigint, { parts: number; changes: Change[][] }>();
  const whole: { seq: bigint; changes: Change[] }[] = [];
  for (const f of plainFrames(data)) {
    if (f.end > length || 'magic' in f.value) continue;
    const v = f.value as { seq: bigint; changes: Change[]; part?: number; parts?: number };
    if (v.part === undefined) whole.push(v);
    else {
      const r = parts.get(v.seq) ?? { parts: v.parts!, changes: [] };
      r.changes[v.part - 1] = v.changes;
      parts.set(v.seq, r);
    }
  }
  for (const [seq, r] of parts) {
    if (r.changes.filter(Boolean).length === r.parts) whole.push({ seq, changes: r.changes.flat() });
  }
  return whole.sort((a, b) => (a.seq < b.seq ? -1 : 1)).flatMap((r) => r.changes);
}

/** device -> sorted iovas, from changes applied in order. */
function mappedBy(changes: Change[]): Record<string, string[]> {
  const out = new Map<string, Set<bigint>>();
  for (const c of changes) {
    if (c.t !== 'mapping.put' && c.t !== 'mapping.delete') continue;
    const set = out.get(c.device) ?? new Set<bigint>();
    out.set(c.device, set);
    if (c.t === 'mapping.put') set.add(c.mapping.iova);
    else set.delete(c.iova);
  }
  return Object.fromEntries(
    [...out]
      .filter(([, s]) => s.size > 0)
      .map(([d, s]) => [d, [...s].sort((a, b) => (a < b ? -1 : 1)).map(String)]),
  );
}

function storeMapped(store: StateStore): Record<string, string[]> {
  return Object.fromEntries(
    [...store.state.devices]
      .filter(([, d]) => d.mappings.size > 0)
      .map(([name, d]) => [name, sortedMappings(d).map((m) => String(m.iova))]),
  );
}

describe('records in parts', () => {
  /** Pieces of encoded changes are about 8 KB (codec.ts): parts of two or so. */
  const PART = 20_000;

  /** A journal of 600 pages of vdpa0 in parts, one page of vdpa1 written between its first and second part. */
  async function interleaved(): Promise<void> {
    const { journal } = await Journal.open(dir, undefined, PART);
    const big = journal.appendEncoded([await encodeChanges(pages('vdpa0', 600))]);
    // Made while the big record's first part is written: written before its next part.
    const small = journal.appendEncoded([await encodeChanges(pages('vdpa1', 1))]);
    await Promise.all([big, small]);
    await journal.close();
  }

  test('a large record goes in parts of at most the part size, with records that came meanwhile between them', async () => {
    await interleaved();
    const frames = plainFrames(fs.readFileSync(journalFile()));
    const kinds = frames
      .slice(1)
      .map((f) => (f.value.part === undefined ? `record ${f.value.seq}` : `part ${f.value.part}`));
    const parts = frames.filter((f) => f.value.part !== undefined);
    assert.ok(parts.length > 2, `${parts.length} parts`);
    assert.equal(kinds[0], 'part 1');
    assert.ok(kinds.indexOf('record 2') < kinds.lastIndexOf(`part ${parts.length}`), kinds.join(', '));
    for (const f of parts) {
      assert.ok(f.end - f.offset - 8 <= PART + 100, 'a part is at most the part size, and its head');
      assert.equal(f.value.seq, 1n);
      assert.equal(f.value.parts, parts.length);
    }
    const again = await Journal.open(dir, undefined, PART);
    assert.deepEqual(again.records, [pages('vdpa0', 600), pages('vdpa1', 1)]);
    assert.equal(again.unfinished, 0);
    await again.journal.close();
  });

  test('a crash at any byte: the records complete before it replay, an unfinished record in parts is skipped, and appends go on', async () => {
    const { store } = await StateStore.open({ dir, recordPartBytes: PART });
    const big = store.commit(pages('vdpa0', 600));
    const smalls: Promise<void>[] = [];
    for (let i = 0; i < 6; i++) {
      await new Promise((resolve) => setImmediate(resolve));
      smalls.push(store.commit(pages('vdpa1', 1, BigInt(i) << 20n)));
    }
    await Promise.all([big, ...smalls]);
    await store.commit(pages('vdpa2', 300));
    await store.close();
    const file = journalFile();
    const data = fs.readFileSync(file);
    const ends = plainFrames(data).map((f) => f.end);
    // Every frame boundary, and a byte into every frame.
    const cuts = [...new Set([...ends, ...ends.map((e) => e - 5)])].sort((a, b) => a - b);
    let unfinishedSeen = 0;
    for (const cut of cuts) {
      fs.writeFileSync(file, data.subarray(0, cut));
      const { store: reopened, unfinished } = await StateStore.open({ dir, recordPartBytes: PART });
      unfinishedSeen += unfinished;
      const expected = completeRecords(data, cut);
      assert.deepEqual(storeMapped(reopened), mappedBy(expected), `cut at ${cut}`);
      // Appends go on after an unfinished record, and what they wrote replays with the rest.
      await reopened.commit(pages('vdpa3', 1));
      await reopened.close();
      const { store: third } = await StateStore.open({ dir, recordPartBytes: PART });
      assert.deepEqual(
        storeMapped(third),
        mappedBy([...expected, ...pages('vdpa3', 1)]),
        `cut at ${cut}, then an append`,
      );
      await third.close();
    }
    assert.ok(unfinishedSeen > 0, 'some cuts fell inside a record in parts');
  });

  test('a failed write of a part leaves the record unfinished: refused, and the records around it stand', async () => {
    // The write of a second part fails half way, once.
    let armed = true;
    const failing = storeFsWithWrites(async (_file, write, buffer, offset, length, position) => {
      if (armed && Buffer.from(buffer).includes('"part":2,')) {
        armed = false;
        await write(buffer, offset, length >> 1, position);
        throw Object.assign(new Error('EIO'), { code: 'EIO' });
      }
      return write(buffer, offset, length, position);
    });
    const { store } = await StateStore.open({ dir, fs: failing, recordPartBytes: PART });
    await store.commit(pages('vdpa1', 1));
    const big = store.commit(pages('vdpa0', 600));
    await assert.rejects(big, (e: unknown) => e instanceof ServiceError && e.code === 'UNAVAILABLE');
    assert.equal(store.state.devices.get('vdpa0')?.mappings.size ?? 0, 0);
    await store.commit(pages('vdpa1', 1, 1n << 20n));
    await store.commit(pages('vdpa0', 300, 1n << 30n));
    await store.close();
    const { store: again, unfinished } = await StateStore.open({ dir, recordPartBytes: PART });
    assert.equal(unfinished, 1);
    assert.deepEqual(
      storeMapped(again),
      mappedBy([...pages('vdpa1', 1), ...pages('vdpa1', 1, 1n << 20n), ...pages('vdpa0', 300, 1n << 30n)]),
    );
    await again.close();
  });

  test('damage to a part names the record in parts among the lost, and repair keeps the records between its parts', async () => {
    await interleaved();
    const bytes = fs.readFileSync(journalFile());
    const frames = plainFrames(bytes);
    const second = frames.find((f) => f.value.part === 2)!;
    bytes[second.offset + 40]! ^= 0x20;
    fs.writeFileSync(journalFile(), bytes);
    await assert.rejects(Journal.open(dir), (e: unknown) => {
      assert.ok(e instanceof StateDamageError, String(e));
      assert.match(e.message, /records lost: [^)]*, and record 1 in parts/);
      return true;
    });
    const report = await repairStateDir(dir);
    assert.ok(report);
    assert.equal(report.kept, 1);
    assert.match(report.dropped[0]!.lostRecords, /record 1 in parts/);
    const { store } = await StateStore.open({ dir });
    assert.equal(store.state.devices.get('vdpa0')?.mappings.size ?? 0, 0);
    assert.equal(store.state.devices.get('vdpa1')?.mappings.size, 1);
    await store.close();
  });

  test('a part out of turn is damage, though its frame is intact', async () => {
    const { journal } = await Journal.open(dir, undefined, PART);
    await journal.append(pages('vdpa0', 600));
    await journal.close();
    const data = fs.readFileSync(journalFile());
    const frames = plainFrames(data);
    // Parts 2 and 3 swapped.
    const [a, b] = [frames[2]!, frames[3]!];
    fs.writeFileSync(
      journalFile(),
      Buffer.concat([
        data.subarray(0, a.offset),
        data.subarray(b.offset, b.end),
        data.subarray(a.offset, a.end),
        data.subarray(b.end),
      ]),
    );
    await assert.rejects(Journal.open(dir), (e: unknown) => {
      assert.ok(e instanceof StateDamageError, String(e));
      assert.match(e.message, /part 3 of record 1 out of turn \(part 2 of record 1 was next\)/);
      return true;
    });
  });
});

describe('repair', () => {
  test('keeps every intact record before and after the damage, moves the damaged file aside, names what it dropped', async () => {
    const iovas = Array.from({ length: 8 }, (_, i) => BigInt(i + 1) * 0x1000n);
    await journalWith(iovas);
    const offsets = journalFrames();
    const bytes = fs.readFileSync(journalFile());
    bytes[offsets[4]! + 30]! ^= 0x20; // record 4: 0x4000
    fs.writeFileSync(journalFile(), bytes);
    const damaged = journalFile();

    assert.equal(await repairStateDir(path.join(dir, 'elsewhere')), undefined, 'nothing to repair');
    const report = await repairStateDir(dir, {}, undefined, new Date('2026-01-02T03:04:05.678Z'));
    assert.ok(report);
    assert.equal(report.file, damaged);
    assert.equal(report.aside, path.join(dir, 'journal.0.damaged-2026-01-02T03-04-05.678Z'));
    assert.deepEqual(fs.readFileSync(report.aside), bytes, 'the damaged bytes, kept as they were');
    assert.equal(report.kept, 7);
    assert.equal(report.dropped.length, 1);
    const [d] = report.dropped;
    assert.deepEqual([d!.offset, d!.length, d!.lostRecords], [offsets[4], offsets[5]! - offsets[4]!, '4..4']);
    assert.match(d!.before, /^record 3 at byte \d+ \(mapping\.put vdpa0\)$/);
    assert.match(d!.after, /^record 5 at byte \d+ \(mapping\.put vdpa0\)$/);
    assert.match(d!.text, /mapping\.put/);
    assert.deepEqual(fs.readdirSync(dir).sort(), [
      'journal.0.damaged-2026-01-02T03-04-05.678Z',
      'journal.1',
      'snapshot',
    ]);

    const { store } = await StateStore.open({ dir });
    const kept = iovas.filter((i) => i !== 0x4000n);
    assert.deepEqual(
      sortedMappings(store.state.devices.get('vdpa0')).map((m) => m.iova),
      kept,
    );
    // Record 4 may have handed out sequence numbers no kept record shows: none is handed out again.
    assert.equal(store.state.devices.get('vdpa0')?.nextSequence, 1n + SEQUENCE_SKIP);
    await store.commit(at(0x9000n));
    await store.close();
    const { store: again } = await StateStore.open({ dir });
    assert.deepEqual(
      sortedMappings(again.state.devices.get('vdpa0')).map((m) => m.iova),
      [...kept, 0x9000n],
    );
    await again.close();
  });
});

describe('store', () => {
  test('commits are durable: a reopened store has the same state', async () => {
    const { store } = await StateStore.open({ dir });
    await store.commit([put(0x1000n), put(0x2000n)]);
    await store.commit([{ t: 'mapping.delete', device: 'vdpa0', asid: 0, iova: 0x1000n }]);
    await store.commit([{ t: 'sequence', device: 'vdpa0', next: 42n }]);
    await store.close();
    const { store: again } = await StateStore.open({ dir });
    assert.deepEqual(
      sortedMappings(again.state.devices.get('vdpa0')).map((m) => m.iova),
      [0x2000n],
    );
    assert.equal(again.state.devices.get('vdpa0')?.nextSequence, 42n);
    assert.equal(again.state.memoryUse.get('m0'), 1);
    await again.close();
  });

  test('commits made while a write is in flight share the next durable write (group commit)', async () => {
    const faulty = new FaultyFs();
    const { store } = await StateStore.open({ dir, fs: faulty });
    await store.commit([put(0x1000n)]);
    const before = faulty.calls.get('datasync') ?? 0;
    const first = store.commit([put(0x2000n)]);
    // Its write is at the file now: the three below wait for it and go together.
    await new Promise((resolve) => setImmediate(resolve));
    await Promise.all([
      first,
      store.commit([put(0x3000n)]),
      store.commit([put(0x4000n)]),
      store.commit([put(0x5000n)]),
    ]);
    assert.equal((faulty.calls.get('datasync') ?? 0) - before, 2);
    assert.equal(store.state.devices.get('vdpa0')?.mappings.size, 5);
    await store.close();
  });

  for (const { op, partial, quiet } of [
    { op: 'write' as const, partial: false, quiet: false },
    { op: 'write' as const, partial: true, quiet: false },
    { op: 'datasync' as const, partial: false, quiet: false },
    { op: 'write' as const, partial: true, quiet: true },
    { op: 'datasync' as const, partial: false, quiet: true },
  ]) {
    const how = `${partial ? ' (half written)' : ''}${quiet ? ' on the calling thread' : ''}`;
    test(`a failed ${op}${how} refuses the change with UNAVAILABLE and changes nothing`, async () => {
      const faulty = new FaultyFs();
      const { store } = await StateStore.open({ dir, fs: faulty, quiet: () => quiet });
      await store.commit([put(0x1000n)]);
      const before = toSnapshot(store.state);
      faulty.fail(op, op === 'write' ? 'ENOSPC' : 'EIO', { partial });
      await assert.rejects(store.commit([put(0x2000n)]), (e: unknown) => {
        assert.ok(e instanceof ServiceError);
        assert.equal(e.code, 'UNAVAILABLE');
        assert.equal(e.errno, op === 'write' ? 'ENOSPC' : 'EIO');
        assert.ok((e.details.retryAfterMs ?? 0) > 0);
        return true;
      });
      assert.deepEqual(toSnapshot(store.state), before);
      await store.commit([put(0x3000n)]);
      await store.close();
      const { store: again, droppedBytes } = await StateStore.open({ dir });
      assert.equal(droppedBytes, 0, 'the refused record was cut off at once');
      assert.deepEqual(
        sortedMappings(again.state.devices.get('vdpa0')).map((m) => m.iova),
        [0x1000n, 0x3000n],
      );
      await again.close();
    });
  }

  test('a small record is written on the calling thread only while the store is told it is quiet', async () => {
    const seen: { bytes: number; onCaller: boolean }[] = [];
    const watched = storeFsWithWrites((file, write, buffer, offset, length, position, onCaller) => {
      if (path.basename(file).startsWith('journal.'))
        seen.push({ bytes: length, onCaller: onCaller === true });
      return write(buffer, offset, length, position, onCaller);
    });
    let quiet = true;
    const { store } = await StateStore.open({ dir, fs: watched, quiet: () => quiet });
    await store.commit([put(0x1000n)]);
    quiet = false;
    await store.commit([put(0x2000n)]);
    quiet = true;
    // Over WRITE_ON_CALLER_MAX_BYTES: to the thread pool even while quiet.
    const many = Array.from({ length: 400 }, (_, i) => put(0x100000n + BigInt(i) * 0x1000n));
    await store.commit(many);
    await store.close();
    assert.deepEqual(
      seen.map((w) => w.onCaller),
      [true, false, false],
    );
    assert.ok(seen[0]!.bytes <= WRITE_ON_CALLER_MAX_BYTES && seen[2]!.bytes > WRITE_ON_CALLER_MAX_BYTES);
    const { store: again } = await StateStore.open({ dir });
    assert.equal(again.state.devices.get('vdpa0')?.mappings.size, 402);
    await again.close();
  });

  test('a write on the calling thread is done when it returns, and fails as a rejection', async () => {
    const file = path.join(dir, 'f');
    const f = await nodeStoreFs.open(file, 'w', { durableWrites: true });
    const written = f.write(Buffer.from('abc'), 0, 3, 0, true);
    assert.equal(fs.readFileSync(file, 'utf8'), 'abc', 'on disk before the promise is awaited');
    assert.deepEqual(await written, { bytesWritten: 3 });
    await f.close();
    // A closed file: the failure comes as the promise's, as from the thread pool.
    const failed = f.write(Buffer.from('d'), 0, 1, 3, true);
    await assert.rejects(failed);
  });

  test('the journal is compacted past compactBytes and everything survives reopening', async () => {
    const { store } = await StateStore.open({ dir, compactBytes: 2048 });
    for (let i = 1n; i <= 40n; i++) await store.commit([put(i * 0x1000n)]);
    await store.commit([{ t: 'mapping.delete', device: 'vdpa0', asid: 0, iova: 0x5000n }]);
    const expected = toSnapshot(store.state);
    await store.close();
    // How many commits land in the next journal depends on how long the snapshot's fsync takes
    // beside the commits' writes: asserted is only what holds at any speed.
    assert.ok(fs.existsSync(path.join(dir, 'snapshot')));
    assert.ok(!fs.existsSync(path.join(dir, 'journal.0')), 'the first journal was compacted away');
    const { journal, snapshot, records } = await Journal.open(dir);
    await journal.close();
    assert.ok((snapshot?.devices[0]?.mappings.length ?? 0) > 0, 'the snapshot holds the early commits');
    assert.ok(records.length < 41, 'the journal holds only the records after the snapshot');
    const { store: again } = await StateStore.open({ dir, compactBytes: 2048 });
    assert.deepEqual(toSnapshot(again.state), expected);
    assert.equal(again.state.devices.get('vdpa0')?.mappings.size, 39);
    await again.close();
  });

  test('commits go on while a compaction writes its snapshot; the next journal holds them, and a crash at the gate loses none', async () => {
    // The snapshot's write waits at a gate: the compaction is held there.
    let open: (() => void) | undefined;
    let reached: (() => void) | undefined;
    const gate = new Promise<void>((resolve) => {
      open = resolve;
    });
    const atGate = new Promise<void>((resolve) => {
      reached = resolve;
    });
    const gated = storeFsWithWrites(async (file, write, buffer, offset, length, position) => {
      if (file.endsWith('snapshot.tmp')) {
        reached!();
        await gate;
      }
      return write(buffer, offset, length, position);
    });
    const { store } = await StateStore.open({ dir, fs: gated, compactBytes: 2048 });
    for (let i = 1n; i <= 20n; i++) await store.commit([put(i * 0x1000n)]);
    await atGate;
    // Answered while the snapshot is held.
    for (let i = 21n; i <= 30n; i++)
      await store.commit([put(i * 0x1000n, i % 2n === 0n ? 'vdpa0' : 'vdpa1')]);
    // A crash now: the copy of the directory holds every acknowledged commit.
    const crashed = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-state-crash-'));
    try {
      for (const name of fs.readdirSync(dir)) fs.copyFileSync(path.join(dir, name), path.join(crashed, name));
      const { store: copy } = await StateStore.open({ dir: crashed });
      assert.equal(copy.state.devices.get('vdpa0')?.mappings.size, 25);
      assert.equal(copy.state.devices.get('vdpa1')?.mappings.size, 5);
      await copy.close();
    } finally {
      fs.rmSync(crashed, { recursive: true, force: true });
    }
    open!();
    await store.commit([put(0x100_0000n)]);
    const expected = toSnapshot(store.state);
    await store.close();
    assert.ok(!fs.readdirSync(dir).includes('journal.0'), 'the first journal was compacted away');
    const { store: again } = await StateStore.open({ dir });
    assert.deepEqual(toSnapshot(again.state), expected);
    assert.equal(again.state.devices.get('vdpa0')?.mappings.size, 26);
    await again.close();
  });

  test('a clean close compacts a journal of compactOnCloseBytes or more; a smaller one is kept as it is', async () => {
    const { store } = await StateStore.open({ dir, compactOnCloseBytes: 4096 });
    for (let i = 1n; i <= 8n; i++) await store.commit([put(i * 0x1000n)]);
    const small = fs.statSync(journalFile()).size;
    assert.ok(small > 0 && small < 4096);
    await store.close();
    assert.equal(fs.statSync(journalFile()).size, small, 'below the threshold the journal stays');
    assert.ok(!fs.existsSync(path.join(dir, 'snapshot')));

    const { store: again } = await StateStore.open({ dir, compactOnCloseBytes: 4096 });
    for (let i = 9n; i <= 60n; i++) await again.commit([put(i * 0x1000n)]);
    await again.commit([{ t: 'mapping.delete', device: 'vdpa0', asid: 0, iova: 0x5000n }]);
    assert.ok(fs.statSync(journalFile()).size >= 4096);
    const expected = toSnapshot(again.state);
    await again.close();
    assert.ok(fs.existsSync(path.join(dir, 'snapshot')), 'the close wrote a snapshot');
    assert.equal(fs.statSync(journalFile()).size, 0, 'and left an empty journal');

    const { store: reopened } = await StateStore.open({ dir });
    assert.deepEqual(toSnapshot(reopened.state), expected);
    assert.equal(reopened.state.devices.get('vdpa0')?.mappings.size, 59);
    await reopened.close();
  });

  test('attachments survive replay and compaction; a detach removes them', async () => {
    const attachment = { device: 'vublk0', socketPath: '/run/vdpa-mapd/vublk0.sock', group: 'kvm' };
    const { store } = await StateStore.open({ dir, compactBytes: 2048 });
    await store.commit([{ t: 'attachment.put', attachment }]);
    await store.commit([
      { t: 'attachment.put', attachment: { device: 'vublk1', socketPath: '/run/b.sock' } },
    ]);
    await store.close();
    const { store: replayed } = await StateStore.open({ dir, compactBytes: 2048 });
    assert.deepEqual(
      [...replayed.state.attachments.values()].map((a) => a.device),
      ['vublk0', 'vublk1'],
    );
    await replayed.commit([{ t: 'attachment.delete', device: 'vublk1' }]);
    for (let i = 1n; i <= 40n; i++) await replayed.commit([put(i * 0x1000n)]);
    // After close, which waits for a compaction under way: commits go on while it runs.
    await replayed.close();
    assert.ok(fs.existsSync(path.join(dir, 'snapshot')), 'compacted');
    const { store: again } = await StateStore.open({ dir });
    assert.deepEqual([...again.state.attachments.values()], [attachment]);
    await again.close();
  });

  test('a failed compaction leaves the store working on the old journal', async () => {
    const faulty = new FaultyFs();
    const errors: unknown[] = [];
    const { store } = await StateStore.open({
      dir,
      fs: faulty,
      compactBytes: 1,
      onCompactionError: (e) => errors.push(e),
    });
    faulty.fail('rename', 'EIO', { times: 10 });
    await store.commit([put(0x1000n)]);
    await store.commit([put(0x2000n)]);
    await store.close();
    // Each record past compactBytes starts an attempt unless one is running.
    assert.ok(errors.length >= 1 && errors.length <= 2, `${errors.length} attempts`);
    for (const e of errors) assert.equal((e as NodeJS.ErrnoException).code, 'EIO');
    assert.ok(!fs.existsSync(path.join(dir, 'snapshot')));
    assert.deepEqual(
      fs.readdirSync(dir).filter((n) => n !== 'journal.0'),
      [],
      'the half-made compaction was cleaned up',
    );
    const { store: again } = await StateStore.open({ dir });
    assert.equal(again.state.devices.get('vdpa0')?.mappings.size, 2);
    await again.close();
  });

  test('idempotency records are bounded per device, oldest forgotten first', async () => {
    const { store } = await StateStore.open({ dir, limits: { idempotencyPerDevice: 3 } });
    for (const id of ['a', 'b', 'c', 'd']) {
      await store.commit([
        { t: 'idempotency.put', device: 'vdpa0', record: { requestId: id, digest: id, answer: {} } },
      ]);
    }
    assert.deepEqual([...store.state.devices.get('vdpa0')!.idempotency.keys()], ['b', 'c', 'd']);
    await store.close();
  });
});
