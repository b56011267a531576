/**
 * `npm start` (scripts/start.ts) keeps its promise: agent + API server come up with vdpa0, vdpa1 and
 * ram0, answer over REST, stop in order on SIGINT (a second one kills both), a second start keeps
 * what the first acknowledged, and a service that dies is restarted, says so, and loses nothing;
 * one that keeps dying makes it give up and stop everything.
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { type TestContext, test } from 'node:test';
import { AgentClient } from '../../src/agent/client.ts';
import { TIER_BUDGET_MS, until } from './agent-harness.ts';
import { spawnNpmStart } from './npm-start.ts';
import { mappingKeys } from './process-harness.ts';

interface Started {
  child: ChildProcess;
  rest: string;
  exited: Promise<number | null>;
  /** The start script's own messages (stderr), so far. */
  said(): string[];
  /** Resolves with the match of the first message (said or still to come) that `re` matches. */
  waitToSay(re: RegExp): Promise<RegExpExecArray>;
}

async function start(dir: string, args: string[] = []): Promise<Started> {
  const child = spawnNpmStart(dir, args);
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const said: string[] = [];
  const listeners = new Set<() => void>();
  createInterface({ input: child.stderr! }).on('line', (line) => {
    said.push(line);
    for (const l of listeners) l();
  });
  const waitToSay = (re: RegExp) =>
    new Promise<RegExpExecArray>((resolve, reject) => {
      const check = () => {
        for (const line of said) {
          const m = re.exec(line);
          if (m) {
            done();
            return resolve(m);
          }
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`start did not say ${re} in ${TIER_BUDGET_MS} ms; it said:\n${said.join('\n')}`));
      }, TIER_BUDGET_MS);
      const done = () => {
        clearTimeout(timer);
        listeners.delete(check);
      };
      listeners.add(check);
      check();
    });
  const rest = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('npm start printed no address in 60 s')), 60_000);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const m = /^vdpa-mapd is running: REST (http:\/\/[0-9.:]+)/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`start exited with ${code}:\n${said.join('\n')}`));
    });
  });
  return { child, rest, exited, said: () => [...said], waitToSay };
}

/** The agent and API server processes working in `dir` (each is given a state dir inside it). */
function servicesIn(dir: string, which = 'agent|api'): number[] {
  const found: number[] = [];
  const script = new RegExp(`services/(${which})/main\\.ts`);
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      const state = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      const zombie = state.slice(state.lastIndexOf(')') + 2).startsWith('Z');
      if (!zombie && cmdline.includes(dir) && script.test(cmdline)) found.push(Number(entry));
    } catch {
      // the process ended while we looked
    }
  }
  return found;
}

function only(pids: number[], what: string): number {
  assert.equal(pids.length, 1, `one ${what} process`);
  return pids[0]!;
}

/** A temp state directory; after the test the start scripts and every service in it are killed. */
function stateDir(t: TestContext, running: Started[]): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-start-'));
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
  return dir;
}

const mapping = { iova: '0x100000', size: '0x200000', memory: 'ram0', offset: '0x0', perm: 'rw' };

async function listed(rest: string, device: string): Promise<string[][]> {
  const listing = (await (await fetch(`${rest}/v1/devices/${device}/mappings`)).json()) as {
    mappings: { iova: string; size: string; memory: string }[];
  };
  return listing.mappings.map((m) => [m.iova, m.size, m.memory]);
}

test('npm start: both processes serve, stop on Ctrl-C in order, and keep what they acknowledged', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const running: Started[] = [];
  const dir = stateDir(t, running);

  const first = await start(dir);
  running.push(first);
  const devices = (await (await fetch(`${first.rest}/v1/devices`)).json()) as {
    devices: { id: string; iommu: string }[];
  };
  assert.deepEqual(
    devices.devices.map((d) => [d.id, d.iommu]),
    [
      ['vdpa0', 'platform'],
      ['vdpa1', 'onchip'],
      ['vblk0', 'onchip'],
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
    body: JSON.stringify(mapping),
  });
  assert.equal(mapped.status, 201);

  assert.equal(servicesIn(dir).length, 2, 'agent and API server run as their own processes');
  const apiPid = only(servicesIn(dir, 'api'), 'API server');
  const agentPid = only(servicesIn(dir, 'agent'), 'agent');
  first.child.kill('SIGINT');
  assert.equal(await first.exited, 0);
  assert.deepEqual(servicesIn(dir), [], 'no service outlives the start script');
  // The agent was asked to stop only once the API server had exited.
  const stops = first.said().filter((l) => /stopping|stopped/.test(l));
  assert.deepEqual(stops, [
    `start: stopping api (pid ${apiPid})`,
    'start: api stopped: it exited with code 0',
    `start: stopping agent (pid ${agentPid})`,
    'start: agent stopped: it exited with code 0',
  ]);

  const second = await start(dir);
  running.push(second);
  // The new agent started empty; start waited for /readyz, so it has been reconciled from disk.
  assert.deepEqual(await listed(second.rest, 'vdpa1'), [['0x100000', '0x200000', 'ram0']]);
  const { device } = (await (await fetch(`${second.rest}/v1/devices/vdpa1`)).json()) as {
    device: { counters: { setMapPushes: number; setMapEntriesPushed: number } };
  };
  // Counters are the new agent's own: it received the mapping in one push.
  assert.equal(device.counters.setMapPushes, 1);
  assert.equal(device.counters.setMapEntriesPushed, 1);

  // A second Ctrl-C while the first is still stopping kills both. The API server is frozen
  // (SIGSTOP), so the orderly stop is still waiting for it when the second one comes.
  process.kill(only(servicesIn(dir, 'api'), 'API server'), 'SIGSTOP');
  second.child.kill('SIGINT');
  await second.waitToSay(/^start: stopping api/);
  second.child.kill('SIGINT');
  assert.equal(await second.exited, 130);
  await second.waitToSay(/^start: killing every service$/);
  await until('both services to be gone', async () => servicesIn(dir).length === 0);
});

