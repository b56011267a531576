/**
 * Which commits of the state store may overtake which (store.ts, "Order"): commits of different
 * devices are independent, so a small commit of one device is written, applied and answered while
 * a large one of another device is still on its way; commits of one device, and commits of the
 * records every device depends on (memory), keep their order. Checked on real files, and as a
 * property against a reference model of the desired state written here.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, test } from 'node:test';
import fc from 'fast-check';
import { ServiceError } from '../../src/core/errors.ts';
import { APPLY_WHOLE_MAX, type Change } from '../../src/state/desired.ts';
import { StateStore } from '../../src/state/store.ts';
import { FaultyFs, storeFsWithWrites } from './core-harness.ts';

const PAGE = 0x1000n;
const put = (device: string, iova: bigint, memory = 'm0'): Change => ({
  t: 'mapping.put',
  device,
  mapping: { asid: 0, iova, size: PAGE, memory, offset: iova, perm: 'rw' },
});
const del = (device: string, iova: bigint): Change => ({ t: 'mapping.delete', device, asid: 0, iova });
/** A table large enough to be staged in slices, and to take several turns to encode. */
const BIG = 3 * APPLY_WHOLE_MAX;
const table = (device: string, n = BIG): Change[] =>
  Array.from({ length: n }, (_, k) => put(device, BigInt(k) * PAGE));
const memoryPut = (id: string): Change => ({
  t: 'memory.put',
  memory: { id, path: `memfd:${id}`, kind: 'memfd', created: true, size: 1n << 30n, registeredAt: 'now' },
});

const turn = () => new Promise((resolve) => setImmediate(resolve));

let dir: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-order-'));
});
afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Settles `p` into the order list under `name`. */
function track(order: string[], name: string, p: Promise<void>): Promise<void> {
  return p.then(
    () => {
      order.push(name);
    },
    (e: unknown) => {
      order.push(`${name} refused`);
      throw e;
    },
  );
}

