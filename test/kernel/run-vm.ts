/**
 * Host side of the real-kernel tier: builds the VM (build-vm.sh, cached), boots it with
 * qemu-system-x86_64 under TCG and reads the verdict that the guest's /init (init.sh)
 * prints on the serial console. QEMU exits 0 whatever the guest did, so a run passes only
 * with a `VDPA-MAPD-KERNEL-TIER: PASS` line and a PASS line for every step asked for.
 *
 * The guest sees three virtio-9p shares: the host's /usr (read-only: node and its
 * libraries), the project tree at its host path (read-only, the steps' working directory)
 * and a per-run job folder at /job (the env file, the step list and the blk kinds' disk images).
 * It also has QEMU's intel-iommu with a virtio-net-pci and a virtio-blk-pci device behind it,
 * which the `vp-vdpa` and `vp-vdpa-blk` kinds hand to vp_vdpa. The disk images are read back
 * after the run (VmResult.images), so the host can check what the guest's I/O wrote.
 *
 * No step has a time limit: a guest under TCG on a loaded machine runs several times slower
 * than on a quiet one, so the only limit is the whole run's (the tier's budget). A step that
 * hangs shows as the step that began and never ended.
 *
 * CLI: `node --import tsx test/kernel/run-vm.ts [--kind K[,K...]] [guest-script.ts ...]` boots
 * the VM with the given guest scripts as steps of each kind K (default vduse; the tier's own
 * checks first for vduse) and streams the console.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { BLK_IMAGE_BYTES, BLK_KINDS, blkImageName, checkBlkImage } from './blk-plan.ts';
import { bundleForGuest, bundleName } from './bundle.ts';
import { bundlePath } from './guest-js.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
export const projectRoot = path.resolve(here, '../..');

/** The vDPA parent kinds init.sh can set up as /dev/vhost-vdpa-0 (see init.sh). */
export const KINDS = [
  'vduse',
  'vp-vdpa',
  'sim-dma-pa',
  'sim-dma-va',
  'sim-setmap-pa',
  'sim-setmap-va',
  ...BLK_KINDS,
] as const;
export type Kind = (typeof KINDS)[number];

/**
 * One command the guest runs from the project root under `sh -c` while `kind`'s device is
 * /dev/vhost-vdpa-0 (env VDPA_MAPD_KIND); exit 0 passes. Steps of one kind run together.
 */
export interface GuestStep {
  kind: Kind;
  name: string;
  command: string;
  /** The guest script, bundled for the guest before the boot (see bundle.ts). */
  script?: string;
}

export interface StepResult {
  name: string;
  pass: boolean;
  /** The rest of the step's PASS/FAIL line (duration, rc, reason). */
  detail: string;
}

export interface VmResult {
  pass: boolean;
  /** Why the run failed; empty when it passed. */
  reason: string;
  steps: StepResult[];
  /** Each kind's `VDPA-MAPD-KIND:` line (READY with what it set up, or FAIL with why). */
  kinds: Record<string, string>;
  /** Guest uptime (s) at each `VDPA-MAPD-TIME: <label>` mark: init, device, done. */
  guestTimes: Record<string, number>;
  /** Host wall time of the qemu run (s). */
  seconds: number;
  /** The console, escape sequences and carriage returns removed. */
  console: string;
  /** The blk kinds' disk images (by kind) as they were when QEMU exited. */
  images: Record<string, Buffer>;
}

export interface RunVmOptions {
  vmDir: string;
  steps: GuestStep[];
  /** Hard limit for the whole qemu run (the tier's budget); default {@link TIER_BUDGET_MS}. */
  timeoutMs?: number;
  /** Receives the console as it arrives (e.g. process.stdout.write). */
  onConsole?: (text: string) => void;
}

/**
 * The whole tier's budget, and the only time limit of a run: 40 minutes, far above what a run
 * takes (about 15 minutes on a machine loaded several times over, much less on a quiet one), so
 * that only a hang reaches it; inside CI's 90. Guest code gets it as VDPA_MAPD_BUDGET_MS for its
 * waits.
 */
