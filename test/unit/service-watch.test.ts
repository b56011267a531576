/** WatchHub's history: whole requests are dropped, resume points are checked, positions reported. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ServiceError } from '../../src/core/errors.ts';
import type { MappingEvent } from '../../src/core/types.ts';
import { WatchHub } from '../../src/service/watch.ts';

function event(sequence: bigint, iova: bigint, device = 'd0'): MappingEvent {
  return {
    device,
    kind: 'mapped',
    sequence,
    mapping: { asid: 0, iova, size: 0x1000n, memory: 'm', offset: 0n, perm: 'rw' },
  };
}

const code = (c: string, field: string) => (e: unknown) =>
  e instanceof ServiceError && e.code === c && e.field === field;

test('a request whose events no longer all fit is dropped whole; resuming before it is too old', async () => {
  const hub = new WatchHub(undefined, 3);
  hub.startAt('d0', 10n);
  await hub.emit([event(11n, 1n), event(11n, 2n), event(12n, 3n), event(12n, 4n)]);
  const latest = hub.subscribe('d0', ['d0'], undefined, () => {});
  assert.deepEqual(latest.positions, [{ device: 'd0', sequence: 12n }]);
  assert.deepEqual(latest.replay, []);
  // Sequence 11 is gone (4 events > 3): from 11 on, both events of 12 are replayed.
  assert.deepEqual(
    hub.subscribe('d0', ['d0'], 11n, () => {}).replay.map((e) => e.mapping.iova),
    [3n, 4n],
  );
  assert.throws(
    () => hub.subscribe('d0', ['d0'], 10n, () => {}),
    code('FAILED_PRECONDITION', 'from_sequence'),
  );
  assert.throws(() => hub.subscribe('d0', ['d0'], 13n, () => {}), code('INVALID_ARGUMENT', 'from_sequence'));
  assert.throws(
    () => hub.subscribe(undefined, ['d0'], 12n, () => {}),
    code('INVALID_ARGUMENT', 'from_sequence'),
  );
});

test('after a start the history begins where the desired state left off', async () => {
  const hub = new WatchHub(undefined, 100);
  hub.startAt('d0', 41n);
  const seen: bigint[] = [];
  const sub = hub.subscribe(undefined, ['d0', 'd1'], undefined, (e) => seen.push(e.sequence));
  assert.deepEqual(sub.positions, [
    { device: 'd0', sequence: 41n },
    { device: 'd1', sequence: 0n },
  ]);
  assert.deepEqual(hub.subscribe('d0', ['d0'], 41n, () => {}).replay, []);
  assert.throws(
    () => hub.subscribe('d0', ['d0'], 40n, () => {}),
    code('FAILED_PRECONDITION', 'from_sequence'),
  );
  await hub.emit([event(42n, 1n), event(1n, 1n, 'd1')]);
  sub.close();
  await hub.emit([event(43n, 2n)]);
  assert.deepEqual(seen, [42n, 1n]);
});
