/**
 * What each vdpactl command asks the API server and prints. With `--json` the answer is printed as
 * the API sends it (repeated fields present even when empty); otherwise as tables.
 */
import fs from 'node:fs';
import { status, type ServiceError } from '@grpc/grpc-js';
import type { Invocation } from './args.ts';
import type { Answer, Connection } from './client.ts';
import { parseMemTableFile } from './memtable-file.ts';
import { devicesTable, eventLine, mappingsTable, memoryTable, opsTable } from './render.ts';
import { positiveArg, u32Arg, u64Arg, UsageError } from './values.ts';

export interface Io {
  out(text: string): void;
  /** Resolves on Ctrl-C (SIGINT). */
  interrupted: Promise<void>;
}

type Run = (inv: Invocation, conn: Connection, io: Io) => Promise<void>;

/** Repeated fields the API leaves out when empty, filled in for scripts. */
function withLists(answer: Answer, keys: readonly string[]): Answer {
  const out = { ...answer };
  for (const key of keys) out[key] ??= [];
  return out;
}

function print(inv: Invocation, io: Io, answer: Answer, human: () => string): void {
  io.out(inv.json ? JSON.stringify(answer) : human());
}

const opt = (inv: Invocation, name: keyof Invocation['options']): string | undefined => {
  const value = inv.options[name];
  return typeof value === 'string' ? value : undefined;
};

/** Options shared by map and unmap, as request fields. */
function asid(inv: Invocation): { asid?: number } {
  const text = opt(inv, 'asid');
  return text === undefined ? {} : { asid: u32Arg(text, '--asid') };
}

function requestId(inv: Invocation): { requestId?: string } {
  const text = opt(inv, 'request-id');
  return text === undefined ? {} : { requestId: text };
}

function readTable(file: string): string {
  try {
    return fs.readFileSync(file === '-' ? 0 : file, 'utf8');
  } catch (e) {
    throw new UsageError(`${file}: ${(e as Error).message}`);
  }
}

const devices: Run = async (inv, conn, io) => {
  const device = inv.args.DEVICE;
  if (device !== undefined) {
    const answer = await conn.devices('getDevice', { device });
    print(inv, io, answer, () => devicesTable([answer.device]));
    return;
  }
  const answer = withLists(await conn.devices('listDevices', {}), ['devices']);
  print(inv, io, answer, () => devicesTable(answer.devices));
};

const listMappings: Run = async (inv, conn, io) => {
  const answer = withLists(await conn.mappings('listMappings', { device: inv.args.DEVICE, ...asid(inv) }), [
    'mappings',
  ]);
  print(inv, io, answer, () => mappingsTable(answer.mappings));
};

const map: Run = async (inv, conn, io) => {
  const offset = opt(inv, 'offset');
  const perm = opt(inv, 'perm');
  const answer = withLists(
    await conn.mappings('map', {
      device: inv.args.DEVICE,
      iova: u64Arg(opt(inv, 'iova')!, '--iova'),
      size: u64Arg(opt(inv, 'size')!, '--size'),
      memory: opt(inv, 'memory'),
      ...(offset === undefined ? {} : { offset: u64Arg(offset, '--offset') }),
      ...(perm === undefined ? {} : { perm }),
      ...asid(inv),
      ...requestId(inv),
    }),
    ['ops'],
  );
  print(inv, io, answer, () => mappingsTable([answer.mapping]));
};

const unmap: Run = async (inv, conn, io) => {
  const answer = withLists(
    await conn.mappings('unmap', {
      device: inv.args.DEVICE,
      iova: u64Arg(opt(inv, 'iova')!, '--iova'),
      size: u64Arg(opt(inv, 'size')!, '--size'),
      exact: inv.options.exact === true,
      ...asid(inv),
      ...requestId(inv),
    }),
    ['removed', 'remapped', 'ops'],
  );
  print(inv, io, answer, () => {
    const lines = [`removed ${answer.removed.length}, remapped ${answer.remapped.length}`];
    if (answer.removed.length > 0) lines.push('', 'removed:', mappingsTable(answer.removed));
    if (answer.remapped.length > 0) lines.push('', 'remapped:', mappingsTable(answer.remapped));
    return lines.join('\n');
  });
};

const applyMemTable: Run = async (inv, conn, io) => {
  const file = opt(inv, 'file')!;
  const table = parseMemTableFile(readTable(file), file);
  const dryRun = inv.options['dry-run'] === true;
  // --summary: the counts without the lists, which for a whole guest are more than gRPC's default 4 MiB.
  const summary = inv.options.summary === true;
  const answer = withLists(
    await conn.mappings('setMemTable', {
      device: inv.args.DEVICE,
      ...table,
      dryRun,
      summary,
      ...requestId(inv),
    }),
    ['ops', 'invalidated', 'mapped'],
  );
  print(inv, io, answer, () => {
    const n = (count: unknown) => Number(count ?? 0);
    const counts = `${n(answer.invalidatedCount)} invalidated, ${n(answer.mappedCount)} mapped, ${n(answer.unchanged)} unchanged`;
    const line = dryRun
      ? `dry run: ${n(answer.opCount)} ops would be applied (${counts}); nothing changed`
      : `applied ${n(answer.opCount)} ops (${counts})`;
    return answer.ops.length > 0 ? `${opsTable(answer.ops)}\n${line}` : line;
  });
};

const listMemory: Run = async (inv, conn, io) => {
  const answer = withLists(await conn.memory('listMemory', {}), ['memory']);
  print(inv, io, answer, () => memoryTable(answer.memory));
};

const registerMemory: Run = async (inv, conn, io) => {
  const size = opt(inv, 'size');
  const path = opt(inv, 'path');
  if ((size === undefined) === (path === undefined))
    throw new UsageError('memory register needs exactly one of --size and --path');
  const answer = await conn.memory('registerMemory', {
    id: inv.args.ID,
    ...(size === undefined ? { path } : { size: u64Arg(size, '--size') }),
  });
  print(inv, io, answer, () => memoryTable([answer.memory]));
};

const releaseMemory: Run = async (inv, conn, io) => {
  const answer = await conn.memory('unregisterMemory', { id: inv.args.ID });
  print(inv, io, answer, () => `released ${inv.args.ID}`);
};

/** Streams events until `--count` of them, Ctrl-C (both exit 0), or the stream fails. */
const watch: Run = async (inv, conn, io) => {
  const countText = opt(inv, 'count');
  const count = countText === undefined ? Number.POSITIVE_INFINITY : positiveArg(countText, '--count');
  const call = conn.watch(inv.args.DEVICE === undefined ? {} : { device: inv.args.DEVICE });
  let cancelled = false;
  const stop = () => {
    cancelled = true;
    call.cancel();
  };
  await new Promise<void>((resolve, reject) => {
    let seen = 0;
    io.interrupted.then(stop);
    call.on('data', (event: Answer) => {
      // The stream's "subscribed" markers are not changes: not printed, not counted.
      if (seen >= count || event.kind === 'subscribed') return;
      io.out(inv.json ? JSON.stringify(event) : eventLine(event));
      if (++seen >= count) stop();
    });
    call.on('error', (err: ServiceError) =>
      cancelled && err.code === status.CANCELLED ? resolve() : reject(err),
    );
    call.on('end', () => resolve());
  });
};

export const RUNS: Readonly<Record<string, Run>> = {
  devices,
  'mappings list': listMappings,
  'mappings map': map,
  'mappings unmap': unmap,
  'memtable apply': applyMemTable,
  'memory list': listMemory,
  'memory register': registerMemory,
  'memory release': releaseMemory,
  watch,
};
