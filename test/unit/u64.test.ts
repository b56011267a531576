/** src/u64.ts, the one reader of u64 text, against a model written here: digits and their value. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { CANONICAL, formatU64, isU64Text, sizeFromText, U64_MAX, u64FromText } from '../../src/u64.ts';

const TWO_64 = 18446744073709551616n;

/** The model: a value's digits in base 10 or 16, by hand. */
function digits(value: bigint, base: 10n | 16n): string {
  if (value === 0n) return '0';
  let out = '';
  for (let v = value; v > 0n; v /= base) out = '0123456789abcdef'[Number(v % base)]! + out;
  return out;
}

const u64 = fc.bigInt({ min: 0n, max: TWO_64 - 1n });

test('every u64 reads back from its decimal and 0x hex text, and is written as 0x hex', () => {
  fc.assert(
    fc.property(u64, fc.boolean(), (value, upper) => {
      const hex = digits(value, 16n);
      assert.equal(u64FromText(digits(value, 10n), CANONICAL), value);
      assert.equal(u64FromText(`0x${upper ? hex.toUpperCase() : hex}`), value);
      assert.equal(u64FromText(`0X${hex}`), value);
      assert.equal(formatU64(value), `0x${hex}`);
    }),
  );
  assert.equal(U64_MAX, TWO_64 - 1n);
});

test('2^64 and beyond, signs, blanks, fractions and other bases are refused', () => {
  fc.assert(
    fc.property(fc.bigInt({ min: TWO_64, max: TWO_64 * TWO_64 }), (value) => {
      assert.equal(u64FromText(digits(value, 10n)), undefined);
      assert.equal(u64FromText(`0x${digits(value, 16n)}`), undefined);
    }),
  );
  for (const text of ['', '-1', '+1', ' 1', '1 ', '1.0', '1e3', '0x', '0b1', '0o7', 'ff', '0x-1', '1_000']) {
    assert.equal(u64FromText(text), undefined, JSON.stringify(text));
  }
  assert.equal(isU64Text('9'.repeat(41)), false, 'too long to be a u64, refused before BigInt');
});

test('leading zeros: read where allowed, refused as the public API refuses them', () => {
  assert.equal(u64FromText('007'), 7n);
  assert.equal(u64FromText('007', CANONICAL), undefined);
  assert.equal(u64FromText('0', CANONICAL), 0n);
  assert.equal(u64FromText('0x007', CANONICAL), 7n);
});

test('sizes: K/M/G/T are binary multiples, and the product must still be a u64', () => {
  fc.assert(
    fc.property(
      fc.bigInt({ min: 0n, max: 1n << 40n }),
      fc.constantFrom('', 'k', 'M', 'g', 'T'),
      (n, suffix) => {
        const shift = { '': 0n, k: 10n, m: 20n, g: 30n, t: 40n }[suffix.toLowerCase()]!;
        const product = n << shift;
        assert.equal(sizeFromText(`${n}${suffix}`), product < TWO_64 ? product : undefined);
      },
    ),
  );
  assert.equal(sizeFromText('0x10M'), 16n << 20n);
  assert.equal(sizeFromText('16777215T'), 16777215n << 40n);
  assert.equal(sizeFromText('16777216T'), undefined, '2^64');
  assert.equal(sizeFromText('1P'), undefined);
  assert.equal(sizeFromText('M'), undefined);
});
