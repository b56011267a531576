/**
 * The ordered store under IovaTable: entries sorted by their first IOVA, at most one per IOVA, in
 * short sorted blocks (a two-level sorted array). A lookup is two binary searches on bigints
 * compared in place, an insert or a removal one splice in a block of at most BLOCK entries, and
 * the usual patterns (entries added in IOVA order, then removed in IOVA order) touch one block
 * at the end or the start. Written here because the generic ordered maps measured 1.7 to 3
 * times slower on these operations (sorted-btree calls a comparator per comparison and walks a
 * callback per removal; @js-sdsl/ordered-map allocates an iterator per lookup and a Proxy per
 * entry read; splaytree has no greatest-key-below lookup), and the tables were most of the cost
 * of a simulated device's apply.
 *
 * A removal from the front of a block (the usual one) only moves the block's head: arrays are
 * slow to shift. `clone` is copy-on-write: both copies share every block until one changes it.
 */

/** Most entries one block holds; a full block is split in two. */
const BLOCK = 64;
/** A block this small after a removal is merged with a neighbour it fits in. */
const SMALL = BLOCK / 4;

export interface Keyed {
  readonly iova: bigint;
}

export class SortedEntries<T extends Keyed> {
  /**
   * The blocks, in IOVA order. Block b holds its entries at `heads[b]` and after; the slots before
   * are free (undefined). None is empty.
   */
  private blocks: (T | undefined)[][] = [];
  /** Where each block's entries start. */
  private heads: number[] = [];
  /** The first IOVA of each block: the first of the two searches. */
  private firsts: bigint[] = [];
  /** Which blocks this store may change in place; a block it shares with a clone is copied first. */
  private owned: boolean[] = [];
  private count = 0;

  get size(): number {
    return this.count;
  }

  /** The entry with the greatest IOVA <= `iova`. */
  atOrBelow(iova: bigint): T | undefined {
    const b = this.blockAtOrBelow(iova);
    if (b < 0) return undefined;
    const block = this.blocks[b]!;
    return block[upperIndex(block, this.heads[b]!, iova) - 1];
  }

  /** The entry with the least IOVA > `iova`. */
  above(iova: bigint): T | undefined {
    const b = this.blockAtOrBelow(iova);
    if (b < 0) return this.firstOf(0);
    const block = this.blocks[b]!;
    const i = upperIndex(block, this.heads[b]!, iova);
    return i < block.length ? block[i] : this.firstOf(b + 1);
  }

  /** Every entry with `from <= iova <= to`, in order. */
  between(from: bigint, to: bigint): T[] {
    const found: T[] = [];
    let b = Math.max(this.blockAtOrBelow(from), 0);
    if (b >= this.blocks.length) return found;
    let i = lowerIndex(this.blocks[b]!, this.heads[b]!, from);
    for (; b < this.blocks.length; b++, i = this.heads[b] ?? 0) {
      const block = this.blocks[b]!;
      for (; i < block.length; i++) {
        const entry = block[i]!;
        if (entry.iova > to) return found;
        found.push(entry);
      }
    }
    return found;
  }

  /** Adds `entry`, replacing the one with the same IOVA if there is one. */
  set(entry: T): void {
    const iova = entry.iova;
    const blocks = this.blocks;
    if (blocks.length === 0) {
      this.insertBlock(0, [entry]);
      this.count++;
      return;
    }
    const b = Math.max(this.blockAtOrBelow(iova), 0);
    const head = this.heads[b]!;
    let block = blocks[b]!;
    const i = lowerIndex(block, head, iova);
    if (i < block.length && block[i]!.iova === iova) {
      this.own(b)[i] = entry;
      return;
    }
    this.count++;
    if (i === block.length && block.length - head >= BLOCK) {
      // Past the end of a full block: a new block after it, so that entries added in order fill
      // their blocks instead of leaving each half empty.
      this.insertBlock(b + 1, [entry]);
      return;
    }
    block = this.own(b);
    if (i === head && head > 0) {
      // Before the first entry, into a free slot.
      block[head - 1] = entry;
      this.heads[b] = head - 1;
      this.firsts[b] = iova;
      return;
    }
    if (i === block.length) block.push(entry);
    else block.splice(i, 0, entry);
    if (i === head) this.firsts[b] = iova;
    if (block.length - head > BLOCK) {
      if (head > 0) this.compact(b);
      this.insertBlock(b + 1, block.splice(BLOCK >> 1) as T[]);
    }
  }

  /** Removes and returns the entry at `iova`, if `keep` (given it) does not say to keep it. */
  delete(iova: bigint, keep?: (held: T) => boolean): T | undefined {
    const b = this.blockAtOrBelow(iova);
    if (b < 0) return undefined;
    const head = this.heads[b]!;
    const i = lowerIndex(this.blocks[b]!, head, iova);
    const held = this.blocks[b]![i];
    if (held === undefined || held.iova !== iova || keep?.(held)) return undefined;
    this.count--;
    const block = this.own(b);
    const live = block.length - head;
    if (live === 1) {
      this.removeBlocks(b, 1);
      return held;
    }
    if (i === head) {
      block[head] = undefined;
      this.heads[b] = head + 1;
      this.firsts[b] = block[head + 1]!.iova;
      // A block's worth of free slots is given back, once per as many removals.
      if (head + 1 >= BLOCK) this.compact(b);
    } else if (i === block.length - 1) block.pop();
    else block.splice(i, 1);
    if (live - 1 < SMALL) this.mergeIfSmall(b);
    return held;
  }

