/**
 * Bulk work gives way to small requests (src/sys/next-turn.ts): after a small request that arrived
 * once the work began, for a while, its turns pause; otherwise they are the next turn. The rule is
 * checked at given times; the turns by the order of events (paused, below). The agent's frame
 * server counts what arrives (the API server's transports: test/integration/give-way.test.ts).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import { pino } from 'pino';
import { AgentClient } from '../../src/agent/client.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { bulkTurn, GiveWay, SMALL_REQUEST_BYTES, smallRequestSince } from '../../src/sys/next-turn.ts';
import { serveFrames } from '../../services/agent/frame-server.ts';
import type { AgentHandlers } from '../../services/agent/server.ts';

/**
 * Whether `turn` resolved only after a setImmediate queued just after it, that is, it paused: a
 * turn that is the next one resolves first. Read from the order of events, not from a clock.
 */
async function paused(turn: () => Promise<void>): Promise<boolean> {
  const pending = turn();
  let immediateRan = false;
  setImmediate(() => {
    immediateRan = true;
  });
  await pending;
  return immediateRan;
}

test('bulk work gives way only to small requests that arrived after it began, and only for a while', () => {
  const arrivals = new GiveWay(20);
  assert.equal(arrivals.givesWay(100, 101), false, 'no request');
  arrivals.arrived(SMALL_REQUEST_BYTES + 1, 110);
  assert.equal(arrivals.givesWay(100, 111), false, 'a large request does not count');
  arrivals.arrived(SMALL_REQUEST_BYTES, 90);
  assert.equal(arrivals.givesWay(100, 101), false, 'nor one from before the work began');
  arrivals.arrived(SMALL_REQUEST_BYTES, 120);
  assert.equal(arrivals.givesWay(100, 121), true, 'a small one after it began does');
  assert.equal(arrivals.givesWay(100, 139), true, 'for the window after it');
  assert.equal(arrivals.givesWay(130, 131), false, 'not for work begun after it');
  assert.equal(arrivals.givesWay(100, 140), false, 'nor once the window is over');
});

test('a bulk turn is the next turn unless it gives way, then it pauses', async () => {
  const arrivals = new GiveWay(60_000);
  const since = performance.now();
  assert.equal(await paused(() => bulkTurn(since, arrivals)), false);
  arrivals.arrived(100);
  assert.equal(await paused(() => bulkTurn(since, arrivals)), true);
});

function socketIn(t: TestContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-give-way-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, 'agent.sock');
}

const update = (k: number): IotlbOp => ({
  type: 'update',
  asid: 0,
  iova: BigInt(k) * 0x2000n,
  size: 0x1000n,
  memory: 'ram0',
  offset: BigInt(k) * 0x1000n,
  perm: 'rw',
});

test("the agent's frame server counts a small Apply, not a large one", async (t) => {
  const socket = socketIn(t);
  const handlers = {
    GetInfo: async () => ({ bootId: 'boot-1', version: '0', pid: 1 }),
    Apply: async (req: { ops: readonly IotlbOp[] }) => ({
      results: req.ops.map(() => ({ ok: true })),
      bootId: 'boot-1',
    }),
  } as unknown as AgentHandlers;
  const server = await serveFrames(socket, handlers, pino({ level: 'silent' }));
  t.after(() => server.close(0));
  const client = new AgentClient({ socketPath: socket });
  t.after(() => client.close());
  await client.connect();

  let since = performance.now();
  await client.apply(
    'vdpa0',
    Array.from({ length: 256 }, (_, k) => update(k)),
  );
  assert.equal(smallRequestSince(since), false, 'a 256-op Apply is bulk work itself');
  since = performance.now();
  await client.apply('vdpa1', [update(0)]);
  assert.equal(smallRequestSince(since), true, 'a one-op Apply is a small request');
});
