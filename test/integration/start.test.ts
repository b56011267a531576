/**
 * `npm start` (scripts/start.ts) keeps its promise: agent + API server come up with vdpa0, vdpa1 and
 * ram0, answer over REST, stop cleanly on SIGINT, and a second start keeps what the first acknowledged.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { type NpmStart, npmStart } from './npm-start.ts';

/** The agent and API server processes working in `dir` (each is given a state dir inside it). */
function servicesIn(dir: string): number[] {
  const found: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      const state = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      const zombie = state.slice(state.lastIndexOf(')') + 2).startsWith('Z');
      if (!zombie && cmdline.includes(dir) && /services\/(agent|api)\/main\.ts/.test(cmdline))
        found.push(Number(entry));
    } catch {
      // the process ended while we looked
    }
  }
  return found;
}

test('npm start: both processes serve, stop on Ctrl-C, and keep what they acknowledged', {
  timeout: 180_000,
}, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-start-'));
  const running: NpmStart[] = [];
  t.after(() => {
    // The services run in their own process groups: on a failure, kill them too, not only the script.
    for (const s of running) if (s.child.exitCode === null) s.child.kill('SIGKILL');
    for (const pid of servicesIn(dir)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const first = await npmStart(dir);
  running.push(first);
  const devices = (await (await fetch(`${first.rest}/v1/devices`)).json()) as {
    devices: { id: string; iommu: string }[];
  };
  assert.deepEqual(
    devices.devices.map((d) => [d.id, d.iommu]),
    [
      ['vdpa0', 'platform'],
      ['vdpa1', 'onchip'],
    ],
  );
  const memory = (await (await fetch(`${first.rest}/v1/memory`)).json()) as {
    memory: { id: string; size: string }[];
  };
  assert.deepEqual(
    memory.memory.map((m) => [m.id, m.size]),
    [['ram0', '0x40000000']],
  );
  const mapped = await fetch(`${first.rest}/v1/devices/vdpa1/mappings`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ iova: '0x100000', size: '0x200000', memory: 'ram0', offset: '0x0', perm: 'rw' }),
  });
  assert.equal(mapped.status, 201);

  assert.equal(servicesIn(dir).length, 2, 'agent and API server run as their own processes');
  first.child.kill('SIGINT');
  assert.equal(await first.exited, 0);
  assert.deepEqual(servicesIn(dir), [], 'no service outlives the start script');

  const second = await npmStart(dir);
  running.push(second);
  // The new agent started empty; start waited for /readyz, so it has been reconciled from disk.
  const listing = (await (await fetch(`${second.rest}/v1/devices/vdpa1/mappings`)).json()) as {
    mappings: { iova: string; size: string; memory: string }[];
  };
  assert.deepEqual(
    listing.mappings.map((m) => [m.iova, m.size, m.memory]),
    [['0x100000', '0x200000', 'ram0']],
  );
  const { device } = (await (await fetch(`${second.rest}/v1/devices/vdpa1`)).json()) as {
    device: { counters: { setMapPushes: number; setMapEntriesPushed: number } };
  };
  // Counters are the new agent's own: it received the mapping in one push.
  assert.equal(device.counters.setMapPushes, 1);
  assert.equal(device.counters.setMapEntriesPushed, 1);
  second.child.kill('SIGINT');
  assert.equal(await second.exited, 0);
});
