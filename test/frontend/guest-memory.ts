/**
 * "Guest memory" of a test front-end: memfd regions mapped MAP_SHARED into this process, each at a
 * guest physical range (the addresses descriptors speak in) and at this process's virtual address
 * (what the memory table's userspace_addr and SET_VRING_ADDR speak in). Every access is checked to
 * lie inside one region: an address outside would crash the process, not fail a test.
 */
import fs from 'node:fs';
import {
  copyFromAddress,
  copyToAddress,
  ftruncate,
  MAP_SHARED,
  MFD_CLOEXEC,
  memfdCreate,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
} from '../../src/sys/libc.ts';
import type { MemoryRegion } from '../../src/vhost-user/wire.ts';

export interface GuestRegion extends MemoryRegion {
  /** The memfd backing it (offset 0 of the file is guestAddr). */
  fd: number;
}

export class GuestMemory {
  private readonly list: GuestRegion[] = [];

  get regions(): readonly GuestRegion[] {
    return this.list;
  }

  /** The first guest physical address above every region. */
  get top(): bigint {
    let top = 0n;
    for (const r of this.list) if (r.guestAddr + r.size > top) top = r.guestAddr + r.size;
    return top;
  }

  /** A new memfd of `size` bytes mapped at guest physical `guestAddr`; it must overlap no region. */
  add(guestAddr: bigint, size: bigint, name: string): GuestRegion {
    if (size <= 0n) throw new RangeError(`guest memory region ${name}: size must be positive`);
    for (const r of this.list) {
      if (guestAddr < r.guestAddr + r.size && r.guestAddr < guestAddr + size) {
        throw new RangeError(`guest memory region ${name} overlaps the one at 0x${r.guestAddr.toString(16)}`);
      }
    }
    const fd = memfdCreate(name, MFD_CLOEXEC);
    try {
      ftruncate(fd, size);
      const userAddr = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
      const region = { guestAddr, size, userAddr, mmapOffset: 0n, fd };
      this.list.push(region);
      return region;
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /**
   * This process's address of guest physical `[gpa, gpa+length)`, which must lie in one region.
   * The front-end is the VMM, so it is also the address SET_VRING_ADDR speaks in.
   */
  address(gpa: bigint, length: number): bigint {
    const r = this.list.find((x) => gpa >= x.guestAddr && gpa + BigInt(length) <= x.guestAddr + x.size);
    if (r === undefined) {
      throw new RangeError(`guest physical [0x${gpa.toString(16)}, +${length}) is in no guest memory region`);
    }
    return r.userAddr + (gpa - r.guestAddr);
  }

  /**
   * Where guest physical `[gpa, gpa+length)` is in this process, piece by piece: a buffer may run
   * from one region into the next when they are adjacent in guest physical space.
   */
  pieces(gpa: bigint, length: number): { addr: bigint; at: number; length: number }[] {
    const out: { addr: bigint; at: number; length: number }[] = [];
    let at = 0;
    while (at < length) {
      const cur = gpa + BigInt(at);
      const r = this.list.find((x) => cur >= x.guestAddr && cur < x.guestAddr + x.size);
      if (r === undefined) {
        throw new RangeError(
          `guest physical [0x${gpa.toString(16)}, +${length}): 0x${cur.toString(16)} is in no region`,
        );
      }
      const n = Math.min(length - at, Number(r.guestAddr + r.size - cur));
      out.push({ addr: r.userAddr + (cur - r.guestAddr), at, length: n });
      at += n;
    }
    return out;
  }

  write(gpa: bigint, data: Uint8Array): void {
    for (const p of this.pieces(gpa, data.byteLength)) {
      copyToAddress(p.addr, data.subarray(p.at, p.at + p.length));
    }
  }

  read(gpa: bigint, length: number): Buffer {
    return Buffer.concat(this.pieces(gpa, length).map((p) => copyFromAddress(p.addr, p.length)));
  }

  /** Unmaps and closes one region. */
  remove(region: GuestRegion): void {
    const i = this.list.indexOf(region);
    if (i < 0) throw new RangeError(`no guest memory region at 0x${region.guestAddr.toString(16)}`);
    this.list.splice(i, 1);
    munmap(region.userAddr, region.size);
    fs.closeSync(region.fd);
  }

  /** Unmaps and closes every region. */
  free(): void {
    for (const r of [...this.list]) this.remove(r);
  }
}
