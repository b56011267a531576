/**
 * The long loops of one device's big table run in time slices (src/sys/next-turn.ts), giving the
 * event loop to other devices between slices. Sliced, each gives what it gives in one piece: no
 * item dropped, none reordered, the same first error. Checked on tables large enough to take many
 * slices, against plain models (a Map, Array.map, zlib's crc32) or the one-piece function.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { crc32 } from 'node:zlib';
import { Ajv } from 'ajv';
import fc from 'fast-check';
import { REST_METHODS } from '../../services/api/api-table.ts';
import { withJsonNames, withJsonNamesInSlices } from '../../services/api/json-names.ts';
import { compileRequestSchema } from '../../services/api/json-schema.ts';
import { routeSchema } from '../../services/api/openapi.ts';
import { AddressSpaces } from '../../src/iotlb/address-spaces.ts';
import { diffSorted, diffSteps, validateTarget, validateTargetSteps } from '../../src/iotlb/planner.ts';
import { FULL_IOVA_RANGE, type IotlbOp, type Mapping, type Region } from '../../src/iotlb/types.ts';
import { WorkingTables } from '../../src/queue/working.ts';
import { framePieces, framePiecesInSlices } from '../../src/state/codec.ts';
import {
  forEachInTimeSlices,
  mapInTimeSlices,
  runInTimeSlices,
  runWhole,
  SLICE_MS,
} from '../../src/sys/next-turn.ts';

const PAGE = 0x1000n;
const _hex = (n: bigint) => `0x${n.toString(16)}`;
const keyOf = (m: Pick<Mapping, 'asid' | 'iova'>) => `${m.asid}:${m.iova}`;

/** Busy for `ms` of wall time: enough work that a slice is spent whatever the machine's load. */
function spin(ms: number): void {
  const until = performance.now() + ms;
  while (performance.now() < until) {
    // spinning
  }
}

/** Resolves how many times other work ran (a setImmediate chain) while `p` was pending. */
async function turnsDuring(p: Promise<unknown>): Promise<number> {
  let turns = 0;
  let done = false;
  const tick = () => {
    if (done) return;
    turns++;
    setImmediate(tick);
  };
  setImmediate(tick);
  await p;
  done = true;
  return turns;
}

describe('time slices', () => {
  test('mapInTimeSlices is map, forEachInTimeSlices visits in order, and both give turns away', async () => {
    const items = Array.from({ length: 200 }, (_, i) => i);
    const seen: number[] = [];
    const mapped = mapInTimeSlices(items, (x, i) => {
      spin(SLICE_MS / 10);
      return [x * 2, i];
    });
    assert.ok((await turnsDuring(mapped)) > 1);
    assert.deepEqual(
      await mapped,
      items.map((x, i) => [x * 2, i]),
    );
    const visited = forEachInTimeSlices(new Set(items), (x, i) => {
      spin(SLICE_MS / 10);
      seen.push(x, i);
    });
    assert.ok((await turnsDuring(visited)) > 1);
    assert.deepEqual(
      seen,
      items.flatMap((x) => [x, x]),
    );
  });

  test('runInTimeSlices returns what runWhole returns; a throw stops it with that error', async () => {
    function* steps(n: number, failAt?: number): Generator<void, number[]> {
      const out: number[] = [];
      for (let i = 0; i < n; i++) {
        if (i === failAt) throw new Error(`item ${i}`);
        spin(SLICE_MS / 20);
        out.push(i);
        yield;
      }
      return out;
    }
    const sliced = runInTimeSlices(steps(300));
    assert.ok((await turnsDuring(sliced)) > 1);
    assert.deepEqual(await sliced, runWhole(steps(300)));
    await assert.rejects(runInTimeSlices(steps(300, 250)), /item 250/);
  });
});

