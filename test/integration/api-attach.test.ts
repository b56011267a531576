/**
 * Attach through the public API, with real processes on loopback: the agent (its own vring relay
 * over a simulated virtio-blk device whose data path DMAs through its IOTLB) and the API server.
 * A scripted virtio-blk front-end (test/frontend/blk-frontend.ts) is the VMM: its memory table
 * becomes asid 0 of the device through the API server's queue before it gets its reply, and its
 * block I/O only works if those mappings are right. Hotplug maps exactly the new region; the
 * disconnect empties asid 0; the orchestrator's own writes to asid 0 are refused meanwhile.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { VhostUserBlkFrontend } from '../frontend/blk-frontend.ts';
import { grpcFails, tempDir } from './api-harness.ts';
import { until, TIER_BUDGET_MS } from './agent-harness.ts';
import { createRig, desiredMappings, deviceCounters } from './process-harness.ts';

const MiB = 1n << 20n;
const DEVICE = 'vublk0';

interface Watched {
  kind: string;
  asid: number;
  iova: bigint;
  size: bigint;
}

/** An agent serving a simulated blk device with a disk (two address spaces) and an API server. */
async function start(t: TestContext, agentArgs: readonly string[] = []) {
  const dir = tempDir('attach-api');
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const disk = path.join(dir, 'disk.img');
  fs.writeFileSync(disk, Buffer.alloc(Number(4n * MiB)));
  const rig = createRig(t, 'attach-api');
  const agentProc = await rig.startAgent([`sim:${DEVICE},asnum=2,disk=${disk}`], agentArgs);
  const api = await rig.startApi();
  // The agent's default attach directory (<state-dir>/vhost-user); the rig's agent state is beside the API's.
  const socketPath = path.join(path.dirname(rig.apiStateDir), 'agent', 'vhost-user', `${DEVICE}.sock`);
  return { rig, agentProc, api, disk, socketPath };
}

