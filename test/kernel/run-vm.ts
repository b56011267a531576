/**
 * Host side of the real-kernel tier: builds the VM (build-vm.sh, cached), boots it with
 * qemu-system-x86_64 under TCG and reads the verdict that the guest's /init (init.sh)
 * prints on the serial console. QEMU exits 0 whatever the guest did, so a run passes only
 * with a `VDPA-MAPD-KERNEL-TIER: PASS` line and a PASS line for every step asked for.
 *
 * The guest sees three virtio-9p shares: the host's /usr (read-only: node and its
 * libraries), the project tree at its host path (read-only, the steps' working directory)
 * and a per-run job folder at /job (the env file and the step list).
 *
 * CLI: `node --import tsx test/kernel/run-vm.ts [guest-script.ts ...]` boots the VM with the
 * tier's steps plus the given guest scripts and streams the console.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const projectRoot = path.resolve(here, '../..');

/** One command the guest runs from the project root under `sh -c`; exit 0 passes. */
export interface GuestStep {
  name: string;
  command: string;
  timeoutSeconds?: number;
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
  /** Guest uptime (s) at each `VDPA-MAPD-TIME: <label>` mark: init, device, done. */
  guestTimes: Record<string, number>;
  /** Host wall time of the qemu run (s). */
  seconds: number;
  /** The console, escape sequences and carriage returns removed. */
  console: string;
}

export interface RunVmOptions {
  vmDir: string;
  steps: GuestStep[];
  /** Hard limit for the whole qemu run; default 60 s plus the steps' timeouts. */
  timeoutMs?: number;
  /** Receives the console as it arrives (e.g. process.stdout.write). */
  onConsole?: (text: string) => void;
}

const DEFAULT_STEP_TIMEOUT_S = 60;
const VERDICT = 'VDPA-MAPD-KERNEL-TIER:';
const STEP = 'VDPA-MAPD-STEP:';
const TIME = 'VDPA-MAPD-TIME:';

/** Single-quotes `s` for sh. */
export function shQuote(s: string): string {
  return `'${s.replaceAll("'", "'\\''")}'`;
}

/**
 * A step that runs a TypeScript guest script (path relative to the project root) with tsx;
 * the step is named `guest-<file name>`.
 */
export function guestScriptStep(script: string, args: string[] = [], timeoutSeconds = 120): GuestStep {
  return {
    name: `guest-${path.basename(script, '.ts')}`,
    command: ['node', '--import', 'tsx', script, ...args].map(shQuote).join(' '),
    timeoutSeconds,
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
    { name: 'guest-smoke', command: 'guest-smoke', timeoutSeconds: 60 },
    { name: 'node-koffi', command: `node -e ${shQuote(koffiOwner)}`, timeoutSeconds: 60 },
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

export async function runVm(opts: RunVmOptions): Promise<VmResult> {
  if (opts.steps.length === 0) throw new Error('runVm: no steps');
  for (const s of opts.steps) {
    if (!/^[\w.-]+$/.test(s.name)) throw new Error(`runVm: bad step name ${JSON.stringify(s.name)}`);
    if (/[\t\n]/.test(s.command)) throw new Error(`runVm: step ${s.name}: tab or newline in command`);
  }
  const stepTimeouts = opts.steps.map((s) => s.timeoutSeconds ?? DEFAULT_STEP_TIMEOUT_S);
  const timeoutMs = opts.timeoutMs ?? (60 + stepTimeouts.reduce((a, b) => a + b, 0)) * 1000;

  const job = await mkdtemp(path.join(tmpdir(), 'vdpa-mapd-vm-'));
  try {
    await writeFile(
      path.join(job, 'env'),
      `VDPA_MAPD_ROOT=${shQuote(projectRoot)}\nVDPA_MAPD_KERNEL_TIER=1\n`,
    );
    await writeFile(
      path.join(job, 'steps'),
      opts.steps.map((s, i) => `${s.name}\t${stepTimeouts[i]}\t${s.command}\n`).join(''),
    );
    const share = (dir: string, tag: string, ro: boolean) => [
      '-virtfs',
      `local,path=${dir},mount_tag=${tag},security_model=none${ro ? ',readonly=on' : ''}`,
    ];
    const args = [
      ...['-machine', 'q35,accel=tcg', '-cpu', 'max', '-smp', '2', '-m', '1G'],
      ...['-nographic', '-no-reboot', '-nic', 'none'],
      ...['-kernel', path.join(opts.vmDir, 'vmlinuz'), '-initrd', path.join(opts.vmDir, 'initramfs.gz')],
      ...['-append', 'console=ttyS0 panic=-1 quiet'],
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

export function parseConsole(text: string, steps: GuestStep[]): VmResult {
  const result: VmResult = { pass: false, reason: '', steps: [], guestTimes: {}, seconds: 0, console: text };
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
    const t = at(TIME)?.match(/^(\S+) ([\d.]+)$/);
    if (t) result.guestTimes[t[1]!] = Number(t[2]);
  }
  const missing = steps.filter((s) => !result.steps.some((r) => r.name === s.name)).map((s) => s.name);
  const failed = result.steps.filter((r) => !r.pass).map((r) => r.name);
  if (verdict === undefined) result.reason = 'no verdict on the console';
  else if (verdict !== 'PASS') result.reason = `guest verdict: ${verdict}`;
  else if (failed.length > 0) result.reason = `failed steps: ${failed.join(' ')}`;
  else if (missing.length > 0) result.reason = `steps without a result: ${missing.join(' ')}`;
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
  const steps = [...tierSteps(), ...process.argv.slice(2).map((script) => guestScriptStep(script))];
  const result = await runVm({ vmDir, steps, onConsole: (text) => process.stdout.write(text) });
  console.log(`\n${result.pass ? 'PASS' : `FAIL: ${result.reason}`} (${result.seconds.toFixed(1)} s)`);
  process.exitCode = result.pass ? 0 : 1;
}