describe('working tables, sliced', () => {
  /** A random sequence of UPDATEs and INVALIDATEs over a small IOVA window, many of them. */
  const opsArb = fc.array(
    fc.oneof(
      fc.record({
        type: fc.constant('update' as const),
        page: fc.integer({ min: 0, max: 4000 }),
        pages: fc.integer({ min: 1, max: 3 }),
        offset: fc.integer({ min: 0, max: 7 }),
      }),
      fc.record({
        type: fc.constant('invalidate' as const),
        page: fc.integer({ min: 0, max: 4000 }),
        pages: fc.integer({ min: 1, max: 8 }),
      }),
    ),
    { minLength: 0, maxLength: 3000 },
  );
  const toOp = (o: {
    type: 'update' | 'invalidate';
    page: number;
    pages: number;
    offset?: number;
  }): IotlbOp =>
    o.type === 'update'
      ? {
          type: 'update',
          asid: 0,
          iova: BigInt(o.page) * PAGE,
          size: BigInt(o.pages) * PAGE,
          memory: 'ram',
          offset: BigInt(o.offset ?? 0) * PAGE,
          perm: 'rw',
        }
      : { type: 'invalidate', asid: 0, iova: BigInt(o.page) * PAGE, size: BigInt(o.pages) * PAGE };
  /** Applies what the tables take (an UPDATE that overlaps is skipped, as validation would). */
  const applyAll = (work: WorkingTables, ops: readonly IotlbOp[]) => {
    for (const op of ops) if (work.spaces.check(op) === undefined) work.apply(op);
  };
  const asMap = (mappings: readonly Mapping[]) => new Map(mappings.map((m) => [keyOf(m), m]));

  test('replaying forEachChange, and applying netDelta, on the table at a mark give the table now', async () => {
    await fc.assert(
      fc.asyncProperty(opsArb, opsArb, async (before, after) => {
        const work = new WorkingTables(new AddressSpaces(1));
        applyAll(work, before.map(toOp));
        const base = asMap(work.spaces.mappings());
        const mark = work.mark();
        applyAll(work, after.map(toOp));
        const now = asMap(work.spaces.mappings());

        const replayed = new Map(base);
        await work.forEachChange(mark, work.mark(), (kind, m) => {
          if (kind === 'mapped') {
            assert.ok(!replayed.has(keyOf(m)), `mapped over ${keyOf(m)}`);
            replayed.set(keyOf(m), m);
          } else {
            assert.deepEqual(replayed.get(keyOf(m)), m);
            replayed.delete(keyOf(m));
          }
        });
        assert.deepEqual(replayed, now);

        const { deleted, put } = await work.netDelta(mark);
        const applied = new Map(base);
        for (const m of deleted) {
          assert.ok(applied.delete(keyOf(m)), `deletes ${keyOf(m)}, not there`);
        }
        for (const m of put) applied.set(keyOf(m), m);
        assert.deepEqual(applied, now);
        // Net: nothing put that was there already, nothing both deleted and put the same.
        for (const m of put) assert.notDeepEqual(base.get(keyOf(m)), m);
      }),
      { numRuns: 40 },
    );
  });
});

