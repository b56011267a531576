/**
 * Scenario 4: IOTLB messages per second through a simulated device (guard, encode, the simulated
 * kernel's decode and rules) vs raw writeSync of 72 bytes to /dev/null, the syscall floor of a
 * kernel device. The two sides alternate over ROUNDS rounds (each the best of three runs) and the
 * medians are compared: one run of either is a few tens of milliseconds, which one collection or
 * recompilation can halve.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { SharedMemoryRegistry } from '../../src/memory/registry.ts';
import { RAW_WRITE, rawWriteRate } from '../floor.ts';
import { alternate, type BenchContext, compare, median, rateAsync, scaled } from '../harness.ts';

const ROUNDS = 5;

const PAGE = 0x1000n;

export async function benchDeviceApply(ctx: BenchContext): Promise<void> {
  const stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-bench-'));
  const memory = new SharedMemoryRegistry({ allowedRoots: [], stateDir });
  try {
    memory.create({ id: 'ram0', size: 64n * 1024n * 1024n, kind: 'memfd' });
    const batch = 256;
    // Even: every round ends with the unmaps, leaving the device empty for the next.
    const calls = 2 * scaled(ctx, 100, 2);
    const mapOps: IotlbOp[] = Array.from({ length: batch }, (_, i) => ({
      type: 'update',
      asid: 0,
      iova: BigInt(i) * PAGE,
      size: PAGE,
      memory: 'ram0',
      offset: BigInt(i) * PAGE,
      perm: 'rw',
    }));
    const unmapOps: IotlbOp[] = mapOps.map((op) => ({
      type: 'invalidate',
      asid: 0,
      iova: op.iova,
      size: op.size,
    }));
    for (const iommu of ['platform', 'onchip'] as const) {
      const device = new SimulatedDevice({ name: `bench-${iommu}`, iommu }, memory);
      // Each call applies 256 maps or 256 unmaps in one batch: 258 messages with BEGIN/END.
      const figures = await alternate(ROUNDS, {
        device: async () =>
          (batch + 2) *
          (await rateAsync(calls, async (i) => {
            const results = await device.apply(i % 2 === 0 ? mapOps : unmapOps);
            if (!results.every((r) => r.ok)) throw new Error('bench apply failed');
          })),
        floor: async () => rawWriteRate(calls * (batch + 2)),
      });
      await device.close();
      compare(
        ctx,
        {
          scenario: 'device apply',
          case: `simulated ${iommu}, 256-op batches`,
          metric: 'msgs/s',
          value: median(figures.device),
          unit: 'msg/s',
        },
        RAW_WRITE,
        median(figures.floor),
      );
    }
  } finally {
    memory.closeAll();
    fs.rmSync(stateDir, { recursive: true, force: true });
  }
}
