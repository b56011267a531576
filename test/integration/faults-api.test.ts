/**
 * The API server as a process, failing under the agent that keeps running:
 * - SIGKILLed under load, then restarted on the same state directory: every acknowledged op is in
 *   the desired state, reconciliation sends only what differs (nothing, when nothing does), and a
 *   retry with the requestId of an answered request gets that answer without anything re-applied;
 * - its store cannot write (a file size limit set on the live process with prlimit(1): EFBIG, as a
 *   full disk gives ENOSPC): the change is refused and not acknowledged, device and desired state
 *   stay as they were, and once the limit is lifted the same request goes through.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { status } from '@grpc/grpc-js';
import type { AgentClient } from '../../src/agent/client.ts';
import type { DeviceCounters } from '../../src/device/types.ts';
import { planConverge } from '../../src/queue/converge.ts';
import { RECORD_PART_BYTES } from '../../src/state/journal.ts';
import { TIER_BUDGET_MS, until } from './agent-harness.ts';
import type { GrpcFailure } from './api-harness.ts';
import {
  type ApiProcess,
  agentTable,
  createRig,
  desiredMappings,
  desiredTable,
  deviceCounters,
  mappingKeys,
  reconciliations,
} from './process-harness.ts';
import { grpcWriter, type ModelClient, mapUnmapFleet, restWriter } from './workload.ts';

const DEVICES = ['vdpa0', 'vdpa1'] as const;

async function allCounters(agent: AgentClient): Promise<Record<string, DeviceCounters>> {
  return Object.fromEntries(await Promise.all(DEVICES.map(async (d) => [d, await deviceCounters(agent, d)])));
}

/** The part of the desired state in `c`'s slots, as mappingKeys. */
async function ownedDesired(api: ApiProcess, c: ModelClient): Promise<string[]> {
  const { device } = c.spec;
  const mine = (await desiredMappings(api, device)).filter((m) => c.owns(device, m.asid, m.iova));
  return mappingKeys(device, mine);
}

async function tables(api: ApiProcess, agent: AgentClient) {
  return Object.fromEntries(
    await Promise.all(
      DEVICES.map(async (d) => [
        d,
        { desired: await desiredTable(api, d), device: await agentTable(agent, d) },
      ]),
    ),
  );
}

test('API server SIGKILLed under load: acknowledged ops kept, only the difference reconciled, retries replayed', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const rig = createRig(t, 'faults-api');
  const agentProc = await rig.startAgent();
  let api = await rig.startApi();
  assert.equal((await api.http('POST', '/v1/memory', { id: 'ram', size: '0x1000000' })).status, 201);
  const agent = rig.agentClient();

  const clients = mapUnmapFleet(api, { memory: 'ram', slots: 24, seed: 3000 });
  // Far more ops than get done: every client is stopped by the kill, its last op in doubt.
  const load = Promise.all(clients.map((c) => c.run({ ops: 100_000, retries: 0 })));
  await until('every client to have ops acknowledged', () => clients.every((c) => c.acked.length >= 20));
  assert.equal((await api.kill('SIGKILL')).signal, 'SIGKILL');
  await load;
  for (const c of clients) assert.deepEqual(c.unexpected, [], `${c.spec.name}: unexpected answers`);

  // The agent kept running: its tables are what the dead server last applied.
  const left = Object.fromEntries(
    await Promise.all(DEVICES.map(async (d) => [d, (await agent.listMapped(d)).mappings] as const)),
  );
  const before = await allCounters(agent);

  api = await rig.startApi();
  assert.ok(agentProc.running);
  for (const c of clients)
    c.writer = c.writer.transport === 'rest' ? restWriter(api.http) : grpcWriter(api.grpc);

  // Every acknowledged op is in the desired state; an op in doubt may or may not have been done.
  const doneBeforeKill = new Set<ModelClient>();
  for (const c of clients) {
    const held = await ownedDesired(api, c);
    if (c.inDoubt && held.join() !== c.expected().join()) doneBeforeKill.add(c);
    assert.deepEqual(
      held,
      doneBeforeKill.has(c) ? c.expectedIfDone() : c.expected(),
      `${c.spec.name}: desired state`,
    );
  }
  // Reconciliation sent only the difference between the device and the desired state: at most
  // the ops in flight when the server died, one per client (and a BATCH_BEGIN/END around them).
  const diffs: string[] = [];
  for (const device of DEVICES) {
    const diff = planConverge(left[device]!, await desiredMappings(api, device)).length;
    diffs.push(`${device} ${diff}`);
    assert.ok(diff <= clients.filter((c) => c.spec.device === device).length, `${device}: ${diff} ops`);
    assert.equal((await reconciliations(api, [device]))[device], diff, `${device}: reconciled`);
    const written = (await deviceCounters(agent, device)).messagesWritten - before[device]!.messagesWritten;
    assert.equal(written, diff === 0 ? 0 : diff + 2, `${device}: messages written`);
  }
  t.diagnostic(
    `in doubt at the kill: ${clients.filter((c) => c.inDoubt).length} of ${clients.length} clients, ` +
      `${doneBeforeKill.size} of them done; reconciliation ops: ${diffs.join(', ')}`,
  );

  // Ops in doubt, sent again with their requestId: replayed if they were done, else done now.
  for (const c of clients) {
    const counters = await deviceCounters(agent, c.spec.device);
    await c.resolveInDoubt(5);
    assert.deepEqual(c.unexpected, [], `${c.spec.name}: unexpected answers`);
    assert.equal(c.inDoubt, undefined);
    const now = await deviceCounters(agent, c.spec.device);
    if (doneBeforeKill.has(c)) assert.deepEqual(now, counters, `${c.spec.name}: replayed, not applied again`);
    else assert.ok(now.messagesWritten > counters.messagesWritten, `${c.spec.name}: applied now`);
  }
  const settled = await tables(api, agent);
  for (const device of DEVICES) {
    const expected = clients
      .filter((c) => c.spec.device === device)
      .flatMap((c) => c.expected())
      .sort();
    assert.deepEqual(settled[device], { desired: expected, device: expected }, device);
  }

  // Answered requests sent again (same requestId, same body) get the same answer; nothing is applied.
  const counters = await allCounters(agent);
  for (const c of clients) {
    for (const { call, answer } of c.acked.slice(-3)) {
      const reply = await c.writer.send(call);
      assert.deepEqual(reply, { kind: 'ok', body: answer }, `${c.spec.name} ${call.requestId}`);
    }
  }
  assert.deepEqual(await allCounters(agent), counters);
  assert.deepEqual(await tables(api, agent), settled);

  // Killed with nothing in flight: the next server finds nothing to change and writes nothing.
  assert.equal((await api.kill('SIGKILL')).signal, 'SIGKILL');
  api = await rig.startApi();
  assert.deepEqual(await reconciliations(api, DEVICES), { vdpa0: 0, vdpa1: 0 });
  assert.deepEqual(await allCounters(agent), counters);
  assert.deepEqual(await tables(api, agent), settled);
});

