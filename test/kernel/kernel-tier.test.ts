/**
 * The real-kernel tier: builds (cached) and boots a TCG VM running Debian's 6.12 kernel with a
 * VDUSE device bound to vhost_vdpa, runs the guest steps and asserts the console verdict.
 * Never skips: no qemu, no kernel package or no verdict is a failure.
 *
 * Run: node --import tsx --test test/kernel/kernel-tier.test.ts
 * To add guest-side TypeScript tests, append scripts to `guestScripts` (each is one step,
 * run from the project root with tsx; exit code 0 passes; test/kernel/guest/harness.ts has the
 * check runner and helpers).
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { buildVm, guestScriptStep, runVm, tierSteps } from './run-vm.ts';

/**
 * Guest scripts, one step each, with their time limits (s). Measured under TCG on 2 cores (no KVM):
 * main 4-5 s, kernel-device 5 s, kernel-vs-sim 5 s, agent-process 22-24 s, full-stack 35-41 s
 * (loading the agent and the API server with tsx over 9p dominates); the whole test 80-90 s.
 */
const guestScripts: [script: string, timeoutSeconds: number][] = [
  ['test/kernel/guest/main.ts', 60],
  // The agent's KernelDevice + SharedMemoryRegistry against the real device.
  ['test/kernel/guest/kernel-device.ts', 60],
  // The same raw requests to the kernel and to src/device/sim-kernel.ts (docs/kernel-notes.md).
  ['test/kernel/guest/kernel-vs-sim.ts', 60],
  // services/agent/main.ts in kernel mode, driven by src/agent/client.ts.
  ['test/kernel/guest/agent-process.ts', 120],
  // Agent + services/api/main.ts, REST calls with fetch.
  ['test/kernel/guest/full-stack.ts', 150],
];

test('real kernel tier (VDUSE device under vhost_vdpa, TCG VM)', { timeout: 420_000 }, async (t) => {
  const built = performance.now();
  const { vmDir, log } = await buildVm();
  for (const line of log.split('\n').filter((l) => l.includes('TIME'))) t.diagnostic(line);
  t.diagnostic(`build-vm: ${((performance.now() - built) / 1000).toFixed(1)} s, ${vmDir}`);

  const steps = [
    ...tierSteps(),
    ...guestScripts.map(([script, limit]) => guestScriptStep(script, [], limit)),
  ];
  // The whole run must stay well under CI's 5 minutes: a hard limit below the steps' sum.
  const result = await runVm({ vmDir, steps, timeoutMs: 270_000 });
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
      assert.ok(
        r.pass,
        `step ${step.name} failed (${r.detail}); its console:\n${stepConsole(result.console, step.name)}`,
      );
    });
  }
  assert.ok(result.pass, `${result.reason}; console:\n${result.console.slice(-6000)}`);
});

/** The console lines of one step (from its BEGIN line to its verdict), at most the last 12000 chars. */
function stepConsole(text: string, name: string): string {
  const begin = text.indexOf(`VDPA-MAPD-STEP: ${name} BEGIN`);
  if (begin < 0) return text.slice(-6000);
  const verdict = new RegExp(`VDPA-MAPD-STEP: ${name} (PASS|FAIL)[^\\n]*`).exec(text.slice(begin));
  const end = verdict ? begin + verdict.index + verdict[0].length : text.length;
  return text.slice(begin, end).slice(-12000);
}
