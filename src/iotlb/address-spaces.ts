/**
 * All address spaces of one device: one IovaTable per asid, sharing the device's IOVA range.
 * Applies IotlbOps with the kernel's checks (asid first, as vhost_vdpa_process_iotlb_msg does).
 */
import { IovaTable, violation } from './table.ts';
import {
  FULL_IOVA_RANGE,
  type IotlbOp,
  type IotlbViolation,
  type IovaRange,
  type Mapping,
  type Region,
  IotlbError,
} from './types.ts';

export class AddressSpaces {
  private readonly tables: IovaTable[];

  constructor(
    readonly asNum = 1,
    readonly range: IovaRange = FULL_IOVA_RANGE,
    /** The page size of a pinning (PA-mode) parent; undefined in VA mode (see IovaTable). */
    readonly pinPageSize?: bigint,
  ) {
    if (!Number.isInteger(asNum) || asNum < 1) throw new RangeError(`asNum must be >= 1, got ${asNum}`);
    this.tables = Array.from({ length: asNum }, (_, asid) => new IovaTable(asid, range, pinPageSize));
  }

  /** Violation for an asid the device does not have (vhost_vdpa_find_alloc_as: asid >= nas). */
  checkAsid(asid: number): IotlbViolation | undefined {
    if (Number.isInteger(asid) && asid >= 0 && asid < this.asNum) return undefined;
    return violation(
      'BAD_ASID',
      `asid ${asid} is out of range: the device has ${this.asNum} address space(s)`,
    );
  }

  table(asid: number): IovaTable {
    const bad = this.checkAsid(asid);
    if (bad) throw new IotlbError(bad);
    return this.tables[asid]!;
  }

  /** What `apply(op)` would refuse, or undefined. INVALIDATE of an empty range is not an error. */
  check(op: IotlbOp): IotlbViolation | undefined {
    const bad = this.checkAsid(op.asid);
    if (bad) return bad;
    return op.type === 'update' ? this.tables[op.asid]!.checkMap(op) : undefined;
  }

  /** Applies one op; returns the entries an INVALIDATE removed (none for an UPDATE). */
  apply(op: IotlbOp): Region[] {
    const table = this.table(op.asid);
    if (op.type === 'update') {
      table.map(op);
      return [];
    }
    return table.invalidate(op.iova, op.size);
  }

  /** Every entry, ordered by asid then iova. */
  mappings(): Mapping[] {
    const all: Mapping[] = [];
    for (const table of this.tables) {
      for (const r of table.entries()) all.push({ ...r, asid: table.asid });
    }
    return all;
  }

  get count(): number {
    return this.tables.reduce((n, t) => n + t.count, 0);
  }

  get bytes(): bigint {
    return this.tables.reduce((n, t) => n + t.bytes, 0n);
  }

  clear(): Mapping[] {
    const all = this.mappings();
    for (const table of this.tables) table.clear();
    return all;
  }
}