/** A map request of one page of `ram` at `iova`. */
const page = (iova: string, requestId: string) => ({
  iova,
  size: '0x1000',
  memory: 'ram',
  offset: '0x0',
  perm: 'rw',
  requestId,
});

/** Sets the soft RLIMIT_FSIZE of a running process (the hard limit stays unlimited). */
function limitFileSize(pid: number, bytes: number | 'unlimited'): void {
  try {
    execFileSync('prlimit', [`--pid=${pid}`, `--fsize=${bytes}:unlimited`], { stdio: 'pipe' });
  } catch (e) {
    throw new Error(
      `prlimit (util-linux) could not limit the API server's file size: ${(e as Error).message}`,
    );
  }
}

test('the store cannot write: the change is refused, nothing changes, and the same request goes through later', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const rig = createRig(t, 'faults-store');
  await rig.startAgent();
  let api = await rig.startApi();
  assert.equal((await api.http('POST', '/v1/memory', { id: 'ram', size: '0x1000000' })).status, 201);
  const agent = rig.agentClient();
  assert.equal((await api.http('POST', '/v1/devices/vdpa0/mappings', page('0x100000', 'a0'))).status, 201);
  await api.grpc.mapping('map', { device: 'vdpa1', ...page('0x100000', 'a1') });
  const before = await tables(api, agent);

  const journals = fs.readdirSync(rig.apiStateDir).filter((f) => /^journal\.\d+$/.test(f));
  assert.equal(journals.length, 1);
  const journal = path.join(rig.apiStateDir, journals[0]!);
  const size = fs.statSync(journal).size;
  // Room for a few more bytes: the next record is torn mid-write, then the write fails.
  limitFileSize(api.proc.pid, size + 16);

  const refused = await api.http('POST', '/v1/devices/vdpa0/mappings', page('0x200000', 'b'));
  assert.equal(refused.status, 503);
  assert.deepEqual([refused.body.error.code, refused.body.error.errno], ['UNAVAILABLE', 'EFBIG']);
  assert.ok(Number(refused.headers.get('retry-after')) >= 1);
  // The device applied it before the commit failed: reconciliation takes it back.
  await api.untilReady();
  const failure: GrpcFailure = await api.grpc
    .mapping('map', { device: 'vdpa1', ...page('0x200000', 'c') })
    .then(
      () => assert.fail('acknowledged a change the store could not write'),
      (e: GrpcFailure) => e,
    );
  assert.equal(failure.code, status.UNAVAILABLE);
  assert.deepEqual(failure.metadata.get('errno'), ['EFBIG']);
  await api.untilReady();
  assert.deepEqual(await tables(api, agent), before);
  assert.equal(fs.statSync(journal).size, size, 'the torn record was cut off');

  // The disk recovers: the refused requests, sent again with their requestId, are done now.
  limitFileSize(api.proc.pid, 'unlimited');
  assert.equal((await api.http('POST', '/v1/devices/vdpa0/mappings', page('0x200000', 'b'))).status, 201);
  await api.grpc.mapping('map', { device: 'vdpa1', ...page('0x200000', 'c') });
  const after = await tables(api, agent);
  for (const device of DEVICES) {
    const added = mappingKeys(device, [
      { asid: 0, iova: 0x200000n, size: 0x1000n, memory: 'ram', offset: 0n, perm: 'rw' },
    ]);
    const want = [...before[device]!.desired, ...added].sort();
    assert.deepEqual(after[device], { desired: want, device: want }, device);
  }

  // What is on disk is whole: a restarted server reads it all, cuts nothing, changes nothing.
  assert.equal((await api.kill('SIGKILL')).signal, 'SIGKILL');
  api = await rig.startApi();
  assert.deepEqual(await tables(api, agent), after);
  assert.ok(!api.proc.logs().some((r) => r.msg === 'cut a torn tail off the state journal'));
  assert.deepEqual(await reconciliations(api, DEVICES), { vdpa0: 0, vdpa1: 0 });
  t.diagnostic(`journal of ${size} bytes limited to ${size + 16}: both writes refused with EFBIG`);
});

