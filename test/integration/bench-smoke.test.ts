/**
 * The whole benchmark (`npm run bench`) at a tiny BENCH_SCALE: every scenario produces its rows,
 * every figure is a finite positive number beside a finite positive baseline, the table is printed
 * and the JSON written to BENCH_OUT parses. No figure is judged: timings belong to bench/ only.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import type { Row } from '../../bench/harness.ts';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import { runNode } from './process-harness.ts';

/** Rows each scenario must produce at any scale (the table scenario adds a heap row per size). */
const EXPECTED_ROWS: Record<string, number> = {
  codec: 1,
  table: 12,
  planner: 6,
  'device apply': 2,
  'agent transport': 3,
  e2e: 17,
  'group commit': 2,
  recovery: 5,
  'head-of-line': 15,
  'large guest': 8,
};

test('npm run bench at BENCH_SCALE=0.01: every scenario, finite positive figures, JSON', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-bench-smoke-'));
  const out = path.join(dir, 'results.json');
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const { code, stdout, stderr } = await runNode(t, ['--expose-gc', '--import', 'tsx', 'bench/run.ts'], {
    ...process.env,
    BENCH_SCALE: '0.01',
    BENCH_OUT: out,
  });
  assert.equal(code, 0, stderr);

  const results = JSON.parse(fs.readFileSync(out, 'utf8')) as { scale: number; rows: Row[] };
  assert.equal(results.scale, 0.01);
  const positive = (v: unknown) => typeof v === 'number' && Number.isFinite(v) && v > 0;
  const counts: Record<string, number> = {};
  for (const row of results.rows) {
    counts[row.scenario] = (counts[row.scenario] ?? 0) + 1;
    const label = JSON.stringify(row);
    assert.ok(positive(row.value), label);
    assert.ok(row.case && row.metric && row.unit, label);
    if (row.metric === 'heap/entry') continue;
    assert.ok(positive(row.baseline?.value) && row.baseline?.name, label);
    assert.ok(positive(row.ratio), label);
  }
  assert.deepEqual(counts, EXPECTED_ROWS);

  // With --max-group 1 every one of the concurrent maps is its own group: one set_map push each.
  const pushes = results.rows.find((r) => r.scenario === 'group commit' && r.metric === 'set_map pushes')!;
  const requests = Number(/^([0-9,]+) concurrent maps/.exec(pushes.case)?.[1]?.replaceAll(',', ''));
  assert.equal(pushes.baseline?.value, requests);
  assert.ok(pushes.value <= requests, JSON.stringify(pushes));

  // The printed table: a header, a rule, one line per row.
  const lines = stdout.trim().split('\n');
  assert.match(lines[0]!, /^\| scenario +\| case +\| metric +\| value +\| baseline +\| ratio +\| note +\|$/);
  assert.equal(lines.length, 2 + results.rows.length);
});
