/**
 * The command that runs test/grpcurl.ts: bundled once per test process with esbuild (tsx's), so that
 * each call is a plain node start rather than a TypeScript compile. The bundle lives two directories
 * below the checkout (node_modules/.cache/), where its bare imports resolve as the source's do.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildSync } from 'esbuild';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
let built: string | undefined;

export function grpcurlCommand(): string[] {
  if (built === undefined) {
    const out = path.join(ROOT, 'node_modules/.cache/vdpa-mapd-test-grpcurl.mjs');
    const tmp = `${out}.${process.pid}`;
    buildSync({
      absWorkingDir: ROOT,
      entryPoints: ['test/grpcurl.ts'],
      outfile: tmp,
      bundle: true,
      packages: 'external',
      platform: 'node',
      format: 'esm',
      target: 'node20',
      logLevel: 'error',
    });
    fs.renameSync(tmp, out);
    built = out;
  }
  return [process.execPath, built];
}
