/**
 * The agent SIGKILLed under load. Its devices close with it (the simulated kernel, like the real
 * one, drops every mapping), and a new agent starts on the same socket. Meanwhile the API server
 * refuses writes with UNAVAILABLE / 503 and a retry-after (src/service/mapd.ts: a prompt, definite
 * "nothing was done" rather than a wait of unknown length), keeps answering reads from the desired
 * state, reconnects with backoff and reconciles. The clients retry refused ops with the same
 * requestId. In the end the new agent's own tables equal the desired state and the clients' model:
 * every acknowledged op is there exactly once (the watch stream saw each applied once), nothing else.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { status } from '@grpc/grpc-js';
import type { GrpcFailure } from './api-harness.ts';
import { until, TIER_BUDGET_MS } from './agent-harness.ts';
import { agentTable, createRig, desiredTable, mappingKeys, watchApplied } from './process-harness.ts';
import { mapUnmapFleet, PAGE } from './workload.ts';

const OPS_PER_CLIENT = 120;
/** Each client waits out at most this many retry-afters for one op. */
const RETRIES = 30;
const DEVICES = ['vdpa0', 'vdpa1'] as const;
const hex = (n: bigint) => `0x${n.toString(16)}`;

/** A mapping outside every client's slots (the watch's sentinel, the probes). */
const extra = (iova: bigint) => ({
  iova: hex(iova),
  size: hex(PAGE),
  memory: 'ram',
  offset: '0x0',
  perm: 'rw',
});
const extraKey = (device: string, iova: bigint) =>
  mappingKeys(device, [{ asid: 0, iova, size: PAGE, memory: 'ram', offset: 0n, perm: 'rw' }]);

test('agent SIGKILLed under load: writes refused with retry-after, then reconciled; nothing lost or doubled', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const rig = createRig(t, 'faults-agent');
  const firstAgent = await rig.startAgent();
  const api = await rig.startApi();
  assert.equal((await api.http('POST', '/v1/memory', { id: 'ram', size: '0x1000000' })).status, 201);

  // Every applied change, as the API server announces it once it is durable.
  const watch = await watchApplied(api, { device: 'vdpa0', memory: 'ram', sentinelBase: 0x7000_0000n });
  t.after(() => watch.close());
  const { events, sentinels } = watch;

  const clients = mapUnmapFleet(api, { memory: 'ram', slots: 24, seed: 2000 });
  const load = Promise.all(clients.map((c) => c.run({ ops: OPS_PER_CLIENT, retries: RETRIES })));

  await until('every client to have ops acknowledged', () => clients.every((c) => c.acked.length >= 15));
  const killedAt = performance.now();
  assert.equal((await firstAgent.kill('SIGKILL')).signal, 'SIGKILL');
  await until('the API server to notice', async () => (await api.http('GET', '/readyz')).status === 503);

  // While the agent is down: writes are refused at once with a retry-after, reads still work.
  const probe = 0x7100_0000n;
  const refused = await api.http('POST', '/v1/devices/vdpa0/mappings', {
    ...extra(probe),
    requestId: 'probe',
  });
  assert.equal(refused.status, 503);
  assert.equal(refused.body.error.code, 'UNAVAILABLE');
  assert.ok(Number(refused.headers.get('retry-after')) >= 1);
  const failure: GrpcFailure = await api.grpc
    .mapping('map', { device: 'vdpa1', ...extra(probe), requestId: 'probe' })
    .then(
      () => assert.fail('a map was acknowledged while the agent was down'),
      (e: GrpcFailure) => e,
    );
  assert.equal(failure.code, status.UNAVAILABLE);
  assert.deepEqual(failure.metadata.get('error-code'), ['UNAVAILABLE']);
  assert.ok(Number(failure.metadata.get('retry-after-ms')[0]) > 0);
  assert.equal((await api.http('GET', '/v1/devices/vdpa0/mappings')).status, 200);

  const secondAgent = await rig.startAgent();
  assert.ok(secondAgent.logs().some((r) => r.msg === 'removed a stale socket left by an agent that is gone'));
  await api.untilReady();
  const outage = (performance.now() - killedAt) / 1000;
  await load;

  for (const c of clients) {
    assert.deepEqual(c.unexpected, [], `${c.spec.name}: unexpected answers`);
    assert.equal(c.acked.length, OPS_PER_CLIENT, `${c.spec.name}: not every op was acknowledged`);
  }
  const retried = clients.flatMap((c) => c.retried);
  assert.ok(retried.length > 0, 'no client was ever told to retry: the outage went unseen');
  assert.ok(retried.every((r) => r.code === 'UNAVAILABLE' && r.retryAfterMs > 0));

  // The refused probes did nothing: sent again with the same requestId they are applied now.
  assert.equal(
    (await api.http('POST', '/v1/devices/vdpa0/mappings', { ...extra(probe), requestId: 'probe' })).status,
    201,
  );
  await api.grpc.mapping('map', { device: 'vdpa1', ...extra(probe), requestId: 'probe' });

  const agent = rig.agentClient();
  assert.notEqual((await agent.getInfo()).pid, firstAgent.pid);
  for (const device of DEVICES) {
    const expected = [
      ...clients.filter((c) => c.spec.device === device).flatMap((c) => c.expected()),
      ...extraKey(device, probe),
      ...(device === 'vdpa0' ? sentinels.flatMap((iova) => extraKey(device, iova)) : []),
    ].sort();
    assert.deepEqual(await desiredTable(api, device), expected, `${device}: desired state`);
    assert.deepEqual(await agentTable(agent, device), expected, `${device}: the new agent's table`);
  }

  // Each acknowledged op was applied exactly once, in order, and no refused attempt was applied.
  // The probes were applied last: once the stream has carried them, it has carried everything.
  await until('the watch to see the probes', () => events.filter((e) => e.iova === probe).length === 2);
  for (const c of clients)
    assert.deepEqual(c.appliedChanges(events), c.ackedChanges(), `${c.spec.name}: applied changes`);
  t.diagnostic(
    `ready again ${outage.toFixed(2)} s after the SIGKILL (new agent's start included); ` +
      `${retried.length} refusals with a retry-after were retried`,
  );
});
