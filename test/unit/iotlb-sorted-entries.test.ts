/**
 * SortedEntries (the ordered store under IovaTable) against a reference model: a plain array kept
 * sorted by a full sort after every change. Sequences are long enough to split, merge and drop
 * blocks (64 entries each), and clones are changed on both sides to check copy-on-write.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { SortedEntries } from '../../src/iotlb/sorted-entries.ts';

interface E {
  iova: bigint;
  tag: number;
}

class Model {
  constructor(public entries: E[] = []) {}
  set(e: E): void {
    this.entries = [...this.entries.filter((x) => x.iova !== e.iova), e].sort((a, b) =>
      a.iova < b.iova ? -1 : 1,
    );
  }
  delete(iova: bigint, keepTag?: number): E | undefined {
    const held = this.entries.find((x) => x.iova === iova);
    if (held === undefined || held.tag === keepTag) return undefined;
    this.entries = this.entries.filter((x) => x !== held);
    return held;
  }
  atOrBelow(iova: bigint): E | undefined {
    return this.entries.filter((x) => x.iova <= iova).at(-1);
  }
  above(iova: bigint): E | undefined {
    return this.entries.find((x) => x.iova > iova);
  }
  between(from: bigint, to: bigint): E[] {
    return this.entries.filter((x) => from <= x.iova && x.iova <= to);
  }
}

type Op =
  | { kind: 'set'; key: number; tag: number }
  | { kind: 'run'; from: number; count: number; step: number; tag: number }
  | { kind: 'delete'; key: number; keepTag?: number }
  | { kind: 'deleteRun'; from: number; count: number; step: number }
  | { kind: 'clone' }
  | { kind: 'switch' }
  | { kind: 'clear' };

const KEYS = 400;
const key = fc.integer({ min: 0, max: KEYS });
/** Keys from, from + step, ... : long enough to fill, split and empty blocks. */
const run = { from: key, count: fc.integer({ min: 1, max: 150 }), step: fc.constantFrom(1, 2, 3, 5, -1) };
const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('set' as const), key, tag: fc.nat(3) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('run' as const), ...run, tag: fc.nat(3) }) },
  {
    weight: 5,
    arbitrary: fc.record(
      { kind: fc.constant('delete' as const), key, keepTag: fc.nat(3) },
      { requiredKeys: ['kind', 'key'] },
    ),
  },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('deleteRun' as const), ...run }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'clone' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'switch' }) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'clear' }) },
);

const big = (k: number): bigint => BigInt(k) * 0x1000n + (1n << 40n);

function runCountingPauses<R>(steps: Generator<void, R>): { value: R; pauses: number } {
  let pauses = 0;
  for (let step = steps.next(); ; step = steps.next()) {
    if (step.done) return { value: step.value, pauses };
    pauses++;
  }
}

function agree(store: SortedEntries<E>, model: Model, probes: readonly number[]): void {
  assert.equal(store.size, model.entries.length);
  assert.deepEqual(store.values(), model.entries);
  const { value, pauses } = runCountingPauses(store.valuesInSteps());
  assert.deepEqual(value, model.entries);
  // Copied a few dozen at a time: a pause at least every 64 entries.
  assert.ok(pauses >= Math.ceil(model.entries.length / 64), `${pauses} pauses for ${model.entries.length}`);
  for (const p of probes) {
    const at = big(p) + BigInt(p % 3) - 1n;
    assert.equal(store.atOrBelow(at), model.atOrBelow(at), `atOrBelow ${at}`);
    assert.equal(store.above(at), model.above(at), `above ${at}`);
  }
  const [lo, hi] = [big(probes[0] ?? 0), big((probes[0] ?? 0) + (probes[1] ?? 0))];
  assert.deepEqual(store.between(lo, hi), model.between(lo, hi));
}

test('property: SortedEntries agrees with a sorted array, clones included', () => {
  fc.assert(
    fc.property(
      fc.array(op, { maxLength: 80 }),
      fc.array(fc.integer({ min: -1, max: KEYS + 1 }), { minLength: 2, maxLength: 12 }),
      (ops, probes) => {
        // Two live stores and their models: `clone` makes the other side a copy of the current one.
        const stores = [new SortedEntries<E>(), new SortedEntries<E>()];
        const models = [new Model(), new Model()];
        let cur = 0;
        for (const o of ops) {
          const [store, model] = [stores[cur]!, models[cur]!];
          switch (o.kind) {
            case 'set': {
              const e = { iova: big(o.key), tag: o.tag };
              store.set(e);
              model.set(e);
              break;
            }
            case 'run':
              for (let i = 0; i < o.count; i++) {
                const e = { iova: big(o.from + i * o.step), tag: o.tag };
                store.set(e);
                model.set(e);
              }
              break;
            case 'delete': {
              const keep = o.keepTag === undefined ? undefined : (held: E) => held.tag === o.keepTag;
              assert.equal(store.delete(big(o.key), keep), model.delete(big(o.key), o.keepTag));
              break;
            }
            case 'deleteRun':
              for (let i = 0; i < o.count; i++) {
                const iova = big(o.from + i * o.step);
                assert.equal(store.delete(iova), model.delete(iova));
              }
              break;
            case 'clone':
              stores[1 - cur] = store.clone();
              models[1 - cur] = new Model([...model.entries]);
              break;
            case 'switch':
              cur = 1 - cur;
              break;
            case 'clear':
              store.clear();
              model.entries = [];
              break;
          }
          agree(stores[0]!, models[0]!, probes);
          agree(stores[1]!, models[1]!, probes);
        }
      },
    ),
    { numRuns: 300 },
  );
});

test('a block that lost entries at its front and is refilled in its middle splits in order', () => {
  const store = new SortedEntries<E>();
  const model = new Model();
  const set = (k: number) => {
    const e = { iova: big(k), tag: 0 };
    store.set(e);
    model.set(e);
  };
  // One full block of every fourth key, its first 40 removed, then 41 keys between the other 24.
  for (let k = 0; k < 256; k += 4) set(k);
  for (let k = 0; k < 160; k += 4) assert.equal(store.delete(big(k)), model.delete(big(k)));
  for (let k = 161; k < 161 + 41 * 2; k += 2) set(k);
  agree(store, model, [159, 160, 161, 200, 241, 252, 253]);
  for (let k = 0; k < 160; k += 4) set(k);
  agree(store, model, [0, 4, 159, 160, 200, 255]);
});
