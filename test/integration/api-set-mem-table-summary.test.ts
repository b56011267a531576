/**
 * SetMemTable's summary answer: the counts of ops, invalidated and mapped without the lists, so
 * that a whole guest's table can be set by a client with gRPC's default 4 MB receive limit. Its
 * full answer lists every op and mapping (about 96 bytes per region in protobuf), which such a client
 * refuses after the table was applied.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { Ajv } from 'ajv';
import { grpcFails, startStack } from './api-harness.ts';

const PAGE = 0x1000;
/** Enough regions that the full answer is over 4 MiB (about 4.8 MB). */
const REGIONS = 50_000;
const hex = (n: number) => `0x${n.toString(16)}`;
const regionsOf = (n: number, from = 0) =>
  Array.from({ length: n }, (_, i) => {
    const k = from + i;
    return { iova: hex(2 * k * PAGE), size: hex(PAGE), memory: 'ram0', offset: hex(k * PAGE) };
  });
const SUMMARY_KEYS = ['dryRun', 'unchanged', 'opCount', 'invalidatedCount', 'mappedCount'];

let stack: Awaited<ReturnType<typeof startStack>>;
before(async () => {
  stack = await startStack('vdpa-summary-');
  const made = await stack.http('POST', '/v1/memory', { id: 'ram0', size: hex((REGIONS + 1) * PAGE) });
  assert.equal(made.status, 201);
});
after(() => stack?.stop());

async function listedCount(device: string): Promise<number> {
  const listed = await stack.http('GET', `/v1/devices/${device}/mappings`);
  assert.equal(listed.status, 200);
  return listed.body.mappings.length;
}

test('over gRPC a whole table with a summary fits a default client; the full answer does not', async () => {
  const regions = regionsOf(REGIONS);
  const full = await grpcFails(stack.grpc.mapping('setMemTable', { device: 'vdpa0', regions }));
  assert.equal(full.code, status.RESOURCE_EXHAUSTED, full.details);
  assert.equal(await listedCount('vdpa0'), REGIONS, 'the table was applied although its answer was refused');

  const set = await stack.grpc.mapping('setMemTable', { device: 'vdpa1', regions, summary: true });
  assert.deepEqual(
    [set.opCount, set.mappedCount, set.invalidatedCount, set.unchanged],
    [REGIONS, REGIONS, 0, 0],
  );
  assert.deepEqual([set.ops, set.mapped, set.invalidated], [[], [], []]);
  assert.equal(await listedCount('vdpa1'), REGIONS);

  // One region moved: two ops (its INVALIDATE and UPDATE), the rest unchanged.
  const moved = [...regions.slice(0, -1), ...regionsOf(1, REGIONS)];
  const diff = await stack.grpc.mapping('setMemTable', { device: 'vdpa1', regions: moved, summary: true });
  assert.deepEqual(
    [diff.opCount, diff.mappedCount, diff.invalidatedCount, diff.unchanged],
    [2, 1, 1, REGIONS - 1],
  );
  const cleared = await stack.grpc.mapping('setMemTable', { device: 'vdpa1', regions: [], summary: true });
  assert.equal(cleared.invalidatedCount, REGIONS);
  assert.equal(await listedCount('vdpa1'), 0);
  await stack.grpc.mapping('setMemTable', { device: 'vdpa0', regions: [], summary: true });
});

test('over REST ?summary=true answers with the counts alone, in the documented schema', async () => {
  const body = { regions: regionsOf(3) };
  const res = await stack.http('PUT', '/v1/devices/vdpa0/memtable?summary=true', body);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.deepEqual(Object.keys(res.body).sort(), [...SUMMARY_KEYS].sort());
  assert.deepEqual(res.body, {
    dryRun: false,
    unchanged: 0,
    opCount: 3,
    invalidatedCount: 0,
    mappedCount: 3,
  });
  const doc = (await stack.http('GET', '/docs/json')).body;
  const route = doc.paths['/v1/devices/{device}/memtable'].put;
  const validate = new Ajv({ allErrors: true, allowUnionTypes: true }).compile(
    route.responses['200'].content['application/json'].schema,
  );
  assert.equal(validate(res.body), true, new Ajv().errorsText(validate.errors));
  assert.ok(
    route.parameters.some((p: { name: string; in: string }) => p.name === 'summary' && p.in === 'query'),
    'summary is documented as a query parameter',
  );

  // The full answer carries the counts too.
  const full = await stack.http('PUT', '/v1/devices/vdpa0/memtable', { regions: regionsOf(2) });
  assert.equal(full.status, 200);
  assert.equal(full.body.ops.length, 1);
  assert.deepEqual([full.body.opCount, full.body.invalidatedCount, full.body.unchanged], [1, 1, 2]);

  const dry = await stack.http('PUT', '/v1/devices/vdpa0/memtable?dryRun=true&summary=true', { regions: [] });
  assert.deepEqual(dry.body, { dryRun: true, unchanged: 0, opCount: 2, invalidatedCount: 2, mappedCount: 0 });
  assert.equal(await listedCount('vdpa0'), 2, 'a dry run changes nothing');
});

test('a summary that is not true or false is refused by name and changes nothing', async () => {
  const res = await stack.http('PUT', '/v1/devices/vdpa1/memtable?summary=yes', { regions: regionsOf(1) });
  assert.equal(res.status, 400);
  assert.equal(res.body.error.field, 'summary');
  assert.equal(await listedCount('vdpa1'), 0);
});
