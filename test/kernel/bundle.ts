/**
 * Compiles what the guest runs (the agent, the API server and the guest scripts) to one
 * JavaScript file each with esbuild (tsx's own compiler), on the host, before the boot. Under TCG,
 * `node --import tsx services/api/main.ts` spent about 18 s opening some 1000 files over 9p and
 * compiling TypeScript; the bundled file starts in a second or two.
 *
 * The bundles live in `.cache/guest-js/` (visible in the guest: the project is shared at its host
 * path). That folder is exactly two levels below the project root on purpose: the project's
 * `new URL('../../proto/...', import.meta.url)` and `../../package.json` then resolve to the same
 * files as from `src/<dir>/` and `services/<dir>/`. CommonJS packages get their own `__dirname` and
 * `__filename` (grpc-health-check finds its .proto files by them); koffi (a native addon) is loaded
 * from node_modules at run time.
 */
import { readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { build, type Plugin } from 'esbuild';
import { bundleDir } from './guest-js.ts';

/** Entry points by bundle name: `<bundleDir>/<name>.mjs`. */
export const bundleEntries: Record<string, string> = {
  agent: 'services/agent/main.ts',
  api: 'services/api/main.ts',
};

/** The bundle a guest script (path relative to the project root) compiles to. */
export function bundleName(script: string): string {
  return path.basename(script, '.ts');
}

/** Each CommonJS file's own `__dirname`/`__filename`, which an ES module bundle does not have. */
const cjsPaths: Plugin = {
  name: 'cjs-paths',
  setup(b) {
    b.onLoad({ filter: /[\\/]node_modules[\\/].*\.c?js$/ }, async (args) => {
      const text = await readFile(args.path, 'utf8');
      if (!/\b__(dirname|filename)\b/.test(text)) return undefined;
      const prelude = `var __dirname = ${JSON.stringify(path.dirname(args.path))}, __filename = ${JSON.stringify(args.path)};\n`;
      return { contents: prelude + text, loader: 'js' };
    });
  },
};

/** Bundles the services and `scripts` (guest scripts); returns the time it took (ms). */
export async function bundleForGuest(scripts: readonly string[]): Promise<number> {
  const started = performance.now();
  const entryPoints: Record<string, string> = { ...bundleEntries };
  for (const s of scripts) entryPoints[bundleName(s)] = s;
  const root = path.resolve(bundleDir, '../..');
  for (const [name, file] of Object.entries(entryPoints)) entryPoints[name] = path.resolve(root, file);
  await rm(bundleDir, { recursive: true, force: true });
  await build({
    entryPoints,
    outdir: bundleDir,
    outExtension: { '.js': '.mjs' },
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    external: ['koffi'],
    plugins: [cjsPaths],
    logLevel: 'warning',
    // CommonJS packages call require() for Node's modules.
    banner: {
      js: "import { createRequire as __createRequire } from 'node:module'; const require = __createRequire(import.meta.url);",
    },
  });
  return performance.now() - started;
}
