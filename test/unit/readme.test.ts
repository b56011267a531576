/** README keeps telling the truth: the two commands, and the option tables as the code has them. */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';
import { USAGE as AGENT_USAGE } from '../../services/agent/config.ts';
import { optionsTable } from '../../services/api/config.ts';

const readme = fs.readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
const pkg = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {
  scripts: Record<string, string>;
};

test('the two commands are in README and package.json', () => {
  assert.match(readme, /^npm ci && npm start /m);
  assert.match(readme, /^npm ci && npm test /m);
  assert.ok(pkg.scripts['start'] && pkg.scripts['test']);
  const ci = fs.readFileSync(new URL('../../.ci/run', import.meta.url), 'utf8');
  assert.match(ci, /^npm ci\b/m);
  assert.match(ci, /^npm test$/m);
});

test("the API server's options table is the code's", () => {
  assert.ok(
    readme.includes(optionsTable()),
    'README is stale: paste optionsTable() from services/api/config.ts',
  );
});

test("the agent's usage is the code's", () => {
  assert.ok(readme.includes(AGENT_USAGE), 'README is stale: paste USAGE from services/agent/config.ts');
});
