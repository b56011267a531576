/**
 * `npm start`: the whole system on the embedded default, on one machine, without privileges.
 *
 * Starts the agent with two simulated devices (vdpa0 behind a platform IOMMU, vdpa1 with an
 * on-chip IOMMU) and a 1 GiB sparse backing file `ram0`, then the API server on 127.0.0.1 (REST
 * 8080, gRPC 50051). Both run as their own processes, as in production. Ctrl-C (or SIGTERM) stops
 * the API server first, then the agent.
 *
 *   npm start -- [--dir DIR] [API server flags, e.g. --rest-listen 127.0.0.1:9090]
 *
 * `--dir` (default ./.state) holds the agent's and the API server's state directories; the desired
 * state there survives restarts. Every other flag goes to the API server (see its --help).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 15_000;

interface Child {
  name: string;
  process: ChildProcess;
  exited: Promise<number>;
}

function splitArgs(argv: string[]): { dir: string; apiArgs: string[] } {
  const apiArgs: string[] = [];
  let dir = path.join(ROOT, '.state');
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--dir' && argv[i + 1] !== undefined) dir = path.resolve(argv[++i]!);
    else if (arg.startsWith('--dir=')) dir = path.resolve(arg.slice('--dir='.length));
    else apiArgs.push(arg);
  }
  return { dir, apiArgs };
}

/**
 * Spawns `node --import tsx <script>` in its own process group (so a terminal's Ctrl-C reaches only
 * this script, which then stops the children in order), echoes its log, and resolves with the first
 * log record whose msg is `readyMsg`.
 */
function spawnService(
  name: string,
  script: string,
  args: string[],
  readyMsg: string,
): { child: Child; ready: Promise<Record<string, unknown>> } {
  const proc = spawn(process.execPath, ['--import', 'tsx', script, ...args], {
    cwd: ROOT,
    detached: true,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise<number>((resolve) => {
    proc.once('exit', (code, signal) => resolve(code ?? (signal === null ? 1 : 128)));
  });
  const ready = new Promise<Record<string, unknown>>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${name} did not start in time`)), START_TIMEOUT_MS);
    createInterface({ input: proc.stdout! }).on('line', (line) => {
      process.stdout.write(`${line}\n`);
      const record = parseLogLine(line);
      if (record?.msg === readyMsg) {
        clearTimeout(timer);
        resolve(record);
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`${name} exited with ${code} before it was ready`));
    });
  });
  return { child: { name, process: proc, exited }, ready };
}

function parseLogLine(line: string): Record<string, unknown> | undefined {
  try {
    const value: unknown = JSON.parse(line);
    return typeof value === 'object' && value !== null ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

async function stop(child: Child): Promise<void> {
  if (child.process.exitCode !== null || child.process.signalCode !== null) return;
  child.process.kill('SIGTERM');
  const timer = setTimeout(() => child.process.kill('SIGKILL'), STOP_TIMEOUT_MS);
  await child.exited;
  clearTimeout(timer);
}

/** Waits until /readyz answers 200: every device reconciled, so a first curl is not refused. */
async function untilReady(rest: string): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    const status = await fetch(`${rest}/readyz`).then(
      (r) => r.status,
      () => 0,
    );
    if (status === 200) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`the API server was not ready in ${START_TIMEOUT_MS / 1000} s (${rest}/readyz)`);
}

function hints(rest: string, grpc: string): string {
  const g = grpc.replace(/^dns:|^ipv4:/, '');
  return `
vdpa-mapd is running: REST ${rest}, gRPC ${g}, metrics ${rest}/metrics. Try:
  curl -s ${rest}/v1/devices
  curl -s -X POST ${rest}/v1/devices/vdpa1/mappings -H 'content-type: application/json' \\
       -d '{"iova":"0x10000000","size":"0x200000","memory":"ram0","offset":"0x0","perm":"rw"}'
  curl -s ${rest}/v1/devices/vdpa1/mappings
  grpcurl -plaintext -d '{"device":"vdpa1"}' ${g} vdpa.mapd.v1.MappingService/ListMappings
Ctrl-C stops both processes.
`;
}

async function main(): Promise<void> {
  const { dir, apiArgs } = splitArgs(process.argv.slice(2));
  const agentDir = path.join(dir, 'agent');
  const socket = path.join(agentDir, 'agent.sock');
  fs.mkdirSync(agentDir, { recursive: true, mode: 0o700 });

  const children: Child[] = [];
  let stopping = false;
  const stopAll = async (code: number) => {
    if (stopping) return;
    stopping = true;
    // API server first, so nothing is in flight when the agent closes its devices.
    for (const child of [...children].reverse()) await stop(child);
    process.exit(code);
  };
  const killAll = () => {
    for (const c of children) if (c.process.exitCode === null) c.process.kill('SIGKILL');
  };
  // First Ctrl-C: orderly stop. A second one while stopping: kill both at once.
  const onSignal = () => {
    if (!stopping) return void stopAll(0);
    killAll();
    process.exit(130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.once('exit', killAll);

  try {
    const agent = spawnService(
      'agent',
      'services/agent/main.ts',
      [
        ...['--device', 'sim:vdpa0,iommu=platform', '--device', 'sim:vdpa1,iommu=onchip'],
        ...['--memory', 'ram0=1G', '--state-dir', agentDir, '--socket', socket],
      ],
      'agent serving',
    );
    children.push(agent.child);
    await agent.ready;

    const api = spawnService(
      'api',
      'services/api/main.ts',
      ['--state-dir', path.join(dir, 'api'), '--agent-socket', socket, ...apiArgs],
      'api server listening',
    );
    children.push(api.child);
    const listening = await api.ready;
    const rest = String(listening['rest']);
    await untilReady(rest);
    process.stdout.write(hints(rest, String(listening['grpc'])));

    // Either process ending on its own ends the system: stop the other and report it.
    const first = await Promise.race(children.map((c) => c.exited.then((code) => ({ c, code }))));
    if (!stopping) {
      process.stderr.write(`start: ${first.c.name} exited with ${first.code}; stopping\n`);
      await stopAll(first.code === 0 ? 1 : first.code);
    }
  } catch (err) {
    process.stderr.write(`start: ${(err as Error).message}\n`);
    await stopAll(1);
  }
}

await main();