test('a table the store cannot finish writing in parts is refused; the records written between its parts stand, and the next start skips it', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const rig = createRig(t, 'faults-parts');
  await rig.startAgent();
  let api = await rig.startApi();
  assert.equal((await api.http('POST', '/v1/memory', { id: 'ram', size: '0x4000000' })).status, 201);
  const agent = rig.agentClient();
  assert.equal((await api.http('POST', '/v1/devices/vdpa1/mappings', page('0x100000', 'a'))).status, 201);
  // 8,192 regions: a journal record of about 1.2 MB, written in parts (RECORD_PART_BYTES).
  const table = {
    regions: Array.from({ length: 8192 }, (_, k) => ({
      iova: `0x${(2 * k * 0x1000).toString(16)}`,
      size: '0x1000',
      memory: 'ram',
      offset: `0x${(k * 0x1000).toString(16)}`,
    })),
  };
  const journal = () => {
    const names = fs.readdirSync(rig.apiStateDir).filter((f) => /^journal\.\d+$/.test(f));
    assert.equal(names.length, 1);
    return path.join(rig.apiStateDir, names[0]!);
  };
  const size = fs.statSync(journal()).size;
  // Room for the table's first parts, not for the rest: a later part's write fails with EFBIG.
  limitFileSize(api.proc.pid, size + 600_000);
  const refused = await api.http('PUT', '/v1/devices/vdpa0/memtable', table);
  assert.equal(refused.status, 503);
  assert.deepEqual([refused.body.error.code, refused.body.error.errno], ['UNAVAILABLE', 'EFBIG']);
  await api.untilReady();
  const unfinished = fs.statSync(journal()).size;
  assert.ok(
    unfinished > size + 4 * RECORD_PART_BYTES,
    `the first parts stay in the journal (${unfinished - size} bytes)`,
  );
  limitFileSize(api.proc.pid, 'unlimited');
  // Written after the unfinished record's parts.
  await api.grpc.mapping('map', { device: 'vdpa1', ...page('0x200000', 'b') });
  const vdpa1 = mappingKeys('vdpa1', [
    { asid: 0, iova: 0x100000n, size: 0x1000n, memory: 'ram', offset: 0n, perm: 'rw' },
    { asid: 0, iova: 0x200000n, size: 0x1000n, memory: 'ram', offset: 0n, perm: 'rw' },
  ]);
  const expected = { vdpa0: { desired: [], device: [] }, vdpa1: { desired: vdpa1, device: vdpa1 } };
  assert.deepEqual(await tables(api, agent), expected);

  // The next server skips the unfinished record, says so, and keeps everything else.
  assert.equal((await api.kill('SIGKILL')).signal, 'SIGKILL');
  api = await rig.startApi();
  assert.ok(
    api.proc.logs().some((r) => String(r.msg).startsWith('skipped a state journal record whose parts stop')),
  );
  assert.deepEqual(await tables(api, agent), expected);
  assert.deepEqual(await reconciliations(api, DEVICES), { vdpa0: 0, vdpa1: 0 });

  // The same table goes through now, in parts after the unfinished one, and survives a restart.
  assert.equal((await api.http('PUT', '/v1/devices/vdpa0/memtable', table)).status, 200);
  const after = await tables(api, agent);
  assert.equal(after.vdpa0!.desired.length, 8192);
  assert.deepEqual(after.vdpa0!.device, after.vdpa0!.desired);
  assert.equal((await api.kill('SIGKILL')).signal, 'SIGKILL');
  api = await rig.startApi();
  assert.deepEqual(await tables(api, agent), after);
  assert.deepEqual(await reconciliations(api, DEVICES), { vdpa0: 0, vdpa1: 0 });
  t.diagnostic(
    `journal of ${size} bytes limited to ${size + 600_000}: the table's parts stopped at ${unfinished - size} bytes`,
  );
});
