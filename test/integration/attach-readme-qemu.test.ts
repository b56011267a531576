/**
 * README's two lines that boot a guest on `npm start`'s vblk0 run as written: the curl that attaches
 * it and the QEMU command line, by bash, in a directory whose `.state` is the system's state. The
 * only rewrites are the ones README names: host:port (the system runs on free ports) and `vmlinuz`
 * / `initrd.img`, the guest's kernel and initramfs (test/vhost-user/guest.ts: its /init reads the
 * pattern the host put on the disk, writes another, reads it back and powers off).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import {
  buildGuest,
  diskBytes,
  type Guest,
  makeDisk,
  PATTERN_BYTES,
  VERDICT,
  WRITE_OFFSET,
} from '../vhost-user/guest.ts';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import { tempDir } from './api-harness.ts';
import { npmStart } from './npm-start.ts';
import { output } from './process-harness.ts';

const README = fileURLToPath(new URL('../../README.md', import.meta.url));

let guest: Guest;
before(async () => {
  guest = await buildGuest();
});
after(() => guest?.cleanup());

/** The logical lines (continuations joined) of README's ```console block that runs QEMU. */
function readmeQemuBlock(): { curl: string; qemu: string } {
  const readme = fs.readFileSync(README, 'utf8');
  const block = [...readme.matchAll(/^```console\n([\s\S]*?)^```$/gm)]
    .map((m) => m[1]!)
    .find((b) => b.includes('qemu-system-x86_64'));
  assert.ok(block, "README has a console block with QEMU's command line");
  const lines = block.split(/(?<!\\)\n/).filter((l) => l.trim() !== '');
  const curl = lines.find((l) => l.startsWith('curl '));
  const qemu = lines.find((l) => l.startsWith('qemu-system-x86_64 '));
  assert.ok(curl && qemu, `the attach curl and the QEMU line:\n${block}`);
  return { curl, qemu };
}

test("README's QEMU line boots a guest on npm start's vblk0 and it reads back what it wrote", {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const work = tempDir('attach-readme');
  t.after(() => fs.rmSync(work, { recursive: true, force: true }));
  const stateDir = path.join(work, '.state');
  fs.mkdirSync(stateDir);
  // npm start makes vblk0.img only when absent: this one holds the pattern the guest reads.
  const disk = makeDisk(guest, stateDir, 'vblk0.img');
  const system = await npmStart(stateDir);
  t.after(async () => {
    if (system.child.exitCode !== null || system.child.signalCode !== null) return;
    system.child.kill('SIGINT');
    await system.exited;
  });

  const { curl, qemu } = readmeQemuBlock();
  const hostPort = new URL(system.rest).host;
  const attach = spawn('bash', ['-c', curl.replaceAll('localhost:8080', hostPort)], {
    cwd: work,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const attached = await output(attach);
  assert.equal(attached.code, 0, attached.stderr);
  const body = JSON.parse(attached.stdout) as { attachment?: { socketPath: string } };
  assert.equal(
    body.attachment?.socketPath,
    path.join(work, '.state/agent/vhost-user/vblk0.sock'),
    attached.stdout,
  );

  const line = qemu
    .replace(/(-kernel )vmlinuz\b/, `$1${guest.vmlinuz}`)
    .replace(/(-initrd )initrd\.img\b/, `$1${guest.initramfs}`);
  assert.notEqual(line, qemu);
  const started = performance.now();
  // bash runs the one command in its own process: the pid is QEMU's, killed by pid if still running.
  const child = spawn('bash', ['-c', line], { cwd: work, stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const ran = await output(child);
  const seconds = (performance.now() - started) / 1000;
  const console_ = `${ran.stdout}${ran.stderr}`.replaceAll('\r', '');
  const verdict = new RegExp(`${VERDICT} (PASS|FAIL)[^\\n]*`).exec(console_);
  assert.ok(verdict, `no verdict; QEMU exited ${ran.code}:\n${console_.slice(-3000)}`);
  assert.equal(verdict[1], 'PASS', `${verdict[0]}\n${console_.slice(-3000)}`);
  assert.equal(ran.code, 0, 'the guest powered QEMU off');
  assert.ok(
    diskBytes(disk, WRITE_OFFSET, PATTERN_BYTES).equals(guest.writePattern),
    'the pattern is on vblk0.img',
  );
  console.log(`# README's QEMU line: boot to power-off ${seconds.toFixed(1)} s; ${verdict[0]}`);
});
