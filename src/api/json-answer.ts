/**
 * The REST answer of SetMemTable, written in slices. It lists every op, every mapping
 * invalidated and every mapping mapped: for a 65,536-region table about 15 MB of JSON, whose
 * formatting and JSON.stringify in one piece held the event loop for 300 ms and more. This writes
 * the same bytes (JSON.stringify of formatSetMemTableResult) a slice of items at a time, with a
 * turn of the event loop between slices, as a stream fastify sends as it is read.
 */
import { Readable } from 'node:stream';
import { setImmediate as nextTurn } from 'node:timers/promises';
import type { SetMemTableResult } from '../core/types.ts';
import { formatMappingJson, formatOpJson, formatSetMemTableResult, setMemTableCounts } from './format.ts';

/** Items per slice: about a millisecond of formatting and encoding. */
const ITEMS_PER_SLICE = 256;

/** Answers with fewer items than this are formatted and encoded in one piece. */
export const SLICED_ANSWER_ITEMS = 4096;

/** JSON of an array of `items`, each written by `json`, a slice of elements at a time. */
async function* listJson<T>(items: readonly T[], json: (item: T) => string): AsyncGenerator<string> {
  yield '[';
  for (let start = 0; start < items.length; start += ITEMS_PER_SLICE) {
    if (start > 0) await nextTurn();
    const slice = items.slice(start, start + ITEMS_PER_SLICE).map(json);
    yield `${start > 0 ? ',' : ''}${slice.join(',')}`;
  }
  yield ']';
}

/** JSON.stringify(formatSetMemTableResult(r)), in pieces. */
export async function* setMemTableJson(r: SetMemTableResult): AsyncGenerator<string> {
  yield `{"dryRun":${JSON.stringify(r.dryRun)},"ops":`;
  yield* listJson(r.ops, formatOpJson);
  yield ',"invalidated":';
  yield* listJson(r.invalidated, formatMappingJson);
  yield ',"mapped":';
  yield* listJson(r.mapped, formatMappingJson);
  const counts = JSON.stringify(setMemTableCounts(r)).slice(1, -1);
  yield `,"unchanged":${JSON.stringify(r.unchanged)},${counts}}`;
}

/**
 * What a REST route returns for `r`: the formatted answer when small (a summary always is), else
 * a stream of its JSON (send it with content-type application/json).
 */
export function setMemTableAnswer(r: SetMemTableResult, summary = false): object {
  const items = r.ops.length + r.invalidated.length + r.mapped.length;
  if (summary || items < SLICED_ANSWER_ITEMS) return formatSetMemTableResult(r, summary);
  return Readable.from(setMemTableJson(r), { objectMode: false });
}
