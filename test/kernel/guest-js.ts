/**
 * Where the guest finds the JavaScript bundle.ts compiled before the boot: `.cache/guest-js/`
 * under the project root (the guest mounts the project at its host path). Imported by the host
 * (bundle.ts, run-vm.ts) and by guest scripts, so it imports nothing but node:path.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The project root: this file is test/kernel/guest-js.ts, or a bundle in .cache/guest-js/. */
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export const bundleDir = path.join(root, '.cache', 'guest-js');

/** `<bundleDir>/<name>.mjs`; a guest script's name is its file name without `.ts`. */
export function bundlePath(name: string): string {
  return path.join(bundleDir, `${name}.mjs`);
}

/**
 * The tier's whole budget (ms), which init.sh passes to every step as VDPA_MAPD_BUDGET_MS: the
 * bound of every wait in guest code, since no wait may be tighter than that on a loaded machine.
 */
export function budgetMs(): number {
  const v = Number(process.env.VDPA_MAPD_BUDGET_MS);
  return Number.isFinite(v) && v > 0 ? v : 40 * 60_000;
}
