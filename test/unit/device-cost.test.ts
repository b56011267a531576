/** The cost model of both IOMMU kinds, as DeviceCounters of a SimulatedDevice. */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { backendFeatureMask } from '../../src/uapi/constants.ts';
import { PAGE, type TmpRegistry, tmpRegistry } from './device-helpers.ts';

const N = 5;
const BATCHED = backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID');
const UNBATCHED = backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_ASID');

let tmp: TmpRegistry;
before(() => {
  tmp = tmpRegistry();
  tmp.registry.create({ id: 'm', size: 64n * PAGE, kind: 'memfd' });
});
after(() => tmp.cleanup());

const updates = (n: number, from = 0): IotlbOp[] =>
  Array.from({ length: n }, (_, k) => {
    const i = BigInt(from + k);
    return {
      type: 'update',
      asid: 0,
      iova: 0x100000n + i * PAGE,
      size: PAGE,
      memory: 'm',
      offset: i * PAGE,
      perm: 'rw',
    };
  });

function sim(iommu: 'platform' | 'onchip', features: bigint, pushDelayMs = 0): SimulatedDevice {
  return new SimulatedDevice({ name: `${iommu}-${features}`, iommu, features, pushDelayMs }, tmp.registry);
}

/** Lets every pending promise callback and I/O callback run (setImmediate is not mocked). */
const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

describe('onchip (set_map)', () => {
  test(`a batch of ${N} UPDATEs is one push of the whole table`, async () => {
    const dev = sim('onchip', BATCHED);
    await dev.apply(updates(N));
    assert.deepEqual(dev.counters(), {
      messagesWritten: N + 2,
      batches: 1,
      dmaMapCalls: 0,
      dmaUnmapCalls: 0,
      setMapPushes: 1,
      setMapEntriesPushed: N,
    });
    // A second batch pushes the whole table again: N + 2 entries.
    await dev.apply(updates(2, N));
    assert.equal(dev.counters().setMapPushes, 2);
    assert.equal(dev.counters().setMapEntriesPushed, N + N + 2);
    await dev.close();
  });

  test(`outside a batch each of ${N} UPDATEs and each INVALIDATE pushes`, async () => {
    const dev = sim('onchip', UNBATCHED);
    await dev.apply(updates(N));
    let c = dev.counters();
    assert.equal(c.batches, 0);
    assert.equal(c.messagesWritten, N);
    assert.equal(c.setMapPushes, N);
    assert.equal(c.setMapEntriesPushed, (N * (N + 1)) / 2, 'table sizes 1, 2, ..., N');
    await dev.apply([
      { type: 'invalidate', asid: 0, iova: 0x100000n, size: PAGE },
      { type: 'invalidate', asid: 0, iova: 0x900000n, size: PAGE },
    ]);
    c = dev.counters();
    assert.equal(c.setMapPushes, N + 2, 'even an INVALIDATE that removes nothing pushes');
    assert.equal(c.dmaUnmapCalls, 0);
    await dev.close();
  });

  test('pushDelayMs: apply waits for each push before the next message', async (t) => {
    t.mock.timers.enable({ apis: ['setTimeout'] });
    const dev = sim('onchip', UNBATCHED, 50);
    let done = false;
    const applied = dev.apply(updates(2)).then(() => {
      done = true;
    });
    await settle();
    assert.equal(dev.counters().messagesWritten, 1, 'the second message waits for the first push');
    t.mock.timers.tick(50);
    await settle();
    assert.equal(dev.counters().messagesWritten, 2);
    assert.equal(done, false);
    t.mock.timers.tick(50);
    await applied;
    assert.equal(dev.counters().setMapPushes, 2);
    await dev.close();
  });

  test('the device sees a batch only at its end; refused ops do not open a batch', async () => {
    const dev = sim('onchip', BATCHED);
    await dev.apply(updates(3));
    assert.equal(dev.simulator.deviceTable(0)?.count, 3);
    // Every op refused by the guard: nothing written, no batch.
    await dev.apply(updates(1));
    assert.equal(dev.counters().batches, 1);
    assert.equal(dev.counters().messagesWritten, 5);
    await dev.close();
  });
});

describe('platform (dma_map / dma_unmap)', () => {
  for (const [label, features] of [
    ['batched', BATCHED],
    ['unbatched', UNBATCHED],
  ] as const) {
    test(`${label}: one dma_map per UPDATE, one dma_unmap per removed entry`, async () => {
      const dev = sim('platform', features);
      await dev.apply(updates(N));
      let c = dev.counters();
      assert.equal(c.dmaMapCalls, N);
      assert.equal(c.setMapPushes, 0);
      assert.equal(c.batches, features === BATCHED ? 1 : 0);
      // One INVALIDATE covering three entries: three dma_unmap calls.
      await dev.apply([{ type: 'invalidate', asid: 0, iova: 0x100000n, size: 3n * PAGE }]);
      c = dev.counters();
      assert.equal(c.dmaUnmapCalls, 3);
      assert.equal(c.setMapEntriesPushed, 0);
      assert.equal(dev.simulator.deviceTable(0)?.count, N - 3);
      await dev.close();
    });
  }
});