describe('commit order', () => {
  test("a small commit of one device is answered before another device's large commit is applied", async () => {
    const { store } = await StateStore.open({ dir });
    const size = () => store.state.devices.get('vdpa0')?.mappings.size ?? 0;
    const order: string[] = [];
    const big = track(order, 'big', store.commit(table('vdpa0')));
    const small = track(order, 'small', store.commit([put('vdpa1', 0x4000_0000n)]));
    await small;
    assert.deepEqual(order, ['small']);
    assert.equal(size(), 0, 'the large table is not applied yet');
    assert.equal(store.state.devices.get('vdpa1')?.mappings.size, 1);
    // Nobody sees the table half applied.
    const seen = new Set<number>();
    let done = false;
    void big.finally(() => {
      done = true;
    });
    while (!done) {
      seen.add(size());
      await turn();
    }
    await big;
    seen.add(size());
    assert.deepEqual(
      [...seen].sort((a, b) => a - b),
      [0, BIG],
    );
    assert.equal(store.state.memoryUse.get('m0'), BIG + 1);
    await store.close();
    const { store: again } = await StateStore.open({ dir });
    assert.equal(again.state.devices.get('vdpa0')?.mappings.size, BIG);
    assert.equal(again.state.devices.get('vdpa1')?.mappings.size, 1);
    await again.close();
  });

  test('a small commit made while a large record is being written waits for one of its parts, not for all of it', async () => {
    // Writes of more than 4 KB (the large record's parts) wait at a gate, one let through at a time.
    const waiting: (() => void)[] = [];
    let arrived: (() => void) | undefined;
    const gated = storeFsWithWrites(async (_file, write, buffer, offset, length, position) => {
      if (length > 4096) {
        await new Promise<void>((resolve) => {
          waiting.push(resolve);
          arrived?.();
        });
      }
      return write(buffer, offset, length, position);
    });
    const atGate = () =>
      new Promise<void>((resolve) => {
        if (waiting.length > 0) resolve();
        else arrived = resolve;
      });
    const { store } = await StateStore.open({ dir, fs: gated, recordPartBytes: 20_000 });
    const order: string[] = [];
    const big = track(order, 'big', store.commit(table('vdpa0')));
    await atGate();
    const small = track(order, 'small', store.commit([put('vdpa1', 0x4000_0000n)]));
    waiting.shift()!();
    await atGate();
    // The large record's next part is held at the gate: the small commit was written before it.
    await small;
    assert.deepEqual(order, ['small']);
    assert.equal(waiting.length, 1);
    for (let i = 0; order.length < 2 && i < 100_000; i++) {
      waiting.shift()?.();
      await turn();
    }
    await big;
    assert.deepEqual(order, ['small', 'big']);
    await store.close();
    const { store: again } = await StateStore.open({ dir });
    assert.equal(again.state.devices.get('vdpa0')?.mappings.size, BIG);
    assert.equal(again.state.devices.get('vdpa1')?.mappings.size, 1);
    await again.close();
  });

  test('commits of one device keep their order; a commit of memory waits for every commit before it', async () => {
    const { store } = await StateStore.open({ dir });
    const order: string[] = [];
    await Promise.all([
      track(order, 'vdpa0 big', store.commit(table('vdpa0'))),
      track(
        order,
        'vdpa0 small',
        store.commit([del('vdpa0', 0n), { t: 'sequence', device: 'vdpa0', next: 9n }]),
      ),
      track(order, 'vdpa1 small', store.commit([put('vdpa1', 0n)])),
    ]);
    assert.deepEqual(order, ['vdpa1 small', 'vdpa0 big', 'vdpa0 small']);
    assert.equal(store.state.devices.get('vdpa0')?.mappings.size, BIG - 1, 'the delete came after the table');
    assert.equal(store.state.devices.get('vdpa0')?.nextSequence, 9n);

    order.length = 0;
    await Promise.all([
      track(order, 'vdpa2 big', store.commit(table('vdpa2'))),
      track(order, 'memory', store.commit([memoryPut('m1')])),
      track(order, 'vdpa1 small', store.commit([put('vdpa1', PAGE, 'm1')])),
    ]);
    assert.deepEqual(order, ['vdpa2 big', 'memory', 'vdpa1 small']);
    await store.close();
  });

  test('a failed write refuses every commit of its record, of every device, and changes nothing in memory', async () => {
    const faulty = new FaultyFs();
    const { store } = await StateStore.open({ dir, fs: faulty });
    await store.commit([put('vdpa0', 0n), put('vdpa1', 0n)]);
    /** The mappings of vdpa0 and vdpa1 (vdpa2's commit below is in another record). */
    const tables = () =>
      ['vdpa0', 'vdpa1'].map((d) => [...(store.state.devices.get(d)?.mappings.keys() ?? [])]);
    const before = tables();
    const use = store.state.memoryUse.get('m0');
    const held = store.commit([put('vdpa2', 0n)]);
    // That write is at the file: the next record holds both commits below, and its write fails.
    await turn();
    faulty.fail('write', 'ENOSPC', { partial: true, file: /journal/ });
    const refused = await Promise.allSettled([
      store.commit([put('vdpa0', PAGE)]),
      store.commit([put('vdpa1', PAGE), del('vdpa1', 0n)]),
    ]);
    await held;
    for (const r of refused) {
      assert.equal(r.status, 'rejected');
      assert.ok(r.reason instanceof ServiceError && r.reason.code === 'UNAVAILABLE', String(r.reason));
    }
    assert.deepEqual(tables(), before);
    assert.equal(store.state.memoryUse.get('m0'), use! + 1, "only vdpa2's mapping was added");
    // A large commit, staged on a copy while it is written: the copy is dropped with it.
    faulty.fail('datasync', 'EIO', { file: /journal/ });
    await assert.rejects(store.commit(table('vdpa0')), ServiceError);
    assert.deepEqual(tables(), before);
    assert.equal(store.state.memoryUse.get('m0'), use! + 1);
    await store.commit([put('vdpa1', 2n * PAGE)]);
    await store.close();
    const { store: again, droppedBytes } = await StateStore.open({ dir });
    assert.equal(droppedBytes, 0);
    assert.deepEqual([...again.state.devices.get('vdpa0')!.mappings.keys()], ['0:0']);
    assert.deepEqual([...again.state.devices.get('vdpa1')!.mappings.keys()], ['0:0', '0:8192']);
    await again.close();
  });
});

