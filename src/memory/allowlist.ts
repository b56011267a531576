/**
 * Path policy for backing memory opened by path: the file must really (after every symlink)
 * live under an allowed root, be a regular file, and still be that file once opened.
 *
 * What a refusal tells the caller: nothing about what lies outside the roots (whether it exists,
 * where a symlink leads, which kernel object, and so no pid from /proc/self). A path under the
 * roots, which the caller may use anyway, gets the specific reason: no such file (NOT_FOUND), a
 * directory, hard links. The whole story goes to the agent's log as the error's `detail`.
 */
import fs from 'node:fs';
import path from 'node:path';
import { MemoryError } from './types.ts';

/** Where guest memory files may live unless configured otherwise. */
export function defaultAllowedRoots(stateDir: string): string[] {
  return ['/dev/hugepages', '/dev/shm/vdpa-mapd', memoryDir(stateDir)];
}

/** Files the agent creates live here; the rest of the state directory stays unmappable. */
export function memoryDir(stateDir: string): string {
  return path.join(path.resolve(stateDir), 'memory');
}

/** Kernel pseudo filesystems: their "regular" files are kernel objects (/proc/self/mem, PCI BARs). */
const REFUSED_TOP_DIRS = new Set(['proc', 'sys']);
const PROC_SUPER_MAGIC = 0x9fa0n;
const SYSFS_MAGIC = 0x62656572n;

/** A file that passed the policy, opened O_RDWR; the caller owns (and must close) `fd`. */
export interface AllowedFile {
  fd: number;
  /** The file's real path. */
  path: string;
  size: bigint;
}

/** A refusal whose reason may be told (it concerns a file under the roots, or the path's text). */
function refuse(why: string): never {
  throw new MemoryError('PATH_REFUSED', why, 'path');
}

/** A refusal that tells the caller only that the path is not allowed; `detail` goes to the log. */
function refuseOutside(p: string, detail: string): never {
  throw new MemoryError(
    'PATH_REFUSED',
    `${p} is not a regular file under the allowed roots`,
    'path',
    undefined,
    `${p} ${detail}`,
  );
}

function segments(absPath: string): string[] {
  return absPath === '/' ? [] : absPath.split('/').slice(1);
}

/** Whether `real` is strictly below `root`, comparing whole path segments. */
function isUnder(real: string, root: string): boolean {
  const r = segments(root);
  const p = segments(real);
  return p.length > r.length && r.every((s, i) => p[i] === s);
}

function fileType(st: fs.BigIntStats): string {
  if (st.isDirectory()) return 'a directory';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  return 'not a regular file';
}

export class PathAllowlist {
  readonly roots: readonly string[];

  constructor(roots: readonly string[]) {
    for (const root of roots) {
      if (!path.isAbsolute(root)) throw new Error(`allowed root must be absolute: ${root}`);
    }
    this.roots = [...roots];
  }

  /**
   * Resolves `p` and opens it read-write after checking the policy. The checks are repeated on
   * the open fd (same dev/ino as the path checked, and the kernel's own path for the fd), so a
   * symlink or directory swapped in between cannot redirect the open outside the roots.
   */
  open(p: string): AllowedFile {
    if (!path.isAbsolute(p)) refuse(`path must be absolute: ${p}`);
    const real = this.resolve(p);
    const st = statReal(real);
    // Checked before open: opening a device or FIFO can itself have side effects.
    if (!st.isFile()) refuse(`${p} is ${fileType(st)}, not a regular file`);

    const fd = openFile(real);
    try {
      const fst = fs.fstatSync(fd, { bigint: true });
      const fdPath = fs.readlinkSync(`/proc/self/fd/${fd}`);
      if (!fst.isFile() || fst.dev !== st.dev || fst.ino !== st.ino || fdPath !== real) {
        refuse(`${p} changed while being opened`);
      }
      this.checkFile(p, real, fd, fst);
      return { fd, path: real, size: fst.size };
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /** realpath + root check; returns the real path. */
  private resolve(p: string): string {
    let real: string;
    try {
      real = fs.realpathSync(p);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (this.isMissingUnderRoots(p)) throw new MemoryError('NOT_FOUND', `${p}: no such file`, 'path');
      refuseOutside(p, `cannot be resolved: ${code}`);
    }
    if (REFUSED_TOP_DIRS.has(segments(real)[0] ?? ''))
      refuseOutside(p, `resolves to ${real}, in a kernel filesystem`);
    if (!this.realRoots().some((root) => isUnder(real, root))) {
      refuseOutside(p, `resolves to ${real}, which is not under an allowed root (${this.roots.join(', ')})`);
    }
    return real;
  }

  /**
   * Nothing at all is at `p` (not even a dangling symlink, whose target may be outside) and its
   * directory really is a root or under one: the caller learns only what it may list anyway.
   */
  private isMissingUnderRoots(p: string): boolean {
    try {
      fs.lstatSync(p);
      return false;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ENOTDIR') return false;
    }
    let dir: string;
    try {
      dir = fs.realpathSync(path.dirname(p));
    } catch {
      return false;
    }
    return this.realRoots().some((root) => dir === root || isUnder(dir, root));
  }

  /** Roots are resolved on each check (they may be created after start); missing ones allow nothing. */
  private realRoots(): string[] {
    const out: string[] = [];
    for (const root of this.roots) {
      try {
        out.push(fs.realpathSync(root));
      } catch {
        // a root that does not exist contains no file
      }
    }
    return out;
  }

  private checkFile(p: string, real: string, fd: number, st: fs.BigIntStats): void {
    // /proc/self/fd/N follows to the open file itself, so this is the fd's filesystem.
    const fsType = fs.statfsSync(`/proc/self/fd/${fd}`, { bigint: true }).type;
    if (fsType === PROC_SUPER_MAGIC || fsType === SYSFS_MAGIC)
      refuseOutside(p, `(${real}) is in a kernel filesystem`);
    // Another name elsewhere would let a file outside the roots be reached from inside them.
    if (st.nlink !== 1n) refuse(`${p} has ${st.nlink} hard links; exactly 1 is required`);
  }
}

function statReal(real: string): fs.BigIntStats {
  try {
    return fs.statSync(real, { bigint: true });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') refuse(`${real} changed while being opened`);
    throw new MemoryError('SYSTEM', `cannot stat ${real}: ${code}`, 'path', code);
  }
}

function openFile(real: string): number {
  const { O_RDWR, O_NOFOLLOW, O_NONBLOCK } = fs.constants;
  try {
    // O_NOFOLLOW: the last component was just resolved, a symlink there now means a swap.
    // O_NONBLOCK: never hang on a FIFO swapped in after the type check. Node adds O_CLOEXEC.
    return fs.openSync(real, O_RDWR | O_NOFOLLOW | O_NONBLOCK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ELOOP' || code === 'ENOENT') refuse(`${real} changed while being opened`);
    throw new MemoryError('SYSTEM', `cannot open ${real}: ${code}`, 'path', code);
  }
}
