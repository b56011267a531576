/**
 * The guest of the vhost-user tests: the kernel tier's cached Debian kernel (test/kernel/build-vm.sh
 * builds and caches it; only its vmlinuz and virtio_blk.ko are used) with a busybox initramfs made
 * per run, whose /init reads a pattern the host put on /dev/vda, writes another with O_DIRECT,
 * reads it back, and prints a verdict on the serial console.
 *
 * The I/O runs in the background and /init waits for it up to `vu.wait` seconds of guest time
 * (kernel command line; 300 without it), so a device that never completes a request still ends in
 * a verdict. With `vu.rounds` it then writes and reads back patterns without end, one round after
 * the other (odd rounds the write pattern at ROUND_OFFSETS[1], even ones the read pattern at
 * ROUND_OFFSETS[0]), printing `ROUND n PASS|FAIL` after each: I/O in flight whenever the host
 *  breaks something. Hotplugged memory stays offline (qemu.ts boots with `memhp_default_state=offline`; no
 * udev to online it), so the guest can always give a DIMM back when the host unplugs it.
 */
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const projectRoot = path.resolve(here, '../..');

export const VERDICT = 'VHOST-USER-GUEST:';
/** Where the host's pattern sits on the disk (read by the guest), and where the guest writes. */
export const READ_OFFSET = 1 << 20;
export const WRITE_OFFSET = 4 << 20;
export const PATTERN_BYTES = 1 << 20;
/** Where even and odd rounds (`vu.rounds`) write: never the region of the round before. */
export const ROUND_OFFSETS = [8 << 20, 12 << 20] as const;

export interface Guest {
  vmlinuz: string;
  initramfs: string;
  /** What the host put at READ_OFFSET, and what the guest must write at WRITE_OFFSET. */
  readPattern: Buffer;
  writePattern: Buffer;
  dir: string;
  cleanup(): void;
}

const INIT = `#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
wait_s=$(sed -n 's/.*vu.wait=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
wait_s=\${wait_s:-300}
say() { echo "${VERDICT} $*" > /dev/console; }
(
  insmod /lib/virtio_blk.ko || { echo "FAIL insmod" > /tmp/result; exit; }
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  [ -b /dev/vda ] || { echo "FAIL no /dev/vda" > /tmp/result; exit; }
  say "DEVICE $(cat /sys/block/vda/size) sectors serial=$(cat /sys/block/vda/serial 2>/dev/null)"
  dd if=/dev/vda of=/tmp/r1 bs=64k skip=${READ_OFFSET / 65536} count=${PATTERN_BYTES / 65536} iflag=direct 2>/dev/null
  cmp -s /tmp/r1 /p-read.bin || { echo "FAIL host pattern read back wrong" > /tmp/result; exit; }
  dd if=/p-write.bin of=/dev/vda bs=64k seek=${WRITE_OFFSET / 65536} oflag=direct conv=fsync,notrunc 2>/dev/null || { echo "FAIL write" > /tmp/result; exit; }
  dd if=/dev/vda of=/tmp/r2 bs=64k skip=${WRITE_OFFSET / 65536} count=${PATTERN_BYTES / 65536} iflag=direct 2>/dev/null
  cmp -s /tmp/r2 /p-write.bin || { echo "FAIL written pattern read back wrong" > /tmp/result; exit; }
  echo "PASS read ${PATTERN_BYTES} write ${PATTERN_BYTES} readback ${PATTERN_BYTES}" > /tmp/result
) &
i=0
while [ ! -s /tmp/result ] && [ $i -lt $wait_s ]; do sleep 1; i=$((i+1)); done
if [ -s /tmp/result ]; then say "$(cat /tmp/result)"; else say "FAIL no result after $wait_s s"; fi
say "UPTIME $(cut -d' ' -f1 /proc/uptime)"
if grep -q vu.rounds /proc/cmdline; then
  n=0
  while true; do
    n=$((n+1))
    if [ $((n % 2)) -eq 1 ]; then p=/p-write.bin; at=${ROUND_OFFSETS[1] / 65536}; else p=/p-read.bin; at=${ROUND_OFFSETS[0] / 65536}; fi
    if dd if=$p of=/dev/vda bs=64k seek=$at oflag=direct conv=fsync,notrunc 2>/dev/null &&
       dd if=/dev/vda of=/tmp/r3 bs=64k skip=$at count=${PATTERN_BYTES / 65536} iflag=direct 2>/dev/null &&
       cmp -s /tmp/r3 $p; then
      say "ROUND $n PASS"
    else
      say "ROUND $n FAIL"
    fi
  done
fi
if grep -q vu.hold /proc/cmdline; then
  say "HOLDING"
  while true; do sleep 1; done
fi
# -n: no sync. A device that never completes a request still blocks the power-off (the kernel's
# shutdown waits for the stuck disk probe): the host ends such a guest over QMP.
poweroff -n -f
`;

