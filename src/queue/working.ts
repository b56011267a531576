/**
 * The working copy of a device's desired tables while a group is validated: ops are applied as
 * each request is checked (so later requests see what earlier ones did), with an undo log to take
 * back any suffix of them: a request that fails validation, a step the device refused, or the
 * whole group when it cannot be committed.
 */
import type { AddressSpaces } from '../iotlb/address-spaces.ts';
import { sameRegion } from '../iotlb/planner.ts';
import { type IotlbOp, type Mapping, mappingOf } from '../iotlb/types.ts';
import { mappingKey } from '../state/desired.ts';
import { runInTimeSlices } from '../sys/next-turn.ts';

type LogEntry = { added: Mapping } | { removed: Mapping[] };

export type ChangeKind = 'mapped' | 'unmapped';

export class WorkingTables {
  private log: LogEntry[] = [];

  constructor(readonly spaces: AddressSpaces) {}

  /** A point to roll back to. */
  mark(): number {
    return this.log.length;
  }

  /** Applies a valid op (throws IotlbError if it is not). */
  apply(op: IotlbOp): void {
    const removed = this.spaces.apply(op);
    if (op.type === 'update') {
      this.log.push({ added: mappingOf(op.asid, op) });
    } else if (removed.length > 0) {
      const asid = op.asid;
      const mappings = removed.map((r) => mappingOf(asid, r));
      this.log.push({ removed: mappings });
    }
  }

  /** Undoes every op applied since `mark`, newest first. */
  rollback(mark: number): void {
    while (this.log.length > mark) {
      const entry = this.log.pop()!;
      if ('added' in entry) {
        this.spaces.table(entry.added.asid).invalidate(entry.added.iova, entry.added.size);
      } else {
        for (const m of entry.removed) this.spaces.table(m.asid).map(m);
      }
    }
  }

  /**
   * The net effect since `from`: entries to delete (by asid and iova) and entries to put, such that
   * deleting then putting turns the table at `from` into the current one. In time slices.
   */
  async netDelta(from: number): Promise<{ deleted: Mapping[]; put: Mapping[] }> {
    const put = new Map<string, Mapping>();
    const deleted = new Map<string, Mapping>();
    await this.forEachChange(from, this.log.length, (kind, mapping) => {
      const key = mappingKey(mapping.asid, mapping.iova);
      if (kind === 'mapped') {
        const gone = deleted.get(key);
        if (gone && sameRegion(gone, mapping)) deleted.delete(key);
        else put.set(key, mapping);
      } else if (put.has(key)) {
        // What is removed at `key` is what was last put there.
        put.delete(key);
      } else {
        deleted.set(key, mapping);
      }
    });
    return { deleted: [...deleted.values()], put: [...put.values()] };
  }

  /**
   * `fn` on every change between two marks, in the order they happened (for watch events), giving
   * the event loop back every slice. The queue that owns these tables is the only one to change
   * them, and it awaits this: the log stands still meanwhile.
   */
  forEachChange(from: number, to: number, fn: (kind: ChangeKind, mapping: Mapping) => void): Promise<void> {
    return runInTimeSlices(this.changes(from, to, fn));
  }

  /** {@link forEachChange} as steps, for a caller that runs it inside its own sliced computation. */
  *changes(
    from: number,
    to: number,
    fn: (kind: ChangeKind, mapping: Mapping) => void,
  ): Generator<void, void> {
    for (let k = from; k < to; k++) {
      const entry = this.log[k]!;
      if ('added' in entry) fn('mapped', entry.added);
      else for (const m of entry.removed) fn('unmapped', m);
      if ((k - from) % 64 === 63) yield;
    }
  }

  /** Forgets the log: what is applied now is the new base. */
  settle(): void {
    this.log = [];
  }
}
