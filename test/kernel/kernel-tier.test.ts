/**
 * The real-kernel tier: builds (cached) and boots a TCG VM running Debian's 6.12 kernel, in
 * which every vDPA parent kind in turn (VDUSE, vp_vdpa behind intel-iommu, vdpa_sim in its four
 * modes, and the blk kinds: QEMU's own virtio-blk as VDUSE and under vp_vdpa) is bound to
 * vhost_vdpa; runs the guest steps of each and asserts the console verdict; then checks every
 * byte of the blk kinds' disk images against what the guest wrote (blk-plan.ts).
 * Never skips: no qemu, no kernel package, a kind that cannot be set up or no verdict is a failure.
 *
 * Run: node --import tsx --test test/kernel/kernel-tier.test.ts
 * To add guest-side TypeScript tests, add scripts to `tierPlan` (each is one step, bundled and
 * run from the project root; exit code 0 passes; test/kernel/guest/harness.ts has the check
 * runner and helpers).
 */
import assert from 'node:assert/strict';
import { appendFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { BLK_KINDS, checkBlkImage } from './blk-plan.ts';
import {
  buildVm,
  bundleSteps,
  type GuestStep,
  guestScriptStep,
  KINDS,
  panickedBeforeInit,
  runVm,
  TIER_BUDGET_MS,
  tierSteps,
} from './run-vm.ts';

/**
 * The steps, kind by kind (init.sh creates each kind's device as /dev/vhost-vdpa-0 in turn, all
 * in one boot). Every guest script is bundled to JavaScript before the boot (bundle.ts). No step
 * has a time limit: the only one is the whole run's, {@link TIER_BUDGET_MS}.
 */
function tierPlan(): GuestStep[] {
  const vduse = [
    'test/kernel/guest/main.ts',
    // The agent's KernelDevice + SharedMemoryRegistry against the real device.
    'test/kernel/guest/kernel-device.ts',
    // The same raw requests to the kernel and to src/device/sim-kernel.ts (docs/kernel-notes.md).
    'test/kernel/guest/kernel-vs-sim.ts',
    // services/agent/main.ts in kernel mode, driven by src/agent/client.ts.
    'test/kernel/guest/agent-process.ts',
    // Agent + services/api/main.ts, REST calls with fetch.
    'test/kernel/guest/full-stack.ts',
  ];
  // Seeded random IOTLB messages to the kernel and to the simulator configured as the kind.
  const differential = 'test/kernel/guest/differential.ts';
  // The agent + the boot's API server: map, batch, unmap, set-mem-table, pins, discovery.
  const services = 'test/kernel/guest/services.ts';
  // Block I/O from a vhost-user front-end through the agent's attach to QEMU's virtio-blk (blk-plan.ts).
  const blkIo = 'test/kernel/guest/blk-io.ts';
  return [
    ...tierSteps(),
    ...vduse.map((script) => guestScriptStep(script, 'vduse')),
    guestScriptStep(differential, 'vduse'),
    ...KINDS.filter((k) => k !== 'vduse' && !isBlkKind(k)).flatMap((kind) => [
      guestScriptStep(differential, kind),
      guestScriptStep(services, kind),
    ]),
    ...BLK_KINDS.map((kind) => guestScriptStep(blkIo, kind)),
  ];
}

function isBlkKind(kind: string): boolean {
  return (BLK_KINDS as readonly string[]).includes(kind);
}

/** init.sh's own verdict on the API server that ran for the whole boot (see init.sh). */
const BOOT_API_STEP = 'boot-api';

test('real kernel tier (every vDPA parent kind under vhost_vdpa, TCG VM)', {
  timeout: TIER_BUDGET_MS + 120_000,
}, async (t) => {
  const built = performance.now();
  const { vmDir, log } = await buildVm();
  for (const line of log.split('\n').filter((l) => l.includes('TIME'))) t.diagnostic(line);
  t.diagnostic(`build-vm: ${((performance.now() - built) / 1000).toFixed(1)} s, ${vmDir}`);

  const steps = tierPlan();
  t.diagnostic(`bundled for the guest in ${((await bundleSteps(steps)) / 1000).toFixed(1)} s`);
  // The console as it arrives (to follow a run, or see where a stuck one is), then cleaned up.
  const consoleLog = path.join(path.dirname(vmDir), 'last-console.log');
  await writeFile(consoleLog, '');
  const onConsole = (text: string) => appendFileSync(consoleLog, text);
  const booted = performance.now();
  let result = await runVm({ vmDir, steps, onConsole });
  if (panickedBeforeInit(result)) {
    // Once only, within the same budget: a second early panic fails the tier.
    const panic = result.console.match(/^.*(Oops|Kernel panic).*$/m)?.[0] ?? 'Kernel panic';
    t.diagnostic(`the guest kernel died before init (${panic.trim()}); booting once more`);
    await writeFile(consoleLog, '');
    const left = TIER_BUDGET_MS - (performance.now() - booted);
    result = await runVm({ vmDir, steps, onConsole, timeoutMs: left });
  }
  await writeFile(consoleLog, result.console);
  t.diagnostic(`guest console: ${consoleLog}`);
  const times = Object.entries(result.guestTimes).map(([k, v]) => `${k} ${v}s`);
  t.diagnostic(`qemu run ${result.seconds.toFixed(1)} s; guest uptime at ${times.join(', ')}`);
  for (const [kind, line] of Object.entries(result.kinds)) t.diagnostic(`kind ${kind}: ${line}`);
  for (const s of result.steps) t.diagnostic(`step ${s.name}: ${s.pass ? 'PASS' : 'FAIL'} ${s.detail}`);

  for (const step of [...steps, { name: BOOT_API_STEP }]) {
    await t.test(step.name, () => {
      const r = result.steps.find((s) => s.name === step.name);
      assert.ok(r, `step ${step.name} reported nothing; console:\n${result.console.slice(-6000)}`);
      assert.ok(
        r.pass,
        `step ${step.name} failed (${r.detail}); its console:\n${stepConsole(result.console, step.name)}`,
      );
    });
  }
  // What the guest's I/O left in each image, checked after QEMU exited.
  for (const kind of BLK_KINDS) {
    await t.test(`${kind}.image`, () => {
      t.diagnostic(`image ${kind}: ${checkBlkImage(kind, result.images[kind]!)}`);
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
