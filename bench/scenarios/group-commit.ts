/**
 * Scenario 6: group commit. 1,000 concurrent Map calls (gRPC) to the on-chip device, whose every
 * group costs one set_map push of the whole table, with the queue coalescing requests (the default
 * --max-group) vs one request per group (--max-group 1). Both are the real API server over the real
 * agent process; the API server is restarted between rounds with the other setting (same state dir,
 * same agent), the two settings alternating. Pushes come from the device counters GetDevice reports.
 */
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import {
  apiConfig,
  grpcClients,
  spawnAgent,
  startReadyApi,
  tempDir,
} from '../../test/integration/api-harness.ts';
import { alternate, type BenchContext, compare, median, scaled } from '../harness.ts';

const ROUNDS = 3;
const DEVICE = 'vdpa1';
const PAGE = 0x1000;
const BASE = 0x100000;
const hex = (n: number) => `0x${n.toString(16)}`;

interface Figures {
  pushes: number;
  mapsPerSecond: number;
}

export async function benchGroupCommit(ctx: BenchContext): Promise<void> {
  // At most the API server's default queue bound (1,024), so no request is refused.
  const requests = Math.min(1000, scaled(ctx, 1000, 20));
  const dir = tempDir('bench-group');
  const agent = await spawnAgent(dir);
  try {
    // Registered memory is desired state: registered once, it is there for every later server.
    let registered = false;
    /** One round: a fresh API server with `maxGroup`, `requests` concurrent maps, then the table emptied. */
    const round = (maxGroup: number | undefined) => async (): Promise<Figures> => {
      const api = await startReadyApi(apiConfig(dir, agent.socket, { core: maxGroup ? { maxGroup } : {} }));
      const grpc = grpcClients(api.grpcAddress);
      try {
        const pushes = async () =>
          Number((await grpc.device('getDevice', { device: DEVICE })).device.counters.setMapPushes);
        if (!registered) await grpc.mem('registerMemory', { id: 'ram0', size: hex(64 << 20) });
        registered = true;
        const before = await pushes();
        const start = performance.now();
        await Promise.all(
          Array.from({ length: requests }, (_, i) =>
            grpc.mapping('map', {
              device: DEVICE,
              iova: hex(BASE + 2 * i * PAGE),
              size: hex(PAGE),
              memory: 'ram0',
              offset: hex(i * PAGE),
            }),
          ),
        );
        const seconds = (performance.now() - start) / 1000;
        const figures = { pushes: (await pushes()) - before, mapsPerSecond: requests / seconds };
        await grpc.mapping('unmap', { device: DEVICE, iova: hex(BASE), size: hex(2 * requests * PAGE) });
        return figures;
      } finally {
        grpc.close();
        await api.stop();
      }
    };
    const figures = await alternate(ROUNDS, { coalesced: round(undefined), single: round(1) });
    const pick = (xs: Figures[], key: keyof Figures) => median(xs.map((f) => f[key]));
    const label = `${requests.toLocaleString('en-US')} concurrent maps, on-chip device`;
    const baseline = '--max-group 1';
    compare(
      ctx,
      {
        scenario: 'group commit',
        case: label,
        metric: 'set_map pushes',
        value: pick(figures.coalesced, 'pushes'),
        unit: 'pushes',
        note: 'default --max-group (256)',
      },
      baseline,
      pick(figures.single, 'pushes'),
    );
    compare(
      ctx,
      {
        scenario: 'group commit',
        case: label,
        metric: 'maps/s',
        value: pick(figures.coalesced, 'mapsPerSecond'),
        unit: 'op/s',
        note: 'default --max-group (256)',
      },
      baseline,
      pick(figures.single, 'mapsPerSecond'),
    );
  } finally {
    await agent.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
