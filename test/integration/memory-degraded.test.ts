/**
 * A memory that cannot be reopened degrades only the mappings that use it. The backing file of a
 * registered memory is swapped for a symlink out of the agent's allowed roots while the agent is
 * down; the restarted agent refuses to open it. The API server still restores every other mapping,
 * serves writes for them, reports the missing ones on the device (REST, gRPC, metrics, one log
 * record), refuses writes into that memory by name, lets them be unmapped, and restores them once
 * the operator puts the file back and registers the memory again.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { memoryDir } from '../../src/memory/allowlist.ts';
import { until, TIER_BUDGET_MS } from './agent-harness.ts';
import { agentTable, createRig, desiredTable, mappingKeys } from './process-harness.ts';

const MiB = 0x100000n;
const hex = (n: bigint) => `0x${n.toString(16)}`;
const map = (iova: bigint, memory: string, offset: bigint) => ({
  iova: hex(iova),
  size: hex(MiB),
  memory,
  offset: hex(offset),
  perm: 'rw',
});

test('a memory the agent cannot reopen fails only its own mappings; the rest is restored and served', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const rig = createRig(t, 'memory-degraded');
  const firstAgent = await rig.startAgent();
  const api = await rig.startApi();
  for (const id of ['ram0', 'ram1']) {
    assert.equal((await api.http('POST', '/v1/memory', { id, size: hex(16n * MiB) })).status, 201);
  }
  const plan: [string, bigint, string, bigint][] = [
    ['vdpa0', 0n, 'ram0', 0n],
    ['vdpa0', MiB, 'ram0', MiB],
    ['vdpa0', 2n * MiB, 'ram0', 2n * MiB],
    ['vdpa0', 8n * MiB, 'ram1', 0n],
    ['vdpa0', 9n * MiB, 'ram1', MiB],
    ['vdpa1', 0n, 'ram0', 4n * MiB],
    ['vdpa1', 8n * MiB, 'ram1', 4n * MiB],
  ];
  for (const [device, iova, memory, offset] of plan) {
    const res = await api.http('POST', `/v1/devices/${device}/mappings`, map(iova, memory, offset));
    assert.equal(res.status, 201, JSON.stringify(res.body));
  }
  const client = rig.agentClient();
  await client.dmaWrite('vdpa0', 0, MiB, Buffer.from('kept in ram0'));

  // Agent down; ram1's file replaced by a symlink to a copy outside the allowed roots.
  await firstAgent.kill('SIGKILL');
  await until('the API server to notice', async () => (await api.http('GET', '/readyz')).status === 503);
  const ram1 = path.join(memoryDir(path.join(path.dirname(rig.apiStateDir), 'agent')), 'ram1');
  const outside = path.join(path.dirname(rig.apiStateDir), 'ram1-outside');
  fs.renameSync(ram1, outside);
  fs.symlinkSync(outside, ram1);
  await rig.startAgent();

  // Ready (the device serves the rest), and /readyz says it is degraded.
  await until('readiness', async () => (await api.http('GET', '/readyz')).status === 200);
  const ready = await api.http('GET', '/readyz');
  assert.equal(ready.body.status, 'degraded');
  assert.deepEqual(
    (ready.body.degraded as { device: string; memory: string; mappings: number }[]).sort((a, b) =>
      a.device.localeCompare(b.device),
    ),
    [
      { device: 'vdpa0', memory: 'ram1', mappings: 2 },
      { device: 'vdpa1', memory: 'ram1', mappings: 1 },
    ],
  );

  // The device view: which memory, how many mappings, why, what to do; never counted as mapped.
  const view = (await api.http('GET', '/v1/devices/vdpa0')).body.device;
  assert.equal(view.ready, true);
  assert.equal(view.mappedEntries, 3);
  assert.equal(view.degraded.length, 1);
  const [degraded] = view.degraded;
  assert.equal(degraded.memory, 'ram1');
  assert.equal(degraded.mappings, 2);
  assert.equal(degraded.bytes, hex(2n * MiB));
  assert.match(degraded.reason, /ram1/);
  assert.match(degraded.remedy, /restore .*ram1.* register memory ram1 again.*or unmap/);
  const viaGrpc = (await api.grpc.device('getDevice', { device: 'vdpa0' })) as {
    device: { degraded: { memory: string; mappings: number; remedy: string }[] };
  };
  assert.equal(viaGrpc.device.degraded[0]?.memory, 'ram1');
  assert.equal(viaGrpc.device.degraded[0]?.mappings, 2);

  // The device holds exactly the other mappings, and their DMA works through the new agent.
  const ram0Mappings = (device: string) =>
    mappingKeys(
      device,
      plan
        .filter(([d, , memory]) => d === device && memory === 'ram0')
        .map(([, iova, memory, offset]) => ({ asid: 0, iova, size: MiB, memory, offset, perm: 'rw' })),
    );
  assert.deepEqual(await agentTable(client, 'vdpa0'), ram0Mappings('vdpa0'));
  assert.deepEqual(await agentTable(client, 'vdpa1'), ram0Mappings('vdpa1'));
  assert.equal((await client.dmaRead('vdpa0', 0, MiB, 12)).toString(), 'kept in ram0');
  const listed = (await api.http('GET', '/v1/devices/vdpa0/mappings')).body.mappings as {
    memory: string;
    missing?: boolean;
  }[];
  assert.deepEqual(
    listed.map((m) => `${m.memory}${m.missing ? ' missing' : ''}`),
    ['ram0', 'ram0', 'ram0', 'ram1 missing', 'ram1 missing'],
  );

  const metrics = String((await api.http('GET', '/metrics')).body);
  assert.match(metrics, /vdpa_mapd_degraded_mappings\{device="vdpa0"\} 2\n/);
  assert.match(metrics, /vdpa_mapd_degraded_memories\{device="vdpa0"\} 1\n/);

  // Writes for everything else go on; a write into ram1 is refused naming it, and changes nothing.
  const more = await api.http('POST', '/v1/devices/vdpa0/mappings', map(3n * MiB, 'ram0', 3n * MiB));
  assert.equal(more.status, 201, JSON.stringify(more.body));
  const refused = await api.http('POST', '/v1/devices/vdpa0/mappings', map(10n * MiB, 'ram1', 2n * MiB));
  assert.equal(refused.status, 409, JSON.stringify(refused.body));
  assert.equal(refused.body.error.code, 'FAILED_PRECONDITION');
  assert.equal(refused.body.error.field, 'memory');
  assert.match(refused.body.error.message, /memory ram1 is unavailable/);
  // A missing mapping can be unmapped (the operator's other way out).
  const unmapped = await api.http('POST', '/v1/devices/vdpa1/mappings:unmap', {
    iova: hex(8n * MiB),
    size: hex(MiB),
  });
  assert.equal(unmapped.status, 200, JSON.stringify(unmapped.body));
  assert.deepEqual((await api.http('GET', '/v1/devices/vdpa1')).body.device.degraded, []);

  // The operator restores the file (one rename over the symlink: a pass between a removal and a
  // rename would see no file, a reason of its own) and registers the memory again: the mappings come back.
  fs.renameSync(outside, ram1);
  const again = await api.http('POST', '/v1/memory', { id: 'ram1', path: ram1 });
  assert.equal(again.status, 201, JSON.stringify(again.body));
  await until('the mappings of ram1 to be restored', async () => {
    const d = (await api.http('GET', '/v1/devices/vdpa0')).body.device;
    return d.degraded.length === 0 && d.mappedEntries === 6;
  });
  for (const device of ['vdpa0', 'vdpa1']) {
    assert.deepEqual(await agentTable(client, device), await desiredTable(api, device));
  }
  assert.equal((await api.http('GET', '/readyz')).body.status, undefined);
  assert.match(
    String((await api.http('GET', '/metrics')).body),
    /vdpa_mapd_degraded_mappings\{device="vdpa0"\} 0\n/,
  );
  const ok = await api.http('POST', '/v1/devices/vdpa0/mappings', map(10n * MiB, 'ram1', 2n * MiB));
  assert.equal(ok.status, 201, JSON.stringify(ok.body));

  // One record per change of state, however many passes retried the memory meanwhile.
  const records = api.proc.logs();
  const count = (msg: string, device?: string) =>
    records.filter((r) => r.msg === msg && (device === undefined || r.device === device)).length;
  assert.equal(count('device degraded: mappings of an unavailable memory are not restored', 'vdpa0'), 1);
  assert.equal(count('memory unavailable: its mappings are not restored'), 1);
  assert.equal(count('mappings restored', 'vdpa0'), 1);
});