// ---- property: concurrent commits against a reference model ----

/** The reference: per device its pages and next sequence number; the memory records; use counted from the pages. */
interface Model {
  devices: Map<string, { pages: Map<bigint, string>; next: bigint }>;
  memory: Set<string>;
}

function modelApply(model: Model, c: Change): void {
  const dev = (name: string) => {
    let d = model.devices.get(name);
    if (!d) {
      d = { pages: new Map(), next: 1n };
      model.devices.set(name, d);
    }
    return d;
  };
  if (c.t === 'mapping.put') dev(c.device).pages.set(c.mapping.iova, c.mapping.memory);
  else if (c.t === 'mapping.delete') dev(c.device).pages.delete(c.iova);
  else if (c.t === 'sequence') {
    const d = dev(c.device);
    if (c.next > d.next) d.next = c.next;
  } else if (c.t === 'memory.put') model.memory.add(c.memory.id);
  else if (c.t === 'memory.delete') model.memory.delete(c.id);
}

/** What a model and a store's state both say, in one comparable form; `only`: one device's part. */
function view(
  devices: Iterable<[string, { pages: Iterable<[bigint, string]>; next: bigint }]>,
  memory: Iterable<string>,
  only?: string,
) {
  const out: Record<string, unknown> = {};
  const use: Record<string, number> = {};
  for (const [name, d] of devices) {
    const pages = [...d.pages].sort((a, b) => (a[0] < b[0] ? -1 : 1));
    for (const [, m] of pages) use[m] = (use[m] ?? 0) + 1;
    if (only !== undefined && name !== only) continue;
    if (pages.length > 0 || d.next !== 1n)
      out[name] = { pages: pages.map(([i, m]) => `${i}:${m}`), next: d.next };
  }
  if (only !== undefined) return out;
  return { devices: out, memory: [...memory].sort(), use };
}

const modelView = (m: Model, only?: string) => view(m.devices, m.memory, only);

function storeView(store: StateStore, only?: string) {
  const s = store.state;
  const devices = [...s.devices].map(
    ([name, d]) =>
      [
        name,
        {
          pages: [...d.mappings.values()].map((m) => [m.iova, m.memory] as [bigint, string]),
          next: d.nextSequence,
        },
      ] as [string, { pages: [bigint, string][]; next: bigint }],
  );
  const v = view(devices, s.memory.keys(), only);
  if (only === undefined) {
    const use = Object.fromEntries([...s.memoryUse].sort());
    assert.deepEqual(use, Object.fromEntries(Object.entries((v as { use: object }).use).sort()), 'memoryUse');
  }
  return v;
}

const deviceName = fc.constantFrom('d0', 'd1', 'd2');
const memoryName = fc.constantFrom('m0', 'm1');
const page = fc.integer({ min: 0, max: 5 }).map((k) => BigInt(k) * PAGE);
const smallCommit = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .tuple(
        deviceName,
        fc.array(
          fc.oneof(
            fc.record({ kind: fc.constant('put' as const), iova: page, memory: memoryName }),
            fc.record({ kind: fc.constant('del' as const), iova: page }),
            fc.record({ kind: fc.constant('seq' as const), next: fc.bigInt({ min: 1n, max: 50n }) }),
          ),
          { minLength: 1, maxLength: 4 },
        ),
      )
      .map(([d, ops]): Change[] =>
        ops.map((o) =>
          o.kind === 'put'
            ? put(d, o.iova, o.memory)
            : o.kind === 'del'
              ? del(d, o.iova)
              : { t: 'sequence', device: d, next: o.next },
        ),
      ),
  },
  {
    weight: 1,
    arbitrary: fc
      .tuple(memoryName, fc.boolean())
      .map(([id, add]): Change[] => [add ? memoryPut(id) : { t: 'memory.delete', id }]),
  },
);
/** Over APPLY_WHOLE_MAX mapping changes: staged in slices. Pages from 0 overlap the small commits' pages. */
const bigCommit = fc
  .tuple(
    deviceName,
    memoryName,
    fc.integer({ min: APPLY_WHOLE_MAX + 1, max: APPLY_WHOLE_MAX + 300 }),
    fc.boolean(),
  )
  .map(([d, memory, n, remove]): Change[] =>
    Array.from({ length: n }, (_, k) =>
      remove ? del(d, BigInt(k) * PAGE) : put(d, BigInt(k) * PAGE, memory),
    ),
  );
