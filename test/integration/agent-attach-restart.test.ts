/**
 * An agent SIGKILLed while a VMM is attached: the VMM sees its connection end, the socket file stays
 * behind (nobody removed it), and a new agent's Attach on the same path replaces it and serves the
 * VMM again. While the first agent lived, the same path was refused to the second: a live socket is
 * never replaced.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { status } from '@grpc/grpc-js';
import { AgentClient } from '../../src/agent/client.ts';
import { AgentError } from '../../src/agent/errors.ts';
import { memTablePayload, Request } from '../../src/vhost-user/wire.ts';
import { FrontEnd, memfd } from '../vhost-user/front-end.ts';
import { negotiate, TableServer } from '../vhost-user/table-server.ts';
import { startAgentProcess, tempDir } from './agent-harness.ts';

const MAIN = fileURLToPath(new URL('../vhost-user/attach-agent.ts', import.meta.url));
const MiB = 1n << 20n;

test('a SIGKILLed agent leaves a stale socket that a new agent replaces and serves', async (t) => {
  const dir = tempDir(t, 'vdpa-attach-kill-');
  const attachDir = path.join(dir, 'vhost-user');
  const args = (name: string) => [
    '--socket',
    path.join(dir, `${name}.sock`),
    '--state-dir',
    path.join(dir, name),
    '--attach-dir',
    attachDir,
    '--device',
    'sim:vdpa0',
    '--log-level',
    'info',
  ];
  const socketPath = path.join(attachDir, 'vdpa0.sock');
  const first = await startAgentProcess(t, args('first'), {}, MAIN);
  const firstClient = new AgentClient({ socketPath: path.join(dir, 'first.sock') });
  const second = await startAgentProcess(t, args('second'), {}, MAIN);
  const secondClient = new AgentClient({ socketPath: path.join(dir, 'second.sock') });
  const ram = memfd(16n * MiB);
  const fes: FrontEnd[] = [];
  t.after(() => {
    for (const fe of fes) fe.close();
    fs.closeSync(ram);
    firstClient.close();
    secondClient.close();
  });

  const server = await TableServer.start(firstClient);
  await firstClient.attach({ device: 'vdpa0', socketPath });
  const fe = FrontEnd.connect(socketPath);
  fes.push(fe);
  await server.next('connected', 'vdpa0');
  await negotiate(fe);
  fe.send(
    Request.SET_MEM_TABLE,
    memTablePayload([{ guestAddr: 0n, size: 8n * MiB, userAddr: 0x7f00_0000_0000n, mmapOffset: 0n }]),
    [ram],
    true,
  );
  assert.equal(await fe.u64(Request.SET_MEM_TABLE), 0n);

  await assert.rejects(secondClient.attach({ device: 'vdpa0', socketPath }), (e: unknown) => {
    assert.ok(e instanceof AgentError);
    assert.deepEqual([e.code, e.status, e.field], ['PATH_IN_USE', status.ALREADY_EXISTS, 'socketPath']);
    return true;
  });

  const exit = await first.stop('SIGKILL');
  assert.equal(exit.signal, 'SIGKILL');
  await fe.eof();
  assert.ok(fs.lstatSync(socketPath).isSocket(), 'the killed agent left its socket file');

  const attached = await secondClient.attach({ device: 'vdpa0', socketPath });
  assert.equal(attached.socketPath, socketPath);
  const again = FrontEnd.connect(socketPath);
  fes.push(again);
  await negotiate(again);
  const { attachment } = await secondClient.describeDevice('vdpa0');
  assert.deepEqual([attachment?.vmmConnected, attachment?.connections], [true, 1]);
  assert.equal(
    second.logs().filter((l) => (l.level as number) >= 50).length,
    0,
    'the new agent logged no error',
  );
  await server.close();
});
