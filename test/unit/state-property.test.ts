import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import fc from 'fast-check';
import { decodeJson, encodeJson } from '../../src/state/codec.ts';
import {
  applyChange,
  type Change,
  emptyState,
  type StateLimits,
  toSnapshot,
} from '../../src/state/desired.ts';
import { StateDamageError } from '../../src/state/journal.ts';
import { repairStateDir, SEQUENCE_SKIP } from '../../src/state/repair.ts';
import { StateStore } from '../../src/state/store.ts';
import { FaultyFs, frameOffsets } from './core-harness.ts';

const limits: StateLimits = { idempotencyPerDevice: 3, failuresPerDevice: 2 };

const device = fc.constantFrom('d0', 'd1');
const memoryId = fc.constantFrom('m0', 'm1');
const u64 = fc.oneof(
  fc.constantFrom(0n, 0x1000n, 0x2000n, (1n << 64n) - 0x1000n),
  fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
);
const seq = fc.bigInt({ min: 1n, max: 20n });
const mapping = fc.record({
  asid: fc.constantFrom(0, 1),
  iova: u64,
  size: fc.bigInt({ min: 1n, max: 1n << 40n }),
  memory: memoryId,
  offset: u64,
  perm: fc.constantFrom('ro' as const, 'wo' as const, 'rw' as const),
});

const change: fc.Arbitrary<Change> = fc.oneof(
  fc.record({
    t: fc.constant('memory.put' as const),
    memory: fc.record({
      id: memoryId,
      path: fc.string(),
      kind: fc.constantFrom('file' as const, 'memfd' as const),
      created: fc.boolean(),
      size: u64,
      registeredAt: fc.constant('2024-01-01T00:00:00.000Z'),
    }),
  }),
  fc.record({ t: fc.constant('memory.delete' as const), id: memoryId }),
  fc.record({ t: fc.constant('mapping.put' as const), device, mapping }),
  fc.record({
    t: fc.constant('mapping.delete' as const),
    device,
    asid: fc.constantFrom(0, 1),
    iova: fc.constantFrom(0n, 0x1000n, 0x2000n),
  }),
  fc.record({ t: fc.constant('sequence' as const), device, next: seq }),
  fc.record({
    t: fc.constant('pending.put' as const),
    device,
    submit: fc.record({
      sequence: seq,
      ops: fc.array(
        mapping.map((m) => ({ op: 'map' as const, ...m })),
        { maxLength: 2 },
      ),
      atomic: fc.boolean(),
    }),
  }),
  fc.record({ t: fc.constant('pending.delete' as const), device, sequence: seq }),
  fc.record({
    t: fc.constant('failure.add' as const),
    device,
    failure: fc.record({
      sequence: seq,
      error: fc.record({
        code: fc.constant('DEVICE_ERROR' as const),
        message: fc.string(),
        errno: fc.constant('EFAULT'),
      }),
    }),
  }),
  fc.record({ t: fc.constant('failures.clear' as const), device, through: seq }),
  fc.record({
    t: fc.constant('idempotency.put' as const),
    device,
    record: fc.record({
      requestId: fc.constantFrom('r0', 'r1', 'r2', 'r3', 'r4'),
      digest: fc.string({ minLength: 1, maxLength: 4 }),
      answer: fc.record({ ok: fc.record({ sequence: seq }) }),
    }),
  }),
);

/** A group is committed as one record; `fault` makes its write fail (it must then change nothing). */
const group = fc.record({
  // Through the codec once: plain objects (fast-check's records have no prototype), as a caller's.
  changes: fc
    .array(change, { minLength: 1, maxLength: 5 })
    .map((cs) => decodeJson(encodeJson(cs)) as Change[]),
  fault: fc.option(fc.constantFrom('write', 'partial', 'datasync'), { freq: 4 }),
});