const step = fc.record({
  changes: fc.oneof({ weight: 5, arbitrary: smallCommit }, { weight: 1, arbitrary: bigCommit }),
  // Turns to wait before the next commit is made (0: in the same turn).
  pause: fc.integer({ min: 0, max: 3 }),
  // Arm a failing write (of whatever record comes next) before making this commit.
  fault: fc.option(fc.constantFrom('write', 'datasync'), { freq: 6 }),
});

/**
 * Part sizes that put the big commits (and now and then a group of small ones) in parts, other
 * records written between them, faults striking any part.
 */
const partBytes = fc.constantFrom(undefined, 12_000, 40_000);
/** Compactions now and then, running beside the commits (a fault may strike their journal write). */
const compactAt = fc.constantFrom(undefined, 30_000);

test('commits made concurrently, some refused by failed writes: each device sees its own commits in order, and the end state (live and reopened) is the sequential application of the accepted ones', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(step, { minLength: 1, maxLength: 12 }),
      partBytes,
      compactAt,
      async (steps, recordPartBytes, compactBytes) => {
        const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-order-prop-'));
        try {
          const faulty = new FaultyFs();
          const { store } = await StateStore.open({ dir, fs: faulty, recordPartBytes, compactBytes });
          const outcome: (boolean | undefined)[] = steps.map(() => undefined);
          const devicesOfStep = steps.map(
            (s) => new Set(s.changes.map((c) => ('device' in c ? c.device : '*'))),
          );
          const problems: string[] = [];
          const settled: Promise<void>[] = [];
          for (const [i, s] of steps.entries()) {
            // One fault at a time: a second one could strike the cut of the first's record.
            if (s.fault === 'write' && faulty.pending === 0)
              faulty.fail('write', 'ENOSPC', { file: /journal/ });
            if (s.fault === 'datasync' && faulty.pending === 0)
              faulty.fail('datasync', 'EIO', { file: /journal/ });
            settled.push(
              store.commit(s.changes).then(
                () => {
                  outcome[i] = true;
                  // Every earlier commit it depends on is settled, and this device's part of the state
                  // is those of them that were accepted, applied in order.
                  for (const d of devicesOfStep[i]!) {
                    if (d === '*') continue;
                    const model: Model = { devices: new Map(), memory: new Set() };
                    for (let j = 0; j <= i; j++) {
                      const dependent = devicesOfStep[j]!.has(d) || devicesOfStep[j]!.has('*');
                      if (!dependent) continue;
                      if (outcome[j] === undefined) problems.push(`commit ${i} resolved before commit ${j}`);
                      if (outcome[j]) for (const c of steps[j]!.changes) modelApply(model, c);
                    }
                    try {
                      assert.deepEqual(storeView(store, d), modelView(model, d));
                    } catch (e) {
                      problems.push(`device ${d} after commit ${i}: ${(e as Error).message}`);
                    }
                  }
                },
                () => {
                  outcome[i] = false;
                },
              ),
            );
            for (let t = 0; t < s.pause; t++) await turn();
          }
          await Promise.all(settled);
          assert.deepEqual(problems, []);
          const model: Model = { devices: new Map(), memory: new Set() };
          for (const [i, s] of steps.entries())
            if (outcome[i]) for (const c of s.changes) modelApply(model, c);
          assert.deepEqual(storeView(store), modelView(model));
          await store.close();
          const { store: reopened, droppedBytes } = await StateStore.open({ dir, recordPartBytes });
          assert.equal(droppedBytes, 0);
          assert.deepEqual(storeView(reopened), modelView(model));
          await reopened.close();
        } finally {
          fs.rmSync(dir, { recursive: true, force: true });
        }
      },
    ),
    { numRuns: 40 },
  );
});
