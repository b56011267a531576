/**
 * JSON bodies: a large one is parsed in slices that yield to the event loop, to the value
 * JSON.parse gives, and refused exactly as a small one is (syntax, poisoning, repeated keys).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { parseJsonBody, SLICED_BODY_BYTES } from '../../src/api/json-body.ts';
import { ServiceError } from '../../src/core/errors.ts';

const hex = (n: number) => `0x${n.toString(16)}`;

function parse(text: string): Promise<{ value?: unknown; err?: Error & { statusCode?: number } }> {
  return new Promise((resolve) => {
    parseJsonBody(undefined, text, (err, value) => resolve(err ? { err } : { value }));
  });
}

/** A memory table of `n` regions, as a client sends it; `edit` may change region 40,000's text. */
function table(n: number, edit = (region: string) => region): string {
  const regions = Array.from({ length: n }, (_, k) => {
    const region = `{"iova":"${hex(2 * k * 4096)}","size":"0x1000","memory":"ram0","offset":"${hex(k * 4096)}"}`;
    return k === 40_000 ? edit(region) : region;
  });
  return `{"regions":[${regions.join(',')}]}`;
}

test('a large body is parsed in slices, yielding to the event loop, to what JSON.parse gives', async () => {
  const text = table(65_536);
  assert.ok(text.length >= SLICED_BODY_BYTES);
  let turns = 0;
  const tick = setInterval(() => turns++, 0);
  const { value, err } = await parse(text);
  clearInterval(tick);
  assert.equal(err, undefined);
  assert.deepEqual(value, JSON.parse(text));
  assert.ok(turns > 0, 'timers ran while the body was parsed');
});

test('a repeated key deep in a large body is refused, naming the field', async () => {
  const { err } = await parse(
    table(65_536, (r) => r.replace('"memory":"ram0"', '"memory":"nope","memory":"ram0"')),
  );
  assert.ok(err instanceof ServiceError);
  assert.equal(err.code, 'INVALID_ARGUMENT');
  assert.equal(err.details.field, 'regions[40000].memory');
});

test('a large body with a syntax error is refused as JSON.parse words it, with status 400', async () => {
  // A trailing comma, and numbers json-ext would join were they cut between slices.
  for (const text of [`${table(65_536).slice(0, -2)},]}`, table(65_536, () => '1 2')]) {
    const { err } = await parse(text);
    let expected = '';
    try {
      JSON.parse(text);
    } catch (e) {
      expected = (e as Error).message;
    }
    assert.equal(err?.statusCode, 400);
    assert.equal(err?.message, expected);
  }
});

test('a large body cut short inside its objects or arrays is refused as JSON.parse refuses it', async () => {
  const full = table(65_536);
  for (const text of [full.slice(0, -1), full.slice(0, -2), `${full.slice(0, -2)},{"iova":"0x0"`]) {
    const { err, value } = await parse(text);
    assert.equal(value, undefined);
    assert.equal(err?.statusCode, 400);
    assert.throws(() => JSON.parse(text), { message: err?.message });
  }
});

for (const [what, edit] of [
  ['__proto__', (r: string) => r.replace('"memory"', '"__proto__":{"x":1},"memory"')],
  ['constructor.prototype', (r: string) => r.replace('"memory"', '"constructor":{"prototype":{}},"memory"')],
  ['\\u-spelled __proto__', (r: string) => r.replace('"memory"', '"\\u005f_proto__":{},"memory"')],
] as const) {
  test(`a ${what} key in a large body is refused as in a small one`, async () => {
    const large = await parse(table(65_536, edit));
    const small = await parse(`{"regions":[${edit('{"memory":"ram0"}')}]}`);
    assert.equal(large.err?.statusCode, 400);
    assert.match(large.err?.message ?? '', /forbidden prototype property/);
    assert.equal(large.err?.message, small.err?.message);
  });
}

test('small bodies: empty is no body, a repeated key is refused, JSON otherwise', async () => {
  assert.deepEqual(await parse(''), { value: undefined });
  const dup = await parse('{"memory":"nope","memory":"ram0"}');
  assert.ok(dup.err instanceof ServiceError);
  assert.equal(dup.err.details.field, 'memory');
  assert.deepEqual(await parse('{"a":[1,{"b":null}]}'), { value: { a: [1, { b: null }] } });
  assert.equal((await parse('{"a":')).err?.statusCode, 400);
});

test('any JSON value, in a body large or small, parses to what JSON.parse gives', async () => {
  const pad = 'x'.repeat(SLICED_BODY_BYTES);
  await fc.assert(
    fc.asyncProperty(fc.jsonValue(), fc.boolean(), async (v, large) => {
      const text = JSON.stringify(large ? { pad, v } : { v });
      fc.pre(!/__proto__|constructor/.test(text));
      const { value, err } = await parse(text);
      assert.equal(err, undefined);
      assert.deepEqual(value, JSON.parse(text));
    }),
    { numRuns: 60 },
  );
});
