import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it, mock } from 'node:test';
import { defaultAllowedRoots, PathAllowlist } from '../../src/memory/allowlist.ts';
import { MemoryError } from '../../src/memory/types.ts';

/** PATH_REFUSED; `pattern` matches the whole story (the detail for the log, else the message). */
function refused(pattern: RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof MemoryError, `expected MemoryError, got ${String(e)}`);
    assert.equal(e.code, 'PATH_REFUSED');
    assert.equal(e.field, 'path');
    assert.match(e.detail ?? e.message, pattern);
    // Outside the roots the caller learns nothing but that: no real path, no existence, no pid.
    if (e.detail !== undefined)
      assert.match(e.message, /^\S+ is not a regular file under the allowed roots$/);
    return true;
  };
}

function missing(e: unknown) {
  assert.ok(e instanceof MemoryError, `expected MemoryError, got ${String(e)}`);
  assert.equal(e.code, 'NOT_FOUND');
  assert.equal(e.field, 'path');
  assert.match(e.message, /no such file/);
  return true;
}

describe('PathAllowlist', () => {
  let base: string;
  let root: string;
  let allowlist: PathAllowlist;

  before(() => {
    base = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-allow-')));
    root = path.join(base, 'root');
    fs.mkdirSync(root);
    fs.mkdirSync(path.join(base, 'root-evil'));
    fs.writeFileSync(path.join(base, 'root-evil', 'mem'), Buffer.alloc(4096));
    fs.writeFileSync(path.join(base, 'outside'), Buffer.alloc(4096));
    fs.writeFileSync(path.join(root, 'mem'), Buffer.alloc(8192, 1));
    allowlist = new PathAllowlist([root]);
  });
  after(() => fs.rmSync(base, { recursive: true, force: true }));

  function accepts(p: string, expectedReal: string, expectedSize: bigint): void {
    const file = allowlist.open(p);
    try {
      assert.equal(file.path, expectedReal);
      assert.equal(file.size, expectedSize);
      assert.ok(fs.fstatSync(file.fd).isFile());
      // Opened read-write: a write through the fd lands in the file.
      fs.writeSync(file.fd, Buffer.from('rw'), 0, 2, 0);
      assert.equal(fs.readFileSync(expectedReal).subarray(0, 2).toString(), 'rw');
    } finally {
      fs.closeSync(file.fd);
    }
  }

  it('accepts a regular file under a root', () => {
    accepts(path.join(root, 'mem'), path.join(root, 'mem'), 8192n);
  });

  it('accepts a symlink inside the root to a file inside the root, reporting the real path', () => {
    fs.mkdirSync(path.join(root, 'sub'));
    fs.symlinkSync('../mem', path.join(root, 'sub', 'link'));
    accepts(path.join(root, 'sub', 'link'), path.join(root, 'mem'), 8192n);
  });

  it('follows a symlinked root to its real location', () => {
    const linkRoot = path.join(base, 'link-root');
    fs.symlinkSync(root, linkRoot);
    const viaLinkRoot = new PathAllowlist([linkRoot]);
    const file = viaLinkRoot.open(path.join(root, 'mem'));
    fs.closeSync(file.fd);
    assert.equal(file.path, path.join(root, 'mem'));
  });

  it('refuses a symlink from the root to /etc/passwd', () => {
    fs.symlinkSync('/etc/passwd', path.join(root, 'passwd'));
    assert.throws(() => allowlist.open(path.join(root, 'passwd')), refused(/resolves to \/etc\/passwd/));
  });

  it('refuses a symlink from the root to a file just outside it', () => {
    fs.symlinkSync('../outside', path.join(root, 'escape'));
    assert.throws(() => allowlist.open(path.join(root, 'escape')), refused(/not under an allowed root/));
  });

  it('refuses .. traversal out of the root', () => {
    assert.throws(() => allowlist.open(`${root}/../outside`), refused(/not under an allowed root/));
    assert.throws(() => allowlist.open(`${root}/sub/../../outside`), refused(/not under an allowed root/));
  });

  it('accepts .. that stays inside the root', () => {
    fs.mkdirSync(path.join(root, 'dots'), { recursive: true });
    accepts(`${root}/dots/../mem`, path.join(root, 'mem'), 8192n);
  });

  it('compares path segments, not string prefixes', () => {
    assert.throws(() => allowlist.open(path.join(base, 'root-evil', 'mem')), refused(/root-evil/));
  });

  it('refuses the root itself', () => {
    assert.throws(() => allowlist.open(root), refused(/not under an allowed root/));
  });

  it('refuses a directory under the root', () => {
    fs.mkdirSync(path.join(root, 'dir'));
    assert.throws(() => allowlist.open(path.join(root, 'dir')), refused(/is a directory/));
  });

  it('refuses a FIFO under the root', () => {
    const fifo = path.join(root, 'fifo');
    execFileSync('mkfifo', [fifo]);
    assert.throws(() => allowlist.open(fifo), refused(/is a FIFO/));
  });

  it('refuses a unix socket under the root', async () => {
    const sock = path.join(root, 'sock');
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    try {
      assert.throws(() => allowlist.open(sock), refused(/is a socket/));
    } finally {
      await new Promise((resolve) => server.close(resolve));
    }
  });

  it('refuses a device file even when its directory is a root', () => {
    const devRoot = new PathAllowlist(['/dev']);
    assert.throws(() => devRoot.open('/dev/null'), refused(/is a character device/));
  });

  it('refuses a symlink from the root to /dev/null', () => {
    fs.symlinkSync('/dev/null', path.join(root, 'null'));
    assert.throws(() => allowlist.open(path.join(root, 'null')), refused(/not under an allowed root/));
  });

  it('refuses /proc/self/mem, even when /proc is configured as a root', () => {
    const procRoot = new PathAllowlist(['/proc']);
    assert.throws(() => procRoot.open('/proc/self/mem'), refused(/kernel filesystem/));
    fs.symlinkSync('/proc/self/mem', path.join(root, 'mem-link'));
    assert.throws(() => allowlist.open(path.join(root, 'mem-link')), refused(/kernel filesystem|not under/));
  });

  it('refuses a file with a second hard link', () => {
    fs.linkSync(path.join(base, 'outside'), path.join(root, 'hard'));
    assert.throws(() => allowlist.open(path.join(root, 'hard')), refused(/2 hard links/));
  });

  it('refuses relative, missing and looping paths', () => {
    assert.throws(() => allowlist.open('root/mem'), refused(/must be absolute/));
    assert.throws(() => allowlist.open(path.join(root, 'missing')), missing);
    assert.throws(() => allowlist.open(path.join(root, 'mem', 'below-a-file')), missing);
    fs.symlinkSync('loop-b', path.join(root, 'loop-a'));
    fs.symlinkSync('loop-a', path.join(root, 'loop-b'));
    assert.throws(() => allowlist.open(path.join(root, 'loop-a')), refused(/ELOOP/));
  });

  it('tells nothing of what lies outside the roots: missing or there, the answer is the same', () => {
    const told = (p: string) => {
      try {
        allowlist.open(p);
      } catch (e) {
        assert.ok(refused(/./)(e));
        return (e as MemoryError).message.replace(p, 'P');
      }
      assert.fail(`${p} was opened`);
    };
    fs.symlinkSync('/etc/no-such-file-here', path.join(root, 'dangling'));
    fs.symlinkSync('/etc/hostname', path.join(root, 'hostname'));
    fs.symlinkSync('/proc/self/status', path.join(root, 'status'));
    const answers = new Set(
      ['/etc/hostname', '/etc/no-such-file-here', '/etc/no-such-dir/x', `${base}/outside`, `${base}/missing`]
        .concat(['dangling', 'hostname', 'status'].map((n) => path.join(root, n)))
        .map(told),
    );
    assert.deepEqual([...answers], ['P is not a regular file under the allowed roots']);
  });

  it('a root that does not exist (yet) allows nothing, and starts working once created', () => {
    const later = path.join(base, 'later');
    const lazy = new PathAllowlist([later]);
    assert.throws(() => lazy.open(path.join(base, 'outside')), refused(/not under an allowed root/));
    fs.mkdirSync(later);
    fs.writeFileSync(path.join(later, 'mem'), Buffer.alloc(4096));
    const file = lazy.open(path.join(later, 'mem'));
    fs.closeSync(file.fd);
    assert.equal(file.path, path.join(later, 'mem'));
  });

  describe('swaps between the checks and the open', () => {
    /** Runs `swap` right before the allowlist's own open, i.e. after realpath and stat. */
    function openWithSwap(p: string, swap: () => void) {
      const realOpen = fs.openSync;
      const m = mock.method(fs, 'openSync', (...args: Parameters<typeof fs.openSync>) => {
        m.mock.restore();
        swap();
        return realOpen(...args);
      });
      try {
        return allowlist.open(p);
      } finally {
        m.mock.restore();
      }
    }

    it('refuses when the file is replaced by a symlink to outside', () => {
      const target = path.join(root, 'swap1');
      fs.writeFileSync(target, Buffer.alloc(4096));
      const swap = () => {
        fs.rmSync(target);
        fs.symlinkSync(path.join(base, 'outside'), target);
      };
      assert.throws(() => openWithSwap(target, swap), refused(/changed while being opened/));
    });

    it('refuses when the file is replaced by another file', () => {
      const target = path.join(root, 'swap2');
      fs.writeFileSync(target, Buffer.alloc(4096));
      // Renamed away rather than deleted, so that the new file cannot reuse its inode number.
      const swap = () => {
        fs.renameSync(target, `${target}.old`);
        fs.writeFileSync(target, Buffer.alloc(4096));
      };
      assert.throws(() => openWithSwap(target, swap), refused(/changed while being opened/));
    });

    it('refuses when a directory on the path is replaced by a symlink to outside', () => {
      const dir = path.join(root, 'swapdir');
      const outsideDir = path.join(base, 'outside-dir');
      fs.mkdirSync(dir);
      fs.mkdirSync(outsideDir);
      fs.writeFileSync(path.join(dir, 'mem'), Buffer.alloc(4096));
      // Same inode on both sides: only the fd's own path gives the escape away.
      fs.linkSync(path.join(dir, 'mem'), path.join(outsideDir, 'mem'));
      const swap = () => {
        fs.rmSync(dir, { recursive: true });
        fs.symlinkSync(outsideDir, dir);
      };
      assert.throws(() => openWithSwap(path.join(dir, 'mem'), swap), refused(/changed while being opened/));
    });

    it('closes the fd it opened when refusing', () => {
      const target = path.join(root, 'swap3');
      fs.writeFileSync(target, Buffer.alloc(4096));
      let opened = -1;
      const realOpen = fs.openSync;
      const m = mock.method(fs, 'openSync', (...args: Parameters<typeof fs.openSync>) => {
        m.mock.restore();
        fs.renameSync(target, `${target}.old`);
        fs.writeFileSync(target, Buffer.alloc(4096));
        opened = realOpen(...args);
        return opened;
      });
      try {
        assert.throws(() => allowlist.open(target), refused(/changed/));
      } finally {
        m.mock.restore();
      }
      assert.ok(opened >= 0);
      assert.throws(() => fs.fstatSync(opened), { code: 'EBADF' });
    });
  });

  it('rejects relative roots', () => {
    assert.throws(() => new PathAllowlist(['relative/root']), /must be absolute/);
  });
});

describe('defaultAllowedRoots', () => {
  it('is hugetlbfs, /dev/shm/vdpa-mapd and the memory directory of the state directory', () => {
    assert.deepEqual(defaultAllowedRoots('/var/lib/vdpa-mapd'), [
      '/dev/hugepages',
      '/dev/shm/vdpa-mapd',
      '/var/lib/vdpa-mapd/memory',
    ]);
  });
});
