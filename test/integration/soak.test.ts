/**
 * `npm run soak` (scripts/soak.ts) at a small scale: two SIGKILLs of the agent, then two of the API
 * server, under load; it prints a line per kill and the figures of each series, and its verdict is
 * zero lost, zero extra, zero duplicates. Timings are printed, never judged here.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import { runNode } from './process-harness.ts';

test('npm run soak --kills 2: every kill reported, each series 0 lost / 0 extra / 0 duplicates, exit 0', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const { code, stdout, stderr } = await runNode(t, [
    '--import',
    'tsx',
    'scripts/soak.ts',
    '--kills',
    '2',
    '--scale',
    '0.3',
  ]);
  assert.equal(code, 0, `${stdout}\n${stderr}`);

  const lines = stdout.trim().split('\n');
  assert.match(
    lines[0]!,
    /^soak: 6 clients \(REST and gRPC, .*\), 2 agent SIGKILLs then 2 API server SIGKILLs/,
  );
  const number = '\\d+(?:\\.\\d+)?';
  for (const name of ['agent', 'api']) {
    const kills = lines.filter((l) => l.startsWith(`${name} SIGKILL `));
    assert.deepEqual(
      kills.map(
        (l) =>
          new RegExp(`^${name} SIGKILL (\\d)/2: every device ready again ${number} s after`).exec(l)?.[1],
      ),
      ['1', '2'],
      stdout,
    );
    const series = lines.find((l) => l.startsWith(`series ${name}: `));
    const m = new RegExp(
      `^series ${name}: 2 kills, (\\d+) ops acknowledged, (\\d+) lost, (\\d+) extra, (\\d+) duplicates; ` +
        `\\d+ refusals retried, \\d+ ops resent after a lost answer; recovery median ${number} s, max ${number} s; took`,
    ).exec(series ?? '');
    assert.ok(m, `no figures for the ${name} series:\n${stdout}`);
    assert.ok(Number(m[1]) > 0, `${name}: ops were acknowledged`);
    assert.deepEqual([m[2], m[3], m[4]], ['0', '0', '0'], `${name}: lost, extra, duplicates`);
  }
  assert.match(lines.at(-1)!, /^soak passed: 0 lost, 0 extra, 0 duplicates over 4 kills in /);
});
