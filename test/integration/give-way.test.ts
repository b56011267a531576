/**
 * The API server's transports count what arrives, so that its bulk work gives way to small
 * requests (src/sys/next-turn.ts): a small REST or gRPC request counts, a large one does not. The
 * server runs in this process, so what arrived at it arrived on this test's thread.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, test } from 'node:test';
import { smallRequestSince } from '../../src/sys/next-turn.ts';
import { pageRegions, startStack } from './api-harness.ts';

type Stack = Awaited<ReturnType<typeof startStack>>;
let stack: Stack;

before(async () => {
  stack = await startStack('give-way');
  const res = await stack.http('POST', '/v1/memory', { id: 'ram0', size: '0x1000000' });
  assert.equal(res.status, 201, JSON.stringify(res.body));
});
after(() => stack.stop());

const PAGE = 0x1000;
const hex = (n: number) => `0x${n.toString(16)}`;

/** Whether `request` counted as a small request that arrived. */
async function countsAsSmall(request: () => Promise<unknown>): Promise<boolean> {
  const since = performance.now();
  await request();
  return smallRequestSince(since);
}

test('a small REST request counts as small; a large one does not', async () => {
  assert.equal(await countsAsSmall(() => stack.http('GET', '/v1/devices')), true);
  const dryRun = () =>
    stack.http('PUT', '/v1/devices/vdpa0/memtable?dryRun=true', {
      regions: pageRegions(64) /* over 4 KiB of JSON */,
    });
  assert.equal((await dryRun()).status, 200);
  assert.equal(await countsAsSmall(dryRun), false);
});

/** PUT `body` in chunks (no content-length), as a client streaming it would; resolves with the status. */
function putChunked(url: string, body: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      url,
      { method: 'PUT', headers: { 'content-type': 'application/json' } },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      },
    );
    req.on('error', reject);
    req.write(body);
    req.end();
  });
}

test('a REST body sent in chunks counts as large, its length unknown when it arrives', async () => {
  const url = `${stack.api.restAddress}/v1/devices/vdpa0/memtable?dryRun=true`;
  const body = JSON.stringify({ regions: pageRegions(1) });
  assert.equal(await putChunked(url, body), 200);
  assert.equal(await countsAsSmall(() => putChunked(url, body)), false);
});

test('a small gRPC request counts as small; a large one does not', async () => {
  const map = { device: 'vdpa0', iova: '0x100000', size: hex(PAGE), memory: 'ram0', offset: '0' };
  assert.equal(await countsAsSmall(() => stack.grpc.mapping('map', map)), true);
  const batch = () =>
    stack.grpc.mapping('batch', {
      device: 'vdpa1',
      // Maps 128 pages, then unmaps them: each call leaves the device as it found it.
      ops: [
        ...pageRegions(128).map((r) => ({ op: 'map', ...r })),
        { op: 'unmap', iova: '0', size: hex(256 * PAGE) },
      ],
    });
  await batch();
  assert.equal(await countsAsSmall(batch), false);
});
