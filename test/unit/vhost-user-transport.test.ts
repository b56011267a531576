/** The vhost-user listener: a 0600 socket, a stale socket replaced, anything else refused. */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type VhostUserConnection, VhostUserListener } from '../../src/vhost-user/transport.ts';
import { encodeReply, encodeRequest, Request, u64Payload } from '../../src/vhost-user/wire.ts';

let dir: string;
before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-vu-listen-'));
});
after(() => fs.rmSync(dir, { recursive: true, force: true }));

describe('vhost-user listener', () => {
  it('serves frames on a 0600 socket and removes it on close', async () => {
    const socketPath = path.join(dir, 'a.sock');
    fs.writeFileSync(path.join(dir, 'keep'), '');
    net.createServer().listen(socketPath).close(); // a stale socket file left behind
    const conns: VhostUserConnection[] = [];
    const listener = new VhostUserListener({
      path: socketPath,
      onConnection: (conn) => {
        conns.push(conn);
        conn.start({
          frame: async (f) => {
            assert.equal(f.header.request, Request.GET_FEATURES);
            conn.send(encodeReply(Request.GET_FEATURES, u64Payload(0x1234n)));
          },
          closed: () => {},
        });
      },
      onError: (e) => assert.fail(e),
    });
    try {
      assert.equal(fs.statSync(socketPath).mode & 0o777, 0o600);
      const client = net.connect(socketPath);
      const reply = await new Promise<Buffer>((resolve) => {
        client.once('data', resolve);
        client.write(encodeRequest(Request.GET_FEATURES, Buffer.alloc(0)));
      });
      assert.equal(reply.readBigUInt64LE(12), 0x1234n);
      client.destroy();
    } finally {
      listener.close();
      for (const c of conns) c.close();
    }
    assert.equal(fs.existsSync(socketPath), false);
  });

  it('refuses a path that is not a socket', () => {
    const file = path.join(dir, 'plain');
    fs.writeFileSync(file, 'data');
    assert.throws(
      () => new VhostUserListener({ path: file, onConnection: () => {}, onError: () => {} }),
      /exists and is not a socket/,
    );
    assert.equal(fs.readFileSync(file, 'utf8'), 'data');
  });
});
