/**
 * The front-end's memory table as a vhost-user backend keeps it: each region identified by the
 * file behind its fd (fstat dev/inode) plus where it sits, never by fd number or address. QEMU
 * re-sends the whole table with new fd numbers on every hotplug; keying by the file lets a new
 * table be diffed against the old one so that only what really changed reaches the device.
 *
 * It also translates the front-end's virtual addresses (SET_VRING_ADDR speaks in them) to guest
 * physical addresses, which are the device's IOVAs.
 */
import fs from 'node:fs';
import { hex } from '../iotlb/types.ts';
import type { MemoryRegion } from './wire.ts';

/** The file behind a region's fd. */
export interface FileKey {
  dev: bigint;
  ino: bigint;
}

export function fileKeyId(file: FileKey): string {
  return `${file.dev}:${file.ino}`;
}

export interface TableRegion extends MemoryRegion {
  file: FileKey;
}

/** A region new to the table, with the fd it came with: valid only while the diff is handled. */
export interface AddedRegion extends TableRegion {
  fd: number;
}

export interface MemoryDiff {
  added: AddedRegion[];
  removed: TableRegion[];
}

/** A region the front-end described that its fd cannot back. */
export class RegionError extends Error {
  constructor(
    message: string,
    readonly field: string,
  ) {
    super(message);
    this.name = 'RegionError';
  }
}

/** Identity as the device sees it: same file, same place in it, same guest range. */
export function regionIdentity(r: TableRegion): string {
  return `${fileKeyId(r.file)}@${r.mmapOffset}:${r.guestAddr}+${r.size}`;
}

/**
 * fstat's the region's fd: it must be a regular file (memfd, tmpfs, hugetlbfs) that holds all of
 * `[mmapOffset, mmapOffset + size)`; an offset past the end would fault on first DMA.
 */
export function describeRegion(region: MemoryRegion, fd: number, field: string): AddedRegion {
  let st: fs.BigIntStats;
  try {
    st = fs.fstatSync(fd, { bigint: true });
  } catch (e) {
    throw new RegionError(`${field}: cannot fstat its fd: ${(e as Error).message}`, field);
  }
  if (!st.isFile()) throw new RegionError(`${field}: its fd is not a regular file`, field);
  if (region.mmapOffset + region.size > st.size) {
    throw new RegionError(
      `${field}: [${hex(region.mmapOffset)}, +${hex(region.size)}) runs past the end of its file (${hex(st.size)} bytes)`,
      `${field}.mmapOffset`,
    );
  }
  return { ...region, file: { dev: st.dev, ino: st.ino }, fd };
}

function overlaps(a: MemoryRegion, b: MemoryRegion, key: 'guestAddr' | 'userAddr'): boolean {
  return a[key] < b[key] + b.size && b[key] < a[key] + a.size;
}

export class MemoryTable {
  private regions: TableRegion[] = [];

  list(): TableRegion[] {
    return this.regions.map((r) => ({ ...r }));
  }

  get size(): number {
    return this.regions.length;
  }

  /** What replacing the whole table with `next` changes (SET_MEM_TABLE). */
  diffReplace(next: readonly AddedRegion[]): MemoryDiff {
    const old = new Set(this.regions.map(regionIdentity));
    const kept = new Set(next.map(regionIdentity));
    return {
      added: next.filter((r) => !old.has(regionIdentity(r))),
      removed: this.regions.filter((r) => !kept.has(regionIdentity(r))),
    };
  }

  /** Applies a diffReplace result once the device has: the new table, user addresses included. */
  replace(next: readonly TableRegion[]): void {
    this.regions = next.map(({ guestAddr, size, userAddr, mmapOffset, file }) => ({
      guestAddr,
      size,
      userAddr,
      mmapOffset,
      file,
    }));
  }

  /** ADD_MEM_REG: the region may overlap nothing already in the table. */
  checkAdd(region: MemoryRegion, field: string): void {
    for (const key of ['guestAddr', 'userAddr'] as const) {
      const hit = this.regions.find((r) => overlaps(r, region, key));
      if (hit) {
        throw new RegionError(
          `${field}: ${key} [${hex(region[key])}, +${hex(region.size)}) overlaps the region at ${hex(hit[key])}`,
          `${field}.${key}`,
        );
      }
    }
  }

  add(region: TableRegion): void {
    const { guestAddr, size, userAddr, mmapOffset, file } = region;
    this.regions.push({ guestAddr, size, userAddr, mmapOffset, file });
    this.regions.sort((a, b) => (a.guestAddr < b.guestAddr ? -1 : 1));
  }

  /** REM_MEM_REG names a region by guest address, size and user address. */
  find(region: MemoryRegion): TableRegion | undefined {
    return this.regions.find(
      (r) => r.guestAddr === region.guestAddr && r.size === region.size && r.userAddr === region.userAddr,
    );
  }

  remove(region: TableRegion): void {
    this.regions = this.regions.filter((r) => r !== region && regionIdentity(r) !== regionIdentity(region));
  }

  clear(): TableRegion[] {
    const all = this.regions;
    this.regions = [];
    return all;
  }

  /** Front-end virtual address -> guest physical address; undefined when no region holds it. */
  toGuestPhysical(userAddr: bigint): bigint | undefined {
    const r = this.regions.find((x) => userAddr >= x.userAddr && userAddr < x.userAddr + x.size);
    return r === undefined ? undefined : r.guestAddr + (userAddr - r.userAddr);
  }
}
