import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  copyFromAddress,
  copyToAddress,
  errnoName,
  ftruncate,
  getrlimit,
  ioctlBuffer,
  ioctlNoArg,
  MAP_SHARED,
  MFD_CLOEXEC,
  memfdCreate,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
  RLIM_INFINITY,
  RLIMIT_MEMLOCK,
  SysError,
} from '../../src/sys/libc.ts';
import {
  ioctlReadIovaRange,
  ioctlReadU8,
  ioctlReadU32,
  ioctlReadU64,
  ioctlWriteU8,
  ioctlWriteU64,
  TransportError,
  type VhostTransport,
} from '../../src/device/transport.ts';
import { openVhostVdpaFd } from '../../src/device/vhost-vdpa-fd.ts';
import { Ioctl } from '../../src/uapi/ioctl.ts';

/** FIONREAD (asm-generic): on a regular file the kernel writes an int, the bytes left to read. */
const FIONREAD = 0x541b;

function sysError(errno: string, syscall: string) {
  return (e: unknown) => {
    assert.ok(e instanceof SysError, `expected SysError, got ${String(e)}`);
    assert.equal(e.errno, errno);
    assert.equal(e.syscall, syscall);
    return true;
  };
}

describe('libc: ioctl', () => {
  let dir: string;
  let fd: number;
  const content = Buffer.alloc(1234, 7);

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-libc-'));
    const file = path.join(dir, 'plain');
    fs.writeFileSync(file, content);
    fd = fs.openSync(file, 'r+');
  });
  after(() => {
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('vhost requests on a regular file fail with ENOTTY', () => {
    assert.throws(() => ioctlNoArg(fd, Ioctl.VHOST_SET_OWNER), sysError('ENOTTY', 'ioctl'));
    assert.throws(
      () => ioctlBuffer(fd, Ioctl.VHOST_VDPA_GET_IOVA_RANGE, new Uint8Array(16)),
      sysError('ENOTTY', 'ioctl'),
    );
  });

  it('the device transport drives them: each typed request fails with the errno userspace sees', () => {
    const t = openVhostVdpaFd(path.join(dir, 'plain'));
    const enotty = (e: unknown) => e instanceof TransportError && e.errno === 'ENOTTY';
    try {
      assert.throws(() => t.ioctl(Ioctl.VHOST_SET_OWNER), enotty);
      assert.throws(() => ioctlReadU64(t, Ioctl.VHOST_GET_FEATURES), enotty);
      assert.throws(() => ioctlReadU32(t, Ioctl.VHOST_VDPA_GET_DEVICE_ID), enotty);
      assert.throws(() => ioctlReadU8(t, Ioctl.VHOST_VDPA_GET_STATUS), enotty);
      assert.throws(() => ioctlWriteU64(t, Ioctl.VHOST_SET_FEATURES, 1n << 33n), enotty);
      assert.throws(() => ioctlWriteU8(t, Ioctl.VHOST_VDPA_SET_STATUS, 0x0f), enotty);
      assert.throws(() => ioctlReadIovaRange(t, Ioctl.VHOST_VDPA_GET_IOVA_RANGE), enotty);
      // A value that does not fit is refused before any syscall.
      assert.throws(() => ioctlWriteU64(t, Ioctl.VHOST_SET_FEATURES, 1n << 64n), RangeError);
    } finally {
      t.close();
    }
  });

  it('names the request and errno in the message', () => {
    try {
      ioctlNoArg(fd, Ioctl.VHOST_SET_OWNER);
      assert.fail('ioctl succeeded');
    } catch (e) {
      assert.ok(e instanceof SysError);
      assert.equal(e.errnum, 25);
      assert.match(e.message, /^ioctl\(0xaf01\): ENOTTY \(/);
    }
  });

  it('a closed fd fails with EBADF', () => {
    const closed = fs.openSync(path.join(dir, 'plain'), 'r');
    fs.closeSync(closed);
    assert.throws(() => ioctlNoArg(closed, Ioctl.VHOST_SET_OWNER), sysError('EBADF', 'ioctl'));
  });

  it('the kernel writes through the pointer, into the typed reads of the device transport', () => {
    const t: VhostTransport = openVhostVdpaFd(path.join(dir, 'plain'));
    try {
      assert.equal(ioctlReadU32(t, FIONREAD), content.length);
      // The kernel writes 4 bytes; the zeroed upper half of the u64 stays zero.
      assert.equal(ioctlReadU64(t, FIONREAD), BigInt(content.length));
    } finally {
      t.close();
    }
    const buf = Buffer.alloc(8, 0xff);
    assert.equal(ioctlBuffer(fd, FIONREAD, buf), 0);
    assert.equal(buf.readInt32LE(0), content.length);
    // Only the int is written: the rest of the buffer is untouched.
    assert.deepEqual([...buf.subarray(4)], [0xff, 0xff, 0xff, 0xff]);
  });

  it('writes into a subarray at its own offset', () => {
    const backing = Buffer.alloc(12);
    ioctlBuffer(fd, FIONREAD, backing.subarray(4, 8));
    assert.equal(backing.readInt32LE(4), content.length);
    assert.equal(backing.readInt32LE(0), 0);
    assert.equal(backing.readInt32LE(8), 0);
  });

  it('refuses out-of-range arguments before calling libc', () => {
    assert.throws(() => ioctlNoArg(fd, 2 ** 32), RangeError);
    assert.throws(() => ioctlNoArg(-1, Ioctl.VHOST_SET_OWNER), RangeError);
    assert.throws(() => ioctlBuffer(fd, FIONREAD, new Uint8Array(0)), RangeError);
  });
});

describe('libc: memfd, ftruncate, mmap, munmap, copies', () => {
  const size = 3n * 4096n;
  let fd: number;

  before(() => {
    fd = memfdCreate('vdpa-mapd-libc-test', MFD_CLOEXEC);
    ftruncate(fd, size);
  });
  after(() => fs.closeSync(fd));

  it('memfd is a file of the truncated size', () => {
    const st = fs.fstatSync(fd, { bigint: true });
    assert.equal(st.size, size);
    assert.ok(st.isFile());
    assert.match(fs.readlinkSync(`/proc/self/fd/${fd}`), /^\/memfd:vdpa-mapd-libc-test/);
  });

  it('MAP_SHARED: copies through the mapping are the file, both ways', () => {
    const addr = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
    try {
      assert.equal(addr % 4096n, 0n);
      copyToAddress(addr + 4097n, Buffer.from('through the mapping'));
      const viaFd = Buffer.alloc(19);
      fs.readSync(fd, viaFd, 0, 19, 4097);
      assert.equal(viaFd.toString(), 'through the mapping');

      fs.writeSync(fd, Buffer.from('through the fd'), 0, 14, 2 * 4096 + 10);
      assert.equal(copyFromAddress(addr + 2n * 4096n + 10n, 14).toString(), 'through the fd');
      assert.equal(copyFromAddress(addr, 0).length, 0);
    } finally {
      munmap(addr, size);
    }
  });

  it('a second mapping sees what the first wrote', () => {
    const a = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
    const b = mmap(4096n, PROT_READ, MAP_SHARED, fd, 4096n);
    try {
      assert.notEqual(a, b);
      copyToAddress(a + 4096n + 5n, Uint8Array.of(1, 2, 3));
      assert.deepEqual([...copyFromAddress(b + 5n, 3)], [1, 2, 3]);
    } finally {
      munmap(a, size);
      munmap(b, 4096n);
    }
  });

  it('reports mmap and munmap errors by errno name', () => {
    assert.throws(() => mmap(0n, PROT_READ, MAP_SHARED, fd), sysError('EINVAL', 'mmap'));
    assert.throws(() => mmap(4096n, PROT_READ, MAP_SHARED, fd, 1n), sysError('EINVAL', 'mmap'));
    const closed = memfdCreate('closed', MFD_CLOEXEC);
    fs.closeSync(closed);
    assert.throws(() => mmap(4096n, PROT_READ, MAP_SHARED, closed), sysError('EBADF', 'mmap'));
    assert.throws(() => munmap(4097n, 4096n), sysError('EINVAL', 'munmap'));
    assert.throws(() => ftruncate(closed, 4096n), sysError('EBADF', 'ftruncate'));
    assert.throws(() => memfdCreate('bad-flags', 0x7fff_0000), sysError('EINVAL', 'memfd_create'));
  });

  it('refuses out-of-range sizes and addresses before calling libc', () => {
    assert.throws(() => mmap(-1n, PROT_READ, MAP_SHARED, fd), RangeError);
    assert.throws(() => mmap(4096n, PROT_READ, MAP_SHARED, fd, -4096n), RangeError);
    assert.throws(() => munmap(1n << 64n, 4096n), RangeError);
    assert.throws(() => ftruncate(fd, 1n << 63n), RangeError);
    assert.throws(() => copyFromAddress(4096n, 2 ** 31), RangeError);
    assert.throws(() => copyFromAddress(4096n, 1.5), RangeError);
    assert.throws(() => copyFromAddress((1n << 64n) - 2n, 4), RangeError);
    assert.throws(() => copyToAddress(-1n, Uint8Array.of(1)), RangeError);
  });
});

describe('libc: getrlimit', () => {
  it('RLIMIT_MEMLOCK matches /proc/self/limits', () => {
    const rl = getrlimit(RLIMIT_MEMLOCK);
    assert.equal(typeof rl.cur, 'bigint');
    assert.equal(typeof rl.max, 'bigint');
    assert.ok(rl.cur <= rl.max);
    const line = fs
      .readFileSync('/proc/self/limits', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('Max locked memory'));
    assert.ok(line !== undefined);
    const [soft, hard] = line.slice('Max locked memory'.length).trim().split(/\s+/);
    const parse = (v: string | undefined) => (v === 'unlimited' ? RLIM_INFINITY : BigInt(v ?? 'x'));
    assert.equal(rl.cur, parse(soft));
    assert.equal(rl.max, parse(hard));
  });

  it('an unknown resource fails with EINVAL', () => {
    assert.throws(() => getrlimit(1000), sysError('EINVAL', 'getrlimit'));
  });
});

describe('libc: errnoName', () => {
  it('maps errno values to their names', () => {
    assert.equal(errnoName(16), 'EBUSY');
    assert.equal(errnoName(14), 'EFAULT');
    assert.equal(errnoName(22), 'EINVAL');
    assert.equal(errnoName(0), 'ERRNO_0');
    assert.equal(errnoName(4000), 'ERRNO_4000');
  });
});
