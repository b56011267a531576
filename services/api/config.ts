/**
 * The API server's configuration: one table of options (flag, environment variable, default), from
 * which the parser, `--help` and the README's table are all made. Flags win over the environment.
 */
import path from 'node:path';
import { parseArgs } from 'node:util';
import type { LevelWithSilent } from 'pino';
import type { MapdServiceOptions } from '../../src/service/index.ts';
import { type ApiLimits, DEFAULT_LIMITS } from '../../src/api/parse.ts';

export interface Listen {
  host: string;
  /** 0 picks a free port. */
  port: number;
}

export interface ApiConfig {
  restListen: Listen;
  grpcListen: Listen;
  agentSocket: string;
  stateDir: string;
  limits: ApiLimits;
  /** Tuning of the application core; unset options keep the core's defaults. */
  core: Pick<MapdServiceOptions, 'maxQueued' | 'maxGroup' | 'flushTimeoutMs'>;
  /** How long in-flight requests get to finish at shutdown before they are cut. */
  shutdownGraceMs: number;
  logLevel: LevelWithSilent;
}

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

export const DEFAULT_STATE_DIR = '/var/lib/vdpa-mapd';
const LOG_LEVELS: readonly LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export interface OptionSpec {
  flag: string;
  env: string;
  /** As shown in --help and the README. */
  default: string;
  description: string;
}

/** Every option, in the order --help lists them. */
export const OPTIONS = {
  restListen: {
    flag: 'rest-listen',
    env: 'VDPA_MAPD_REST_LISTEN',
    default: '127.0.0.1:8080',
    description: 'HOST:PORT the REST API, /metrics and the health probes listen on (port 0: any free port)',
  },
  grpcListen: {
    flag: 'grpc-listen',
    env: 'VDPA_MAPD_GRPC_LISTEN',
    default: '127.0.0.1:50051',
    description: 'HOST:PORT the gRPC API (with health and reflection) listens on (port 0: any free port)',
  },
  agentSocket: {
    flag: 'agent-socket',
    env: 'VDPA_MAPD_AGENT_SOCKET',
    default: '<state-dir>/agent/agent.sock',
    description: "The agent's unix socket",
  },
  stateDir: {
    flag: 'state-dir',
    env: 'VDPA_MAPD_STATE_DIR',
    default: DEFAULT_STATE_DIR,
    description: 'Where the desired state (every acknowledged mapping) is kept',
  },
  bodyLimit: {
    flag: 'body-limit',
    env: 'VDPA_MAPD_BODY_LIMIT',
    default: String(DEFAULT_LIMITS.bodyLimit),
    description: 'Largest REST body / gRPC message, in bytes',
  },
  maxBatchOps: {
    flag: 'max-batch-ops',
    env: 'VDPA_MAPD_MAX_BATCH_OPS',
    default: String(DEFAULT_LIMITS.maxBatchOps),
    description: 'Most ops in one Batch or Submit',
  },
  maxRegions: {
    flag: 'max-regions',
    env: 'VDPA_MAPD_MAX_REGIONS',
    default: String(DEFAULT_LIMITS.maxRegions),
    description: 'Most regions in one SetMemTable',
  },
  maxQueued: {
    flag: 'max-queued',
    env: 'VDPA_MAPD_MAX_QUEUED',
    default: '1024 (core default)',
    description: 'Requests waiting per device before RESOURCE_EXHAUSTED (429)',
  },
  maxGroup: {
    flag: 'max-group',
    env: 'VDPA_MAPD_MAX_GROUP',
    default: '256 (core default)',
    description: 'Most requests coalesced into one group commit',
  },
  flushTimeoutMs: {
    flag: 'flush-timeout-ms',
    env: 'VDPA_MAPD_FLUSH_TIMEOUT_MS',
    default: '30000 (core default)',
    description: 'How long Flush waits before answering UNAVAILABLE',
  },
  shutdownGraceMs: {
    flag: 'shutdown-grace-ms',
    env: 'VDPA_MAPD_SHUTDOWN_GRACE_MS',
    default: '10000',
    description: 'On SIGTERM/SIGINT, how long in-flight requests get to finish',
  },
  logLevel: {
    flag: 'log-level',
    env: 'VDPA_MAPD_LOG_LEVEL',
    default: 'info',
    description: LOG_LEVELS.join('|'),
  },
} as const satisfies Record<string, OptionSpec>;

