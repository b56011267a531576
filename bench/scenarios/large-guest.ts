/**
 * Scenario: a 1 TiB guest's memory table set end to end (REST PUT /v1/devices/vdpa0/memtable,
 * through the queue, the agent, a simulated on-chip device and the journal), as 512 regions of
 * 2 GiB and as 65,536 regions of 16 MiB, from empty and then with 1% of the regions moved to other
 * memory offsets. Beside it, the floor: one raw write per op the service sent (writeSync of one
 * 72-byte message to /dev/null, as device-apply measures it), timed in the same rounds. The note
 * gives, for scale, a JSON.parse of the same request: the floor leaves out reading the table, which
 * a changed 1% still needs whole. Each is timed with the full answer (every op and mapping listed)
 * and with `?summary=true` (the counts alone).
 *
 * The device is VA mode (on-chip IOMMU): a PA-mode parent would pin the whole terabyte.
 */
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { DEFAULT_LIMITS } from '../../src/api/parse.ts';
import { apiConfig, rest, spawnAgent, startReadyApi, tempDir } from '../../test/integration/api-harness.ts';
import { RAW_WRITE, rawWriteRate } from '../floor.ts';
import { alternate, type BenchContext, compare, median, scaled } from '../harness.ts';

const TIB = 1n << 40n;
const ROUNDS = 3;

const hex = (n: bigint) => `0x${n.toString(16)}`;

/** The guest as `n` equal regions; `moved` shifts every hundredth region's offset by one region. */
function guestTable(n: number, moved: boolean) {
  const size = TIB / BigInt(n);
  return Array.from({ length: n }, (_, k) => {
    const slot = moved && k % 100 === 0 ? (k + 1) % n : k;
    return { iova: hex(BigInt(k) * size), size: hex(size), memory: 'ram0', offset: hex(BigInt(slot) * size) };
  });
}

/** The table as the request body, serialized before the clock starts. */
const bodyOf = (regions: unknown[]) => Buffer.from(JSON.stringify({ regions }));

/** PUTs `body` as vdpa0's memory table: seconds until the whole answer is in, and its op count. */
function putTable(base: string, body: Buffer, query = ''): Promise<{ seconds: number; ops: number }> {
  return new Promise((resolve, reject) => {
    const start = performance.now();
    const req = http.request(
      `${base}/v1/devices/vdpa0/memtable${query}`,
      { method: 'PUT', headers: { 'content-type': 'application/json' } },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('error', reject);
        res.on('end', () => {
          const seconds = (performance.now() - start) / 1000;
          const answer = Buffer.concat(chunks).toString('utf8');
          if (res.statusCode !== 200)
            return reject(new Error(`memtable: ${res.statusCode} ${answer.slice(0, 500)}`));
          resolve({ seconds, ops: (JSON.parse(answer) as { opCount: number }).opCount });
        });
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

/** Seconds for JSON.parse of `body`: for scale, what reading the request alone costs a client. */
function parseSeconds(body: Buffer): number {
  const start = performance.now();
  JSON.parse(body.toString('utf8'));
  return (performance.now() - start) / 1000;
}

/** Seconds for `count` raw message writes: the floor of `count` ops. */
const rawWrites = (count: number): number => count / rawWriteRate(count, 1);

export async function benchLargeGuest(ctx: BenchContext): Promise<void> {
  const dir = tempDir('bench-large-guest');
  const agent = await spawnAgent(dir, ['sim:vdpa0,iommu=onchip']);
  try {
    // A power of two, so that the regions tile the terabyte in whole pages.
    const most = 2 ** Math.round(Math.log2(scaled(ctx, 65_536, 512)));
    const limits = { ...DEFAULT_LIMITS, bodyLimit: Math.max(DEFAULT_LIMITS.bodyLimit, 160 * most) };
    const api = await startReadyApi(apiConfig(dir, path.join(dir, 'agent.sock'), { limits }));
    try {
      const call = rest(api.restAddress);
      const created = await call('POST', '/v1/memory', { id: 'ram0', size: hex(TIB) });
      if (created.status !== 201)
        throw new Error(`memory: ${created.status} ${JSON.stringify(created.body)}`);
      const clear = bodyOf([]);
      for (const n of [512, most]) {
        const bodies = { fromEmpty: bodyOf(guestTable(n, false)), changed: bodyOf(guestTable(n, true)) };
        // One round of one answer: from empty, then 1% changed, then back to empty (untimed); the floor of each.
        const round = async (query: string) => {
          const fromEmpty = await putTable(api.restAddress, bodies.fromEmpty, query);
          const changed = await putTable(api.restAddress, bodies.changed, query);
          await putTable(api.restAddress, clear, query);
          return {
            fromEmpty,
            changed,
            floor: { fromEmpty: rawWrites(fromEmpty.ops), changed: rawWrites(changed.ops) },
            parse: { fromEmpty: parseSeconds(bodies.fromEmpty), changed: parseSeconds(bodies.changed) },
          };
        };
        // The full answer and the summary in alternating rounds, after one warm-up round of each.
        await round('');
        await round('?summary=true');
        const rounds = await alternate(ROUNDS, {
          full: () => round(''),
          summary: () => round('?summary=true'),
        });
        for (const [answer, answerLabel] of [
          ['full', ''],
          ['summary', ' ?summary=true'],
        ] as const) {
          for (const [key, label] of [
            ['fromEmpty', 'from empty'],
            ['changed', '1% changed'],
          ] as const) {
            const these = rounds[answer];
            compare(
              ctx,
              {
                scenario: 'large guest',
                case: `1 TiB guest as ${n.toLocaleString('en-US')} regions, ${label}, REST set-mem-table${answerLabel}`,
                metric: 'time',
                value: median(these.map((r) => r[key].seconds)) * 1000,
                unit: 'ms',
                note: `ops ${these[0]![key].ops}; JSON.parse of the request ${(median(these.map((r) => r.parse[key])) * 1000).toPrecision(3)} ms`,
              },
              `one raw write per op (${RAW_WRITE})`,
              median(these.map((r) => r.floor[key])) * 1000,
            );
          }
        }
      }
    } finally {
      await api.stop();
    }
  } finally {
    await agent.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