function run(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      err += d;
    });
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err.slice(-2000)}`));
    });
  });
}

/** The kernel tier's VM folder (vmlinuz) and the unpacked kernel's modules folder. */
async function kernel(): Promise<{ vmlinuz: string; modules: string }> {
  const out = await run('bash', [path.join(projectRoot, 'test/kernel/build-vm.sh')]);
  const vmDir = out.trim().split('\n').pop() ?? '';
  const info = fs.readFileSync(path.join(vmDir, 'info'), 'utf8');
  const pkg = info.match(/^kernel (\S+)$/m)?.[1];
  if (pkg === undefined) throw new Error(`no kernel line in ${vmDir}/info`);
  const modules = path.join(projectRoot, '.cache/kernel-vm/kernel', pkg, 'modules');
  if (!fs.existsSync(modules)) throw new Error(`kernel modules not found at ${modules}`);
  return { vmlinuz: path.join(vmDir, 'vmlinuz'), modules };
}

/** Random bytes: a disk left over from an earlier run can never match. */
function pattern(): Buffer {
  return crypto.randomBytes(PATTERN_BYTES);
}

export async function buildGuest(): Promise<Guest> {
  const { vmlinuz, modules } = await kernel();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-vu-guest-'));
  const root = path.join(dir, 'root');
  for (const d of ['bin', 'lib', 'proc', 'sys', 'dev', 'tmp'])
    fs.mkdirSync(path.join(root, d), { recursive: true });
  fs.copyFileSync('/bin/busybox', path.join(root, 'bin/busybox'));
  for (const applet of [
    'sh',
    'mount',
    'sed',
    'cat',
    'dd',
    'cmp',
    'sleep',
    'insmod',
    'poweroff',
    'grep',
    'cut',
  ]) {
    fs.symlinkSync('busybox', path.join(root, 'bin', applet));
  }
  fs.writeFileSync(path.join(root, 'init'), INIT, { mode: 0o755 });
  const ko = path.join(modules, 'kernel/drivers/block/virtio_blk.ko.xz');
  fs.writeFileSync(path.join(root, 'lib/virtio_blk.ko'), await runBuffer('xz', ['-dc', ko]));
  const readPattern = pattern();
  const writePattern = pattern();
  fs.writeFileSync(path.join(root, 'p-read.bin'), readPattern);
  fs.writeFileSync(path.join(root, 'p-write.bin'), writePattern);
  const initramfs = path.join(dir, 'initramfs.gz');
  await run('sh', ['-c', `find . | cpio -o -H newc --quiet | gzip -1 > ${JSON.stringify(initramfs)}`], {
    cwd: root,
  });
  fs.rmSync(root, { recursive: true, force: true });
  return {
    vmlinuz,
    initramfs,
    readPattern,
    writePattern,
    dir,
    cleanup: () => fs.rmSync(dir, { recursive: true, force: true }),
  };
}

function runBuffer(cmd: string, args: string[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    const chunks: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => chunks.push(d));
    child.on('error', reject);
    child.on('close', (code) =>
      code === 0 ? resolve(Buffer.concat(chunks)) : reject(new Error(`${cmd} exited ${code}`)),
    );
  });
}

/** Size of the guest's disk image. */
export const DISK_BYTES = 64 << 20;

/** A sparse disk image in `dir` holding the guest's read pattern at READ_OFFSET. */
export function makeDisk(guest: Guest, dir: string, name: string): string {
  const disk = path.join(dir, name);
  fs.writeFileSync(disk, Buffer.alloc(0));
  fs.truncateSync(disk, DISK_BYTES);
  const fd = fs.openSync(disk, 'r+');
  fs.writeSync(fd, guest.readPattern, 0, guest.readPattern.length, READ_OFFSET);
  fs.closeSync(fd);
  return disk;
}

export function diskBytes(disk: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(disk, 'r');
  const out = Buffer.alloc(length);
  fs.readSync(fd, out, 0, length, offset);
  fs.closeSync(fd);
  return out;
}
