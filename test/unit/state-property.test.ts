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
import { StateStore } from '../../src/state/store.ts';
import { FaultyFs } from './core-harness.ts';

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
            // Only the journal's own calls fail: a compaction may still be running from the last commit.
            const file = /journal\.\d+$/;
            if (g.fault === 'datasync') faulty.fail('datasync', 'EIO', { file });
            else if (g.fault !== null)
              faulty.fail('write', 'ENOSPC', { partial: g.fault === 'partial', file });
            const committed = await store.commit(g.changes).then(
              () => true,
              () => false,
            );
            assert.equal(committed, g.fault === null);
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
