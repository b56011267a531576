/**
 * The JSON Schemas REST checks bodies with (generated from the proto) never refuse what
 * src/api/parse.ts takes, and where they refuse, the answer names the same field with parse.ts's
 * own message: a schema in front of the parser changes no answer.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import {
  DEFAULT_LIMITS,
  parseBatch,
  parseMap,
  parseRegisterMemory,
  parseUnmap,
} from '../../src/api/parse.ts';
import { ServiceError } from '../../src/core/errors.ts';
import { REST_METHODS } from '../../services/api/api-table.ts';
import { compileRequestSchema, schemaError } from '../../services/api/json-schema.ts';
import { routeSchema } from '../../services/api/openapi.ts';

function bodyValidator(name: string) {
  const method = REST_METHODS.find((m) => m.name === name);
  assert.ok(method, name);
  const body = (routeSchema(method) as { body?: object }).body;
  assert.ok(body, `${name} takes a body`);
  return compileRequestSchema(body, 'body');
}

function parseError(parse: () => unknown): ServiceError | undefined {
  try {
    parse();
    return undefined;
  } catch (e) {
    assert.ok(e instanceof ServiceError, String(e));
    return e;
  }
}

/** Any JSON value, and the ones that sit at the edges of the rules. */
const value = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.constantFrom(
    '',
    '0',
    '0x',
    '0x1000',
    '-1',
    '1.5',
    ' 1',
    '18446744073709551616',
    'rw',
    'ro',
    'x'.repeat(129),
  ),
  fc.constantFrom(0, -1, 1.5, 2 ** 32, 2 ** 53, Number.MAX_SAFE_INTEGER, true, null),
);

const cases = [
  {
    name: 'Map',
    base: {
      iova: '0x1000',
      size: '0x1000',
      memory: 'ram0',
      offset: '0',
      perm: 'rw',
      asid: 0,
      requestId: 'r',
    },
    parse: (b: unknown) => parseMap('vdpa0', b),
  },
  {
    name: 'Unmap',
    base: { iova: '0x1000', size: '0x1000', asid: 1, exact: true, requestId: 'r' },
    parse: (b: unknown) => parseUnmap('vdpa0', b),
  },
  {
    name: 'RegisterMemory',
    base: { id: 'ram0', size: '4096' },
    parse: (b: unknown) => parseRegisterMemory(b),
  },
  {
    name: 'Batch',
    base: { ops: [], atomic: false, requestId: 'r' },
    parse: (b: unknown) => parseBatch('vdpa0', b, DEFAULT_LIMITS),
  },
  {
    name: 'Batch',
    label: 'one op of a batch',
    base: { op: 'unmap', iova: '1', size: '1', asid: 0, exact: false },
    wrap: (op: object) => ({ ops: [op] }),
    parse: (b: unknown) => parseBatch('vdpa0', b, DEFAULT_LIMITS),
  },
];

for (const { name, label = name, base, wrap = (b: object) => b, parse } of cases) {
  test(`${label}: the body schema refuses only what parse.ts refuses, naming the same field`, () => {
    const validate = bodyValidator(name);
    const keys = [...Object.keys(base), 'colour'];
    // One fault per body (a list given for `ops` may hold several: each side may name another).
    const oneFault = ([key, v]: [string, unknown]) => key !== 'ops' || !Array.isArray(v);
    fc.assert(
      fc.property(fc.tuple(fc.constantFrom(...keys), value).filter(oneFault), ([key, v]) => {
        const body = wrap({ ...base, [key]: v });
        const parsed = parseError(() => parse(body));
        if (validate(body)) return;
        const first = validate.errors?.[0];
        assert.ok(first);
        const refused = schemaError(first, 'body');
        assert.ok(
          parsed,
          `the schema refused what parse.ts takes: ${JSON.stringify(body)}: ${refused.message}`,
        );
        assert.equal(refused.field, parsed.field, JSON.stringify(body));
        // One wording differs, as clear: `op: must be one of map, unmap` (parse.ts: `map or unmap`).
        if (!(first.keyword === 'enum' && key === 'op')) {
          assert.equal(refused.message, parsed.message, JSON.stringify(body));
        }
      }),
      { numRuns: 400 },
    );
  });
}

test('a body that is no object is refused as `body`, as parse.ts does', () => {
  const validate = bodyValidator('Map');
  for (const body of [[], 'x', 1, null, true]) {
    assert.equal(validate(body), false);
    const refused = schemaError(validate.errors![0]!, 'body');
    assert.equal(refused.field, 'body');
    assert.equal(refused.message, parseError(() => parseMap('vdpa0', body))?.message);
  }
});
