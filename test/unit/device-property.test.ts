/**
 * Property: any sequence of ops applied to a VA-mode SimulatedDevice (dma_map or set_map, batched or not,
 * in any split into apply() calls) gives the same per-op ok/errno and the same final mappings as
 * a plain reference model, an array of ranges. The simulated kernel's own tables, the parent's
 * table (after the batch) and the memory references must all agree with it too.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import fc from 'fast-check';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import type { IotlbOp, Mapping, Perm } from '../../src/iotlb/types.ts';
import { backendFeatureMask } from '../../src/uapi/constants.ts';
import { PAGE, type TmpRegistry, tmpRegistry } from './device-helpers.ts';

const LIMIT = 1n << 64n;
const U64_MAX = LIMIT - 1n;
const AS_NUM = 2;
const RANGE = { first: 0x1000n, last: 0x2f_ffffn };
const MEMORY_SIZE = 16n * PAGE;
const MEMORIES = ['pa', 'pb'];

let tmp: TmpRegistry;
before(() => {
  tmp = tmpRegistry();
  for (const id of MEMORIES) tmp.registry.create({ id, size: MEMORY_SIZE, kind: 'memfd' });
});
after(() => tmp.cleanup());

type Outcome = { ok: true } | { ok: false; errno: string };

/** The rules of kernel-iotlb.md, written as plainly as possible. */
class Model {
  entries: Mapping[] = [];

  apply(op: IotlbOp): Outcome {
    if (op.asid >= AS_NUM) return { ok: false, errno: 'EINVAL' };
    if (op.type === 'invalidate') {
      const last = (op.iova + op.size - 1n + LIMIT) % LIMIT;
      if (last >= op.iova) {
        this.entries = this.entries.filter(
          (e) => e.asid !== op.asid || e.iova > last || e.iova + e.size - 1n < op.iova,
        );
      }
      return { ok: true };
    }
    if (op.size === 0n) return { ok: false, errno: 'EINVAL' };
    if (op.iova + op.size > LIMIT) return { ok: false, errno: 'EINVAL' };
    if (op.iova < RANGE.first || op.iova + op.size - 1n > RANGE.last) return { ok: false, errno: 'EINVAL' };
    const end = op.iova + op.size;
    if (this.entries.some((e) => e.asid === op.asid && e.iova < end && op.iova < e.iova + e.size)) {
      return { ok: false, errno: 'EEXIST' };
    }
    if (!MEMORIES.includes(op.memory) || op.offset + op.size > MEMORY_SIZE)
      return { ok: false, errno: 'EFAULT' };
    const { type: _, ...mapping } = op;
    this.entries.push(mapping);
    return { ok: true };
  }

  sorted(): Mapping[] {
    return [...this.entries].sort(
      (a, b) => a.asid - b.asid || (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0),
    );
  }
}

const page = (max: number) => fc.integer({ min: 0, max }).map((n) => BigInt(n) * PAGE);
const iova = fc.oneof(
  { weight: 6, arbitrary: page(40) },
  { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: 0x31_0000n }) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 4 }).map((k) => LIMIT - BigInt(k) * PAGE) },
);
const size = fc.oneof(
  { weight: 6, arbitrary: fc.integer({ min: 1, max: 6 }).map((n) => BigInt(n) * PAGE) },
  { weight: 1, arbitrary: fc.constantFrom(0n, 1n, 0x1800n, U64_MAX, 0x30_0000n) },
);
const asid = fc.oneof(
  { weight: 8, arbitrary: fc.integer({ min: 0, max: 1 }) },
  { weight: 1, arbitrary: fc.constant(2) },
);
const updateOp: fc.Arbitrary<IotlbOp> = fc.record({
  type: fc.constant('update' as const),
  asid,
  iova,
  size,
  memory: fc.oneof(
    { weight: 8, arbitrary: fc.constantFrom(...MEMORIES) },
    { weight: 1, arbitrary: fc.constant('nope') },
  ),
  offset: page(17),
  perm: fc.constantFrom<Perm>('ro', 'wo', 'rw'),
});
const invalidateOp: fc.Arbitrary<IotlbOp> = fc.record({
  type: fc.constant('invalidate' as const),
  asid,
  iova,
  size: fc.oneof(size, fc.constant(0n)),
});
const ops = fc.array(fc.oneof({ weight: 3, arbitrary: updateOp }, { weight: 2, arbitrary: invalidateOp }), {
  maxLength: 40,
});

const outcome = (r: { ok: boolean; errno?: string }): Outcome =>
  r.ok ? { ok: true } : { ok: false, errno: r.errno! };

test('a SimulatedDevice agrees with the reference model', async () => {
  await fc.assert(
    fc.asyncProperty(
      ops,
      fc.constantFrom('dma_map' as const, 'set_map' as const),
      fc.boolean(),
      fc.array(fc.integer({ min: 1, max: 10 }), { minLength: 1, maxLength: 5 }),
      async (sequence, onchipMap, batched, splits) => {
        const features = batched
          ? backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID')
          : backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_ASID');
        const dev = new SimulatedDevice(
          { name: 'prop', iommu: 'onchip', onchipMap, asNum: AS_NUM, iovaRange: RANGE, features },
          tmp.registry,
        );
        const model = new Model();
        try {
          let at = 0;
          let split = 0;
          while (at < sequence.length) {
            const chunk = sequence.slice(at, at + splits[split++ % splits.length]!);
            at += chunk.length;
            const results = await dev.apply(chunk);
            assert.deepEqual(
              results.map(outcome),
              chunk.map((op) => model.apply(op)),
            );
          }
          const expected = model.sorted();
          assert.deepEqual(dev.mappings(), expected);
          assert.deepEqual(dev.simulator.kernelMappings(), expected);
          for (let a = 0; a < AS_NUM; a++) {
            assert.deepEqual(
              [...dev.simulator.deviceTable(a)!.entries()].map((r) => ({ ...r, asid: a })),
              expected.filter((m) => m.asid === a),
              `the parent's table of asid ${a}`,
            );
          }
          for (const id of MEMORIES) {
            assert.equal(tmp.registry.get(id)?.mappedEntries, expected.filter((m) => m.memory === id).length);
          }
        } finally {
          await dev.close();
        }
        for (const id of MEMORIES) assert.equal(tmp.registry.get(id)?.mappedEntries, 0);
      },
    ),
    { numRuns: 200 },
  );
});
