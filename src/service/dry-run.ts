/** A set-mem-table dry run: planned against the acknowledged desired state; changes nothing. */
import type { Region } from '../iotlb/types.ts';
import type { SetMemTableResult } from '../core/types.ts';
import { type DeviceFacts, pinPageSize } from '../device/types.ts';
import { AddressSpaces } from '../iotlb/address-spaces.ts';
import { type Quota, quotaError } from '../queue/quota.ts';
import { applySetMemTable, type MemoryLookup } from '../queue/validate.ts';
import { WorkingTables } from '../queue/working.ts';
import { type DeviceState, sortedMappings } from '../state/desired.ts';

export async function dryRunSetMemTable(
  facts: DeviceFacts,
  desired: DeviceState | undefined,
  memory: MemoryLookup,
  quota: Quota,
  asid: number,
  regions: Region[],
): Promise<SetMemTableResult> {
  const spaces = new AddressSpaces(facts.asNum, facts.iovaRange, pinPageSize(facts));
  if (spaces.checkAsid(asid) === undefined) {
    for (const m of sortedMappings(desired, asid)) spaces.apply({ type: 'update', ...m });
  }
  // The quota counts every address space; only `asid`'s table is loaded.
  const others = { bytes: 0n, entries: 0 };
  for (const m of desired?.mappings.values() ?? []) {
    if (m.asid === asid) continue;
    others.bytes += m.size;
    others.entries++;
  }
  const usage = () => ({ bytes: others.bytes + spaces.bytes, entries: others.entries + spaces.count });
  const before = usage();
  const result = await applySetMemTable(new WorkingTables(spaces), memory, asid, regions);
  const over = quotaError(facts.name, quota, before, usage());
  if (over) throw over;
  return { ...result, dryRun: true };
}