test('a VMM attached over REST: its memory table is asid 0, hotplug maps only the new region', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const { rig, api, disk, socketPath } = await start(t);
  const agent = rig.agentClient();

  const refused = await api.http('POST', `/v1/devices/${DEVICE}:attach`, { socketPath: '/tmp/x.sock' });
  assert.equal(refused.status, 403, JSON.stringify(refused.body));
  assert.equal(refused.body.error.field, 'socketPath');

  const attached = await api.http('POST', `/v1/devices/${DEVICE}:attach`, { socketPath });
  assert.equal(attached.status, 200, JSON.stringify(attached.body));
  assert.deepEqual([attached.body.attachment.socketPath, attached.body.attachment.mode], [socketPath, 0o600]);
  const again = await api.http('POST', `/v1/devices/${DEVICE}:attach`, { socketPath });
  assert.deepEqual(
    [again.status, again.body.error.code, again.body.error.field],
    [409, 'ALREADY_EXISTS', 'device'],
  );

  // Every applied change of the device, from WatchMappings (subscribed before the VMM comes).
  const events: Watched[] = [];
  const stream = api.grpc.watch({ device: DEVICE });
  t.after(() => stream.cancel());
  stream.on('error', () => undefined);
  const subscribed = new Promise<void>((resolve) =>
    stream.on('data', (e: { kind: string; mapping?: { asid?: number; iova: string; size: string } }) => {
      if (e.kind === 'subscribed') resolve();
      else if (e.mapping) {
        events.push({
          kind: e.kind,
          asid: e.mapping.asid ?? 0,
          iova: BigInt(e.mapping.iova),
          size: BigInt(e.mapping.size),
        });
      }
    }),
  );
  await subscribed;

  // connect() negotiates REPLY_ACK and waits for SET_MEM_TABLE's ack: by then the table is applied.
  const fe = await VhostUserBlkFrontend.connect(socketPath, { memoryBytes: 2n * MiB });
  t.after(() => fe.close());
  const [ram] = fe.memory.regions;
  assert.ok(ram);
  const asid0 = (await desiredMappings(api, DEVICE)).filter((m) => m.asid === 0);
  assert.equal(asid0.length, 1, 'acked only once the table was the desired state');
  const vmmMemory = asid0[0]!.memory;
  assert.match(vmmMemory, /^vhost-user-/);
  assert.deepEqual(asid0, [{ asid: 0, iova: 0n, size: 2n * MiB, memory: vmmMemory, offset: 0n, perm: 'rw' }]);
  const onDevice = (await agent.listMapped(DEVICE)).mappings.filter((m) => m.asid === 0);
  assert.deepEqual(onDevice, asid0, 'the device maps exactly the table');
  await until('the table on the watch', () => events.length === 1);
  assert.deepEqual(events, [{ kind: 'mapped', asid: 0, iova: 0n, size: 2n * MiB }]);

  // Real block I/O through those mappings.
  const sector = Buffer.alloc(512, 0x5a);
  await fe.write(8n, sector);
  assert.ok((await fe.read(8n, 512)).equals(sector));
  assert.ok(
    fs
      .readFileSync(disk)
      .subarray(8 * 512, 9 * 512)
      .equals(sector),
    'the bytes are on the disk',
  );

  // The orchestrator's own writes: asid 0 is the VMM's, asid 1 stays the orchestrator's.
  assert.equal((await api.http('POST', '/v1/memory', { id: 'orch', size: String(MiB) })).status, 201);
  const map = (asid: number) =>
    api.http('POST', `/v1/devices/${DEVICE}/mappings`, {
      iova: '0x40000000',
      size: '0x1000',
      memory: 'orch',
      asid,
    });
  const owned = await map(0);
  assert.deepEqual(
    [owned.status, owned.body.error.code, owned.body.error.field],
    [409, 'FAILED_PRECONDITION', 'asid'],
  );
  const batch = await api.http('POST', `/v1/devices/${DEVICE}:batch`, {
    ops: [
      { op: 'map', iova: '0x50000000', size: '0x1000', memory: 'orch', asid: 1 },
      { op: 'unmap', iova: '0x0', size: '0x1000', asid: 0 },
    ],
  });
  assert.deepEqual([batch.status, batch.body.error.field], [409, 'ops[1].asid']);
  const viaGrpcMap = await grpcFails(
    api.grpc.mapping('map', { device: DEVICE, iova: '0x40000000', size: '0x1000', memory: 'orch' }),
  );
  assert.deepEqual(
    [viaGrpcMap.code, viaGrpcMap.metadata.get('field')[0]],
    [status.FAILED_PRECONDITION, 'asid'],
  );
  const table = await api.http('PUT', `/v1/devices/${DEVICE}/memtable`, { regions: [] });
  assert.deepEqual([table.status, table.body.error.field], [409, 'asid']);
  assert.equal((await map(1)).status, 201, 'asid 1 is still the orchestrator');
  await until('the asid-1 map on the watch', () => events.some((e) => e.asid === 1));
  events.length = 0;

  // Hotplug: one UPDATE of the new region, nothing else invalidated or mapped again.
  const before = await deviceCounters(agent, DEVICE);
  const added = await fe.addMemory(MiB);
  const after = await deviceCounters(agent, DEVICE);
  const sent = {
    messages: after.messagesWritten - before.messagesWritten,
    batches: after.batches - before.batches,
    pagesPinned: after.dmaMapCalls - before.dmaMapCalls,
    pagesUnpinned: after.dmaUnmapCalls - before.dmaUnmapCalls,
  };
  console.log(`# hotplug of 1 MiB sent ${JSON.stringify(sent)}`);
  // BATCH_BEGIN, one UPDATE, BATCH_END; the platform IOMMU pins the new region's pages only.
  assert.deepEqual(
    sent,
    { messages: 3, batches: 1, pagesPinned: Number(MiB / 4096n), pagesUnpinned: 0 },
    'ADD_MEM_REG maps the new region only',
  );
  await until('the hotplug on the watch', () => events.length >= 1);
  assert.deepEqual(events, [{ kind: 'mapped', asid: 0, iova: added.guestAddr, size: MiB }]);
  const grown = await api.http('GET', `/v1/devices/${DEVICE}/mappings?asid=0`);
  assert.equal(grown.body.mappings.length, 2);
  // A buffer in the hotplugged memory is reachable by the device.
  await fe.write(16n, sector, { guestAddr: added.guestAddr });
  assert.ok((await fe.read(16n, 512, { guestAddr: added.guestAddr + 0x1000n })).equals(sector));

  // GetDevice shows the attachment.
  const shown = await api.http('GET', `/v1/devices/${DEVICE}`);
  assert.equal(shown.status, 200, JSON.stringify(shown.body));
  const a = shown.body.device.attachment;
  assert.ok(a, JSON.stringify(shown.body));
  assert.deepEqual(
    [a.socketPath, a.vmmConnected, a.memoryTableEntries, a.memoryTableBytes, a.connections],
    [socketPath, true, 2, `0x${(3n * MiB).toString(16)}`, 1],
  );
  assert.ok(a.vrings[0]?.running, 'vring 0 runs');
  assert.notEqual(a.negotiatedFeatures, '0x0');
  const listed = await api.http('GET', '/v1/devices');
  assert.ok(listed.body.devices[0].attachment.vmmConnected);
  const { device: viaGrpc } = await api.grpc.device('getDevice', { device: DEVICE });
  assert.equal(viaGrpc.attachment?.vmmConnected, true);
  assert.equal(viaGrpc.attachment?.memoryTableEntries, 2);

  // The VMM goes: asid 0 is emptied, its memory forgotten; asid 1 is untouched.
  events.length = 0;
  await fe.close();
  await until('asid 0 emptied', async () => (await desiredMappings(api, DEVICE)).every((m) => m.asid !== 0));
  assert.deepEqual(
    (await agent.listMapped(DEVICE)).mappings.map((m) => m.asid),
    [1],
    'the device keeps only asid 1',
  );
  await until('the VMM memory forgotten', async () => {
    const memory = (await api.http('GET', '/v1/memory')).body.memory as { id: string }[];
    return memory.every((m) => !m.id.startsWith('vhost-user-'));
  });

  const detached = await api.http('POST', `/v1/devices/${DEVICE}:detach`);
  assert.equal(detached.status, 200, JSON.stringify(detached.body));
  assert.equal((await api.http('GET', `/v1/devices/${DEVICE}`)).body.device.attachment, undefined);
  assert.equal((await map(0)).status, 201, 'asid 0 is the orchestrator again');
  const twice = await api.http('POST', `/v1/devices/${DEVICE}:detach`);
  assert.deepEqual([twice.status, twice.body.error.code], [409, 'FAILED_PRECONDITION']);
});

