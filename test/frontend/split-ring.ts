/**
 * The driver's side of one split virtqueue (virtio 1.x, 2.7) laid out in guest memory: descriptor
 * table, avail ring, used ring (page aligned, as the legacy layout has it). One chain in flight at a
 * time, always from descriptor 0: enough for a test front-end, and it keeps the ring trivially
 * checkable. No EVENT_IDX, no indirect descriptors: the device signals every used entry.
 */
import type { GuestMemory } from './guest-memory.ts';

const DESC_SIZE = 16;
const VRING_DESC_F_NEXT = 1;
const VRING_DESC_F_WRITE = 2;
const PAGE = 4096n;

/** One buffer of a chain: guest physical address, length, whether the device writes it. */
export interface ChainBuffer {
  addr: bigint;
  length: number;
  deviceWrites: boolean;
}

export interface UsedEntry {
  head: number;
  /** Bytes the device says it wrote into the chain. */
  written: number;
}

export class SplitRing {
  readonly desc: bigint;
  readonly avail: bigint;
  readonly used: bigint;
  /** The first guest physical byte after the ring. */
  readonly end: bigint;
  private availIdx = 0;
  private usedSeen = 0;

  constructor(
    private readonly memory: GuestMemory,
    /** Guest physical address of the descriptor table; page aligned. */
    base: bigint,
    /** Entries, a power of two up to 32768. */
    readonly size: number,
  ) {
    if (!Number.isInteger(size) || size < 2 || size > 32768 || (size & (size - 1)) !== 0) {
      throw new RangeError(`queue size must be a power of two in [2, 32768], not ${size}`);
    }
    if (base % PAGE !== 0n) throw new RangeError('the ring must start on a page');
    this.desc = base;
    this.avail = base + BigInt(DESC_SIZE * size);
    // avail: flags, idx, ring[size], used_event
    const availEnd = this.avail + BigInt(6 + 2 * size);
    this.used = (availEnd + PAGE - 1n) & ~(PAGE - 1n);
    // used: flags, idx, ring[size] of {id, len}, avail_event
    this.end = (this.used + BigInt(6 + 8 * size) + PAGE - 1n) & ~(PAGE - 1n);
    memory.write(base, Buffer.alloc(Number(this.end - base)));
  }

  /** The avail index the next chain gets (also what GET_VRING_BASE should report when idle). */
  get nextAvail(): number {
    return this.availIdx;
  }

  /** Writes the chain at descriptor 0 and publishes it; returns its avail index. */
  publish(buffers: readonly ChainBuffer[]): number {
    if (buffers.length === 0 || buffers.length > this.size) {
      throw new RangeError(`a chain of ${buffers.length} descriptors does not fit a ring of ${this.size}`);
    }
    const table = Buffer.alloc(DESC_SIZE * buffers.length);
    buffers.forEach((b, i) => {
      const at = i * DESC_SIZE;
      const last = i === buffers.length - 1;
      table.writeBigUInt64LE(b.addr, at);
      table.writeUInt32LE(b.length, at + 8);
      table.writeUInt16LE(
        (last ? 0 : VRING_DESC_F_NEXT) | (b.deviceWrites ? VRING_DESC_F_WRITE : 0),
        at + 12,
      );
      table.writeUInt16LE(last ? 0 : i + 1, at + 14);
    });
    this.memory.write(this.desc, table);
    const slot = Buffer.alloc(2);
    slot.writeUInt16LE(0); // head: descriptor 0
    this.memory.write(this.avail + 4n + BigInt(2 * (this.availIdx % this.size)), slot);
    const published = this.availIdx;
    this.availIdx = (this.availIdx + 1) & 0xffff;
    // The index is written after the entry (the memcpy of koffi is a plain store on x86; the
    // device reads avail.idx, then the entry, as virtio 2.7.13 orders it).
    const idx = Buffer.alloc(2);
    idx.writeUInt16LE(this.availIdx);
    this.memory.write(this.avail + 2n, idx);
    return published;
  }

  /** The next used entry, or null when the device has not returned one yet. */
  takeUsed(): UsedEntry | null {
    const usedIdx = this.memory.read(this.used + 2n, 2).readUInt16LE(0);
    if (usedIdx === this.usedSeen) return null;
    const e = this.memory.read(this.used + 4n + BigInt(8 * (this.usedSeen % this.size)), 8);
    this.usedSeen = (this.usedSeen + 1) & 0xffff;
    return { head: e.readUInt32LE(0), written: e.readUInt32LE(4) };
  }
}
