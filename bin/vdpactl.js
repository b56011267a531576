#!/usr/bin/env node
// vdpactl. The image and `npm run build` (dist/) have the CLI compiled beside this file; a checkout
// runs a bundle of its TypeScript (see checkout-bundle.js), not tsx, so that a call is a plain node
// start.
import fs from 'node:fs';
import { pathToFileURL } from 'node:url';

const compiled = new URL('../services/cli/main.js', import.meta.url);
if (fs.existsSync(compiled)) {
  await import(compiled.href);
} else {
  const { checkoutBundle } = await import('./checkout-bundle.js');
  await import(pathToFileURL(await checkoutBundle('services/cli/main.ts', 'vdpactl.mjs')).href);
}
