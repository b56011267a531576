/**
 * `npm start`: the whole system on the embedded default, on one machine, without privileges.
 *
 * Starts the agent with two simulated devices (vdpa0 behind a platform IOMMU, vdpa1 with an
 * on-chip IOMMU), a simulated virtio-blk device vblk0 with a data path on the disk image
 * `<dir>/vblk0.img` (64 MiB sparse, made if absent; a VMM attaches to it over vhost-user, see
 * README) and a 1 GiB sparse backing file `ram0`, then the API server on 127.0.0.1 (REST
 * 8080, gRPC 50051). Both run as their own processes, as in production, supervised as systemd's
 * Restart=on-failure would (scripts/supervise.ts): one that dies is restarted with backoff, and the
 * API server reconciles a restarted agent. Ctrl-C (or SIGTERM) stops the API server first, then the
 * agent; a second Ctrl-C kills both.
 *
 *   npm start -- [--dir DIR] [--restart-sec S] [--restart-burst N] [--restart-interval S]
 *                [API server flags, e.g. --rest-listen 127.0.0.1:9090]
 *
 * `--dir` (default ./.state) holds the agent's and the API server's state directories; the desired
 * state there survives restarts. `--restart-sec` (default 1) is the first restart's delay, doubled
 * for each further one; more than `--restart-burst` (default 5) restarts of one service within
 * `--restart-interval` seconds (default 60) and everything is stopped. Every other flag goes to the
 * API server (see its --help).
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { DEFAULT_RESTART_POLICY, type RestartPolicy, Supervisor } from './supervise.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const READY_TIMEOUT_MS = 60_000;
/** The attachable blk device's disk image, made sparse when absent. */
const DISK_BYTES = 64 * 1024 * 1024;

const POLICY_FLAGS: Record<string, keyof RestartPolicy> = {
  '--restart-sec': 'restartSec',
  '--restart-burst': 'burst',
  '--restart-interval': 'intervalSec',
};

function splitArgs(argv: string[]): { dir: string; policy: RestartPolicy; apiArgs: string[] } {
  const apiArgs: string[] = [];
  const policy = { ...DEFAULT_RESTART_POLICY };
  let dir = path.join(ROOT, '.state');
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const [flag, inline] = arg.startsWith('--') && arg.includes('=') ? arg.split(/=(.*)/s) : [arg, undefined];
    const known = flag === '--dir' || flag! in POLICY_FLAGS;
    const value = known ? (inline ?? argv[++i]) : undefined;
    if (!known) apiArgs.push(arg);
    else if (value === undefined) throw new Error(`${flag} needs a value`);
    else if (flag === '--dir') dir = path.resolve(value);
    else {
      const n = Number(value);
      if (!(n >= 0) || (flag === '--restart-burst' && !Number.isInteger(n)))
        throw new Error(`${flag}: not a non-negative number: ${value}`);
      policy[POLICY_FLAGS[flag!]!] = n;
    }
  }
  return { dir, policy, apiArgs };
}

/** Waits until /readyz answers 200: every device reconciled, so a first curl is not refused. */
async function untilReady(rest: string): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    const status = await fetch(`${rest}/readyz`).then(
      (r) => r.status,
      () => 0,
    );
    if (status === 200) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`the API server was not ready in ${READY_TIMEOUT_MS / 1000} s (${rest}/readyz)`);
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
  const say = (line: string) => process.stderr.write(`start: ${line}\n`);
  let args: ReturnType<typeof splitArgs>;
  try {
    args = splitArgs(process.argv.slice(2));
  } catch (err) {
    say((err as Error).message);
    process.exit(2);
  }
  const { dir, policy, apiArgs } = args;
  const agentDir = path.join(dir, 'agent');
  const socket = path.join(agentDir, 'agent.sock');
  fs.mkdirSync(agentDir, { recursive: true, mode: 0o700 });
  const disk = path.join(dir, 'vblk0.img');
  if (!fs.existsSync(disk)) {
    const fd = fs.openSync(disk, 'wx', 0o600);
    try {
      fs.ftruncateSync(fd, DISK_BYTES);
    } finally {
      fs.closeSync(fd);
    }
  }

  const supervisor = new Supervisor({
    cwd: ROOT,
    policy,
    echo: (line) => process.stdout.write(`${line}\n`),
    say,
  });
  let stopping = false;
  const stopAll = async (code: number) => {
    stopping = true;
    await supervisor.stop();
    process.exit(code);
  };
  // First Ctrl-C: orderly stop. A second one while stopping: kill both at once.
  const onSignal = () => {
    if (!stopping) return void stopAll(0);
    say('killing every service');
    supervisor.killAll();
    process.exit(130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.once('exit', () => supervisor.killAll());
  void supervisor.ended.then(stopAll);

  try {
    await supervisor.start({
      name: 'agent',
      script: 'services/agent/main.ts',
      args: [
        ...['--device', 'sim:vdpa0,iommu=platform', '--device', 'sim:vdpa1,iommu=onchip'],
        ...['--device', `sim:vblk0,iommu=onchip,disk=${disk}`],
        ...['--memory', 'ram0=1G', '--state-dir', agentDir, '--socket', socket],
      ],
      readyMsg: 'agent serving',
    });
    const listening = await supervisor.start({
      name: 'api',
      script: 'services/api/main.ts',
      args: ['--state-dir', path.join(dir, 'api'), '--agent-socket', socket, ...apiArgs],
      readyMsg: 'api server listening',
      // Port 0 picks new ports on every start: say where it listens.
      describeReady: (ready) => `REST ${ready['rest']}, gRPC ${ready['grpc']}`,
    });
    const rest = String(listening['rest']);
    await untilReady(rest);
    process.stdout.write(hints(rest, String(listening['grpc'])));
  } catch (err) {
    say((err as Error).message);
    await stopAll(1);
  }
}

await main();
