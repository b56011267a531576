/**
 * The agent as a process: its socket's permissions, one agent per socket, stale sockets, signals,
 * restarts seen by the client, and refusing a bad command line.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { AgentClient } from '../../src/agent/client.ts';
import { AgentError } from '../../src/agent/errors.ts';
import { nextEvent, spawnAgent, startAgentProcess, tempDir } from './agent-harness.ts';

const PAGE = 0x1000n;

/** Agent arguments for one simulated device and default socket path under `stateDir`. */
const args = (stateDir: string) => ['--state-dir', stateDir, '--device', 'sim:vdpa0', '--memory', 'ram=1M'];
const socketOf = (stateDir: string) => path.join(stateDir, 'agent', 'agent.sock');

test('with nobody reading its log any more (EPIPE), SIGTERM still stops the agent cleanly', async (t) => {
  const state = path.join(tempDir(t), 'state');
  const agent = await startAgentProcess(t, args(state));
  // Close our end of its stdout: every record it writes from now on fails with EPIPE.
  agent.child.stdout!.destroy();
  const exit = await agent.stop('SIGTERM');
  assert.deepEqual(exit, { code: 0, signal: null });
  assert.equal(fs.existsSync(socketOf(state)), false, 'the socket was removed');
});

test('the socket is 0600 in a 0700 directory, and SIGTERM closes devices, removes it and exits 0', async (t) => {
  const state = path.join(tempDir(t), 'state');
  const agent = await startAgentProcess(t, args(state));
  const socket = socketOf(state);
  assert.ok(fs.lstatSync(socket).isSocket());
  assert.equal(fs.statSync(socket).mode & 0o777, 0o600);
  assert.equal(fs.statSync(path.dirname(socket)).mode & 0o777, 0o700);

  const client = new AgentClient({ socketPath: socket, reconnect: { initialDelayMs: 20 } });
  t.after(() => client.close());
  await client.connect();
  const { results } = await client.apply('vdpa0', [
    { type: 'update', asid: 0, iova: 0x10000n, size: PAGE, memory: 'ram', offset: 0n, perm: 'rw' },
    { type: 'update', asid: 0, iova: 0x20000n, size: 2n * PAGE, memory: 'ram', offset: PAGE, perm: 'ro' },
  ]);
  assert.deepEqual(results, [{ ok: true }, { ok: true }]);

  const disconnected = nextEvent<AgentError>(client, 'disconnected');
  const exit = await agent.stop('SIGTERM');
  assert.deepEqual(exit, { code: 0, signal: null });
  assert.equal(fs.existsSync(socket), false);
  const closed = agent.logs().find((l) => l.device === 'vdpa0' && l.entries !== undefined);
  assert.ok(closed, agent.stdout());
  assert.equal(closed.entries, 2);
  assert.equal(closed.bytes, String(3n * PAGE));
  assert.ok(agent.logs().some((l) => l.msg === 'agent stopped'));

  // The client noticed, and calls now fail fast (retrying is the caller's choice, not the client's).
  assert.equal((await disconnected).status, status.UNAVAILABLE);
  assert.equal(client.connected, false);
  await assert.rejects(
    client.getInfo(),
    (e: unknown) => e instanceof AgentError && e.status === status.UNAVAILABLE,
  );
});

test('a second agent on a live socket refuses to start, naming the first; the first keeps serving', async (t) => {
  const dir = tempDir(t);
  const socket = path.join(dir, 'run', 'agent.sock');
  const first = await startAgentProcess(t, [...args(path.join(dir, 'a')), '--socket', socket]);

  const second = spawnAgent(t, ['--state-dir', path.join(dir, 'b'), '--device', 'sim:vdpa9'], {
    VDPA_MAPD_AGENT_SOCKET: socket,
  });
  const exit = await second.exited;
  assert.notEqual(exit.code, 0);
  assert.match(second.stderr(), new RegExp(`another agent \\(pid ${first.pid},.*is serving on ${socket}`));

  const client = new AgentClient({ socketPath: socket });
  t.after(() => client.close());
  assert.equal((await client.getInfo()).pid, first.pid);
  assert.equal(fs.statSync(socket).mode & 0o777, 0o600);
});

test('a stale socket left by a killed agent is removed; the client sees the restart; memory files survive', async (t) => {
  const state = path.join(tempDir(t), 'state');
  const socket = socketOf(state);
  const first = await startAgentProcess(t, args(state));
  const client = new AgentClient({
    socketPath: socket,
    reconnect: { initialDelayMs: 50, maxDelayMs: 500 },
  });
  t.after(() => client.close());
  const before = await client.connect();
  const map = {
    type: 'update',
    asid: 0,
    iova: 0x10000n,
    size: PAGE,
    memory: 'ram',
    offset: PAGE,
    perm: 'rw',
  } as const;
  assert.deepEqual((await client.apply('vdpa0', [map])).results, [{ ok: true }]);
  const guestData = Buffer.from('guest data that outlives the agent');
  await client.dmaWrite('vdpa0', 0, 0x10010n, guestData);

  const disconnected = nextEvent(client, 'disconnected');
  assert.equal((await first.stop('SIGKILL')).signal, 'SIGKILL');
  await disconnected;
  assert.ok(fs.lstatSync(socket).isSocket(), 'SIGKILL leaves the socket file behind');

  const second = await startAgentProcess(t, args(state));
  assert.ok(second.logs().some((l) => l.msg === 'removed a stale socket left by an agent that is gone'));

  // The same client reaches the new agent; its answers name another boot.
  const after = await client.connect();
  assert.notEqual(after.bootId, before.bootId);
  assert.equal(client.connected, true);
  const info = await client.getInfo();
  assert.deepEqual([info.pid, info.bootId], [second.pid, after.bootId]);
  // The kernel dropped every mapping with the old agent's fds; the new one starts empty...
  assert.deepEqual((await client.listMapped('vdpa0')).mappings, []);
  // ...but `--memory ram=1M` re-opened the backing file instead of recreating it: the data is there.
  const ram = (await client.listMemory()).find((m) => m.id === 'ram')!;
  assert.deepEqual([ram.created, ram.mappedEntries], [false, 0]);
  assert.deepEqual((await client.apply('vdpa0', [map])).results, [{ ok: true }]);
  assert.deepEqual(await client.dmaRead('vdpa0', 0, 0x10010n, guestData.length), guestData);
  assert.deepEqual(await second.stop(), { code: 0, signal: null });
});

test('a bad command line is refused with exit code 2 and the usage', async (t) => {
  const dir = tempDir(t);
  const agent = spawnAgent(t, ['--state-dir', dir, '--memory', 'ram=12Q']);
  assert.equal((await agent.exited).code, 2);
  assert.match(agent.stderr(), /--memory ram=12Q: "12Q" is not a size/);
  assert.match(agent.stderr(), /usage: agent/);
  assert.equal(fs.existsSync(socketOf(dir)), false);
});