test('random sequences of changes, some refused by failed writes, replay to the same state', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(group, { maxLength: 25 }),
      fc.constantFrom(256, 1024, 1 << 20),
      async (groups, compactBytes) => {
        const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-prop-'));
        try {
          const faulty = new FaultyFs();
          const { store } = await StateStore.open({ dir, fs: faulty, limits, compactBytes });
          const model = emptyState(limits);
          for (const g of groups) {
            // Only journal writes fail, not the snapshot's.
            const file = /journal\.\d+$/;
            if (g.fault === 'datasync') faulty.fail('datasync', 'EIO', { file });
            else if (g.fault !== null)
              faulty.fail('write', 'ENOSPC', { partial: g.fault === 'partial', file });
            const committed = await store.commit(g.changes).then(
              () => true,
              () => false,
            );
            // A compaction runs beside the commits (its new journal's write may take the fault
            // instead): only without one is the faulted commit sure to be the one refused.
            if (compactBytes === 1 << 20) assert.equal(committed, g.fault === null);
            else assert.ok(committed || g.fault !== null, 'a commit without a fault was refused');
            faulty.disarm();
            if (committed) for (const c of g.changes) applyChange(model, c);
            assert.deepEqual(toSnapshot(store.state), toSnapshot(model));
          }
          await store.close();
          const { store: reopened, droppedBytes } = await StateStore.open({ dir, limits, compactBytes });
          assert.equal(droppedBytes, 0);
          assert.deepEqual(toSnapshot(reopened.state), toSnapshot(model));
          assert.deepEqual(reopened.state.memoryUse, model.memoryUse);
          await reopened.close();
        } finally {
          fs.rmSync(dir, { recursive: true, force: true });
        }
      },
    ),
    { numRuns: 60 },
  );
});

function modelOf(groups: readonly Change[][], sequenceSkip = 0n) {
  const model = emptyState(limits);
  for (const g of groups) for (const c of g) applyChange(model, c);
  for (const d of model.devices.values()) d.nextSequence += sequenceSkip;
  return toSnapshot(model);
}

const hurt = fc.oneof(
  fc.record({
    kind: fc.constant('flip' as const),
    frame: fc.nat(),
    byte: fc.nat(),
    mask: fc.integer({ min: 1, max: 255 }),
  }),
  fc.record({ kind: fc.constant('cut' as const), at: fc.nat() }),
);

test('a flipped byte in any frame but the last is damage (refused, file untouched, repair keeps the rest); a cut in the last frame is a torn tail', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(
        group.map((g) => g.changes),
        { minLength: 1, maxLength: 12 },
      ),
      hurt,
      async (groups, how) => {
        const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-prop-'));
        try {
          const { store } = await StateStore.open({ dir, limits });
          for (const changes of groups) await store.commit(changes);
          await store.close();
          const file = path.join(dir, 'journal.0');
          const data = fs.readFileSync(file);
          const offsets = frameOffsets(data);
          // A header, then one frame per group.
          assert.equal(offsets.length, groups.length + 1);
          const end = (i: number) => offsets[i + 1] ?? data.length;

          if (how.kind === 'cut') {
            const last = offsets.at(-1)!;
            const cutAt = last + 1 + (how.at % (data.length - last - 1));
            fs.truncateSync(file, cutAt);
            const { store: reopened, droppedBytes } = await StateStore.open({ dir, limits });
            assert.equal(droppedBytes, cutAt - last);
            assert.equal(fs.statSync(file).size, last);
            assert.deepEqual(toSnapshot(reopened.state), modelOf(groups.slice(0, -1)));
            await reopened.close();
            return;
          }

          const i = how.frame % groups.length; // any frame but the last: the header or a record
          const at = offsets[i]! + (how.byte % (end(i) - offsets[i]!));
          const hurtData = Buffer.from(data);
          hurtData[at]! ^= how.mask;
          fs.writeFileSync(file, hurtData);
          await assert.rejects(StateStore.open({ dir, limits }), (e: unknown) => {
            assert.ok(e instanceof StateDamageError, String(e));
            assert.equal(e.offset, offsets[i]);
            assert.equal(e.intactAfter, groups.length - i);
            return true;
          });
          assert.deepEqual(fs.readdirSync(dir), ['journal.0']);
          assert.deepEqual(fs.readFileSync(file), hurtData, 'left exactly as it was');

          // Frame 0 is the header: a record lost is group i - 1.
          const report = await repairStateDir(dir, limits);
          assert.equal(report?.kept, i === 0 ? groups.length : groups.length - 1);
          const { store: repaired } = await StateStore.open({ dir, limits });
          const kept = groups.filter((_, g) => g !== i - 1);
          assert.deepEqual(toSnapshot(repaired.state), modelOf(kept, SEQUENCE_SKIP));
          await repaired.close();
        } finally {
          fs.rmSync(dir, { recursive: true, force: true });
        }
      },
    ),
    { numRuns: 150 },
  );
});
