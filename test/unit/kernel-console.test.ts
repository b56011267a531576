/**
 * The kernel tier's reading of the guest console (test/kernel/run-vm.ts): which runs count as the
 * guest kernel dying before anything of ours ran, the one case the tier boots again for.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type GuestStep, panickedBeforeInit, parseConsole } from '../kernel/run-vm.ts';

const steps: GuestStep[] = [{ name: 'guest-smoke', kind: 'vduse', command: 'true' }];

/** The start of a console from a run that died so (6.12 under multi-threaded TCG). */
const EARLY_PANIC = [
  'Booting from ROM...',
  '[    1.994600] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI',
  '[    1.995830] RIP: 0010:sched_clock_cpu+0x9/0x190',
  '[    2.002135] Kernel panic - not syncing: Fatal exception in interrupt',
].join('\n');

test('a kernel panic before init.sh started is an early death of the guest kernel', () => {
  const result = parseConsole(EARLY_PANIC, steps);
  assert.equal(result.pass, false);
  assert.equal(panickedBeforeInit(result), true);
});

test('a panic once init.sh ran, or a run without a panic, is not', () => {
  const late = parseConsole(
    ['VDPA-MAPD-TIME: init 3.1', 'VDPA-MAPD-STEP: guest-smoke BEGIN', EARLY_PANIC].join('\n'),
    steps,
  );
  assert.equal(panickedBeforeInit(late), false);
  const silent = parseConsole('Booting from ROM...\n', steps);
  assert.equal(panickedBeforeInit(silent), false);
});
