/**
 * `npm run bench`: every scenario beside its baseline, one table on stdout, bench/results.json.
 * BENCH_SCALE (default 1) scales the sizes; BENCH_ONLY=codec,table,... picks scenarios (the keys of
 * SCENARIOS); BENCH_OUT writes the JSON elsewhere.
 */
import { writeFileSync } from 'node:fs';
import type { BenchContext, Row } from './harness.ts';
import { benchAgentTransport } from './scenarios/agent-transport.ts';
import { benchCodec } from './scenarios/codec.ts';
import { benchDeviceApply } from './scenarios/device-apply.ts';
import { benchE2e } from './scenarios/e2e.ts';
import { benchGroupCommit } from './scenarios/group-commit.ts';
import { benchHeadOfLine } from './scenarios/head-of-line.ts';
import { benchPlanner } from './scenarios/planner.ts';
import { benchRecovery } from './scenarios/recovery.ts';
import { benchTable } from './scenarios/table.ts';

/** By BENCH_ONLY name; they run in this order. */
const SCENARIOS: Record<string, (ctx: BenchContext) => void | Promise<void>> = {
  codec: benchCodec,
  table: benchTable,
  planner: benchPlanner,
  'device-apply': benchDeviceApply,
  'agent-transport': benchAgentTransport,
  e2e: benchE2e,
  'group-commit': benchGroupCommit,
  recovery: benchRecovery,
  'head-of-line': benchHeadOfLine,
};

function formatNumber(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString('en-US');
  return v.toPrecision(3);
}

function printTable(rows: Row[]): void {
  const header = ['scenario', 'case', 'metric', 'value', 'baseline', 'ratio', 'note'];
  const lines = rows.map((r) => [
    r.scenario,
    r.case,
    r.metric,
    `${formatNumber(r.value)} ${r.unit}`,
    r.baseline ? `${r.baseline.name}: ${formatNumber(r.baseline.value)}` : '',
    r.ratio === undefined ? '' : `${r.ratio.toFixed(2)}x`,
    r.note ?? '',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  const fmt = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  console.log(fmt(header));
  console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  for (const l of lines) console.log(fmt(l));
}

async function main(): Promise<void> {
  const scale = Number(process.env['BENCH_SCALE'] ?? '1');
  const only = process.env['BENCH_ONLY']?.split(',').filter(Boolean);
  const out = process.env['BENCH_OUT'] ?? new URL('./results.json', import.meta.url).pathname;
  const unknown = only?.filter((name) => !(name in SCENARIOS)) ?? [];
  if (unknown.length > 0)
    throw new Error(
      `BENCH_ONLY: no scenario ${unknown.join(', ')} (known: ${Object.keys(SCENARIOS).join(', ')})`,
    );
  const ctx: BenchContext = { scale, rows: [], log: (line) => console.error(line) };
  for (const [name, run] of Object.entries(SCENARIOS)) {
    if (only && !only.includes(name)) continue;
    console.error(`bench: ${name} ...`);
    // Each scenario starts on a collected heap: not paying for the last one's garbage (a table of
    // 1,000,000 entries) in its own rounds.
    globalThis.gc?.();
    await run(ctx);
  }
  printTable(ctx.rows);
  writeFileSync(
    out,
    `${JSON.stringify({ date: new Date().toISOString(), node: process.version, scale, rows: ctx.rows }, null, 2)}\n`,
  );
  console.error(`bench: wrote ${out}`);
}

// Stopped early: exit, so that the agents the scenarios started are stopped with it (api-harness.ts).
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => process.exit(130));

await main();
