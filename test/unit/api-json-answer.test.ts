/**
 * SetMemTable's REST answer in slices: the bytes of JSON.stringify of the formatted answer, at any
 * size, written with turns of the event loop between slices when it is large.
 */
import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import fc from 'fast-check';
import { SLICED_ANSWER_ITEMS, setMemTableAnswer, setMemTableJson } from '../../src/api/json-answer.ts';
import type { SetMemTableResult } from '../../src/core/types.ts';
import type { Mapping } from '../../src/iotlb/types.ts';
import { setMemTableResult } from './api-arbitraries.ts';

const result = setMemTableResult({ minLength: 300, maxLength: 700 });

/** The answer as the REST layer formats it, written independently: u64 as 0x hex. */
const hex = (v: bigint) => `0x${v.toString(16)}`;
const formatted = (m: Mapping) => ({
  iova: hex(m.iova),
  size: hex(m.size),
  memory: m.memory,
  offset: hex(m.offset),
  perm: m.perm,
  asid: m.asid,
});
const reference = (r: SetMemTableResult) =>
  JSON.stringify({
    dryRun: r.dryRun,
    ops: r.ops.map((o) =>
      o.type === 'invalidate'
        ? { type: o.type, asid: o.asid, iova: hex(o.iova), size: hex(o.size) }
        : { type: o.type, ...formatted(o) },
    ),
    invalidated: r.invalidated.map(formatted),
    mapped: r.mapped.map(formatted),
    unchanged: r.unchanged,
    opCount: r.ops.length,
    invalidatedCount: r.invalidated.length,
    mappedCount: r.mapped.length,
  });
/** The summary answer: the counts, no lists. */
const summaryReference = (r: SetMemTableResult) =>
  JSON.stringify({
    dryRun: r.dryRun,
    unchanged: r.unchanged,
    opCount: r.ops.length,
    invalidatedCount: r.invalidated.length,
    mappedCount: r.mapped.length,
  });

async function text(chunks: AsyncIterable<string | Buffer>): Promise<string> {
  let out = '';
  for await (const chunk of chunks) out += chunk.toString();
  return out;
}

test('the sliced answer is JSON.stringify of the formatted answer, byte for byte', async () => {
  await fc.assert(
    fc.asyncProperty(result, async (r) => {
      assert.equal(await text(setMemTableJson(r)), reference(r));
    }),
    { numRuns: 80 },
  );
});

test('a large answer is a stream, written with turns of the event loop between slices', async () => {
  const mapped: Mapping[] = Array.from({ length: SLICED_ANSWER_ITEMS }, (_, k) => ({
    asid: 0,
    iova: BigInt(k) << 13n,
    size: 0x1000n,
    memory: 'ram0',
    offset: BigInt(k) << 12n,
    perm: 'rw',
  }));
  const r: SetMemTableResult = {
    dryRun: false,
    ops: mapped.map((m) => ({ type: 'update', ...m })),
    invalidated: [],
    mapped,
    unchanged: 3,
  };
  const answer = setMemTableAnswer(r);
  assert.ok(answer instanceof Readable);
  let turns = 0;
  const tick = setInterval(() => turns++, 0);
  const body = await text(answer);
  clearInterval(tick);
  assert.equal(body, reference(r));
  assert.ok(turns > 0, 'timers ran while the answer was written');
  const small = setMemTableAnswer({ ...r, ops: [], mapped: mapped.slice(0, 2) });
  assert.equal(JSON.stringify(small), reference({ ...r, ops: [], mapped: mapped.slice(0, 2) }));
});

test('a summary answer of any size is the counts in one piece, no list', async () => {
  await fc.assert(
    fc.asyncProperty(result, async (r) => {
      const answer = setMemTableAnswer(r, true);
      assert.ok(!(answer instanceof Readable));
      assert.equal(JSON.stringify(answer), summaryReference(r));
    }),
    { numRuns: 20 },
  );
});