test('a memory change left unanswered by an API server that died is answered by the next one', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  // The agent waits long for an answer: a new API server has to start meanwhile on a busy machine.
  const { rig, api, socketPath } = await start(t, ['--attach-answer-ms', '180000']);
  const agent = rig.agentClient();
  assert.equal((await api.http('POST', `/v1/devices/${DEVICE}:attach`, { socketPath })).status, 200);
  // Its replies wait as long as the agent does (a new API server answers them).
  const fe = await VhostUserBlkFrontend.connect(socketPath, { memoryBytes: 2n * MiB, replyWaitMs: 180_000 });
  t.after(() => fe.close());

  // Stopped, the API server still holds its WatchAttachments stream: the agent sends it the request.
  process.kill(api.proc.pid, 'SIGSTOP');
  const hotplug = fe.addMemory(MiB);
  let answered = false;
  void hotplug.then(() => {
    answered = true;
  });
  await until('the agent received ADD_MEM_REG', async () => {
    const { attachment } = await agent.describeDevice(DEVICE);
    return (attachment?.stats.messages.ADD_MEM_REG ?? 0) === 1;
  });
  await api.kill('SIGKILL');
  assert.equal(answered, false, 'no reply while nobody answered');

  const next = await rig.startApi();
  const added = await hotplug;
  const asid0 = (await desiredMappings(next, DEVICE)).filter((m) => m.asid === 0);
  assert.deepEqual(
    asid0.map((m) => [m.iova, m.size]),
    [
      [0n, 2n * MiB],
      [added.guestAddr, MiB],
    ],
  );
  assert.deepEqual(
    (await agent.listMapped(DEVICE)).mappings.filter((m) => m.asid === 0),
    asid0,
    'the device maps the table',
  );
  // The new server knows the device is attached (from `watching`): asid 0 is still refused.
  const owned = await next.http('POST', `/v1/devices/${DEVICE}/mappings`, {
    iova: '0x40000000',
    size: '0x1000',
    memory: asid0[0]!.memory,
  });
  assert.deepEqual([owned.status, owned.body.error.field], [409, 'asid']);
  const sector = Buffer.alloc(512, 0xc3);
  await fe.write(3n, sector, { guestAddr: added.guestAddr });
  assert.ok((await fe.read(3n, 512)).equals(sector));
});

