import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import fc from 'fast-check';
import { SharedMemoryRegistry } from '../../src/memory/registry.ts';
import { MemoryError, type MemoryErrorCode } from '../../src/memory/types.ts';

const U64_MAX = (1n << 64n) - 1n;

function memoryError(code: MemoryErrorCode, field?: string) {
  return (e: unknown) => {
    assert.ok(e instanceof MemoryError, `expected MemoryError, got ${String(e)}`);
    assert.equal(e.code, code);
    if (field !== undefined) assert.equal(e.field, field);
    return true;
  };
}

describe('SharedMemoryRegistry', () => {
  let base: string;
  let stateDir: string;
  let shmRoot: string;
  let reg: SharedMemoryRegistry;

  beforeEach(() => {
    base = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-reg-')));
    stateDir = path.join(base, 'state');
    shmRoot = path.join(base, 'shm');
    fs.mkdirSync(shmRoot);
    reg = new SharedMemoryRegistry({ allowedRoots: [shmRoot], stateDir });
  });
  afterEach(() => {
    reg.closeAll();
    fs.rmSync(base, { recursive: true, force: true });
  });

  describe('create (file)', () => {
    it('creates a sparse 0600 file in a 0700 <stateDir>/memory and maps it', () => {
      const info = reg.create({ id: 'guest0', size: 1n << 20n });
      const file = path.join(stateDir, 'memory', 'guest0');
      assert.deepEqual(
        { ...info, uaddr: 0n },
        {
          id: 'guest0',
          path: file,
          kind: 'file',
          created: true,
          size: 1n << 20n,
          uaddr: 0n,
          mappedEntries: 0,
        },
      );
      assert.ok(info.uaddr > 0n && info.uaddr % 4096n === 0n);
      const st = fs.statSync(file, { bigint: true });
      assert.equal(st.size, 1n << 20n);
      assert.equal(st.mode & 0o777n, 0o600n);
      assert.ok(st.blocks * 512n < st.size, 'file is sparse');
      assert.equal(fs.statSync(path.join(stateDir, 'memory')).mode & 0o777, 0o700);
    });

    it('registry.write lands in the file; a write to the file shows in registry.read', () => {
      reg.create({ id: 'g', size: 16384n });
      const file = path.join(stateDir, 'memory', 'g');
      reg.write('g', 4090n, Buffer.from('across a page boundary'));
      assert.equal(fs.readFileSync(file).subarray(4090, 4112).toString(), 'across a page boundary');

      const fd = fs.openSync(file, 'r+');
      try {
        fs.writeSync(fd, Buffer.from('from the fd'), 0, 11, 16384 - 11);
      } finally {
        fs.closeSync(fd);
      }
      assert.equal(reg.read('g', 16384n - 11n, 11).toString(), 'from the fd');
      assert.deepEqual([...reg.read('g', 0n, 4)], [0, 0, 0, 0]);
    });

    it('write accepts a subarray view of a larger buffer', () => {
      reg.create({ id: 'g', size: 4096n });
      const big = Buffer.from('0123456789');
      reg.write('g', 100n, big.subarray(3, 7));
      assert.equal(reg.read('g', 100n, 4).toString(), '3456');
    });

    it('refuses to overwrite an existing backing file, which opens by path instead', () => {
      const info = reg.create({ id: 'keep', size: 8192n });
      reg.write('keep', 0n, Buffer.from('guest data'));
      reg.release('keep');
      assert.ok(fs.existsSync(info.path), 'release keeps a created file');
      assert.throws(() => reg.create({ id: 'keep', size: 8192n }), memoryError('ALREADY_EXISTS', 'id'));

      // A restarted agent (a new registry) finds the data again.
      const restarted = new SharedMemoryRegistry({ allowedRoots: [], stateDir });
      try {
        const reopened = restarted.open({ id: 'keep', path: info.path });
        assert.equal(reopened.size, 8192n);
        assert.equal(reopened.created, false);
        assert.equal(restarted.read('keep', 0n, 10).toString(), 'guest data');
      } finally {
        restarted.closeAll();
      }
    });

    it('removes the file when the mapping fails', () => {
      // 2^62 bytes: ftruncate of a sparse file may succeed, mmap cannot.
      assert.throws(() => reg.create({ id: 'huge', size: 1n << 62n }), memoryError('SYSTEM'));
      assert.equal(fs.existsSync(path.join(stateDir, 'memory', 'huge')), false);
      assert.equal(reg.get('huge'), undefined);
    });

    it('refuses a symlink planted as <stateDir>/memory', () => {
      fs.mkdirSync(stateDir);
      fs.symlinkSync(shmRoot, path.join(stateDir, 'memory'));
      assert.throws(() => reg.create({ id: 'g', size: 4096n }), memoryError('PATH_REFUSED'));
      assert.deepEqual(fs.readdirSync(shmRoot), []);
    });
  });

  describe('create (memfd)', () => {
    it('maps a memfd: the data is visible through its fd', () => {
      const info = reg.create({ id: 'anon', size: 8192n, kind: 'memfd' });
      assert.equal(info.path, 'memfd:anon');
      assert.equal(info.kind, 'memfd');
      assert.equal(info.created, true);
      reg.write('anon', 5000n, Buffer.from('memfd bytes'));

      // The agent's own memfd shows up in /proc/self/fd as /memfd:vdpa-mapd:anon (deleted).
      const link = fs
        .readdirSync('/proc/self/fd')
        .map((n) => ({ n, target: safeReadlink(`/proc/self/fd/${n}`) }))
        .find((l) => l.target.startsWith('/memfd:vdpa-mapd:anon'));
      assert.ok(link !== undefined, 'memfd fd is open');
      const copy = fs.readFileSync(`/proc/self/fd/${link.n}`);
      assert.equal(copy.length, 8192);
      assert.equal(copy.subarray(5000, 5011).toString(), 'memfd bytes');
      assert.equal(fs.existsSync(path.join(stateDir, 'memory', 'anon')), false);
    });
  });

  describe('open', () => {
    it('maps an existing file under an allowed root, size from the file', () => {
      const file = path.join(shmRoot, 'qemu-ram');
      fs.writeFileSync(file, Buffer.alloc(3 * 4096, 0xab));
      const info = reg.open({ id: 'ram', path: file });
      assert.equal(info.size, 3n * 4096n);
      assert.equal(info.path, file);
      assert.equal(info.kind, 'file');
      assert.equal(info.created, false);
      assert.deepEqual([...reg.read('ram', 4095n, 2)], [0xab, 0xab]);
      reg.write('ram', 0n, Buffer.from('qemu'));
      assert.equal(fs.readFileSync(file).subarray(0, 4).toString(), 'qemu');
    });

    it('refuses paths outside the roots', () => {
      fs.symlinkSync('/etc/passwd', path.join(shmRoot, 'passwd'));
      assert.throws(
        () => reg.open({ id: 'x', path: path.join(shmRoot, 'passwd') }),
        memoryError('PATH_REFUSED', 'path'),
      );
      assert.throws(() => reg.open({ id: 'x', path: '/etc/passwd' }), memoryError('PATH_REFUSED', 'path'));
      assert.equal(reg.list().length, 0);
    });

    it('refuses empty and non-page-multiple files', () => {
      fs.writeFileSync(path.join(shmRoot, 'empty'), '');
      fs.writeFileSync(path.join(shmRoot, 'odd'), Buffer.alloc(4097));
      assert.throws(
        () => reg.open({ id: 'e', path: path.join(shmRoot, 'empty') }),
        memoryError('INVALID_SIZE', 'path'),
      );
      assert.throws(
        () => reg.open({ id: 'o', path: path.join(shmRoot, 'odd') }),
        memoryError('INVALID_SIZE', 'path'),
      );
      assert.equal(reg.list().length, 0);
    });
  });

  describe('ids and sizes', () => {
    it('validates ids', () => {
      for (const id of [
        '',
        'a'.repeat(65),
        'a/b',
        '..x/',
        'sp ace',
        'é',
        'a\0b',
        '.',
        '..',
        '...',
        '-',
        '-rf',
        '.hidden',
      ]) {
        assert.throws(
          () => reg.create({ id, size: 4096n }),
          memoryError('INVALID_ID', 'id'),
          JSON.stringify(id),
        );
      }
      for (const id of ['a', 'a'.repeat(64), 'A-z_0.9', 'x...', '9.x']) {
        reg.create({ id, size: 4096n });
      }
      assert.equal(reg.list().length, 5);
      assert.equal(fs.readdirSync(path.join(stateDir, 'memory')).length, 5);
    });

    it('refuses a duplicate id', () => {
      reg.create({ id: 'dup', size: 4096n, kind: 'memfd' });
      assert.throws(
        () => reg.create({ id: 'dup', size: 4096n, kind: 'memfd' }),
        memoryError('ALREADY_EXISTS', 'id'),
      );
      fs.writeFileSync(path.join(shmRoot, 'f'), Buffer.alloc(4096));
      assert.throws(
        () => reg.open({ id: 'dup', path: path.join(shmRoot, 'f') }),
        memoryError('ALREADY_EXISTS', 'id'),
      );
    });

    it('validates sizes', () => {
      for (const size of [0n, -4096n, 1n, 4095n, 4097n, 1n << 63n, U64_MAX]) {
        assert.throws(() => reg.create({ id: 's', size }), memoryError('INVALID_SIZE', 'size'), String(size));
      }
      assert.equal(fs.existsSync(path.join(stateDir, 'memory', 's')), false);
    });
  });

  describe('translate and check', () => {
    const size = 64n * 1024n;
    beforeEach(() => {
      reg.create({ id: 'm', size, kind: 'memfd' });
    });

    it('translates inside the memory', () => {
      const base = reg.get('m')!.uaddr;
      assert.equal(reg.translate('m', 0n, size), base);
      assert.equal(reg.translate('m', 4096n, 4096n), base + 4096n);
      assert.equal(reg.translate('m', size - 1n, 1n), base + size - 1n);
      assert.equal(reg.check('m', 0n, size), undefined);
    });

    it('refuses what runs past the end, with the field to blame', () => {
      const cases: [bigint, bigint, string][] = [
        [size, 1n, 'offset'],
        [size - 1n, 2n, 'size'],
        [0n, size + 1n, 'size'],
        [0n, 0n, 'size'],
        [0n, -1n, 'size'],
        [-1n, 1n, 'offset'],
        [U64_MAX, 1n, 'offset'],
        [1n, U64_MAX, 'size'],
        [U64_MAX, U64_MAX, 'offset'],
        [1n << 64n, 1n, 'offset'],
        [0n, 1n << 64n, 'size'],
      ];
      for (const [offset, sz, field] of cases) {
        const err = reg.check('m', offset, sz);
        assert.ok(err instanceof MemoryError, `${offset} +${sz}`);
        assert.equal(err.code, 'OUT_OF_BOUNDS');
        assert.equal(err.field, field, `${offset} +${sz}`);
        assert.throws(() => reg.translate('m', offset, sz), memoryError('OUT_OF_BOUNDS', field));
      }
    });

    it('agrees with exact arithmetic on any u64 offset and size', () => {
      const u64 = fc.bigInt({ min: 0n, max: U64_MAX });
      const near = fc.bigInt({ min: 0n, max: size + 8192n });
      fc.assert(
        fc.property(fc.oneof(u64, near), fc.oneof(u64, near), (offset, sz) => {
          const ok = sz > 0n && offset + sz <= size;
          assert.equal(reg.check('m', offset, sz) === undefined, ok);
          if (ok) assert.equal(reg.translate('m', offset, sz), reg.get('m')!.uaddr + offset);
        }),
      );
    });

    it('reads and writes are bounds-checked the same way', () => {
      assert.throws(() => reg.read('m', size - 2n, 3), memoryError('OUT_OF_BOUNDS', 'size'));
      assert.throws(() => reg.write('m', size, Uint8Array.of(1)), memoryError('OUT_OF_BOUNDS', 'offset'));
      assert.throws(() => reg.read('m', 0n, 0), memoryError('OUT_OF_BOUNDS', 'size'));
      assert.throws(() => reg.read('m', 0n, 2 ** 31), memoryError('OUT_OF_BOUNDS', 'size'));
      assert.throws(() => reg.read('m', 0n, 1.5), memoryError('OUT_OF_BOUNDS', 'size'));
      reg.write('m', size - 3n, Uint8Array.of(7, 8, 9));
      assert.deepEqual([...reg.read('m', size - 3n, 3)], [7, 8, 9]);
    });

    it('unknown ids are NOT_FOUND', () => {
      assert.equal(reg.check('nope', 0n, 1n)?.code, 'NOT_FOUND');
      assert.throws(() => reg.translate('nope', 0n, 1n), memoryError('NOT_FOUND', 'id'));
      assert.throws(() => reg.read('nope', 0n, 1), memoryError('NOT_FOUND', 'id'));
      assert.throws(() => reg.retain('nope'), memoryError('NOT_FOUND', 'id'));
      assert.throws(() => reg.release('nope'), memoryError('NOT_FOUND', 'id'));
    });
  });

  describe('retain, release, closeAll', () => {
    it('release is refused while retained, allowed once unretained', () => {
      reg.create({ id: 'r', size: 4096n, kind: 'memfd' });
      reg.retain('r');
      reg.retain('r');
      assert.equal(reg.get('r')!.mappedEntries, 2);
      assert.throws(() => reg.release('r'), memoryError('IN_USE', 'id'));
      reg.unretain('r');
      assert.throws(() => reg.release('r'), memoryError('IN_USE', 'id'));
      reg.unretain('r');
      assert.throws(() => reg.unretain('r'), /no mapped entries/);
      reg.release('r');
      assert.equal(reg.get('r'), undefined);
      assert.deepEqual(reg.list(), []);
      assert.throws(() => reg.read('r', 0n, 1), memoryError('NOT_FOUND'));
    });

    it('release unmaps: the address range is gone from /proc/self/maps', () => {
      const info = reg.create({ id: 'u', size: 8192n });
      assert.ok(mapped(info.uaddr), 'mapped after create');
      reg.release('u');
      assert.equal(mapped(info.uaddr), false);
    });

    it('get and list return snapshots that do not alias the registry', () => {
      reg.create({ id: 's', size: 4096n, kind: 'memfd' });
      const snap = reg.get('s')!;
      snap.mappedEntries = 99;
      snap.size = 1n << 40n;
      assert.equal(reg.get('s')!.mappedEntries, 0);
      assert.throws(() => reg.translate('s', 4096n, 1n), memoryError('OUT_OF_BOUNDS'));
      reg.list()[0]!.mappedEntries = 5;
      reg.release('s');
    });

    it('closeAll unmaps everything, even retained memory', () => {
      const a = reg.create({ id: 'a', size: 4096n, kind: 'memfd' });
      const b = reg.create({ id: 'b', size: 4096n });
      reg.retain('a');
      reg.closeAll();
      assert.deepEqual(reg.list(), []);
      assert.equal(mapped(a.uaddr), false);
      assert.equal(mapped(b.uaddr), false);
      assert.ok(fs.existsSync(b.path));
    });
  });
});

function safeReadlink(p: string): string {
  try {
    return fs.readlinkSync(p);
  } catch {
    return '';
  }
}

/** Whether `addr` lies in one of this process's mappings. */
function mapped(addr: bigint): boolean {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .some((line) => {
      const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
      return m !== null && BigInt(`0x${m[1]}`) <= addr && addr < BigInt(`0x${m[2]}`);
    });
}
