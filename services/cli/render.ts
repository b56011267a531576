/**
 * vdpactl's human output: aligned tables of the API's answers. Values are printed as the API sends
 * them (u64 as 0x hex strings); an absent field prints as `-`.
 */
import type { Answer } from './client.ts';

/** Left-aligned columns, two spaces apart, a header row first; no trailing blanks. */
export function table(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [headers, ...rows].map(line).join('\n');
}

const cell = (value: unknown): string =>
  value === undefined || value === null || value === '' ? '-' : String(value);

export function devicesTable(devices: Answer[]): string {
  return table(
    ['ID', 'KIND', 'IOMMU', 'READY', 'MAPPED_BYTES', 'ENTRIES', 'QUEUE', 'IOVA_RANGE', 'NODE'],
    devices.map((d) => [
      cell(d.id),
      cell(d.kind),
      cell(d.iommu),
      d.ready ? 'yes' : 'no',
      cell(d.mappedBytes),
      cell(d.mappedEntries ?? 0),
      cell(d.queueDepth ?? 0),
      d.iovaRange ? `${d.iovaRange.first}-${d.iovaRange.last}` : '-',
      cell(d.node),
    ]),
  );
}

export function mappingsTable(mappings: Answer[]): string {
  return table(
    ['ASID', 'IOVA', 'SIZE', 'MEMORY', 'OFFSET', 'PERM'],
    mappings.map((m) => [
      cell(m.asid ?? 0),
      cell(m.iova),
      cell(m.size),
      cell(m.memory),
      cell(m.offset),
      cell(m.perm),
    ]),
  );
}

/** IOTLB ops: updates carry the mapping, invalidates only the range. */
export function opsTable(ops: Answer[]): string {
  return table(
    ['OP', 'ASID', 'IOVA', 'SIZE', 'MEMORY', 'OFFSET', 'PERM'],
    ops.map((o) => [
      cell(o.type),
      cell(o.asid ?? 0),
      cell(o.iova),
      cell(o.size),
      cell(o.memory),
      cell(o.offset),
      cell(o.perm),
    ]),
  );
}

export function memoryTable(memory: Answer[]): string {
  return table(
    ['ID', 'KIND', 'SIZE', 'MAPPED_ENTRIES', 'CREATED', 'PATH'],
    memory.map((m) => [
      cell(m.id),
      cell(m.kind),
      cell(m.size),
      cell(m.mappedEntries ?? 0),
      m.created ? 'yes' : 'no',
      cell(m.path),
    ]),
  );
}

/** One watch event per line: `SEQUENCE DEVICE KIND asid=.. iova=.. size=.. memory=.. offset=.. perm=..`. */
export function eventLine(e: Answer): string {
  const m = e.mapping ?? {};
  return [
    cell(e.sequence),
    cell(e.device),
    cell(e.kind),
    `asid=${m.asid ?? 0}`,
    `iova=${cell(m.iova)}`,
    `size=${cell(m.size)}`,
    `memory=${cell(m.memory)}`,
    `offset=${cell(m.offset)}`,
    `perm=${cell(m.perm)}`,
  ].join(' ');
}