type Key = keyof typeof OPTIONS;

export const USAGE = `usage: api [options]\n${Object.values(OPTIONS)
  .map(
    (o) => `  --${o.flag.padEnd(18)} ${o.description}\n  ${''.padEnd(20)} (${o.env}; default ${o.default})`,
  )
  .join('\n')}\n  --help`;

/** The options as a Markdown table, for the README. */
export function optionsTable(): string {
  const rows = Object.values(OPTIONS).map(
    (o) => `| \`--${o.flag}\` | \`${o.env}\` | \`${o.default}\` | ${o.description.replaceAll('|', '\\|')} |`,
  );
  return ['| Flag | Environment | Default | Meaning |', '| --- | --- | --- | --- |', ...rows].join('\n');
}

export function parseListen(text: string, option: string): Listen {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:[\]]+):([0-9]{1,5})$/.exec(text);
  const port = Number(m?.[2]);
  if (!m || port > 65535) throw new ConfigError(`--${option} ${JSON.stringify(text)}: expected HOST:PORT`);
  return { host: m[1]!.replace(/^\[(.*)\]$/, '$1'), port };
}

function parseCount(text: string, option: string): number {
  const n = /^[0-9]+$/.test(text) ? Number(text) : Number.NaN;
  if (!Number.isSafeInteger(n) || n < 1)
    throw new ConfigError(`--${option} ${JSON.stringify(text)}: expected a positive integer`);
  return n;
}

/** Parses argv (without node and the script) and env; throws ConfigError, or returns null for --help. */
export function parseApiConfig(argv: readonly string[], env: NodeJS.ProcessEnv): ApiConfig | null {
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({
      args: [...argv],
      strict: true,
      allowPositionals: false,
      options: {
        ...Object.fromEntries(Object.values(OPTIONS).map((o) => [o.flag, { type: 'string' as const }])),
        help: { type: 'boolean' },
      },
    }).values;
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  if (values.help) return null;

  const raw = (key: Key): string | undefined => {
    const o = OPTIONS[key];
    const flag = values[o.flag];
    return typeof flag === 'string' ? flag : env[o.env] || undefined;
  };
  const value = (key: Key): string => raw(key) ?? OPTIONS[key].default;
  const core = (key: keyof ApiConfig['core']): ApiConfig['core'] => {
    const text = raw(key);
    return text === undefined ? {} : { [key]: parseCount(text, OPTIONS[key].flag) };
  };

  const stateDir = path.resolve(value('stateDir'));
  const logLevel = LOG_LEVELS.find((l) => l === value('logLevel'));
  if (logLevel === undefined)
    throw new ConfigError(`--log-level ${value('logLevel')}: expected ${OPTIONS.logLevel.description}`);
  return {
    restListen: parseListen(value('restListen'), OPTIONS.restListen.flag),
    grpcListen: parseListen(value('grpcListen'), OPTIONS.grpcListen.flag),
    agentSocket: path.resolve(raw('agentSocket') ?? path.join(stateDir, 'agent', 'agent.sock')),
    stateDir,
    limits: {
      bodyLimit: parseCount(value('bodyLimit'), OPTIONS.bodyLimit.flag),
      maxBatchOps: parseCount(value('maxBatchOps'), OPTIONS.maxBatchOps.flag),
      maxRegions: parseCount(value('maxRegions'), OPTIONS.maxRegions.flag),
    },
    core: { ...core('maxQueued'), ...core('maxGroup'), ...core('flushTimeoutMs') },
    shutdownGraceMs: parseCount(value('shutdownGraceMs'), OPTIONS.shutdownGraceMs.flag),
    logLevel,
  };
}
