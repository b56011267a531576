/**
 * The API server says in its log when it loses the agent, when it is back and what reconciling
 * took: once per outage, not once per retry.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import { createRig, type LogRecord } from './process-harness.ts';

test('agent link: lost, reconnected and reconciled are logged, with devices and counts; restarts counted', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const rig = createRig(t, 'agent-link-log');
  const firstAgent = await rig.startAgent();
  const api = await rig.startApi();
  const up = await api.proc.waitForLog((r) => r.msg === 'agent link up', 'link up');
  assert.equal(typeof up.bootId, 'string');
  await api.proc.waitForLog((r) => r.msg === 'agent link reconciled' && r.ready === 2, 'first reconcile');
  assert.equal((await api.http('POST', '/v1/memory', { id: 'ram0', size: '0x100000' })).status, 201);
  const map = { iova: '0x0', size: '0x1000', memory: 'ram0' };
  assert.equal((await api.http('POST', '/v1/devices/vdpa1/mappings', map)).status, 201);

  await firstAgent.kill('SIGKILL');
  const lost = await api.proc.waitForLog(
    (r) => r.msg?.toString().startsWith('agent link lost') === true,
    'lost',
  );
  assert.equal(lost.level, 40, 'a warning');
  assert.match(String(lost.reason), /unreachable|restarted/);
  // Retries while the agent is away do not repeat it.
  await new Promise((r) => setTimeout(r, 2_000));
  const count = (msg: string) =>
    api.proc.logs().filter((r: LogRecord) => String(r.msg).startsWith(msg)).length;
  assert.equal(count('agent link lost'), 1, 'one line per outage');

  const since = api.proc.logs().length;
  await rig.startAgent();
  const after = (match: (r: LogRecord) => boolean, what: string) =>
    api.proc.waitForLog((r) => api.proc.logs().indexOf(r) >= since && match(r), what);
  const back = await after((r) => r.msg === 'agent link reconnected', 'reconnected');
  assert.notEqual(back.bootId, up.bootId, 'a new agent');
  const device = await after(
    (r) => r.msg === 'device reconciled' && r.device === 'vdpa1',
    'vdpa1 reconciled',
  );
  assert.equal(device.entries, 1);
  assert.equal(device.ops, 1, 'the mapping the new agent lacked, put back');
  const done = await after((r) => r.msg === 'agent link reconciled', 'reconciled');
  assert.deepEqual([done.devices, done.ready, done.bootId], [2, 2, back.bootId]);
  await api.untilReady();
  // What VdpaMapdAgentDown sees even when the agent is back before the next scrape.
  const metrics = (await api.http('GET', '/metrics')).body as string;
  assert.match(metrics, /^vdpa_mapd_agent_restarts_total 1$/m);
  assert.match(metrics, /^vdpa_mapd_agent_up 1$/m);
});
