/** Backing memory as the agent sees it: shared, file-backed, mmap'd MAP_SHARED into the agent. */

export type MemoryKind = 'memfd' | 'file';

export interface MemoryInfo {
  id: string;
  /** Where the memory lives: the file's real path, or `memfd:<id>` for anonymous memfd memory. */
  path: string;
  kind: MemoryKind;
  /** Whether the agent created the backing (true) or opened an existing file (false). */
  created: boolean;
  size: bigint;
  /** Start of the MAP_SHARED mapping in the agent's address space (the uaddr base). */
  uaddr: bigint;
  /** How many live IOTLB entries (over all devices) point into this memory. */
  mappedEntries: number;
}

export type MemoryErrorCode =
  | 'INVALID_ID' // not an id by the rule of src/id.ts
  | 'ALREADY_EXISTS' // id already registered
  | 'NOT_FOUND' // no memory with that id, or no file at that path under the allowed roots
  | 'PATH_REFUSED' // path outside the allowed roots (after realpath), or not a regular file
  | 'INVALID_SIZE' // size 0, not a page multiple, or too large
  | 'OUT_OF_BOUNDS' // offset/size past the end of the memory
  | 'IN_USE' // release while a device still maps it
  | 'SYSTEM'; // an OS call failed; `errno` names it

export class MemoryError extends Error {
  constructor(
    readonly code: MemoryErrorCode,
    /** What the caller is told. */
    message: string,
    readonly field?: string,
    readonly errno?: string,
    /** What only the agent's log is told (where a path really leads, why it was refused). */
    readonly detail?: string,
  ) {
    super(message);
    this.name = 'MemoryError';
  }
}

export interface CreateMemoryRequest {
  id: string;
  size: bigint;
  /** `file` (default): a sparse file under `<stateDir>/memory/`, which outlives the agent. */
  kind?: MemoryKind;
}

export interface OpenMemoryRequest {
  id: string;
  path: string;
}

/** The agent's registry of backing memory. All methods are synchronous (they are syscalls). */
export interface MemoryRegistry {
  create(req: CreateMemoryRequest): MemoryInfo;
  open(req: OpenMemoryRequest): MemoryInfo;
  get(id: string): MemoryInfo | undefined;
  list(): MemoryInfo[];
  /** Unmaps and forgets the memory; MemoryError IN_USE while mappedEntries > 0. */
  release(id: string): void;
  /** Agent address of `offset` in memory `id`, after checking `[offset, offset+size)` lies inside it. */
  translate(id: string, offset: bigint, size: bigint): bigint;
  /** Bounds check only: undefined when fine, else the MemoryError a translate would throw. */
  check(id: string, offset: bigint, size: bigint): MemoryError | undefined;
  /** Count one more / one fewer IOTLB entry pointing into memory `id`. */
  retain(id: string): void;
  unretain(id: string): void;
  /** Copy bytes out of / into the shared mapping (through the mmap'd pointer, not the fd). */
  read(id: string, offset: bigint, length: number): Buffer;
  write(id: string, offset: bigint, data: Uint8Array): void;
  /** munmap and close everything (agent shutdown). */
  closeAll(): void;
}
