/**
 * The core's side of attach over the in-process agent: each `memoryTable` request the agent sends
 * on WatchAttachments becomes asid 0 of the device through its queue (only the difference is
 * applied) and is answered after; a refusal is answered with its code; the orchestrator's writes
 * to asid 0 are refused while the device is attached, other address spaces stay its own.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { AttachmentEvent, MemoryTableAnswer } from '../../src/agent/wire.ts';
import type { ServiceError } from '../../src/core/errors.ts';
import type { Mapping } from '../../src/iotlb/types.ts';
import { type Harness, harness, PAGE } from './core-harness.ts';
import { until } from './tier.ts';

const DEVICE = 'vdpa1';
/** Memory the agent adopted from a VMM's fd (agent/attach.ts names it by the file). */
const VMM = 'vhost-user-1-2';

let h: Harness;
before(async () => {
  h = await harness([{ name: DEVICE, iommu: 'onchip', asNum: 2 }]);
  await h.service.registerMemory({ id: 'orch', size: 16n * PAGE });
});
after(() => h.cleanup());

/** A one-page map of `orch` on the device. */
function mapReq(m: { asid: number; iova: bigint }) {
  return { device: DEVICE, ...m, size: PAGE, memory: 'orch', offset: 0n, perm: 'rw' as const };
}

let requests = 0;
/** Plays the agent: sends a table to the core's subscriber and waits for its answer. */
async function table(entries: Omit<Mapping, 'asid' | 'perm'>[]): Promise<MemoryTableAnswer> {
  const requestId = `r${++requests}`;
  const event: AttachmentEvent = {
    type: 'memoryTable',
    device: DEVICE,
    requestId,
    entries: entries.map((e) => ({ ...e, asid: 0, perm: 'rw' })),
  };
  assert.equal(h.agent.attachmentWatchers.size, 1, 'the core follows attachments');
  for (const w of h.agent.attachmentWatchers) w(event);
  await until(`an answer to ${requestId}`, () => h.agent.answers.some((a) => a.requestId === requestId));
  return h.agent.answers.find((a) => a.requestId === requestId)!;
}

function refused(field: string) {
  return (e: unknown) => {
    const err = e as ServiceError;
    assert.deepEqual([err.code, err.field], ['FAILED_PRECONDITION', field], err.message);
    return true;
  };
}

test('an attached VMM owns asid 0: its tables are applied as diffs, the orchestrator is refused there', async () => {
  await h.service.map(mapReq({ asid: 0, iova: 0x100000n }));
  await assert.rejects(
    h.service.attachDevice({ device: DEVICE, socketPath: '/run/x.sock' }),
    refused('device'),
  );
  await h.service.unmap({ device: DEVICE, asid: 0, iova: 0x100000n, size: PAGE });
  await h.service.attachDevice({ device: DEVICE, socketPath: '/run/x.sock' });

  h.agent.registry.create({ id: VMM, size: 64n * PAGE, kind: 'memfd' });
  const low = { iova: 0n, size: 32n * PAGE, memory: VMM, offset: 0n };
  const high = { iova: 0x1_0000_0000n, size: 16n * PAGE, memory: VMM, offset: 32n * PAGE };
  h.agent.applies.length = 0;
  assert.deepEqual(await table([low]), { requestId: `r${requests}`, ok: true });
  assert.deepEqual(
    (await h.service.listMappings(DEVICE, 0)).map((m) => [m.iova, m.size, m.memory]),
    [[0n, 32n * PAGE, VMM]],
    'the adopted memory was learnt and mapped',
  );

  // A hotplug: the whole new table, of which only the new region reaches the device.
  h.agent.applies.length = 0;
  assert.equal((await table([low, high])).ok, true);
  const ops = h.agent.applies.flatMap((a) => a.ops);
  assert.deepEqual(
    ops.map((op) => [op.type, op.iova]),
    [['update', high.iova]],
  );

  // Refusals are answered with the code: nothing changes.
  const bad = await table([low, { iova: 0x2_0000_0000n, size: PAGE, memory: 'ghost', offset: 0n }]);
  assert.equal(bad.ok, false);
  assert.equal(!bad.ok && bad.code, 'NOT_FOUND');
  assert.equal((await h.service.listMappings(DEVICE, 0)).length, 2);

  const orch = { iova: 0x4000_0000n };
  await assert.rejects(h.service.map(mapReq({ ...orch, asid: 0 })), refused('asid'));
  await assert.rejects(h.service.unmap({ device: DEVICE, asid: 0, iova: 0n, size: PAGE }), refused('asid'));
  await assert.rejects(h.service.setMemTable({ device: DEVICE, asid: 0, regions: [] }), refused('asid'));
  await assert.rejects(
    h.service.submit({ device: DEVICE, ops: [{ op: 'map', ...mapReq({ ...orch, asid: 0 }) }] }),
    refused('ops[0].asid'),
  );
  await h.service.map(mapReq({ ...orch, asid: 1 }));

  // The VMM goes (the empty table): asid 0 is emptied, its memory forgotten; asid 1 stays.
  assert.equal((await table([])).ok, true);
  assert.deepEqual(await h.service.listMappings(DEVICE, 0), []);
  assert.equal((await h.service.listMappings(DEVICE, 1)).length, 1);
  assert.ok((await h.service.listMemory()).every((m) => m.id !== VMM));

  await h.service.detachDevice(DEVICE);
  await h.service.map(mapReq({ ...orch, asid: 0 }));
  await assert.rejects(h.service.detachDevice(DEVICE), refused('device'));
});

