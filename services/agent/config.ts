/** The agent's configuration from its command line and environment (flags win over env). */
import path from 'node:path';
import { parseArgs } from 'node:util';
import type { RegisterMemoryRequest } from '../../src/agent/wire.ts';
import { parseDeviceSpec } from '../../src/device/factory.ts';
import { defaultAllowedRoots, memoryDir } from '../../src/memory/allowlist.ts';

export interface AgentConfig {
  /** Unix socket path the agent serves on. */
  socketPath: string;
  /** Device specs for openDevices: `sim:NAME[,k=v...]`, `kernel:auto`, `kernel:/dev/vhost-vdpa-N`. */
  devices: string[];
  /** Roots memory may be opened under by path. */
  allowedRoots: string[];
  stateDir: string;
  /** vhost-user sockets of attached devices may only be made under this directory
   *  (default: {@link defaultAttachDir}). */
  attachDir?: string;
  /** How long a VMM's memory change waits for the API server's answer, ms (default 30 s). */
  attachAnswerMs?: number;
  /** Memory registered at start, before the socket is served. */
  memory: RegisterMemoryRequest[];
  logLevel: LogLevel;
}

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export const DEFAULT_STATE_DIR = '/var/lib/vdpa-mapd';

export const USAGE = `usage: agent [options]
  --socket PATH        unix socket to serve on   (VDPA_MAPD_AGENT_SOCKET; default <state-dir>/agent/agent.sock)
  --device SPEC        device to open, repeatable (VDPA_MAPD_DEVICES, comma or semicolon separated)
                       sim:NAME[,iommu=onchip|platform]  kernel:auto  kernel:/dev/vhost-vdpa-N
                       (a sim is any parent kind: onchipMap=set_map|dma_map, useVa=0|1,
                       keepsMapOnReset=0|1, pageSize=, contiguousPages=, memlock=, range=, ...)
                       (fault injection for tests and drills: sim:NAME,failIova=ADDR makes every
                       UPDATE for IOVA ADDR fail with EFAULT, as a failed pin would)
  --allowed-root DIR   root memory may be opened under, repeatable
                       (VDPA_MAPD_ALLOWED_ROOTS; default /dev/hugepages, /dev/shm/vdpa-mapd;
                       <state-dir>/memory, where created memory lives, is always allowed)
  --state-dir DIR      state directory            (VDPA_MAPD_STATE_DIR; default ${DEFAULT_STATE_DIR})
  --attach-dir DIR     vhost-user sockets of attached devices only under DIR
                       (VDPA_MAPD_ATTACH_DIR; default <state-dir>/vhost-user)
  --attach-answer-ms N how long a VMM's memory change waits for the API server (default 30000)
  --memory ID=SIZE     create memory at start (SIZE: bytes, 0x hex, or with K/M/G/T), repeatable
  --memory ID=memfd:SIZE   same, as a memfd
  --memory ID=PATH     open an existing file (absolute or ./relative path)
  --log-level LEVEL    ${LOG_LEVELS.join('|')} (VDPA_MAPD_LOG_LEVEL; default info)
  --help`;

export function defaultAttachDir(stateDir: string): string {
  return path.join(stateDir, 'vhost-user');
}

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

/** Env lists: comma or semicolon separated, blanks dropped. */
function splitList(value: string | undefined, separator = /[;,]/): string[] {
  return (value ?? '')
    .split(separator)
    .map((s) => s.trim())
    .filter((s) => s !== '');
}

/** Device specs carry their own commas (`sim:a,iommu=onchip`): a comma separates two specs only
 *  when a new `kind:` follows it. */
function splitDeviceList(value: string | undefined): string[] {
  return splitList(value, /;|,(?=\s*[a-z]+:)/i);
}

/** Checks each spec's syntax now, so a typo is a usage error rather than a failed start. */
function checkDeviceSpecs(specs: string[]): string[] {
  for (const spec of specs) {
    try {
      parseDeviceSpec(spec);
    } catch (e) {
      throw new ConfigError((e as Error).message);
    }
  }
  return specs;
}

const SIZE = /^(0x[0-9a-f]+|[0-9]+)([kmgt]?)$/i;
const SHIFT: Record<string, bigint> = { '': 0n, k: 10n, m: 20n, g: 30n, t: 40n };

