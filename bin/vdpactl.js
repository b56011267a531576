#!/usr/bin/env node
// vdpactl. The image and `npm run build` (dist/) have the CLI compiled beside this file. A checkout
// has TypeScript: the CLI is bundled with esbuild (which tsx brings) into node_modules/.cache/ and
// bundled again whenever a source file it came from has changed, so that a call costs one plain node
// start, not a TypeScript compile. The bundle sits two directories below the checkout, as the
// modules it came from do (services/cli/, services/api/), so their `../../proto/` paths still hold.
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';

const compiled = new URL('../services/cli/main.js', import.meta.url);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const BUNDLE = `${ROOT}node_modules/.cache/vdpactl.mjs`;
const INPUTS = `${BUNDLE}.inputs.json`;

/** The bundle is missing, or older than a file it was made from (or one is gone). */
function stale() {
  try {
    const built = fs.statSync(BUNDLE).mtimeMs;
    const inputs = JSON.parse(fs.readFileSync(INPUTS, 'utf8'));
    return inputs.some((file) => fs.statSync(`${ROOT}${file}`).mtimeMs > built);
  } catch {
    return true;
  }
}

async function bundle() {
  const { build } = await import('esbuild');
  const tmp = `${BUNDLE}.${process.pid}`;
  const result = await build({
    absWorkingDir: ROOT,
    entryPoints: ['services/cli/main.ts'],
    outfile: tmp,
    bundle: true,
    packages: 'external',
    platform: 'node',
    format: 'esm',
    target: 'node20',
    metafile: true,
    logLevel: 'error',
  });
  fs.writeFileSync(`${INPUTS}.${process.pid}`, JSON.stringify(Object.keys(result.metafile.inputs)));
  // Renamed into place, so that calls running at the same time never read half a file.
  fs.renameSync(`${INPUTS}.${process.pid}`, INPUTS);
  fs.renameSync(tmp, BUNDLE);
}

if (fs.existsSync(compiled)) {
  await import(compiled.href);
} else {
  if (stale()) await bundle();
  await import(new URL(`file://${BUNDLE}`).href);
}
