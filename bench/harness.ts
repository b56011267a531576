/**
 * Tiny benchmark harness. Every figure is measured beside its baseline in the same run and
 * reported as a ratio, because a shared 2-core machine is too noisy for absolute numbers alone.
 */
import { performance } from 'node:perf_hooks';

export interface Row {
  scenario: string;
  case: string;
  metric: string;
  value: number;
  unit: string;
  baseline?: { name: string; value: number };
  /** value / baseline.value (for rates: how many times the baseline's rate we reach). */
  ratio?: number;
  note?: string;
}

export interface BenchContext {
  /** 1 = defaults that finish in a few minutes on 2 cores; smaller for smoke runs. */
  scale: number;
  rows: Row[];
  log: (line: string) => void;
}

/** Runs `fn(i)` for `count` iterations, `rounds` times, and returns the best rate (ops/s). */
export function rate(count: number, fn: (i: number) => void, rounds = 3): number {
  let best = 0;
  for (let r = 0; r < rounds; r++) {
    const start = performance.now();
    for (let i = 0; i < count; i++) fn(i);
    const seconds = (performance.now() - start) / 1000;
    best = Math.max(best, count / Math.max(seconds, 1e-9));
  }
  return best;
}

/** Async variant: `count` sequential awaits per round. */
export async function rateAsync(
  count: number,
  fn: (i: number) => Promise<unknown>,
  rounds = 3,
): Promise<number> {
  let best = 0;
  for (let r = 0; r < rounds; r++) {
    const start = performance.now();
    for (let i = 0; i < count; i++) await fn(i);
    const seconds = (performance.now() - start) / 1000;
    best = Math.max(best, count / Math.max(seconds, 1e-9));
  }
  return best;
}

export function seconds(fn: () => void): number {
  const start = performance.now();
  fn();
  return (performance.now() - start) / 1000;
}

export async function secondsAsync(fn: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  await fn();
  return (performance.now() - start) / 1000;
}

/** The middle value (the upper of the two middle ones for an even count). */
export function median(xs: readonly number[]): number {
  return [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? Number.NaN;
}

/**
 * Runs every side once per round, in reversed order on every other round (A B, B A, A B, ...), so
 * that drift on a shared machine hits every side alike. Returns each side's results, round by round.
 */
export async function alternate<S extends Record<string, () => Promise<unknown>>>(
  rounds: number,
  sides: S,
): Promise<{ [K in keyof S]: Awaited<ReturnType<S[K]>>[] }> {
  const names = Object.keys(sides) as (keyof S)[];
  const results = Object.fromEntries(names.map((n) => [n, [] as unknown[]])) as Record<keyof S, unknown[]>;
  for (let round = 0; round < rounds; round++) {
    for (const name of round % 2 === 0 ? names : [...names].reverse()) {
      results[name].push(await sides[name]!());
    }
  }
  return results as { [K in keyof S]: Awaited<ReturnType<S[K]>>[] };
}

/** Latency percentiles (ms) of `samples` (ms). */
export function percentiles(samples: number[]): { p50: number; p99: number } {
  const sorted = [...samples].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? Number.NaN;
  return { p50: at(0.5), p99: at(0.99) };
}

export function scaled(ctx: BenchContext, n: number, min = 1): number {
  return Math.max(min, Math.round(n * ctx.scale));
}

/** Adds a row comparing `value` with a baseline measured in the same run. */
export function compare(
  ctx: BenchContext,
  row: Omit<Row, 'ratio' | 'baseline'>,
  baselineName: string,
  baselineValue: number,
): void {
  ctx.rows.push({
    ...row,
    baseline: { name: baselineName, value: baselineValue },
    ratio: row.value / baselineValue,
  });
}

export function heapUsed(): number {
  globalThis.gc?.();
  globalThis.gc?.();
  return process.memoryUsage().heapUsed;
}
