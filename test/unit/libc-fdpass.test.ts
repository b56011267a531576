/**
 * Unix sockets passing fds through koffi (SCM_RIGHTS), woken by koffi's poll: the ground the
 * vhost-user transport stands on. A koffi upgrade that breaks struct msghdr handling or its poll
 * callback fails here.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { describe, it } from 'node:test';
import {
  EFD_CLOEXEC,
  EFD_NONBLOCK,
  eventfd,
  FdSocketBuffer,
  MAX_PASSED_FDS,
  memfdCreate,
  MFD_CLOEXEC,
  unixSocketPair,
  watchReadable,
} from '../../src/sys/libc.ts';

function sameFile(a: number, b: number): boolean {
  const sa = fs.fstatSync(a, { bigint: true });
  const sb = fs.fstatSync(b, { bigint: true });
  return sa.dev === sb.dev && sa.ino === sb.ino;
}

function closeAll(fds: number[]): void {
  for (const fd of fds) fs.closeSync(fd);
}

describe('fd passing over a socketpair', () => {
  it('delivers the bytes with the fds attached to them, as new fds of the same files', () => {
    const [a, b] = unixSocketPair();
    const tx = new FdSocketBuffer();
    const rx = new FdSocketBuffer();
    const files = Array.from({ length: MAX_PASSED_FDS }, (_, i) => memfdCreate(`fdpass-${i}`, MFD_CLOEXEC));
    try {
      assert.equal(tx.send(a, Buffer.from('first'), files), 5);
      assert.equal(tx.send(a, Buffer.from('second'), []), 6);
      // Reading exactly the first message's length keeps the second one's bytes (and fds) apart.
      const first = rx.receive(b, 5);
      assert.ok(first);
      assert.equal(first.data.toString(), 'first');
      assert.equal(first.fds.length, MAX_PASSED_FDS);
      assert.equal(first.fdsTruncated, false);
      first.fds.forEach((fd, i) => {
        assert.notEqual(fd, files[i]);
        assert.ok(sameFile(fd, files[i]!), `fd ${i} is the same memfd`);
        // MSG_CMSG_CLOEXEC: received fds do not leak into children.
        assert.ok(fs.readlinkSync(`/proc/self/fd/${fd}`).startsWith('/memfd:fdpass-'));
      });
      closeAll(first.fds);
      const second = rx.receive(b, 100);
      assert.equal(second?.data.toString(), 'second');
      assert.deepEqual(second?.fds, []);
      assert.equal(rx.receive(b, 100), null, 'EAGAIN when empty');
    } finally {
      closeAll([a, b, ...files]);
      tx.free();
      rx.free();
    }
  });

  it('reports more fds than fit as truncated and EOF as eof', () => {
    const [a, b] = unixSocketPair();
    const rx = new FdSocketBuffer();
    const tx = new FdSocketBuffer();
    const files = Array.from({ length: MAX_PASSED_FDS + 1 }, () => eventfd(0, EFD_CLOEXEC));
    try {
      // The receiver's control buffer holds 8 fds: the kernel installs those and drops the 9th.
      tx.send(a, Buffer.from('x'), files);
      const got = rx.receive(b, 1);
      assert.ok(got);
      assert.equal(got.fdsTruncated, true);
      assert.equal(got.fds.length, MAX_PASSED_FDS);
      closeAll(got.fds);
      fs.closeSync(a);
      const end = rx.receive(b, 1);
      assert.equal(end?.eof, true);
    } finally {
      closeAll([b, ...files]);
      rx.free();
      tx.free();
    }
  });

  it('koffi poll wakes the main thread when a socket and an eventfd become readable', async () => {
    const [a, b] = unixSocketPair();
    const efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    const tx = new FdSocketBuffer();
    const rx = new FdSocketBuffer();
    const errors: unknown[] = [];
    try {
      const got = await new Promise<string>((resolve) => {
        const w = watchReadable(
          b,
          () => {
            const r = rx.receive(b, 16);
            if (r === null) return;
            w.stop();
            resolve(r.data.toString());
          },
          (e) => errors.push(e),
        );
        setImmediate(() => tx.send(a, Buffer.from('wake')));
      });
      assert.equal(got, 'wake');
      const counter = await new Promise<bigint>((resolve) => {
        const w = watchReadable(
          efd,
          () => {
            const buf = Buffer.alloc(8);
            fs.readSync(efd, buf);
            w.stop();
            resolve(buf.readBigUInt64LE());
          },
          (e) => errors.push(e),
        );
        const one = Buffer.alloc(8);
        one.writeBigUInt64LE(3n);
        fs.writeSync(efd, one);
      });
      assert.equal(counter, 3n);
      // An exception in the callback is caught and reported, and the watch keeps working.
      let calls = 0;
      await new Promise<void>((resolve) => {
        const w = watchReadable(
          b,
          () => {
            calls++;
            const r = rx.receive(b, 1);
            if (calls === 1) throw new Error('boom');
            if (r !== null) {
              w.stop();
              resolve();
            }
          },
          (e) => errors.push(e),
        );
        tx.send(a, Buffer.from('12'));
      });
      assert.equal(errors.length, 1);
      assert.match(String(errors[0]), /boom/);
    } finally {
      closeAll([a, b, efd]);
      tx.free();
      rx.free();
    }
  });
});
