/**
 * The file operations the state store uses, as an interface so tests can make any step fail
 * (ENOSPC on a write, EIO on a sync) and check that the store refuses the change cleanly.
 */
import { constants, writeSync } from 'node:fs';
import fsp from 'node:fs/promises';

export interface StoreFile {
  /**
   * `onCaller`: made on the calling thread, not handed to the thread pool (done when it returns;
   * a failure still comes as a rejection). For a small durable write when nothing else waits for
   * the event loop: the hop to a pool thread and back costs half as much again as the write.
   */
  write(
    buffer: Uint8Array,
    offset: number,
    length: number,
    position: number,
    onCaller?: boolean,
  ): Promise<{ bytesWritten: number }>;
  datasync(): Promise<void>;
  sync(): Promise<void>;
  truncate(length: number): Promise<void>;
  close(): Promise<void>;
}

export interface StoreFs {
  /**
   * `flags` as for fs.open: 'r' (directories, for fsync), 'r+', 'w', 'w+'; files are created 0600.
   * `durableWrites`: opened O_DSYNC, so that a write returns only once its data (and the file size
   * it needs) is on disk, as write + fdatasync would leave it: one system call instead of two.
   */
  open(path: string, flags: OpenFlags, opts?: { durableWrites?: boolean }): Promise<StoreFile>;
  /** Rejects with code ENOENT when the file does not exist. */
  readFile(path: string): Promise<Buffer>;
  rename(from: string, to: string): Promise<void>;
  unlink(path: string): Promise<void>;
  readdir(path: string): Promise<string[]>;
  /** Creates the directory (0700) unless it exists. */
  mkdir(path: string): Promise<void>;
  /** Takes away any access of group and others from an existing file. */
  restrict(path: string): Promise<void>;
}

export type OpenFlags = 'r' | 'r+' | 'w' | 'w+';

const OPEN_FLAGS: Record<OpenFlags, number> = {
  r: constants.O_RDONLY,
  'r+': constants.O_RDWR,
  w: constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC,
  'w+': constants.O_RDWR | constants.O_CREAT | constants.O_TRUNC,
};

/** `file` as a StoreFile: its writes on the calling thread when asked. */
function storeFileOf(file: fsp.FileHandle): StoreFile {
  return {
    write: (buffer, offset, length, position, onCaller) => {
      if (!onCaller) return file.write(buffer, offset, length, position);
      try {
        return Promise.resolve({ bytesWritten: writeSync(file.fd, buffer, offset, length, position) });
      } catch (e) {
        return Promise.reject(e as Error);
      }
    },
    datasync: () => file.datasync(),
    sync: () => file.sync(),
    truncate: (length) => file.truncate(length),
    close: () => file.close(),
  };
}

export const nodeStoreFs: StoreFs = {
  open: async (path, flags, opts) =>
    storeFileOf(
      await fsp.open(path, OPEN_FLAGS[flags] | (opts?.durableWrites ? constants.O_DSYNC : 0), 0o600),
    ),
  readFile: (path) => fsp.readFile(path),
  rename: (from, to) => fsp.rename(from, to),
  unlink: (path) => fsp.unlink(path),
  readdir: (path) => fsp.readdir(path),
  mkdir: async (path) => {
    await fsp.mkdir(path, { recursive: true, mode: 0o700 });
  },
  restrict: async (path) => {
    const { mode } = await fsp.stat(path);
    if ((mode & 0o077) !== 0) await fsp.chmod(path, mode & 0o700);
  },
};

export function errnoCode(err: unknown): string | undefined {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}