/** Another VMM's memory (the agent still holds the first test's). */
const VMM2 = 'vhost-user-1-3';

test('an attachment is durable: a new agent and a new API server serve it again; asid 0 is empty until the VMM is back', async () => {
  // The test before left the orchestrator's page in asid 0.
  await h.service.unmap({ device: DEVICE, asid: 0, iova: 0x4000_0000n, size: PAGE });
  const attach = { device: DEVICE, socketPath: '/run/vm2.sock', group: 'kvm' };
  await h.service.attachDevice(attach);
  assert.deepEqual([...h.reopenState().attachments.values()], [attach], 'journaled before the answer');
  h.agent.registry.create({ id: VMM2, size: 64n * PAGE, kind: 'memfd' });
  assert.equal((await table([{ iova: 0n, size: 32n * PAGE, memory: VMM2, offset: 0n }])).ok, true);
  assert.equal((await h.service.listMappings(DEVICE, 0)).length, 1);

  // The agent dies with its VMM connection: the kernel dropped its mappings, the socket is gone.
  h.agent.attachCalls.length = 0;
  await h.agent.restart();
  await h.service.reconcile();
  await until('the attachment served again', () => h.agent.attached.has(DEVICE));
  assert.deepEqual(h.agent.attachCalls, [attach], 'the same socket, the same group');
  assert.deepEqual(await h.service.listMappings(DEVICE, 0), [], 'asid 0 is empty while no VMM is connected');
  assert.deepEqual(
    (await h.agent.listMapped(DEVICE)).mappings.filter((m) => m.asid === 0),
    [],
  );
  await until('the VMM memory forgotten', async () =>
    (await h.service.listMemory()).every((m) => m.id !== VMM2),
  );
  await assert.rejects(h.service.map(mapReq({ asid: 0, iova: 0x4000_0000n })), refused('asid'));
  // The VMM reconnects and sends its whole table again.
  h.agent.registry.create({ id: VMM2, size: 64n * PAGE, kind: 'memfd' });
  assert.equal((await table([{ iova: 0n, size: 32n * PAGE, memory: VMM2, offset: 0n }])).ok, true);
  assert.equal((await h.agent.listMapped(DEVICE)).mappings.filter((m) => m.asid === 0).length, 1);

  // An API server restart while the agent serves it: nothing to do, asid 0 stays the VMM's at once.
  h.agent.attachCalls.length = 0;
  await h.reopen();
  await assert.rejects(h.service.map(mapReq({ asid: 0, iova: 0x4000_0000n })), refused('asid'));
  await until('the core follows attachments', () => h.agent.attachmentWatchers.size === 1);
  assert.deepEqual(h.agent.attachCalls, []);
  assert.equal((await h.service.listMappings(DEVICE, 0)).length, 1);

  // Both restart: the new API server restores it from its state.
  await h.service.close();
  await h.agent.restart(false);
  await h.reopen();
  await until('the attachment served again', () => h.agent.attached.has(DEVICE));
  assert.deepEqual(h.agent.attachCalls, [attach]);
  await until('asid 0 emptied', async () => (await h.service.listMappings(DEVICE, 0)).length === 0);

  // Detach removes the record: the next agent is not asked to serve it.
  await h.service.detachDevice(DEVICE);
  assert.equal(h.reopenState().attachments.size, 0);
  h.agent.attachCalls.length = 0;
  await h.agent.restart();
  await h.service.reconcile();
  await until('the core follows attachments', () => h.agent.attachmentWatchers.size === 1);
  assert.deepEqual(h.agent.attachCalls, []);
  await h.service.map(mapReq({ asid: 0, iova: 0x4000_0000n }));
  await h.service.unmap({ device: DEVICE, asid: 0, iova: 0x4000_0000n, size: PAGE });
});

test('a recorded attachment the agent does not serve is detached all the same; unknown ones are refused', async () => {
  await h.service.attachDevice({ device: DEVICE, socketPath: '/run/vm3.sock' });
  // The agent lost it without the core hearing of it yet.
  h.agent.attached.delete(DEVICE);
  await h.service.detachDevice(DEVICE);
  assert.equal(h.reopenState().attachments.size, 0);
  await assert.rejects(h.service.detachDevice(DEVICE), refused('device'));
});

test('an Attach the agent serves but the state lacks (its answer lost in a crash) is journaled by its retry', async () => {
  const req = { device: DEVICE, socketPath: '/run/vm4.sock' };
  const served = await h.agent.attach(req);
  const describe = h.agent.describeDevice.bind(h.agent);
  h.agent.describeDevice = async (d) => ({ ...(await describe(d)), attachment: served });
  try {
    assert.equal((await h.service.attachDevice(req)).socketPath, req.socketPath);
    assert.deepEqual([...h.reopenState().attachments.values()], [req]);
    await assert.rejects(
      h.service.attachDevice({ device: DEVICE, socketPath: '/run/other.sock' }),
      (e: unknown) => (e as ServiceError).code === 'ALREADY_EXISTS',
    );
  } finally {
    h.agent.describeDevice = describe;
  }
  await h.service.detachDevice(DEVICE);
  assert.equal(h.reopenState().attachments.size, 0);
});
