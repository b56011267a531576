#!/usr/bin/env node
// vdpactl: runs the compiled CLI beside this file (the image, or `npm run build` output in dist/),
// else the TypeScript source of a checkout through tsx.
import fs from 'node:fs';

const compiled = new URL('../services/cli/main.js', import.meta.url);
if (fs.existsSync(compiled)) {
  await import(compiled.href);
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import(new URL('../services/cli/main.ts', import.meta.url).href);
}