test('an attachment outlives a SIGKILLed agent and API server: served again on the same socket, asid 0 empty until the VMM is back', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const { rig, agentProc, api, disk, socketPath } = await start(t);
  const agent = rig.agentClient();
  assert.equal((await api.http('POST', `/v1/devices/${DEVICE}:attach`, { socketPath })).status, 200);
  const fe = await VhostUserBlkFrontend.connect(socketPath, { memoryBytes: 2n * MiB });
  t.after(() => fe.close());
  assert.equal((await desiredMappings(api, DEVICE)).length, 1);

  const orchMap = (server: typeof api) =>
    server.http('POST', `/v1/devices/${DEVICE}/mappings`, {
      iova: '0x0',
      size: '0x1000',
      memory: 'orch',
    });
  /** The new agent serves the socket again, asid 0 holds nothing, the VMM's memory is forgotten. */
  const restored = async (server: typeof api) => {
    await until('the attachment served again', async () => {
      const { attachment } = await agent.describeDevice(DEVICE).catch(() => ({ attachment: undefined }));
      return attachment?.socketPath === socketPath;
    });
    await until('asid 0 emptied', async () => (await desiredMappings(server, DEVICE)).length === 0);
    assert.deepEqual((await agent.listMapped(DEVICE)).mappings, []);
    await until('the VMM memory forgotten', async () => {
      const memory = (await server.http('GET', '/v1/memory')).body.memory as { id: string }[];
      return memory.every((m) => !m.id.startsWith('vhost-user-'));
    });
    assert.ok((await agent.listMemory()).every((m) => !m.id.startsWith('vhost-user-')));
    await server.untilReady();
    const shown = (await server.http('GET', `/v1/devices/${DEVICE}`)).body.device;
    assert.deepEqual(
      [shown.attachment?.socketPath, shown.attachment?.vmmConnected, shown.degraded],
      [socketPath, false, []],
    );
    // asid 0 is still the VMM's.
    const owned = await orchMap(server);
    assert.deepEqual([owned.status, owned.body.error?.field], [409, 'asid']);
  };

  assert.equal((await api.http('POST', '/v1/memory', { id: 'orch', size: String(MiB) })).status, 201);
  await agentProc.kill('SIGKILL');
  const second = await rig.startAgent([`sim:${DEVICE},asnum=2,disk=${disk}`]);
  await restored(api);
  // A VMM connecting again gets its table mapped and does I/O.
  const again = await VhostUserBlkFrontend.connect(socketPath, { memoryBytes: 2n * MiB });
  t.after(() => again.close());
  assert.deepEqual(
    (await desiredMappings(api, DEVICE)).map((m) => [m.asid, m.iova, m.size]),
    [[0, 0n, 2n * MiB]],
  );
  const sector = Buffer.alloc(512, 0x3c);
  await again.write(5n, sector);
  assert.ok((await again.read(5n, 512)).equals(sector));

  // Both die: the next API server restores the attachment from its state alone.
  await api.kill('SIGKILL');
  await second.kill('SIGKILL');
  await rig.startAgent([`sim:${DEVICE},asnum=2,disk=${disk}`]);
  const next = await rig.startApi();
  await restored(next);

  // Detach removes it from the state: the next agent does not serve it, asid 0 is the orchestrator's.
  assert.equal((await next.http('POST', `/v1/devices/${DEVICE}:detach`)).status, 200);
  assert.equal(fs.existsSync(socketPath), false);
  await next.kill('SIGKILL');
  const last = await rig.startApi();
  assert.equal((await last.http('GET', `/v1/devices/${DEVICE}`)).body.device.attachment, undefined);
  const map = await orchMap(last);
  assert.equal(map.status, 201, JSON.stringify(map.body));
});
