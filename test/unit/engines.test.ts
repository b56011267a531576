/**
 * Every package the lockfile installs runs on the oldest Node the project supports (package.json
 * `engines`): npm ci warns EBADENGINE otherwise, and a package that needs a newer Node may fail at
 * run time (cookie 2 and content-disposition 3 are ES modules that Node 20.15 cannot require; the
 * `overrides` in package.json pin versions that support Node 20).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { test } from 'node:test';

const require = createRequire(import.meta.url);
// fastify's own dependency: the semver npm uses, for npm's reading of the ranges.
const semver = require('semver') as {
  minVersion(range: string): { version: string } | null;
  satisfies(v: string, range: string): boolean;
};

const root = new URL('../../', import.meta.url);
const pkg = JSON.parse(fs.readFileSync(new URL('package.json', root), 'utf8'));
const lock = JSON.parse(fs.readFileSync(new URL('package-lock.json', root), 'utf8'));

test('every installed package supports the oldest Node of package.json engines', () => {
  const oldest = semver.minVersion(pkg.engines.node)!.version;
  assert.equal(oldest, '20.15.0');
  const refusing = Object.entries(
    lock.packages as Record<string, { engines?: { node?: string }; dev?: boolean }>,
  )
    .filter(([name, p]) => name !== '' && typeof p.engines?.node === 'string')
    .filter(([, p]) => !semver.satisfies(oldest, p.engines!.node!))
    .map(([name, p]) => `${name} (node ${p.engines!.node})`);
  assert.deepEqual(refusing, []);
});
