/**
 * A journal record encoded in slices (one piece per commit, each in slices that yield) is the
 * record the one-piece encoding writes, byte for byte: checked against JSON.stringify and zlib's
 * crc32 framed here, and read back by the journal's reader.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { crc32 } from 'node:zlib';
import fc from 'fast-check';
import { decodeJsonPayload, encodeElements, encodeJsonPieces, scanFrames } from '../../src/state/codec.ts';
import type { Change } from '../../src/state/desired.ts';
import { encodeChanges, RECORD_PART_BYTES, recordFrames } from '../../src/state/journal.ts';

/** The format as journal.ts documents it: `u32 LE length | u32 LE crc32 | JSON`, bigints as {"$n": "..."}. */
const referenceJson = (value: unknown): string | undefined =>
  JSON.stringify(value, (_k, v: unknown) => (typeof v === 'bigint' ? { $n: v.toString() } : v));

function referenceFrame(value: unknown): Buffer {
  const payload = Buffer.from(referenceJson(value)!, 'utf8');
  const head = Buffer.alloc(8);
  head.writeUInt32LE(payload.length, 0);
  head.writeUInt32LE(crc32(payload), 4);
  return Buffer.concat([head, payload]);
}

// Anything a change may hold, and the odd cases of JSON: lone surrogates, -0, NaN, undefined.
const leaf = fc.oneof(
  fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
  fc.string({ unit: 'binary' }),
  fc.double(),
  fc.integer(),
  fc.boolean(),
  fc.constant(null),
  fc.constant(undefined),
);
const item = fc.oneof(
  {
    weight: 5,
    arbitrary: fc.object({ key: fc.string({ unit: 'binary', maxLength: 6 }), values: [leaf], maxDepth: 2 }),
  },
  { weight: 1, arbitrary: leaf },
);
// Long enough to take several slices now and then, short enough to stay quick.
const commit = fc.oneof(
  { weight: 4, arbitrary: fc.array(item, { maxLength: 20 }) },
  { weight: 1, arbitrary: fc.array(item, { minLength: 500, maxLength: 1600 }) },
);

test('a record of sliced commits is byte-identical to the one-piece frame of all their changes', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.bigInt({ min: 1n, max: (1n << 64n) - 1n }),
      fc.array(commit, { maxLength: 4 }),
      async (seq, commits) => {
        const encoded = await Promise.all(commits.map((c) => encodeChanges(c as Change[])));
        const got = recordFrames(seq, encoded, Number.MAX_SAFE_INTEGER);
        assert.deepEqual(got, [referenceFrame({ seq, changes: commits.flat() })]);
      },
    ),
    { numRuns: 60 },
  );
});

test('the elements of an array, in pieces of whole elements joined by commas, are what JSON.stringify writes between its brackets', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(item, { maxLength: 1300 }), async (items) => {
      const pieces = await encodeElements(items);
      const whole = referenceFrame(items).subarray(8).toString('utf8');
      assert.equal(pieces.map((p) => p.toString('utf8')).join(','), whole.slice(1, -1));
      // Each piece is whole elements: a JSON array of its own.
      const elements = pieces.flatMap((p) => JSON.parse(`[${p.toString('utf8')}]`) as unknown[]);
      assert.equal(elements.length, items.length);
    }),
    { numRuns: 40 },
  );
});

test('a record larger than the part size is parts of at most that size, each a frame of the next changes', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.bigInt({ min: 1n, max: (1n << 64n) - 1n }),
      fc.array(commit, { minLength: 1, maxLength: 4 }),
      fc.integer({ min: 64, max: 64 * 1024 }),
      async (seq, commits, partBytes) => {
        const encoded = await Promise.all(commits.map((c) => encodeChanges(c as Change[])));
        const frames = recordFrames(seq, encoded, partBytes);
        const all = commits.flat();
        const values = frames.map((f) => {
          const scan = scanFrames(f, decodeJsonPayload);
          assert.equal(scan.frames.length, 1);
          return scan.frames[0]!.value as { seq: bigint; part?: number; parts?: number; changes: unknown[] };
        });
        if (frames.length === 1) {
          assert.deepEqual(frames[0], referenceFrame({ seq, changes: all }));
          return;
        }
        // The changes, in order, across the parts, numbered 1..n; none larger than the part size
        // unless a piece alone is.
        assert.deepEqual(
          values.map((v) => [v.seq, v.part, v.parts]),
          values.map((_, i) => [seq, i + 1, frames.length]),
        );
        assert.deepEqual(
          values.flatMap((v) => v.changes),
          JSON.parse(referenceJson(all)!, (_k, v: unknown) =>
            typeof v === 'object' && v !== null && '$n' in v ? BigInt((v as { $n: string }).$n) : v,
          ),
        );
        for (const v of values) assert.ok(v.changes.length > 0);
      },
    ),
    { numRuns: 40 },
  );
  assert.ok(RECORD_PART_BYTES >= 64 * 1024);
});

test('the reader takes a sliced record back as the changes that went in', async () => {
  const changes: Change[] = Array.from({ length: 1500 }, (_, k) => ({
    t: 'mapping.put',
    device: 'vdpa0',
    mapping: {
      asid: 0,
      iova: BigInt(k) << 13n,
      size: 0x1000n,
      memory: 'ram0',
      offset: BigInt(k) << 12n,
      perm: 'rw',
    },
  }));
  // Parts large enough for one frame: this is about the encoding's slices, not a record's parts.
  const [record, ...more] = recordFrames(
    7n,
    [
      await encodeChanges(changes.slice(0, 700)),
      await encodeChanges([]),
      await encodeChanges(changes.slice(700)),
    ],
    1 << 20,
  );
  assert.deepEqual(more, []);
  const scan = scanFrames(record!, decodeJsonPayload);
  assert.equal(scan.damage.length, 0);
  assert.equal(scan.torn, undefined);
  assert.deepEqual(
    scan.frames.map((f) => f.value),
    [{ seq: 7n, changes }],
  );
});

test('a large commit is encoded in slices: other work runs before it is done', async () => {
  const changes = Array.from({ length: 5000 }, (_, k) => ({
    t: 'sequence',
    device: 'd',
    next: BigInt(k),
  })) as Change[];
  let ranBetween = false;
  setImmediate(() => {
    ranBetween = true;
  });
  const encoding = encodeChanges(changes).then((e) => {
    assert.ok(ranBetween, 'the encoding yielded to the event loop');
    return e;
  });
  assert.ok((await encoding).pieces.length > 1);
});

test('encodeJsonPieces writes what the one-piece JSON.stringify writes, byte for byte, in pieces', async () => {
  const value = fc.letrec((tie) => ({
    node: fc.oneof(
      { depthSize: 'small', withCrossShrink: true },
      leaf,
      fc.array(tie('node'), { maxLength: 6 }),
      fc.dictionary(fc.string({ unit: 'binary', maxLength: 6 }), tie('node'), { maxKeys: 6 }),
      fc.array(leaf, { minLength: 3000, maxLength: 6000 }),
    ),
  })).node;
  await fc.assert(
    fc.asyncProperty(value, async (v) => {
      const pieces = await encodeJsonPieces(v);
      assert.equal(Buffer.concat(pieces).toString('utf8'), referenceJson(v) ?? '');
    }),
    { numRuns: 80 },
  );
});

test('encodeJsonPieces refuses a circular structure, as JSON.stringify does', async () => {
  const a: unknown[] = [1];
  a.push({ a });
  await assert.rejects(encodeJsonPieces(a), TypeError);
});
