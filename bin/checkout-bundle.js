// A TypeScript entry point of this checkout as one JavaScript file, bundled with esbuild (which tsx
// brings) into node_modules/.cache/NAME and bundled again whenever a source file it came from has
// changed: running it is then a plain node start, not a TypeScript compile. The bundle sits two
// directories below the checkout, as the modules it comes from do (services/cli/, services/api/),
// so their `../../proto/` paths still hold and bare imports resolve from the checkout's node_modules.
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

/** The bundle is missing, or older than a file it was made from (or one is gone). */
function stale(bundle, inputs) {
  try {
    const built = fs.statSync(bundle).mtimeMs;
    return JSON.parse(fs.readFileSync(inputs, 'utf8')).some(
      (f) => fs.statSync(`${ROOT}${f}`).mtimeMs > built,
    );
  } catch {
    return true;
  }
}

/** The path of the bundle of `entry` (relative to the checkout), made or remade if needed. */
export async function checkoutBundle(entry, name) {
  const bundle = `${ROOT}node_modules/.cache/${name}`;
  const inputs = `${bundle}.inputs.json`;
  if (!stale(bundle, inputs)) return bundle;
  const { build } = await import('esbuild');
  const tmp = `.${process.pid}`;
  const result = await build({
    absWorkingDir: ROOT,
    entryPoints: [entry],
    outfile: `${bundle}${tmp}`,
    bundle: true,
    packages: 'external',
    platform: 'node',
    format: 'esm',
    target: 'node20',
    metafile: true,
    logLevel: 'error',
  });
  fs.writeFileSync(`${inputs}${tmp}`, JSON.stringify(Object.keys(result.metafile.inputs)));
  // Renamed into place, so that runs at the same time never read half a file.
  fs.renameSync(`${inputs}${tmp}`, inputs);
  fs.renameSync(`${bundle}${tmp}`, bundle);
  return bundle;
}