export const TIER_BUDGET_MS = 40 * 60_000;
const VERDICT = 'VDPA-MAPD-KERNEL-TIER:';
const STEP = 'VDPA-MAPD-STEP:';
const KIND = 'VDPA-MAPD-KIND:';
const TIME = 'VDPA-MAPD-TIME:';

/** Single-quotes `s` for sh. */
export function shQuote(s: string): string {
  return `'${s.replaceAll("'", "'\\''")}'`;
}

/**
 * A step that runs a TypeScript guest script (path relative to the project root), bundled to
 * JavaScript before the boot; named `guest-<file name>` for vduse and `<kind>.<file name>` for
 * the other kinds.
 */
export function guestScriptStep(script: string, kind: Kind = 'vduse', args: string[] = []): GuestStep {
  const base = path.basename(script, '.ts');
  return {
    kind,
    name: kind === 'vduse' ? `guest-${base}` : `${kind}.${base}`,
    command: ['node', bundlePath(bundleName(script)), ...args].map(shQuote).join(' '),
    script,
  };
}

/**
 * The tier's own checks: the C smoke test, then plain Node calling VHOST_SET_OWNER through
 * koffi from the project's node_modules (no tsx, no project code).
 */
export function tierSteps(): GuestStep[] {
  const koffiOwner = [
    "const koffi = require('koffi');",
    "const fd = require('node:fs').openSync(process.env.VHOST_VDPA_DEV, 'r+');",
    "const ioctl = koffi.load('libc.so.6').func('int ioctl(int fd, unsigned long request, ...)');",
    'const r = ioctl(fd, 0xaf01);', // VHOST_SET_OWNER = _IO(0xAF, 0x01)
    "console.log('NODE-KOFFI: VHOST_SET_OWNER ->', r === 0 ? 'ok' : 'errno ' + koffi.errno());",
    'process.exit(r === 0 ? 0 : 1);',
  ].join(' ');
  return [
    { kind: 'vduse', name: 'guest-smoke', command: 'guest-smoke' },
    { kind: 'vduse', name: 'node-koffi', command: `node -e ${shQuote(koffiOwner)}` },
  ];
}

/** Runs build-vm.sh (cached) and returns the VM folder and the script's log (timings). */
export async function buildVm(): Promise<{ vmDir: string; log: string }> {
  const { code, stdout, stderr } = await run('bash', [path.join(here, 'build-vm.sh')]);
  const vmDir = stdout.trim().split('\n').pop() ?? '';
  if (code !== 0 || vmDir === '') {
    throw new Error(`test/kernel/build-vm.sh failed (exit ${code}):\n${stderr.slice(-4000)}`);
  }
  return { vmDir, log: stderr };
}

/** Bundles the steps' guest scripts (and the services) for the guest; returns the time it took (ms). */
export function bundleSteps(steps: readonly GuestStep[]): Promise<number> {
  return bundleForGuest([...new Set(steps.flatMap((s) => (s.script ? [s.script] : [])))]);
}