export function parseSize(text: string): bigint {
  const m = SIZE.exec(text);
  if (!m) throw new ConfigError(`${JSON.stringify(text)} is not a size (bytes, 0x hex, or with K/M/G/T)`);
  return BigInt(m[1]!) << SHIFT[m[2]!.toLowerCase()]!;
}

/** `id=SIZE`, `id=memfd:SIZE` or `id=PATH`. */
export function parseMemorySpec(spec: string): RegisterMemoryRequest {
  const eq = spec.indexOf('=');
  const id = spec.slice(0, eq);
  const value = spec.slice(eq + 1);
  if (eq <= 0 || value === '')
    throw new ConfigError(`--memory ${spec}: expected ID=SIZE, ID=memfd:SIZE or ID=PATH`);
  if (value.startsWith('/') || value.startsWith('.')) return { id, path: path.resolve(value) };
  try {
    if (value.startsWith('memfd:'))
      return { id, size: parseSize(value.slice('memfd:'.length)), kind: 'memfd' };
    return { id, size: parseSize(value), kind: 'file' };
  } catch (e) {
    throw new ConfigError(`--memory ${spec}: ${(e as Error).message}`);
  }
}

function parseMs(value: string, flag: string): number {
  if (!/^[0-9]+$/.test(value) || Number(value) < 1 || Number(value) > 3_600_000) {
    throw new ConfigError(`${flag} ${JSON.stringify(value)} must be 1..3600000 milliseconds`);
  }
  return Number(value);
}

function parseLogLevel(value: string): LogLevel {
  const level = LOG_LEVELS.find((l) => l === value);
  if (level === undefined)
    throw new ConfigError(`log level ${JSON.stringify(value)} is not one of ${LOG_LEVELS.join(', ')}`);
  return level;
}

/** Parses argv (without node and the script) and env; throws ConfigError, or returns null for --help. */
export function parseAgentConfig(argv: readonly string[], env: NodeJS.ProcessEnv): AgentConfig | null {
  let values: ReturnType<typeof parse>['values'];
  try {
    values = parse(argv).values;
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  if (values.help) return null;

  const stateDir = path.resolve(values['state-dir'] ?? (env.VDPA_MAPD_STATE_DIR || DEFAULT_STATE_DIR));
  const socketPath = path.resolve(
    values.socket ?? (env.VDPA_MAPD_AGENT_SOCKET || path.join(stateDir, 'agent', 'agent.sock')),
  );
  const devices = checkDeviceSpecs(
    values.device?.length ? values.device : splitDeviceList(env.VDPA_MAPD_DEVICES),
  );
  const roots = values['allowed-root']?.length
    ? values['allowed-root']
    : splitList(env.VDPA_MAPD_ALLOWED_ROOTS);
  return {
    socketPath,
    devices,
    // The agent's own <state-dir>/memory stays allowed: after a restart it must reopen what it created.
    allowedRoots:
      roots.length > 0
        ? [...roots.map((r) => path.resolve(r)), memoryDir(stateDir)]
        : defaultAllowedRoots(stateDir),
    stateDir,
    attachDir: path.resolve(values['attach-dir'] ?? (env.VDPA_MAPD_ATTACH_DIR || defaultAttachDir(stateDir))),
    ...(values['attach-answer-ms'] === undefined
      ? {}
      : { attachAnswerMs: parseMs(values['attach-answer-ms'], '--attach-answer-ms') }),
    memory: (values.memory ?? []).map(parseMemorySpec),
    logLevel: parseLogLevel(values['log-level'] ?? (env.VDPA_MAPD_LOG_LEVEL || 'info')),
  };
}

function parse(argv: readonly string[]) {
  return parseArgs({
    args: [...argv],
    strict: true,
    allowPositionals: false,
    options: {
      socket: { type: 'string' },
      device: { type: 'string', multiple: true },
      'allowed-root': { type: 'string', multiple: true },
      'state-dir': { type: 'string' },
      'attach-dir': { type: 'string' },
      'attach-answer-ms': { type: 'string' },
      memory: { type: 'string', multiple: true },
      'log-level': { type: 'string' },
      help: { type: 'boolean' },
    },
  });
}
