/**
 * Large REST bodies and answers, which take their own path: a body of more than SLICED_BODY_BYTES
 * is parsed in slices, and a SetMemTable answer of SLICED_ANSWER_ITEMS items and more is sent as a
 * stream of its JSON. Both must read exactly as the small ones do: the same answer (the documented
 * schema, the same mappings as listed), the same refusals.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { Ajv } from 'ajv';
import { SLICED_ANSWER_ITEMS } from '../../src/api/json-answer.ts';
import { SLICED_BODY_BYTES } from '../../src/api/json-body.ts';
import { pageRegions, startStack } from './api-harness.ts';

const PAGE = 0x1000;
const REGIONS = SLICED_ANSWER_ITEMS + 100;
const hex = (n: number) => `0x${n.toString(16)}`;

let stack: Awaited<ReturnType<typeof startStack>>;
before(async () => {
  stack = await startStack('vdpa-rest-large-');
  const made = await stack.http('POST', '/v1/memory', { id: 'ram0', size: hex(2 * REGIONS * PAGE) });
  assert.equal(made.status, 201);
});
after(() => stack?.stop());

test('a large memtable is answered as a stream: JSON, the documented schema, what is listed', async () => {
  const body = JSON.stringify({ regions: pageRegions(REGIONS) });
  assert.ok(body.length > SLICED_BODY_BYTES, 'the body is parsed in slices');
  const res = await stack.http('PUT', '/v1/devices/vdpa0/memtable', body);
  assert.equal(res.status, 200, JSON.stringify(res.body).slice(0, 300));
  assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
  assert.equal(res.body.ops.length, REGIONS);
  assert.equal(res.body.mapped.length, REGIONS);
  assert.deepEqual(res.body.invalidated, []);
  assert.equal(res.body.dryRun, false);

  const doc = (await stack.http('GET', '/docs/json')).body;
  const schema =
    doc.paths['/v1/devices/{device}/memtable'].put.responses['200'].content['application/json'].schema;
  const validate = new Ajv({ allErrors: true, allowUnionTypes: true }).compile(schema);
  assert.equal(validate(res.body), true, new Ajv().errorsText(validate.errors));

  const listed = await stack.http('GET', '/v1/devices/vdpa0/mappings');
  assert.equal(listed.status, 200);
  const key = (m: { iova: string }) => BigInt(m.iova);
  const sorted = (ms: { iova: string }[]) => [...ms].sort((a, b) => (key(a) < key(b) ? -1 : 1));
  assert.deepEqual(sorted(res.body.mapped), sorted(listed.body.mappings));

  // The same table again: nothing to do, answered in one piece.
  const again = await stack.http('PUT', '/v1/devices/vdpa0/memtable', body);
  assert.equal(again.status, 200);
  assert.deepEqual(again.body.ops, []);
  assert.equal(again.body.unchanged, REGIONS);
});

test('a large body is refused as a small one is: a repeated key by its path, bad JSON as 400', async () => {
  const regions = pageRegions(REGIONS);
  const last = REGIONS - 1;
  const text = JSON.stringify({ regions }).replace(
    `"offset":"${regions[last]!.offset}"}`,
    `"offset":"${regions[last]!.offset}","offset":"0x0"}`,
  );
  const repeated = await stack.http('PUT', '/v1/devices/vdpa1/memtable', text);
  assert.equal(repeated.status, 400);
  assert.equal(repeated.body.error.field, `regions[${last}].offset`);
  assert.match(repeated.body.error.message, /given twice/);

  const cut = await stack.http('PUT', '/v1/devices/vdpa1/memtable', JSON.stringify({ regions }).slice(0, -2));
  assert.equal(cut.status, 400);
  assert.equal(cut.body.error.field, 'body');

  const listed = await stack.http('GET', '/v1/devices/vdpa1/mappings');
  assert.deepEqual(listed.body.mappings, [], 'nothing refused was applied');
});
