/**
 * The REST answer of SetMemTable, written in slices. It lists every op, every mapping
 * invalidated and every mapping mapped: for a 65,536-region table about 15 MB of JSON, whose
 * formatting and JSON.stringify in one piece held the event loop for 300 ms and more. This writes
 * the same bytes (JSON.stringify of formatSetMemTableResult) a time slice of items at a time, with a
 * turn of the event loop between slices, as a stream fastify sends as it is read.
 */
import { Readable } from 'node:stream';
import { TimeSlices } from '../sys/next-turn.ts';
import type { SetMemTableResult } from '../core/types.ts';
import { formatMappingJson, formatOpJson, formatSetMemTableResult, setMemTableCounts } from './format.ts';

/** Answers with fewer items than this are formatted and encoded in one piece. */
export const SLICED_ANSWER_ITEMS = 4096;

/** JSON of an array of `items`, each written by `json`, one time slice's worth of elements per piece. */
async function* listJson<T>(items: readonly T[], json: (item: T) => string): AsyncGenerator<string> {
  yield '[';
  const slices = new TimeSlices();
  let piece: string[] = [];
  let wrote = false;
  const flush = () => {
    const text = `${wrote ? ',' : ''}${piece.join(',')}`;
    wrote = true;
    piece = [];
    return text;
  };
  for (let i = 0; i < items.length; i++) {
    piece.push(json(items[i]!));
    if (slices.due()) {
      yield flush();
      await slices.next();
    }
  }
  if (piece.length > 0) yield flush();
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
