/**
 * REST's renaming of proto field names (`request_id`) to JSON names (`requestId`), against a
 * reference written here: the same value for any JSON, the very same object when nothing is to be
 * renamed, and a field given under both names refused by its path.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { withJsonNames } from '../../services/api/json-names.ts';
import { ServiceError } from '../../src/core/errors.ts';

/** Proto names of vdpa.mapd.v1 that differ from their JSON names, written out by hand. */
const RENAMED: Readonly<Record<string, string>> = {
  request_id: 'requestId',
  dry_run: 'dryRun',
  from_sequence: 'fromSequence',
};

/** The reference: renames every key, at any depth; throws the path of a field given twice. */
function reference(value: unknown, path: string): unknown {
  if (Array.isArray(value)) return value.map((item, i) => reference(item, `${path}[${i}]`));
  if (typeof value !== 'object' || value === null) return value;
  const out: Record<string, unknown> = {};
  for (const [key, item] of Object.entries(value)) {
    const name = RENAMED[key] ?? key;
    const at = path === '' ? name : `${path}.${name}`;
    if (name !== key && Object.hasOwn(value, name)) throw new Error(at);
    out[name] = reference(item, at);
  }
  return out;
}

const KEYS = [...Object.entries(RENAMED).flat(), 'iova', 'regions', 'ops', 'memory'];
const json = fc.letrec((tie) => ({
  value: fc.oneof(
    { depthSize: 'small' },
    fc.oneof(fc.string(), fc.integer(), fc.boolean(), fc.constant(null)),
    fc.array(tie('value')),
    fc.dictionary(fc.constantFrom(...KEYS), tie('value'), { maxKeys: 4 }),
  ),
})).value;

test('withJsonNames renames as the reference does, and refuses a field given under both names', () => {
  fc.assert(
    fc.property(json, (v) => {
      let expected: unknown;
      let twice: string | undefined;
      try {
        expected = reference(v, '');
      } catch (e) {
        twice = (e as Error).message;
      }
      if (twice !== undefined) {
        assert.throws(
          () => withJsonNames(v),
          (e) => e instanceof ServiceError && e.details.field === twice,
        );
        return;
      }
      const got = withJsonNames(v);
      // By their JSON: fast-check's dictionaries have no prototype.
      assert.equal(JSON.stringify(got), JSON.stringify(expected));
      const hasProtoName = /"(request_id|dry_run|from_sequence)":/.test(JSON.stringify(v));
      if (!hasProtoName) assert.equal(got, v, 'nothing to rename: the same value');
    }),
    { numRuns: 500 },
  );
});

test('a large table with nothing to rename is the same object; one proto name deep in it is renamed', () => {
  const regions = Array.from({ length: 10_000 }, (_, k) => ({ iova: String(k), memory: 'ram0' }));
  const body = { regions };
  assert.equal(withJsonNames(body), body);
  const deep = { ops: [...regions.slice(0, 9_999), { iova: '1', request_id: 'x' }] };
  const renamed = withJsonNames(deep) as { ops: Record<string, unknown>[] };
  assert.deepEqual(renamed.ops[9_999], { iova: '1', requestId: 'x' });
  assert.equal(renamed.ops[0], regions[0], 'untouched items are kept as they are');
});
