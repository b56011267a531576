/**
 * `/docs` is a browsable API page: headless Chromium (Debian's) renders it from the server alone,
 * and it lists every REST operation with its summary and documented answers (success and error).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import { startStack } from './api-harness.ts';

const CHROMIUM = '/usr/bin/chromium';

let stack: Awaited<ReturnType<typeof startStack>>;
before(async () => {
  stack = await startStack('vdpa-docs-');
});
after(() => stack.stop());

interface Operation {
  method: string;
  path: string;
  summary?: string;
  responses: Record<string, { description?: string; content?: unknown }>;
}

async function documentedOperations(): Promise<Operation[]> {
  const doc = (await stack.http('GET', '/docs/json')).body as {
    paths: Record<string, Record<string, Omit<Operation, 'method' | 'path'>>>;
  };
  return Object.entries(doc.paths).flatMap(([p, methods]) =>
    Object.entries(methods).map(([method, op]) => ({ method, path: p, ...op })),
  );
}

test('every operation has a summary and documents its success and error answers', async () => {
  const operations = await documentedOperations();
  assert.equal(operations.length, 14, "every REST operation of README's table (WatchMappings is gRPC only)");
  for (const op of operations) {
    const where = `${op.method} ${op.path}`;
    assert.ok(op.summary, `${where} has a summary`);
    const codes = Object.keys(op.responses);
    assert.ok(
      codes.some((c) => c.startsWith('2')),
      `${where} documents its success`,
    );
    assert.ok(
      codes.includes('400') || op.path === '/v1/devices' || op.path === '/v1/memory',
      `${where}: 400`,
    );
    for (const [code, answer] of Object.entries(op.responses)) {
      assert.ok(
        answer.description && answer.description !== 'Default Response',
        `${where} ${code} is described`,
      );
      if (!code.startsWith('2'))
        assert.match(JSON.stringify(answer.content), /"error"/, `${where} ${code}: error shape`);
    }
  }
});

test('/docs renders in Chromium, from loopback alone, listing every operation', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} (Debian's chromium package) is installed`);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-chromium-'));
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  t.after(async () => {
    await browser.close();
    fs.rmSync(profile, { recursive: true, force: true });
  });
  const elsewhere: string[] = [];
  await browser.route('**/*', (route) => {
    const url = new URL(route.request().url());
    if (url.hostname === '127.0.0.1' || url.protocol === 'data:') return route.continue();
    elsewhere.push(url.href);
    return route.abort();
  });
  const page = await browser.newPage();
  const response = await page.goto(`${stack.api.restAddress}/docs`, { timeout: TIER_BUDGET_MS });
  assert.equal(response?.status(), 200);
  await page.waitForSelector('.opblock', { timeout: TIER_BUDGET_MS });
  const listed = await page.$$eval('.opblock', (blocks) =>
    blocks.map((b) => ({
      method: b.querySelector('.opblock-summary-method')?.textContent?.trim().toLowerCase(),
      path: b.querySelector('.opblock-summary-path')?.getAttribute('data-path'),
      summary: b.querySelector('.opblock-summary-description')?.textContent?.trim(),
    })),
  );
  const expected = await documentedOperations();
  assert.deepEqual(
    listed.map((o) => `${o.method} ${o.path} ${o.summary}`).sort(),
    expected.map((o) => `${o.method} ${o.path} ${o.summary}`).sort(),
  );
  assert.equal(await page.title(), 'Swagger UI');
  if (process.env.DOCS_SCREENSHOT)
    await page.screenshot({ path: process.env.DOCS_SCREENSHOT, fullPage: true });
  assert.deepEqual(elsewhere, [], 'the page asked for nothing beyond loopback');
});