  /** Every entry, in order, in a new array. */
  values(): T[] {
    const all: T[] = [];
    for (let b = 0; b < this.blocks.length; b++) this.copyBlock(b, all);
    return all;
  }

  /**
   * {@link values}, pausing after every block (at most BLOCK entries) for a caller running in
   * time slices. The store must not change while the copy is under way.
   */
  *valuesInSteps(): Generator<void, T[]> {
    const all: T[] = [];
    for (let b = 0; b < this.blocks.length; b++) {
      this.copyBlock(b, all);
      yield;
    }
    return all;
  }

  private copyBlock(b: number, to: T[]): void {
    const block = this.blocks[b]!;
    for (let i = this.heads[b]!; i < block.length; i++) to.push(block[i]!);
  }

  clear(): void {
    this.blocks = [];
    this.heads = [];
    this.firsts = [];
    this.owned = [];
    this.count = 0;
  }

  /** An independent copy; the blocks are shared until either side changes one. */
  clone(): SortedEntries<T> {
    const copy = new SortedEntries<T>();
    copy.blocks = this.blocks.slice();
    copy.heads = this.heads.slice();
    copy.firsts = this.firsts.slice();
    this.owned.fill(false);
    copy.owned = this.owned.slice();
    copy.count = this.count;
    return copy;
  }

  /** The index of the last block whose first IOVA is <= `iova`, or -1. */
  private blockAtOrBelow(iova: bigint): number {
    const firsts = this.firsts;
    let hi = firsts.length;
    // At the end or the start first: where entries added or removed in IOVA order are.
    if (hi === 0 || firsts[hi - 1]! <= iova) return hi - 1;
    if (firsts[0]! > iova) return -1;
    let lo = 0;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (firsts[mid]! <= iova) lo = mid + 1;
      else hi = mid;
    }
    return lo - 1;
  }

  private firstOf(b: number): T | undefined {
    return b < this.blocks.length ? this.blocks[b]![this.heads[b]!] : undefined;
  }

  /** Block `b`, copied first (slot for slot: indexes into it stay valid) when it is shared with a clone. */
  private own(b: number): (T | undefined)[] {
    if (this.owned[b]) return this.blocks[b]!;
    const copy = this.blocks[b]!.slice();
    this.blocks[b] = copy;
    this.owned[b] = true;
    return copy;
  }

  /** Drops the free slots of owned block `b`. */
  private compact(b: number): void {
    this.blocks[b]!.splice(0, this.heads[b]);
    this.heads[b] = 0;
  }

  private insertBlock(b: number, block: T[]): void {
    this.blocks.splice(b, 0, block);
    this.heads.splice(b, 0, 0);
    this.firsts.splice(b, 0, block[0]!.iova);
    this.owned.splice(b, 0, true);
  }

  private removeBlocks(b: number, n: number): void {
    this.blocks.splice(b, n);
    this.heads.splice(b, n);
    this.firsts.splice(b, n);
    this.owned.splice(b, n);
  }

  private live(b: number): number {
    return this.blocks[b]!.length - this.heads[b]!;
  }

  /** Merges small block `b` into a neighbour when both fit in one block. */
  private mergeIfSmall(b: number): void {
    const left = b > 0 && this.live(b - 1) + this.live(b) <= BLOCK ? b - 1 : -1;
    const at =
      left >= 0 ? left : b + 1 < this.blocks.length && this.live(b) + this.live(b + 1) <= BLOCK ? b : -1;
    if (at < 0) return;
    const merged = this.own(at);
    const next = this.blocks[at + 1]!;
    for (let i = this.heads[at + 1]!; i < next.length; i++) merged.push(next[i]);
    this.removeBlocks(at + 1, 1);
  }
}

/** The index of the first entry of `block` from `head` on whose IOVA is >= `iova` (block.length if none). */
function lowerIndex<T extends Keyed>(block: readonly (T | undefined)[], head: number, iova: bigint): number {
  let hi = block.length;
  if (hi === head || block[head]!.iova >= iova) return head;
  if (block[hi - 1]!.iova < iova) return hi;
  let lo = head;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (block[mid]!.iova < iova) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The index of the first entry of `block` from `head` on whose IOVA is > `iova` (block.length if none). */
function upperIndex<T extends Keyed>(block: readonly (T | undefined)[], head: number, iova: bigint): number {
  let hi = block.length;
  if (hi === head || block[hi - 1]!.iova <= iova) return hi;
  if (block[head]!.iova > iova) return head;
  let lo = head;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (block[mid]!.iova <= iova) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