export async function runVm(opts: RunVmOptions): Promise<VmResult> {
  if (opts.steps.length === 0) throw new Error('runVm: no steps');
  const seenKinds: Kind[] = [];
  for (const s of opts.steps) {
    if (!/^[\w.-]+$/.test(s.name)) throw new Error(`runVm: bad step name ${JSON.stringify(s.name)}`);
    if (/[\t\n]/.test(s.command)) throw new Error(`runVm: step ${s.name}: tab or newline in command`);
    if (seenKinds.at(-1) !== s.kind) {
      if (seenKinds.includes(s.kind)) throw new Error(`runVm: the steps of kind ${s.kind} are not together`);
      seenKinds.push(s.kind);
    }
  }
  const timeoutMs = opts.timeoutMs ?? TIER_BUDGET_MS;

  const job = await mkdtemp(path.join(tmpdir(), 'vdpa-mapd-vm-'));
  try {
    await writeFile(
      path.join(job, 'env'),
      `VDPA_MAPD_ROOT=${shQuote(projectRoot)}\nVDPA_MAPD_KERNEL_TIER=1\nVDPA_MAPD_BUDGET_MS=${timeoutMs}\n`,
    );
    await writeFile(
      path.join(job, 'steps'),
      opts.steps.map((s) => `${s.kind}\t${s.name}\t${s.command}\n`).join(''),
    );
    // The blk kinds' disks: zeros, BLK_IMAGE_BYTES each, checked by the host after the run.
    for (const kind of BLK_KINDS) {
      await writeFile(path.join(job, blkImageName(kind)), '');
      await truncate(path.join(job, blkImageName(kind)), BLK_IMAGE_BYTES);
    }
    const share = (dir: string, tag: string, ro: boolean) => [
      '-virtfs',
      `local,path=${dir},mount_tag=${tag},security_model=none${ro ? ',readonly=on' : ''}`,
    ];
    const args = [
      ...['-machine', 'q35,accel=tcg', '-cpu', 'max', '-smp', '2', '-m', '1G'],
      ...['-nographic', '-no-reboot', '-nic', 'none'],
      // The vp-vdpa kind: a modern-only virtio-net-pci that DMAs through the platform IOMMU
      // (39-bit address width: GET_IOVA_RANGE [0, 0x7fffffffff]).
      ...['-device', 'intel-iommu,intremap=off'],
      ...['-device', 'virtio-net-pci,iommu_platform=on,disable-legacy=on'],
      // The vp-vdpa-blk kind: the same for a virtio-blk-pci on a host image.
      ...['-drive', `file=${path.join(job, blkImageName('vp-vdpa-blk'))},format=raw,if=none,id=vb0`],
      ...['-device', 'virtio-blk-pci,drive=vb0,iommu_platform=on,disable-legacy=on'],
      ...['-kernel', path.join(opts.vmDir, 'vmlinuz'), '-initrd', path.join(opts.vmDir, 'initramfs.gz')],
      ...['-append', 'console=ttyS0 panic=-1 quiet intel_iommu=on'],
      ...share('/usr', 'usr', true),
      ...share(projectRoot, 'project', true),
      ...share(job, 'job', false),
    ];
    const started = performance.now();
    const { code, stdout, stderr, timedOut } = await run(
      'qemu-system-x86_64',
      args,
      timeoutMs,
      opts.onConsole,
    );
    const seconds = (performance.now() - started) / 1000;
    const result = parseConsole(cleanConsole(stdout + stderr), opts.steps);
    result.seconds = seconds;
    for (const kind of BLK_KINDS) result.images[kind] = await readFile(path.join(job, blkImageName(kind)));
    if (timedOut) fail(result, `qemu killed after ${timeoutMs / 1000} s (hard timeout)`);
    else if (code !== 0) fail(result, `qemu exited with ${code}`);
    return result;
  } finally {
    await rm(job, { recursive: true, force: true });
  }
}

function fail(result: VmResult, reason: string): void {
  result.pass = false;
  result.reason = result.reason === '' ? reason : `${reason}; ${result.reason}`;
}

/** Removes terminal escape sequences (SeaBIOS clears the screen) and carriage returns. */
function cleanConsole(text: string): string {
  // biome-ignore lint/suspicious/noControlCharactersInRegex: matching ESC is the point
  return text.replace(/\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])/g, '').replaceAll('\r', '');
}

/**
 * Whether the guest kernel died before init.sh started (no `VDPA-MAPD-TIME: init` mark, a
 * `Kernel panic` on the console): nothing of ours ran, so the tier boots once more
 * (docs/kernel-notes.md B8: a multi-threaded TCG crash in the kernel's own early boot).
 */
