/**
 * The real-kernel tier: builds (cached) and boots a TCG VM running Debian's 6.12 kernel with a
 * VDUSE device bound to vhost_vdpa, runs the guest steps and asserts the console verdict.
 * Never skips: no qemu, no kernel package or no verdict is a failure.
 *
 * Run: node --import tsx --test test/kernel/kernel-tier.test.ts
 * To add guest-side TypeScript tests, append scripts to `guestScripts` (each is one step,
 * run from the project root with tsx; exit code 0 passes).
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { buildVm, guestScriptStep, runVm, tierSteps } from './run-vm.ts';

const guestScripts = ['test/kernel/guest/main.ts'];

test('real kernel tier (VDUSE device under vhost_vdpa, TCG VM)', { timeout: 420_000 }, async (t) => {
  const built = performance.now();
  const { vmDir, log } = await buildVm();
  for (const line of log.split('\n').filter((l) => l.includes('TIME'))) t.diagnostic(line);
  t.diagnostic(`build-vm: ${((performance.now() - built) / 1000).toFixed(1)} s, ${vmDir}`);

  const steps = [...tierSteps(), ...guestScripts.map((script) => guestScriptStep(script))];
  const result = await runVm({ vmDir, steps, timeoutMs: 240_000 });
  const consoleLog = path.join(path.dirname(vmDir), 'last-console.log');
  await writeFile(consoleLog, result.console);
  t.diagnostic(`guest console: ${consoleLog}`);
  const times = Object.entries(result.guestTimes).map(([k, v]) => `${k} ${v}s`);
  t.diagnostic(`qemu run ${result.seconds.toFixed(1)} s; guest uptime at ${times.join(', ')}`);
  for (const s of result.steps) t.diagnostic(`step ${s.name}: ${s.pass ? 'PASS' : 'FAIL'} ${s.detail}`);

  for (const step of steps) {
    await t.test(step.name, () => {
      const r = result.steps.find((s) => s.name === step.name);
      assert.ok(r, `step ${step.name} reported nothing; console:\n${result.console.slice(-6000)}`);
      assert.ok(r.pass, `step ${step.name} failed (${r.detail}); console:\n${result.console.slice(-6000)}`);
    });
  }
  assert.ok(result.pass, `${result.reason}; console:\n${result.console.slice(-6000)}`);
});