test('npm start: a SIGKILLed agent or API server is restarted and loses nothing; one that keeps dying stops everything', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const running: Started[] = [];
  const dir = stateDir(t, running);
  const socket = path.join(dir, 'agent', 'agent.sock');
  // Two restarts each within an hour: the third death gives up, whatever the machine's speed.
  const started = await start(dir, ['--restart-burst', '2', '--restart-interval', '3600']);
  running.push(started);
  let { rest } = started;
  const post = await fetch(`${rest}/v1/devices/vdpa0/mappings`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(mapping),
  });
  assert.equal(post.status, 201);
  const expected = [['0x100000', '0x200000', 'ram0']];
  const onDevice = mappingKeys('vdpa0', [
    { asid: 0, iova: 0x100000n, size: 0x200000n, memory: 'ram0', offset: 0n, perm: 'rw' },
  ]);
  /** The agent's own table of vdpa0, asked over its socket. */
  const agentTable = async () => {
    const client = new AgentClient({ socketPath: socket });
    try {
      const info = await client.connect();
      return { pid: info.pid, table: mappingKeys('vdpa0', (await client.listMapped('vdpa0')).mappings) };
    } finally {
      client.close();
    }
  };

  // The agent dies: restarted, and the API server reconciles the new one back to the desired state.
  const agentPid = only(servicesIn(dir, 'agent'), 'agent');
  process.kill(agentPid, 'SIGKILL');
  await started.waitToSay(
    new RegExp(`^start: agent \\(pid ${agentPid}\\) was killed by SIGKILL; restarting it in \\d`),
  );
  const [, restarted] = await started.waitToSay(/^start: agent restarted \(pid (\d+)\)/);
  assert.notEqual(Number(restarted), agentPid);
  // Either may refuse a connection while it restarts: not yet, not a failure.
  await until('the new agent to be reconciled', async () => {
    const ready = (await fetch(`${rest}/readyz`).catch(() => undefined))?.status === 200;
    return ready && (await agentTable().catch(() => undefined))?.table.join() === onDevice.join();
  });
  assert.deepEqual(await agentTable(), { pid: Number(restarted), table: onDevice });
  assert.deepEqual(await listed(rest, 'vdpa0'), expected);

  // The API server dies: restarted on the same state, it finds everything; the agent is untouched.
  const apiPid = only(servicesIn(dir, 'api'), 'API server');
  process.kill(apiPid, 'SIGKILL');
  await started.waitToSay(new RegExp(`^start: api \\(pid ${apiPid}\\) was killed by SIGKILL; restarting it`));
  const [, apiRestarted, newRest] = await started.waitToSay(
    /^start: api restarted \(pid (\d+)\): REST (http:\/\/[0-9.:]+), gRPC /,
  );
  assert.notEqual(Number(apiRestarted), apiPid);
  rest = newRest!;
  await until(
    'the new API server to be ready',
    async () => (await fetch(`${rest}/readyz`).catch(() => undefined))?.status === 200,
  );
  assert.deepEqual(await listed(rest, 'vdpa0'), expected);
  assert.deepEqual(await agentTable(), { pid: Number(restarted), table: onDevice });

  // The agent dies twice more: restarted once (its second restart), then start gives up.
  process.kill(Number(restarted), 'SIGKILL');
  const [, third] = await started.waitToSay(
    new RegExp(`^start: agent restarted \\(pid ((?!${restarted}\\))\\d+)\\)`),
  );
  process.kill(Number(third), 'SIGKILL');
  await started.waitToSay(
    new RegExp(
      `^start: agent \\(pid ${third}\\) was killed by SIGKILL; it was restarted 2 times within 3600 s ` +
        '\\(at most 2\\): giving up, stopping everything$',
    ),
  );
  assert.equal(await started.exited, 1);
  assert.deepEqual(servicesIn(dir), [], 'no service outlives the start script');
  assert.ok(started.said().includes('start: api stopped: it exited with code 0'), started.said().join('\n'));
});
