import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { decodeJson, encodeJson, frame, unframe } from '../../src/state/codec.ts';
import { type Change, sortedMappings, toSnapshot } from '../../src/state/desired.ts';
import { Journal } from '../../src/state/journal.ts';
import { StateStore } from '../../src/state/store.ts';
import { ServiceError } from '../../src/service/errors.ts';
import { FaultyFs } from './core-harness.ts';

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

const journalFile = () => path.join(dir, fs.readdirSync(dir).find((n) => n.startsWith('journal.'))!);

describe('codec', () => {
  test('bigints survive JSON exactly, as decimal strings', () => {
    const value = { a: BIG, b: [0n, 1n << 63n], c: 'x', d: 7 };
    const text = encodeJson(value);
    assert.match(text, /"18446744073709551615"/);
    assert.deepEqual(decodeJson(text), value);
  });

  test('unframe stops at a torn frame and at a bad CRC', () => {
    const a = frame({ n: 1n });
    const b = frame({ n: 2n });
    const torn = Buffer.concat([a, b.subarray(0, b.length - 3)]);
    assert.deepEqual(unframe(torn), { values: [{ n: 1n }], validBytes: a.length });
    const flipped = Buffer.concat([a, b]);
    flipped[flipped.length - 2]! ^= 0xff;
    assert.deepEqual(unframe(flipped), { values: [{ n: 1n }], validBytes: a.length });
  });
});

describe('journal', () => {
  test('appended records replay in order after reopening', async () => {
    const { journal } = await Journal.open(dir);
    await journal.append(['a', 1n]);
    await journal.append(['b', BIG]);
    await journal.close();
    const again = await Journal.open(dir);
    assert.deepEqual(again.records, [
      ['a', 1n],
      ['b', BIG],
    ]);
    assert.equal(again.droppedBytes, 0);
    await again.journal.close();
  });

  test('a torn tail is cut off on open, and appends continue after the last whole record', async () => {
    const { journal } = await Journal.open(dir);
    await journal.append({ n: 1 });
    await journal.close();
    const whole = fs.statSync(journalFile()).size;
    fs.appendFileSync(journalFile(), frame({ n: 2 }).subarray(0, 10));
    const reopened = await Journal.open(dir);
    assert.deepEqual(reopened.records, [{ n: 1 }]);
    assert.equal(reopened.droppedBytes, 10);
    assert.equal(fs.statSync(journalFile()).size, whole);
    await reopened.journal.append({ n: 3 });
    await reopened.journal.close();
    assert.deepEqual((await Journal.open(dir)).records, [{ n: 1 }, { n: 3 }]);
  });

  test('compaction: snapshot replaces the journal; leftovers of a crashed compaction are ignored', async () => {
    const { journal } = await Journal.open(dir);
    await journal.append('before');
    await journal.compact({ state: 1 });
    await journal.append('after');
    await journal.close();
    assert.deepEqual(fs.readdirSync(dir).sort(), ['journal.1', 'snapshot']);
    // A crash during a later compaction: the next journal and the temp snapshot were written,
    // the rename never happened.
    fs.writeFileSync(path.join(dir, 'journal.2'), frame('never acknowledged'));
    fs.writeFileSync(path.join(dir, 'snapshot.tmp'), 'garbage');
    const reopened = await Journal.open(dir);
    assert.deepEqual(reopened.snapshot, { state: 1 });
    assert.deepEqual(reopened.records, ['after']);
    assert.deepEqual(fs.readdirSync(dir).sort(), ['journal.1', 'snapshot']);
    await reopened.journal.close();
  });

  test('a damaged snapshot is refused rather than silently dropped', async () => {
    const { journal } = await Journal.open(dir);
    await journal.compact({ state: 1 });
    await journal.close();
    const snap = path.join(dir, 'snapshot');
    const bytes = fs.readFileSync(snap);
    bytes[bytes.length - 1]! ^= 0xff;
    fs.writeFileSync(snap, bytes);
    await assert.rejects(Journal.open(dir), /snapshot .* is damaged/);
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

  test('concurrent commits share one write and one fdatasync (group commit)', async () => {
    const faulty = new FaultyFs();
    const { store } = await StateStore.open({ dir, fs: faulty });
    await store.commit([put(0x1000n)]);
    const before = faulty.calls.get('datasync') ?? 0;
    await Promise.all([
      store.commit([put(0x2000n)]),
      store.commit([put(0x3000n)]),
      store.commit([put(0x4000n)]),
    ]);
    // The first of the three starts a write at once; the other two wait and go together.
    assert.equal((faulty.calls.get('datasync') ?? 0) - before, 2);
    assert.equal(store.state.devices.get('vdpa0')?.mappings.size, 4);
    await store.close();
  });

  for (const { op, partial } of [
    { op: 'write' as const, partial: false },
    { op: 'write' as const, partial: true },
    { op: 'datasync' as const, partial: false },
  ]) {
    test(`a failed ${op}${partial ? ' (half written)' : ''} refuses the change with UNAVAILABLE and changes nothing`, async () => {
      const faulty = new FaultyFs();
      const { store } = await StateStore.open({ dir, fs: faulty });
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

  test('the journal is compacted past compactBytes and everything survives reopening', async () => {
    const { store } = await StateStore.open({ dir, compactBytes: 2048 });
    for (let i = 1n; i <= 40n; i++) await store.commit([put(i * 0x1000n)]);
    await store.commit([{ t: 'mapping.delete', device: 'vdpa0', asid: 0, iova: 0x5000n }]);
    assert.ok(fs.existsSync(path.join(dir, 'snapshot')));
    assert.ok(fs.statSync(journalFile()).size <= 2048 + 512);
    const expected = toSnapshot(store.state);
    await store.close();
    const { store: again } = await StateStore.open({ dir, compactBytes: 2048 });
    assert.deepEqual(toSnapshot(again.state), expected);
    assert.equal(again.state.devices.get('vdpa0')?.mappings.size, 39);
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
    // Each commit waits for the compaction attempt that followed the one before.
    await store.commit([put(0x2000n)]);
    await store.close();
    assert.equal(errors.length, 2);
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