describe('a big table, sliced', () => {
  const N = 20_000;
  const regions: Region[] = Array.from({ length: N }, (_, k) => ({
    iova: BigInt(2 * k) * PAGE,
    size: PAGE,
    memory: k % 3 === 0 ? 'ram0' : 'ram1',
    offset: BigInt(k) * PAGE,
    perm: 'rw',
  }));

  test('the sliced planner gives the one-piece plan and the same refusal', async () => {
    const shuffled = [...regions].reverse();
    const validateInSlices = (target: Region[]) =>
      runInTimeSlices(validateTargetSteps(target, FULL_IOVA_RANGE, undefined));
    assert.deepEqual(await validateInSlices(shuffled), validateTarget(shuffled));
    const overlapping = [...regions, { ...regions[N - 2]!, iova: regions[N - 2]!.iova + 1n }];
    const refusal = (() => {
      try {
        validateTarget(overlapping);
      } catch (e) {
        return e;
      }
      assert.fail('validateTarget took an overlap');
    })();
    await assert.rejects(validateInSlices(overlapping), (e) => {
      assert.deepEqual(e, refusal);
      return true;
    });
    // Half the table kept, a quarter changed, a quarter new.
    const current = regions
      .filter((_, k) => k % 4 !== 3)
      .map((r, k) => (k % 3 === 1 ? { ...r, perm: 'ro' as const } : r));
    assert.deepEqual(await runInTimeSlices(diffSteps(current, regions, 2)), diffSorted(current, regions, 2));
  });

  test('a frame written in slices is the frame of its pieces; with a lead, the lead and then the frame', async () => {
    const pieces = Array.from({ length: 300 }, (_, i) => Buffer.from(`"piece ${i}"`.repeat(1 + (i % 50))));
    const payload = Buffer.concat(pieces);
    const head = Buffer.alloc(8);
    head.writeUInt32LE(payload.length, 0);
    head.writeUInt32LE(crc32(payload), 4);
    const lead = Buffer.from('lead bytes');
    assert.deepEqual(await framePiecesInSlices(pieces), Buffer.concat([head, payload]));
    assert.deepEqual(framePieces(pieces, lead), Buffer.concat([lead, head, payload]));
  });
});

describe('a long body checked against its schema in chunks', () => {
  const body = (routeSchema(REST_METHODS.find((m) => m.name === 'SetMemTable')!) as { body: object }).body;
  const sliced = compileRequestSchema(body, 'body');
  // The reference: ajv on the whole body, as fastify's own validator compiler would run it.
  const whole = new Ajv({ verbose: true, allowUnionTypes: true, coerceTypes: false }).compile(body);
  const N = 3000;
  const good = { iova: '0x1000', size: '0x1000', memory: 'ram0', offset: '0', perm: 'rw' };
  const fault = fc.oneof(
    fc.record({
      at: fc.integer({ min: 0, max: N - 1 }),
      key: fc.constantFrom('iova', 'size', 'memory', 'perm', 'colour'),
      value: fc.constantFrom('', 'x', -1, null, '0x'),
    }),
    fc.record({
      at: fc.constant(-1),
      key: fc.constantFrom('asid', 'requestId', 'colour'),
      value: fc.constantFrom('', 'x', -1, null, []),
    }),
  );

  test('gives the first error the whole body gives, or none', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fault, { maxLength: 3 }), fc.boolean(), async (faults, listFirst) => {
        const regions: Record<string, unknown>[] = Array.from({ length: N }, () => ({ ...good }));
        const top: Record<string, unknown> = {};
        for (const f of faults) {
          if (f.at < 0) top[f.key] = f.value;
          else regions[f.at]![f.key] = f.value;
        }
        const data = listFirst ? { regions, ...top } : { ...top, regions };
        const expected = whole(data);
        const got = await sliced(data);
        assert.equal(got, expected);
        if (!expected) assert.deepEqual(sliced.errors?.[0], whole.errors?.[0]);
      }),
      { numRuns: 60 },
    );
  });
});

test('a long body has its proto names renamed in slices as in one piece', async () => {
  const region = { iova: '0x1000', size: '0x1000', memory: 'ram0' };
  const regions = Array.from({ length: 5000 }, () => ({ ...region }));
  const plain = { regions, requestId: 'r' };
  assert.equal(await withJsonNamesInSlices(plain), plain);
  for (const at of [0, 4321, 4999]) {
    const named = { regions: regions.map((r, i) => (i === at ? { ...r, request_id: 'x' } : r)) };
    assert.deepEqual(await withJsonNamesInSlices(named), withJsonNames(named));
  }
  const top = { regions, request_id: 'r' };
  assert.deepEqual(await withJsonNamesInSlices(top), withJsonNames(top));
});
