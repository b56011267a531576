/**
 * Attach over the real agent (services/agent/main.ts on a unix socket, AgentClient): a scripted
 * VMM connects to the device's vhost-user socket and sends its memory table with memfds; the
 * table reaches a WatchAttachments subscriber (standing in for the API server) with one memory id
 * per file, and the VMM gets its REPLY_ACK only once the subscriber answered. Refusals (an error
 * answer, no subscriber, no answer in time) are failure replies; paths outside the attach directory
 * and unknown groups are refused; Detach and the VMM hanging up leave no memory and no fd behind.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status } from '@grpc/grpc-js';
import { AgentClient } from '../../src/agent/client.ts';
import { AgentError } from '../../src/agent/errors.ts';
import { dupCloexec, EFD_CLOEXEC, EFD_NONBLOCK, eventfd } from '../../src/sys/libc.ts';
import type { MemoryRegion } from '../../src/vhost-user/wire.ts';
import {
  F_PROTOCOL_FEATURES,
  memTablePayload,
  Request,
  vringAddrPayload,
  vringFdPayload,
  vringStatePayload,
} from '../../src/vhost-user/wire.ts';
import { type RunningAgent, startAgent } from '../../services/agent/main.ts';
import { FrontEnd, highRam, lowRam, memfd, passedFds } from '../vhost-user/front-end.ts';
import { BLK_FEATURES, recordingSides } from '../vhost-user/recording-side.ts';
import { negotiate, PROTOCOL, TableServer } from '../vhost-user/table-server.ts';
import { TIER_BUDGET_MS } from './tier.ts';

const MiB = 1n << 20n;

const dimmRegion: MemoryRegion = {
  guestAddr: 0x2_0000_0000n,
  size: 4n * MiB,
  userAddr: 0x7f00_8000_0000n,
  mmapOffset: 0n,
};

async function refused(promise: Promise<unknown>, code: string, grpcStatus: status, field: string) {
  await assert.rejects(promise, (e: unknown) => {
    assert.ok(e instanceof AgentError, String(e));
    assert.deepEqual([e.code, e.status, e.field], [code, grpcStatus, field], e.message);
    return true;
  });
}

let root: string;
let attachDir: string;
let agent: RunningAgent;
let client: AgentClient;
const sides = recordingSides();

function agentConfig(name: string, attachAnswerMs?: number) {
  return {
    socketPath: path.join(root, `${name}.sock`),
    devices: ['sim:vdpa0', 'sim:vdpa1', 'sim:vdpa2', 'sim:vdpa3'],
    allowedRoots: [],
    stateDir: path.join(root, name),
    attachDir,
    ...(attachAnswerMs === undefined ? {} : { attachAnswerMs }),
    memory: [],
    logLevel: 'silent' as const,
  };
}

before(async () => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-attach-'));
  attachDir = path.join(root, 'vhost-user');
  fs.mkdirSync(attachDir);
  agent = await startAgent(agentConfig('agent'), undefined, { deviceSide: sides.factory });
  client = new AgentClient({ socketPath: path.join(root, 'agent.sock') });
  await client.connect();
});

after(async () => {
  client?.close();
  await agent?.stop();
  fs.rmSync(root, { recursive: true, force: true });
});

// A broken attach leaves a wait unanswered: each test is bounded, generously for a loaded machine.
describe('attach: the VMM memory table goes through the API server', { timeout: TIER_BUDGET_MS }, () => {
  it('a subscriber sees the table with one memory id per file; the VMM is answered only after it', async () => {
    const fdsBefore = passedFds();
    const server = await TableServer.start(client);
    server.hold = true;
    const socketPath = path.join(attachDir, 'vdpa0.sock');
    const attached = await client.attach({ device: 'vdpa0', socketPath });
    assert.deepEqual([attached.socketPath, attached.mode, attached.vmmConnected], [socketPath, 0o600, false]);
    assert.equal(fs.statSync(socketPath).mode & 0o777, 0o600);

    const fe = FrontEnd.connect(socketPath);
    const ram = memfd(16n * MiB);
    const dimm = memfd(4n * MiB);
    const kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    const call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    try {
      await server.next('connected', 'vdpa0');
      await negotiate(fe);
      // Two regions of one memfd and one of another; the second region comes with its own fd.
      const again = dupCloexec(ram);
      fe.send(
        Request.SET_MEM_TABLE,
        memTablePayload([lowRam, highRam, dimmRegion]),
        [ram, again, dimm],
        true,
      );
      fs.closeSync(again);
      const request = await server.next('memoryTable', 'vdpa0');
      assert.ok(request.type === 'memoryTable');
      const ids = request.entries.map((e) => e.memory);
      assert.equal(ids[0], ids[1], 'the two regions of one file share one memory id');
      assert.notEqual(ids[0], ids[2]);
      assert.deepEqual(
        request.entries.map(({ asid, iova, size, offset, perm }) => ({ asid, iova, size, offset, perm })),
        [lowRam, highRam, dimmRegion].map((r) => ({
          asid: 0,
          iova: r.guestAddr,
          size: r.size,
          offset: r.mmapOffset,
          perm: 'rw',
        })),
      );
      const memory = await client.listMemory();
      assert.deepEqual(
        memory.filter((m) => ids.includes(m.id)).map((m) => [m.kind, m.size]),
        [
          ['memfd', 16n * MiB],
          ['memfd', 4n * MiB],
        ],
      );
      assert.equal(fe.io.receive(fe.fd, 12), null, 'no reply before the answer');

      await server.apply(request);
      assert.equal(await fe.u64(Request.SET_MEM_TABLE), 0n, 'REPLY_ACK success once answered');
      assert.equal((await client.listMapped('vdpa0')).mappings.length, 3);

      // A vring, so the attachment shows its guest physical addresses.
      fe.send(Request.SET_VRING_NUM, vringStatePayload(0, 256));
      fe.send(Request.SET_VRING_BASE, vringStatePayload(0, 0));
      fe.send(
        Request.SET_VRING_ADDR,
        vringAddrPayload({
          index: 0,
          log: false,
          desc: lowRam.userAddr + 0x1000n,
          avail: lowRam.userAddr + 0x2000n,
          used: lowRam.userAddr + 0x3000n,
          logAddr: 0n,
        }),
      );
      fe.send(Request.SET_VRING_CALL, vringFdPayload(0, true), [call]);
      fe.send(Request.SET_VRING_KICK, vringFdPayload(0, true), [kick]);
      fe.send(Request.SET_VRING_ENABLE, vringStatePayload(0, 1), [], true);
      assert.equal(await fe.u64(Request.SET_VRING_ENABLE), 0n);

      const { attachment } = await client.describeDevice('vdpa0');
      assert.ok(attachment);
      assert.equal(attachment.vmmConnected, true);
      assert.equal(attachment.negotiatedFeatures, BLK_FEATURES | F_PROTOCOL_FEATURES);
      assert.equal(attachment.protocolFeatures, PROTOCOL);
      assert.deepEqual(attachment.memoryTable, request.entries);
      assert.deepEqual(attachment.vrings, [
        {
          index: 0,
          size: 256,
          lastAvail: 0,
          desc: 0x1000n,
          avail: 0x2000n,
          used: 0x3000n,
          enabled: true,
          running: true,
        },
      ]);
      assert.equal(attachment.stats.memoryUpdates, 1);
      assert.equal(attachment.stats.messages.SET_MEM_TABLE, 1);
      assert.equal(attachment.connections, 1);
      assert.equal((await client.describeDevice('vdpa1')).attachment, undefined);

      // The VMM hangs up: an empty table (the API server unmaps), then the memory goes.
      fe.close();
      const empty = await server.next('memoryTable', 'vdpa0');
      assert.ok(empty.type === 'memoryTable');
      assert.deepEqual(empty.entries, []);
      await server.apply(empty);
      await server.next('disconnected', 'vdpa0');
      assert.deepEqual((await client.listMapped('vdpa0')).mappings, []);
      assert.deepEqual(
        (await client.listMemory()).filter((m) => ids.includes(m.id)),
        [],
        'memory no device uses is released',
      );
      assert.equal((await client.describeDevice('vdpa0')).attachment?.vmmConnected, false);
    } finally {
      fe.close();
      for (const fd of [ram, dimm, kick, call]) fs.closeSync(fd);
      await client.detach('vdpa0');
      await server.close();
    }
    assert.equal(fs.existsSync(socketPath), false, 'Detach removes the socket');
    assert.equal(passedFds(), fdsBefore, 'every memfd and eventfd the VMM passed is closed');
  });

  it('two devices given the same file share its memory, released when the last one lets go', async () => {
    const server = await TableServer.start(client);
    const ram = memfd(16n * MiB);
    const fes: FrontEnd[] = [];
    try {
      for (const device of ['vdpa1', 'vdpa2']) {
        const socketPath = path.join(attachDir, `${device}.sock`);
        await client.attach({ device, socketPath });
        const fe = FrontEnd.connect(socketPath);
        fes.push(fe);
        await server.next('connected', device);
        await negotiate(fe);
        fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [ram], true);
        assert.equal(await fe.u64(Request.SET_MEM_TABLE), 0n);
      }
      const [a, b] = await Promise.all(['vdpa1', 'vdpa2'].map((d) => client.listMapped(d)));
      assert.equal(a!.mappings[0]!.memory, b!.mappings[0]!.memory, 'one memory id for one file');
      const id = a!.mappings[0]!.memory;
      assert.equal((await client.listMemory()).find((m) => m.id === id)?.mappedEntries, 2);

      await client.detach('vdpa1');
      await server.next('disconnected', 'vdpa1');
      assert.ok(
        (await client.listMemory()).some((m) => m.id === id),
        'still used by vdpa2',
      );
      await client.detach('vdpa2');
      await server.next('disconnected', 'vdpa2');
      assert.equal(
        (await client.listMemory()).some((m) => m.id === id),
        false,
      );
    } finally {
      for (const fe of fes) fe.close();
      fs.closeSync(ram);
      await server.close();
    }
  });

  it('no subscriber at all and an error answer are failure replies, and change nothing', async () => {
    const socketPath = path.join(attachDir, 'vdpa3.sock');
    await client.attach({ device: 'vdpa3', socketPath });
    const fe = FrontEnd.connect(socketPath);
    const ram = memfd(16n * MiB);
    let server: TableServer | undefined;
    try {
      await negotiate(fe);
      fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [ram], true);
      assert.equal(await fe.u64(Request.SET_MEM_TABLE), 1n, 'refused: nobody can apply it');

      server = await TableServer.start(client);
      server.hold = true;
      fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [ram], true);
      const request = await server.next('memoryTable', 'vdpa3');
      assert.ok(request.type === 'memoryTable');
      const { requestId } = request;
      await client.answerMemoryTable({ requestId, ok: false, code: 'QUOTA', message: 'over quota' });
      assert.equal(await fe.u64(Request.SET_MEM_TABLE), 1n, 'a failure reply');
      await refused(
        client.answerMemoryTable({ requestId, ok: true }),
        'REQUEST_NOT_FOUND',
        status.NOT_FOUND,
        'requestId',
      );

      const { attachment } = await client.describeDevice('vdpa3');
      assert.deepEqual(attachment?.memoryTable, []);
      assert.equal(attachment?.stats.refusals, 2);
      assert.equal(
        (await client.listMemory()).some((m) => m.kind === 'memfd'),
        false,
        'memory of a refused table is not kept',
      );
    } finally {
      fe.close();
      fs.closeSync(ram);
      await client.detach('vdpa3');
      await server?.close();
    }
  });

  it('refuses paths outside the attach directory, unknown groups, and a second attach', async () => {
    await refused(
      client.attach({ device: 'vdpa0', socketPath: path.join(root, 'elsewhere.sock') }),
      'PATH_REFUSED',
      status.PERMISSION_DENIED,
      'socketPath',
    );
    const link = path.join(attachDir, 'escape');
    fs.symlinkSync(root, link);
    await refused(
      client.attach({ device: 'vdpa0', socketPath: path.join(link, 'x.sock') }),
      'PATH_REFUSED',
      status.PERMISSION_DENIED,
      'socketPath',
    );
    await refused(
      client.attach({ device: 'vdpa0', socketPath: `${attachDir}/../x.sock` }),
      'BAD_REQUEST',
      status.INVALID_ARGUMENT,
      'socketPath',
    );
    await refused(
      client.attach({
        device: 'vdpa0',
        socketPath: path.join(attachDir, 'g.sock'),
        group: 'no-such-group-here',
      }),
      'UNKNOWN_GROUP',
      status.INVALID_ARGUMENT,
      'group',
    );
    const plain = path.join(attachDir, 'plain-file');
    fs.writeFileSync(plain, 'keep me');
    await refused(
      client.attach({ device: 'vdpa0', socketPath: plain }),
      'PATH_IN_USE',
      status.ALREADY_EXISTS,
      'socketPath',
    );
    assert.equal(fs.readFileSync(plain, 'utf8'), 'keep me');
    await refused(
      client.attach({ device: 'nope', socketPath: path.join(attachDir, 'n.sock') }),
      'DEVICE_NOT_FOUND',
      status.NOT_FOUND,
      'device',
    );
    await refused(client.detach('vdpa0'), 'NOT_ATTACHED', status.FAILED_PRECONDITION, 'device');
    assert.deepEqual(
      fs.readdirSync(attachDir).sort(),
      ['escape', 'plain-file'],
      'no refused attach left a socket behind',
    );

    const socketPath = path.join(attachDir, 'g.sock');
    const a = await client.attach({ device: 'vdpa0', socketPath, group: 'nogroup' });
    try {
      assert.deepEqual([a.mode, a.group], [0o660, 'nogroup']);
      const st = fs.statSync(socketPath);
      assert.deepEqual([st.mode & 0o777, st.gid], [0o660, 65534]);
      await refused(
        client.attach({ device: 'vdpa0', socketPath: path.join(attachDir, 'other.sock') }),
        'ALREADY_ATTACHED',
        status.ALREADY_EXISTS,
        'device',
      );
      await refused(
        client.attach({ device: 'vdpa1', socketPath }),
        'PATH_IN_USE',
        status.ALREADY_EXISTS,
        'socketPath',
      );
    } finally {
      await client.detach('vdpa0');
    }
  });

  it('a Detach while the API server applies a table: the table is taken back once applied', async () => {
    const socketPath = path.join(attachDir, 'leaving.sock');
    const server = await TableServer.start(client);
    server.hold = true;
    await client.attach({ device: 'vdpa1', socketPath });
    const fe = FrontEnd.connect(socketPath);
    const ram = memfd(16n * MiB);
    try {
      await server.next('connected', 'vdpa1');
      await negotiate(fe);
      fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [ram], true);
      const request = await server.next('memoryTable', 'vdpa1');
      await client.detach('vdpa1');
      await server.next('disconnected', 'vdpa1');
      await fe.eof();
      assert.ok(request.type === 'memoryTable');
      await server.apply(request); // the API server finishes what it had started
      const takeBack = await server.next('memoryTable', 'vdpa1');
      assert.ok(takeBack.type === 'memoryTable');
      assert.deepEqual(takeBack.entries, []);
      await server.apply(takeBack);
      assert.deepEqual((await client.listMapped('vdpa1')).mappings, []);
      assert.equal(
        (await client.listMemory()).some((m) => m.kind === 'memfd'),
        false,
        'its memory is released',
      );
    } finally {
      fe.close();
      fs.closeSync(ram);
      await client.detach('vdpa1').catch(() => undefined);
      await server.close();
    }
  });

  it('two Attach calls racing for one path: one wins, and its socket stays served', async () => {
    const socketPath = path.join(attachDir, 'race.sock');
    const outcomes = await Promise.allSettled([
      client.attach({ device: 'vdpa0', socketPath }),
      client.attach({ device: 'vdpa1', socketPath }),
    ]);
    const won = outcomes.findIndex((o) => o.status === 'fulfilled');
    assert.ok(won >= 0, 'one attach succeeds');
    const lost = outcomes[1 - won]!;
    assert.ok(lost.status === 'rejected' && lost.reason instanceof AgentError);
    assert.equal(lost.reason.status, status.ALREADY_EXISTS);
    const winner = won === 0 ? 'vdpa0' : 'vdpa1';
    try {
      const fe = FrontEnd.connect(socketPath);
      try {
        await negotiate(fe);
      } finally {
        fe.close();
      }
      assert.equal((await client.describeDevice(winner)).attachment?.connections, 1);
    } finally {
      await client.detach(winner);
    }
  });

  it('no answer within the deadline is a failure reply', async () => {
    const config = agentConfig('short', 200);
    const short = await startAgent(config, undefined, { deviceSide: sides.factory });
    const shortClient = new AgentClient({ socketPath: config.socketPath });
    const socketPath = path.join(attachDir, 'short.sock');
    const server = await TableServer.start(shortClient);
    server.hold = true;
    const ram = memfd(16n * MiB);
    let fe: FrontEnd | undefined;
    try {
      await shortClient.attach({ device: 'vdpa0', socketPath });
      fe = FrontEnd.connect(socketPath);
      await server.next('connected', 'vdpa0');
      await negotiate(fe);
      fe.send(Request.SET_MEM_TABLE, memTablePayload([lowRam]), [ram], true);
      await server.next('memoryTable', 'vdpa0'); // and never answered
      assert.equal(await fe.u64(Request.SET_MEM_TABLE), 1n);
    } finally {
      fe?.close();
      fs.closeSync(ram);
      await server.close();
      shortClient.close();
      await short.stop();
    }
    assert.equal(fs.existsSync(socketPath), false, 'the stopping agent removed its socket');
  });
});
