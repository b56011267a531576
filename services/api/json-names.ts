/**
 * protobuf's JSON mapping prints a field by its lowerCamelCase JSON name (`requestId`) and accepts
 * its proto name too (`request_id`). REST reads the JSON names; this renames the proto names of
 * vdpa.mapd.v1 in a body or query to them, so that REST takes what a gRPC JSON client sends.
 */
import { invalid } from '../../src/core/u64.ts';
import { TimeSlices } from '../../src/sys/next-turn.ts';
import { originalFieldNames } from './proto.ts';

function join(path: string, key: string): string {
  return path === '' ? key : `${path}.${key}`;
}

/** Whether any key of `value`, at any depth, is a proto name to rename: a walk that builds nothing. */
function hasProtoNames(value: unknown, names: ReadonlyMap<string, string>): boolean {
  if (Array.isArray(value)) {
    for (const item of value) if (hasProtoNames(item, names)) return true;
    return false;
  }
  if (typeof value !== 'object' || value === null) return false;
  const record = value as Record<string, unknown>;
  for (const key in record) {
    if (!Object.hasOwn(record, key)) continue;
    if (names.has(key) || hasProtoNames(record[key], names)) return true;
  }
  return false;
}

/**
 * `value` with every proto field name renamed to its JSON name, at any depth; the same value when
 * none is there (found without rebuilding it: a 65,536-region table has none). A field given under
 * both names is refused, naming it.
 */
export function withJsonNames(value: unknown): unknown {
  return hasProtoNames(value, originalFieldNames()) ? renamed(value, '') : value;
}

/** withJsonNames of a body, whose lists (65,536 regions) are looked through in time slices. */
export async function withJsonNamesInSlices(value: unknown): Promise<unknown> {
  return (await hasProtoNamesInSlices(value, originalFieldNames())) ? renamed(value, '') : value;
}

async function hasProtoNamesInSlices(value: unknown, names: ReadonlyMap<string, string>): Promise<boolean> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return hasProtoNames(value, names);
  const record = value as Record<string, unknown>;
  for (const key in record) {
    if (!Object.hasOwn(record, key)) continue;
    if (names.has(key)) return true;
    const field = record[key];
    if (!Array.isArray(field)) {
      if (hasProtoNames(field, names)) return true;
      continue;
    }
    const slices = new TimeSlices();
    for (const item of field) {
      if (slices.due()) await slices.next();
      if (hasProtoNames(item, names)) return true;
    }
  }
  return false;
}

function renamed(value: unknown, path: string): unknown {
  if (Array.isArray(value)) {
    let changed = false;
    const out = value.map((item, i) => {
      const next = renamed(item, `${path}[${i}]`);
      changed ||= next !== item;
      return next;
    });
    return changed ? out : value;
  }
  if (typeof value !== 'object' || value === null) return value;
  const record = value as Record<string, unknown>;
  let changed = false;
  const entries = Object.keys(record).map((key): [string, unknown] => {
    const name = originalFieldNames().get(key) ?? key;
    if (name !== key && Object.hasOwn(record, name)) {
      throw invalid(join(path, name), `given twice, as ${key} and as ${name}`);
    }
    const item = renamed(record[key], join(path, name));
    changed ||= name !== key || item !== record[key];
    return [name, item];
  });
  // fromEntries defines own properties: a `__proto__` key stays data, never a prototype.
  return changed ? Object.fromEntries(entries) : value;
}
