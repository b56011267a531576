/**
 * The ops that turn what a device has into what is wanted, per address space, with the same
 * planner as set-mem-table (diffSorted). Used by reconciliation and by compensation after a device
 * refused an op mid-group.
 */
import { diffSorted } from '../iotlb/planner.ts';
import type { IotlbOp, Mapping, Region } from '../iotlb/types.ts';

const byIova = (a: Region, b: Region): number => (a.iova < b.iova ? -1 : a.iova > b.iova ? 1 : 0);

function byAsid(mappings: readonly Mapping[]): Map<number, Region[]> {
  const out = new Map<number, Region[]>();
  for (const { asid, ...region } of mappings) {
    const list = out.get(asid);
    if (list) list.push(region);
    else out.set(asid, [region]);
  }
  for (const list of out.values()) list.sort(byIova);
  return out;
}

/** Plans `actual` → `desired`; both may be in any order. */
export function planConverge(actual: readonly Mapping[], desired: readonly Mapping[]): IotlbOp[] {
  const have = byAsid(actual);
  const want = byAsid(desired);
  const asids = [...new Set([...have.keys(), ...want.keys()])].sort((a, b) => a - b);
  return asids.flatMap((asid) => diffSorted(have.get(asid) ?? [], want.get(asid) ?? [], asid).ops);
}
