/**
 * The file operations the state store uses, as an interface so tests can make any step fail
 * (ENOSPC on a write, EIO on a sync) and check that the store refuses the change cleanly.
 */
import fsp from 'node:fs/promises';

export interface StoreFile {
  write(
    buffer: Uint8Array,
    offset: number,
    length: number,
    position: number,
  ): Promise<{ bytesWritten: number }>;
  datasync(): Promise<void>;
  sync(): Promise<void>;
  truncate(length: number): Promise<void>;
  close(): Promise<void>;
}

export interface StoreFs {
  /** `flags` as for fs.open: 'r' (directories, for fsync), 'r+', 'w', 'w+'; files are created 0600. */
  open(path: string, flags: string): Promise<StoreFile>;
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

export const nodeStoreFs: StoreFs = {
  open: (path, flags) => fsp.open(path, flags, 0o600),
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
