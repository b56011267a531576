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
 * `clone` is copy-on-write: both copies share every block until one of them changes it.
 */

/** Most entries one block holds; a full block is split in two. */
const BLOCK = 64;
/** A block this small after a removal is merged with a neighbour it fits in. */
const SMALL = BLOCK / 4;

export interface Keyed {
  readonly iova: bigint;
}

export class SortedEntries<T extends Keyed> {
  /** The blocks, in IOVA order; none is empty. */
  private blocks: T[][] = [];
  /** The first IOVA of each block (`blocks[b][0].iova`): the first of the two searches. */
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
    return block[upperIndex(block, iova) - 1];
  }

  /** The entry with the least IOVA > `iova`. */
  above(iova: bigint): T | undefined {
    const b = this.blockAtOrBelow(iova);
    if (b < 0) return this.blocks[0]?.[0];
    const block = this.blocks[b]!;
    const i = upperIndex(block, iova);
    return i < block.length ? block[i] : this.blocks[b + 1]?.[0];
  }

  /** Every entry with `from <= iova <= to`, in order. */
  between(from: bigint, to: bigint): T[] {
    const found: T[] = [];
    let b = Math.max(this.blockAtOrBelow(from), 0);
    let i = b < this.blocks.length ? lowerIndex(this.blocks[b]!, from) : 0;
    for (; b < this.blocks.length; b++, i = 0) {
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
    let block = blocks[b]!;
    const i = lowerIndex(block, iova);
    if (i < block.length && block[i]!.iova === iova) {
      this.own(b)[i] = entry;
      return;
    }
    this.count++;
    if (i === BLOCK) {
      // Past the end of a full block: a new block after it, so that entries added in order fill
      // their blocks instead of leaving each half empty.
      this.insertBlock(b + 1, [entry]);
      return;
    }
    block = this.own(b);
    if (i === block.length) block.push(entry);
    else block.splice(i, 0, entry);
    if (i === 0) this.firsts[b] = iova;
    if (block.length > BLOCK) this.insertBlock(b + 1, block.splice(BLOCK >> 1));
  }

  /** Removes and returns the entry at `iova`, if `keep` (given it) does not say to keep it. */
  delete(iova: bigint, keep?: (held: T) => boolean): T | undefined {
    const b = this.blockAtOrBelow(iova);
    if (b < 0) return undefined;
    const i = lowerIndex(this.blocks[b]!, iova);
    const held = this.blocks[b]![i];
    if (held === undefined || held.iova !== iova || keep?.(held)) return undefined;
    this.count--;
    const block = this.own(b);
    if (block.length === 1) {
      this.removeBlocks(b, 1);
      return held;
    }
    if (i === 0) {
      block.shift();
      this.firsts[b] = block[0]!.iova;
    } else if (i === block.length - 1) block.pop();
    else block.splice(i, 1);
    if (block.length < SMALL) this.mergeIfSmall(b);
    return held;
  }

  /** Every entry, in order, in a new array. */
  values(): T[] {
    return this.blocks.length === 1 ? this.blocks[0]!.slice() : this.blocks.flat();
  }

  clear(): void {
    this.blocks = [];
    this.firsts = [];
    this.owned = [];
    this.count = 0;
  }

  /** An independent copy; the blocks are shared until either side changes one. */
  clone(): SortedEntries<T> {
    const copy = new SortedEntries<T>();
    copy.blocks = this.blocks.slice();
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

  /** Block `b`, copied first when it is shared with a clone. */
  private own(b: number): T[] {
    if (this.owned[b]) return this.blocks[b]!;
    const copy = this.blocks[b]!.slice();
    this.blocks[b] = copy;
    this.owned[b] = true;
    return copy;
  }

  private insertBlock(b: number, block: T[]): void {
    this.blocks.splice(b, 0, block);
    this.firsts.splice(b, 0, block[0]!.iova);
    this.owned.splice(b, 0, true);
  }

  private removeBlocks(b: number, n: number): void {
    this.blocks.splice(b, n);
    this.firsts.splice(b, n);
    this.owned.splice(b, n);
  }

  /** Merges small block `b` into a neighbour when both fit in one block. */
  private mergeIfSmall(b: number): void {
    const blocks = this.blocks;
    const left = b > 0 && blocks[b - 1]!.length + blocks[b]!.length <= BLOCK ? b - 1 : -1;
    const at =
      left >= 0 ? left : b + 1 < blocks.length && blocks[b]!.length + blocks[b + 1]!.length <= BLOCK ? b : -1;
    if (at < 0) return;
    const merged = this.own(at);
    for (const entry of blocks[at + 1]!) merged.push(entry);
    this.removeBlocks(at + 1, 1);
  }
}

/** The index of the first entry of `block` whose IOVA is >= `iova` (block.length if none). */
function lowerIndex<T extends Keyed>(block: readonly T[], iova: bigint): number {
  let hi = block.length;
  if (hi === 0 || block[0]!.iova >= iova) return 0;
  if (block[hi - 1]!.iova < iova) return hi;
  let lo = 0;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (block[mid]!.iova < iova) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** The index of the first entry of `block` whose IOVA is > `iova` (block.length if none). */
function upperIndex<T extends Keyed>(block: readonly T[], iova: bigint): number {
  let hi = block.length;
  if (hi === 0 || block[hi - 1]!.iova <= iova) return hi;
  if (block[0]!.iova > iova) return 0;
  let lo = 0;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (block[mid]!.iova <= iova) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
