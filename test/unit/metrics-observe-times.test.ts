/**
 * observeTimes records what as many observe() calls of prom-client record: the same exposition,
 * bucket by bucket, for values inside, on and beyond the bucket bounds, on label sets new and old.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { Histogram, Registry } from 'prom-client';
import { observeTimes } from '../../src/metrics/metrics.ts';

const BUCKETS = [0.001, 0.01, 0.1];

function histogram() {
  const registry = new Registry();
  const h = new Histogram({
    name: 'h_seconds',
    help: 'h',
    labelNames: ['device', 'kind'],
    buckets: BUCKETS,
    registers: [registry],
  });
  return { registry, h };
}

test('observeTimes(v, n) exposes what n observe(v) calls expose', async () => {
  const observation = fc.record({
    device: fc.constantFrom('vdpa0', 'vdpa1'),
    kind: fc.constantFrom('a', 'b'),
    value: fc.oneof(fc.constantFrom(0, ...BUCKETS, 5), fc.double({ min: 0, max: 1, noNaN: true })),
    times: fc.nat({ max: 300 }),
  });
  await fc.assert(
    fc.asyncProperty(fc.array(observation, { maxLength: 8 }), async (observations) => {
      const one = histogram();
      const many = histogram();
      for (const { device, kind, value, times } of observations) {
        for (let i = 0; i < times; i++) one.h.observe({ device, kind }, value);
        observeTimes(many.h, { device, kind }, value, times);
      }
      const text = async (r: Registry) =>
        (await r.metrics()).replace(
          /_sum(\{[^}]*\}) (\S+)/g,
          (_m, l, v) => `_sum${l} ${Number(v).toPrecision(9)}`,
        );
      assert.equal(await text(many.registry), await text(one.registry));
    }),
  );
});