export function panickedBeforeInit(result: VmResult): boolean {
  return result.guestTimes.init === undefined && result.console.includes('Kernel panic');
}

export function parseConsole(text: string, steps: GuestStep[]): VmResult {
  const result: VmResult = {
    pass: false,
    reason: '',
    steps: [],
    kinds: {},
    guestTimes: {},
    seconds: 0,
    console: text,
    images: {},
  };
  let verdict: string | undefined;
  for (const line of text.split('\n')) {
    // Kernel messages may be printed in the middle of a line: search, not anchor.
    const at = (tag: string) => {
      const i = line.indexOf(tag);
      return i < 0 ? undefined : line.slice(i + tag.length).trim();
    };
    const v = at(VERDICT);
    if (v !== undefined) verdict = v;
    const s = at(STEP);
    const m = s?.match(/^(\S+) (PASS|FAIL)\b ?(.*)$/);
    if (m) result.steps.push({ name: m[1]!, pass: m[2] === 'PASS', detail: m[3]! });
    const k = at(KIND)?.match(/^(\S+) (.*)$/);
    if (k) result.kinds[k[1]!] = k[2]!;
    const t = at(TIME)?.match(/^(\S+) ([\d.]+)$/);
    if (t) result.guestTimes[t[1]!] = Number(t[2]);
  }
  const missing = steps.filter((s) => !result.steps.some((r) => r.name === s.name)).map((s) => s.name);
  const running = [...text.matchAll(/VDPA-MAPD-STEP: (\S+) BEGIN/g)]
    .map((m) => m[1]!)
    .filter((name) => !result.steps.some((r) => r.name === name));
  const failed = result.steps.filter((r) => !r.pass).map((r) => r.name);
  if (verdict === undefined) result.reason = 'no verdict on the console';
  else if (verdict !== 'PASS') result.reason = `guest verdict: ${verdict}`;
  else if (failed.length > 0) result.reason = `failed steps: ${failed.join(' ')}`;
  else if (missing.length > 0) result.reason = `steps without a result: ${missing.join(' ')}`;
  if (running.length > 0) result.reason += ` (still running when the console ended: ${running.join(' ')})`;
  result.pass = result.reason === '';
  return result;
}

interface RunOutput {
  code: number | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

function run(
  cmd: string,
  args: string[],
  timeoutMs?: number,
  onOut?: (text: string) => void,
): Promise<RunOutput> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
      onOut?.(d);
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            child.kill('SIGKILL');
          }, timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${cmd}: ${err.message}`));
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, timedOut });
    });
  });
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const { vmDir, log } = await buildVm();
  process.stderr.write(log);
  const args = process.argv.slice(2);
  const kindAt = args.indexOf('--kind');
  const kinds = (kindAt >= 0 ? args.splice(kindAt, 2)[1]! : 'vduse').split(',') as Kind[];
  const unknown = kinds.filter((k) => !KINDS.includes(k));
  if (unknown.length > 0) throw new Error(`--kind ${unknown.join(',')}: one of ${KINDS.join(' ')}`);
  const steps = kinds.flatMap((kind) => [
    ...(kind === 'vduse' ? tierSteps() : []),
    ...args.map((script) => guestScriptStep(script, kind)),
  ]);
  await bundleSteps(steps);
  const result = await runVm({ vmDir, steps, onConsole: (text) => process.stdout.write(text) });
  for (const kind of BLK_KINDS.filter((k) => kinds.includes(k))) {
    try {
      console.log(`image ${kind}: ${checkBlkImage(kind, result.images[kind]!)}`);
    } catch (e) {
      console.log(`image ${kind}: FAIL ${(e as Error).message}`);
      result.pass = false;
    }
  }
  console.log(`\n${result.pass ? 'PASS' : `FAIL: ${result.reason}`} (${result.seconds.toFixed(1)} s)`);
  process.exitCode = result.pass ? 0 : 1;
}
