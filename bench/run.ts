/**
 * `npm run bench`: every scenario beside its baseline, one table on stdout, bench/results.json.
 * BENCH_SCALE (default 1) scales the sizes; BENCH_ONLY=codec,table,... picks scenarios (the keys of
 * SCENARIOS); BENCH_OUT writes the JSON elsewhere.
 *
 * Each scenario runs in a process of its own (this script again, `--scenario NAME --rows FILE`):
 * it starts on a fresh heap and on code V8 has not yet optimised for another scenario's shapes.
 * In one process, the device apply read 0.37x-1.15x of its floor across three full runs, lower
 * after the table scenario had trained the same IovaTable code on other sizes.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import type { BenchContext, Row } from './harness.ts';
import { benchAgentTransport } from './scenarios/agent-transport.ts';
import { benchCodec } from './scenarios/codec.ts';
import { benchDeviceApply } from './scenarios/device-apply.ts';
import { benchE2e } from './scenarios/e2e.ts';
import { benchGroupCommit } from './scenarios/group-commit.ts';
import { benchHeadOfLine } from './scenarios/head-of-line.ts';
import { benchLargeGuest } from './scenarios/large-guest.ts';
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
  'large-guest': benchLargeGuest,
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

const scale = Number(process.env['BENCH_SCALE'] ?? '1');

/** Runs one scenario here and writes its rows to `rowsFile`. */
async function runScenario(name: string, rowsFile: string): Promise<void> {
  const run = SCENARIOS[name];
  if (!run) throw new Error(`--scenario: no scenario ${name}`);
  const ctx: BenchContext = { scale, rows: [], log: (line) => console.error(line) };
  await run(ctx);
  writeFileSync(rowsFile, JSON.stringify(ctx.rows));
}

let child: ReturnType<typeof spawn> | undefined;

/** Runs one scenario in a process of its own (same Node flags); resolves with its rows. */
async function scenarioRows(name: string, dir: string): Promise<Row[]> {
  const rowsFile = path.join(dir, `${name}.json`);
  const args = [
    ...process.execArgv,
    new URL(import.meta.url).pathname,
    '--scenario',
    name,
    '--rows',
    rowsFile,
  ];
  const code = await new Promise<number | null>((resolve, reject) => {
    child = spawn(process.execPath, args, { stdio: ['ignore', 'inherit', 'inherit'] });
    child.once('error', reject);
    child.once('exit', (c, signal) => resolve(c ?? (signal ? 128 : null)));
  });
  child = undefined;
  if (code !== 0) throw new Error(`bench: scenario ${name} failed (exit ${code})`);
  return JSON.parse(readFileSync(rowsFile, 'utf8')) as Row[];
}

async function main(): Promise<void> {
  const only = process.env['BENCH_ONLY']?.split(',').filter(Boolean);
  const out = process.env['BENCH_OUT'] ?? new URL('./results.json', import.meta.url).pathname;
  const unknown = only?.filter((name) => !(name in SCENARIOS)) ?? [];
  if (unknown.length > 0)
    throw new Error(
      `BENCH_ONLY: no scenario ${unknown.join(', ')} (known: ${Object.keys(SCENARIOS).join(', ')})`,
    );
  const rows: Row[] = [];
  const dir = mkdtempSync(path.join(tmpdir(), 'vdpa-mapd-bench-'));
  try {
    for (const name of Object.keys(SCENARIOS)) {
      if (only && !only.includes(name)) continue;
      console.error(`bench: ${name} ...`);
      rows.push(...(await scenarioRows(name, dir)));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  printTable(rows);
  writeFileSync(
    out,
    `${JSON.stringify({ date: new Date().toISOString(), node: process.version, scale, rows }, null, 2)}\n`,
  );
  console.error(`bench: wrote ${out}`);
}

// Stopped early: exit, so that the agents the scenarios started are stopped with it (api-harness.ts),
// and the scenario's process with this one.
for (const signal of ['SIGINT', 'SIGTERM'] as const)
  process.once(signal, () => {
    child?.kill('SIGTERM');
    process.exit(130);
  });

const { values } = parseArgs({ options: { scenario: { type: 'string' }, rows: { type: 'string' } } });
if (values.scenario !== undefined) await runScenario(values.scenario, values.rows ?? '/dev/null');
else await main();
