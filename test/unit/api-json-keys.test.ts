/**
 * findDuplicateKey against a model: random JSON trees whose objects are entry lists (so a key may
 * repeat), written out by hand with escapes and spacing; the expected answer is read off the tree.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { DuplicateKeyScan, findDuplicateKey } from '../../src/api/json-keys.ts';

type Tree = { obj: [string, Tree][] } | { arr: Tree[] } | { str: string } | { num: number } | null;

const KEYS = ['a', 'b', 'memory', '"q"', 'back\\slash', 'é', '', ' '];

const tree: fc.Arbitrary<Tree> = fc.letrec<{ tree: Tree }>((tie) => ({
  tree: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    fc.constant(null),
    fc.integer().map((num) => ({ num })),
    fc.constantFrom(...KEYS, '{"a":1,"a":2}', ',"a":').map((str) => ({ str })),
    fc.array(tie('tree'), { maxLength: 4 }).map((arr) => ({ arr })),
    fc.array(fc.tuple(fc.constantFrom(...KEYS), tie('tree')), { maxLength: 4 }).map((obj) => ({ obj })),
  ),
})).tree;

/** A string as JSON, sometimes with every character \u-escaped (the same key, spelled otherwise). */
function quote(s: string, escapeAll: boolean): string {
  if (!escapeAll) return JSON.stringify(s);
  return `"${[...s].map((c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).join('')}"`;
}

function write(t: Tree, escapeAll: boolean, space: string): string {
  if (t === null) return 'null';
  if ('num' in t) return String(t.num);
  if ('str' in t) return quote(t.str, escapeAll);
  if ('arr' in t) return `[${space}${t.arr.map((x) => write(x, escapeAll, space)).join(`,${space}`)}]`;
  const entries = t.obj.map(
    ([k, v], i) => `${quote(k, escapeAll && i % 2 === 1)}${space}:${write(v, escapeAll, space)}`,
  );
  return `{${space}${entries.join(`,${space}`)}${space}}`;
}

/** The first key (in document order) that repeats in its object, as a field path. */
function expected(t: Tree, path: string): string | undefined {
  if (t === null || 'num' in t || 'str' in t) return undefined;
  if ('arr' in t) {
    for (const [i, x] of t.arr.entries()) {
      const found = expected(x, `${path}[${i}]`);
      if (found !== undefined) return found;
    }
    return undefined;
  }
  const seen = new Set<string>();
  for (const [k, v] of t.obj) {
    const at = path === '' ? k : `${path}.${k}`;
    if (seen.has(k)) return at;
    seen.add(k);
    const found = expected(v, at);
    if (found !== undefined) return found;
  }
  return undefined;
}

test('findDuplicateKey finds the first repeated key, by its path, however it is spelled', () => {
  fc.assert(
    fc.property(tree, fc.boolean(), fc.constantFrom('', ' ', '\n\t'), (t, escapeAll, space) => {
      const text = write(t, escapeAll, space);
      JSON.parse(text); // the scan runs on text JSON.parse accepted
      assert.equal(findDuplicateKey(text), expected(t, ''), text);
    }),
    { numRuns: 2000 },
  );
});

test('examples', () => {
  assert.equal(findDuplicateKey('{"memory":"nope","memory":"ram0"}'), 'memory');
  assert.equal(findDuplicateKey('{"memory":"nope","\\u006demory":"ram0"}'), 'memory');
  assert.equal(findDuplicateKey('{"ops":[{"a":1},{"a":1,"b":{"c":"\\"","c":2}}]}'), 'ops[1].b.c');
  assert.equal(findDuplicateKey('{"a":"{\\"a\\":1,\\"a\\":2}","b":[1,"a","a"]}'), undefined);
  assert.equal(findDuplicateKey('[{"a":1},{"a":2}]'), undefined);
});

test('a scan in steps stops after a comma between array elements, or any comma past anyUntil', () => {
  const text = '{"r":[{"a":1,"b":2},{"a":3,"b":4}],"c":5,"d":6}';
  const commaAt = (from: number) => text.indexOf(',', from);
  const elementComma = text.indexOf('},{') + 1;
  const stops = (until: number, anyUntil?: number) => {
    const scan = new DuplicateKeyScan(Buffer.from(text));
    assert.equal(scan.scanTo(until, anyUntil), undefined);
    return scan.position;
  };
  // From the start: the first comma is inside an element; the scan runs on to the element comma.
  assert.equal(stops(0, text.length), elementComma + 1);
  // Any comma once anyUntil is reached.
  assert.equal(stops(0), commaAt(0) + 1);
  assert.equal(stops(0, elementComma - 3), commaAt(elementComma - 3) + 1);
  // Past the last array: only anyUntil stops it, or the end.
  assert.equal(stops(elementComma + 1, text.length), text.length);
  assert.equal(stops(elementComma + 1, elementComma + 1), commaAt(elementComma + 1) + 1);
});
