/**
 * The API server's configuration: one table of options (flag, environment variable, default), from
 * which the parser, `--help` and the README's table are all made. Flags win over the environment.
 */
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import type { LevelWithSilent } from 'pino';
import { type ApiLimits, DEFAULT_LIMITS } from '../../src/api/parse.ts';
import { isValidId } from '../../src/id.ts';
import { CANONICAL, u64FromText } from '../../src/u64.ts';
import type { Quota, QuotaConfig } from '../../src/queue/quota.ts';
import type { MapdServiceOptions } from '../../src/service/index.ts';
import { DEFAULT_WATCH_HISTORY } from '../../src/service/watch.ts';
import { isLoopback, TOKEN_SYNTAX } from './auth.ts';

export interface Listen {
  host: string;
  /** 0 picks a free port. */
  port: number;
}

export interface AuthConfig {
  /** The bearer token every API call must carry. */
  token: string;
  /** Whether /healthz, /readyz, /metrics and gRPC health need it too. */
  probes: 'open' | 'token';
}

/** PEM files of gRPC's TLS; with `clientCa`, clients must present a certificate it signed (mTLS). */
export interface GrpcTlsConfig {
  cert: string;
  key: string;
  clientCa?: string;
}

/** How long a slow or idle client may hold a connection, and how many it may hold. */
export interface ConnectionLimits {
  /** REST: the request's head must arrive within this. */
  headersTimeoutMs: number;
  /** REST: the whole request (head and body) must arrive within this. */
  requestTimeoutMs: number;
  /** REST keep-alive and gRPC: a connection with no request in flight for this long is closed. */
  idleTimeoutMs: number;
  /** REST: connections beyond this many are closed as they come. */
  maxConnections: number;
}

export const DEFAULT_CONNECTIONS: ConnectionLimits = {
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 120_000,
  idleTimeoutMs: 60_000,
  maxConnections: 1024,
};

export interface ApiConfig {
  restListen: Listen;
  grpcListen: Listen;
  agentSocket: string;
  stateDir: string;
  limits: ApiLimits;
  connections: ConnectionLimits;
  /** Tuning of the application core; unset options keep the core's defaults. */
  core: Pick<MapdServiceOptions, 'maxQueued' | 'maxGroup' | 'flushTimeoutMs' | 'watchHistory'>;
  /** How long in-flight requests get to finish at shutdown before they are cut. */
  shutdownGraceMs: number;
  logLevel: LevelWithSilent;
  /** Absent: no token is asked for. */
  auth?: AuthConfig;
  /** Absent: gRPC in plaintext. */
  grpcTls?: GrpcTlsConfig;
  /** Absent: no quota. */
  quotas?: QuotaConfig;
  /** Repair a damaged state journal before starting (keep every intact record, move the file aside). */
  repairState?: boolean;
  /** Listen beyond loopback with no authentication anyway (warned about at start). */
  insecureListenWithoutAuth?: true;
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
  /** The flag may be repeated (the variable then holds the values separated by spaces). */
  multiple?: true;
  /** The flag takes no value; the variable is `true` or `false`. */
  boolean?: true;
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
  repairState: {
    flag: 'repair-state',
    // No variable: a repair is a decision about one damage, not a standing setting.
    env: 'no variable',
    default: 'off',
    description:
      'Start even though the state journal is damaged: keep every intact record (before and after the damage), move the damaged file aside, log what was dropped',
    boolean: true,
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
  maxInflightBytes: {
    flag: 'max-inflight-bytes',
    env: 'VDPA_MAPD_MAX_INFLIGHT_BYTES',
    default: String(DEFAULT_LIMITS.maxInflightBytes),
    description:
      'Most bytes of REST bodies and gRPC messages processed at once (at least --body-limit); beyond, RESOURCE_EXHAUSTED (429) with Retry-After',
  },
  headersTimeoutMs: {
    flag: 'headers-timeout-ms',
    env: 'VDPA_MAPD_HEADERS_TIMEOUT_MS',
    default: String(DEFAULT_CONNECTIONS.headersTimeoutMs),
    description: "REST: a request's head must arrive within this, or its connection is closed",
  },
  requestTimeoutMs: {
    flag: 'request-timeout-ms',
    env: 'VDPA_MAPD_REQUEST_TIMEOUT_MS',
    default: String(DEFAULT_CONNECTIONS.requestTimeoutMs),
    description: 'REST: a whole request (head and body) must arrive within this (408 otherwise)',
  },
  idleTimeoutMs: {
    flag: 'idle-timeout-ms',
    env: 'VDPA_MAPD_IDLE_TIMEOUT_MS',
    default: String(DEFAULT_CONNECTIONS.idleTimeoutMs),
    description: 'REST keep-alive and gRPC: a connection with no request in flight for this long is closed',
  },
  maxConnections: {
    flag: 'max-connections',
    env: 'VDPA_MAPD_MAX_CONNECTIONS',
    default: String(DEFAULT_CONNECTIONS.maxConnections),
    description: 'REST: connections beyond this many are closed as they arrive',
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
  watchHistory: {
    flag: 'watch-history',
    env: 'VDPA_MAPD_WATCH_HISTORY',
    default: `${DEFAULT_WATCH_HISTORY} (core default)`,
    description: 'Mapping events kept per device for WatchMappings to resume from (from_sequence)',
  },
  shutdownGraceMs: {
    flag: 'shutdown-grace-ms',
    env: 'VDPA_MAPD_SHUTDOWN_GRACE_MS',
    default: '10000',
    description: 'On SIGTERM/SIGINT, how long in-flight requests get to finish',
  },
  authToken: {
    flag: 'auth-token-file',
    env: 'VDPA_MAPD_AUTH_TOKEN',
    default: '(none: no authentication)',
    description:
      'Bearer token every REST and gRPC call must send (Authorization: Bearer TOKEN): the flag names a file holding it, the variable holds the token itself',
  },
  authProbes: {
    flag: 'auth-probes',
    env: 'VDPA_MAPD_AUTH_PROBES',
    default: 'open',
    description: 'open|token: whether /healthz, /readyz, /metrics and gRPC health need the token too',
  },
  grpcTlsCert: {
    flag: 'grpc-tls-cert',
    env: 'VDPA_MAPD_GRPC_TLS_CERT',
    default: '(none: plaintext gRPC)',
    description: 'PEM certificate chain of the gRPC server; gRPC then takes TLS only (with --grpc-tls-key)',
  },
  grpcTlsKey: {
    flag: 'grpc-tls-key',
    env: 'VDPA_MAPD_GRPC_TLS_KEY',
    default: '(none)',
    description: 'PEM private key of --grpc-tls-cert',
  },
  grpcTlsClientCa: {
    flag: 'grpc-tls-client-ca',
    env: 'VDPA_MAPD_GRPC_TLS_CLIENT_CA',
    default: '(none: no client certificate asked)',
    description: 'PEM CA bundle: gRPC clients must present a certificate it signed (mTLS)',
  },
  insecureListenWithoutAuth: {
    flag: 'insecure-listen-without-auth',
    env: 'VDPA_MAPD_INSECURE_LISTEN_WITHOUT_AUTH',
    default: 'false',
    description:
      'Start even though REST or gRPC listens beyond loopback with nothing authenticating callers (no token; for gRPC, no mTLS either): anyone who reaches it may change DMA mappings. Without it the server refuses to start so',
    boolean: true,
  },
  quotaMaxBytes: {
    flag: 'quota-max-bytes',
    env: 'VDPA_MAPD_QUOTA_MAX_BYTES',
    default: '(none: unlimited)',
    description: 'Most bytes any one device may have mapped (decimal or 0x hex); more is QUOTA_EXCEEDED',
  },
  quotaMaxEntries: {
    flag: 'quota-max-entries',
    env: 'VDPA_MAPD_QUOTA_MAX_ENTRIES',
    default: '(none: unlimited)',
    description: 'Most mappings any one device may have (every address space together)',
  },
  deviceQuota: {
    flag: 'device-quota',
    env: 'VDPA_MAPD_DEVICE_QUOTA',
    default: '(none)',
    description:
      'DEVICE=bytes:N,entries:N (either; N or "unlimited"): one device\'s quota instead of the defaults; repeatable (the variable: space-separated)',
    multiple: true,
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
  let values: Record<string, string | string[] | boolean | undefined>;
  try {
    values = parseArgs({
      args: [...argv],
      strict: true,
      allowPositionals: false,
      options: {
        ...Object.fromEntries(
          Object.values(OPTIONS).map((o: OptionSpec) => [
            o.flag,
            { type: o.boolean ? ('boolean' as const) : ('string' as const), multiple: o.multiple === true },
          ]),
        ),
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

  const auth = parseAuth(
    raw('authToken'),
    typeof values[OPTIONS.authToken.flag] === 'string',
    value('authProbes'),
  );
  const grpcTls = parseGrpcTls(raw('grpcTlsCert'), raw('grpcTlsKey'), raw('grpcTlsClientCa'));
  const deviceQuotas = values[OPTIONS.deviceQuota.flag];
  const quotas = parseQuotas(
    raw('quotaMaxBytes'),
    raw('quotaMaxEntries'),
    Array.isArray(deviceQuotas) && deviceQuotas.length > 0
      ? deviceQuotas
      : (env[OPTIONS.deviceQuota.env]?.split(/\s+/).filter((s) => s !== '') ?? []),
  );
  const limits: ApiLimits = {
    bodyLimit: parseCount(value('bodyLimit'), OPTIONS.bodyLimit.flag),
    maxBatchOps: parseCount(value('maxBatchOps'), OPTIONS.maxBatchOps.flag),
    maxRegions: parseCount(value('maxRegions'), OPTIONS.maxRegions.flag),
    maxInflightBytes: parseCount(value('maxInflightBytes'), OPTIONS.maxInflightBytes.flag),
  };
  if (limits.maxInflightBytes < limits.bodyLimit) {
    throw new ConfigError(
      `--${OPTIONS.maxInflightBytes.flag} ${limits.maxInflightBytes} is below --${OPTIONS.bodyLimit.flag} ${limits.bodyLimit}: a largest request could never be taken`,
    );
  }
  const insecure = parseSwitch(values, env, 'insecureListenWithoutAuth');
  const stateDir = path.resolve(value('stateDir'));
  const logLevel = LOG_LEVELS.find((l) => l === value('logLevel'));
  if (logLevel === undefined)
    throw new ConfigError(`--log-level ${value('logLevel')}: expected ${OPTIONS.logLevel.description}`);
  const config: ApiConfig = {
    restListen: parseListen(value('restListen'), OPTIONS.restListen.flag),
    grpcListen: parseListen(value('grpcListen'), OPTIONS.grpcListen.flag),
    agentSocket: path.resolve(raw('agentSocket') ?? path.join(stateDir, 'agent', 'agent.sock')),
    stateDir,
    limits,
    connections: {
      headersTimeoutMs: parseCount(value('headersTimeoutMs'), OPTIONS.headersTimeoutMs.flag),
      requestTimeoutMs: parseCount(value('requestTimeoutMs'), OPTIONS.requestTimeoutMs.flag),
      idleTimeoutMs: parseCount(value('idleTimeoutMs'), OPTIONS.idleTimeoutMs.flag),
      maxConnections: parseCount(value('maxConnections'), OPTIONS.maxConnections.flag),
    },
    core: { ...core('maxQueued'), ...core('maxGroup'), ...core('flushTimeoutMs'), ...core('watchHistory') },
    shutdownGraceMs: parseCount(value('shutdownGraceMs'), OPTIONS.shutdownGraceMs.flag),
    logLevel,
    ...(auth ? { auth } : {}),
    ...(grpcTls ? { grpcTls } : {}),
    ...(quotas ? { quotas } : {}),
    ...(values[OPTIONS.repairState.flag] === true ? { repairState: true } : {}),
    ...(insecure ? { insecureListenWithoutAuth: true as const } : {}),
  };
  const exposed = unauthenticatedListeners(config);
  if (exposed.length > 0 && !insecure) {
    throw new ConfigError(
      `${exposed.join(' and ')} ${exposed.length > 1 ? 'listen' : 'listens'} beyond loopback, and nothing authenticates callers: anyone who reaches ${exposed.length > 1 ? 'them' : 'it'} could change DMA mappings. Give a token (--${OPTIONS.authToken.flag} FILE or ${OPTIONS.authToken.env}; for gRPC, mTLS with --${OPTIONS.grpcTlsClientCa.flag} also does), listen on 127.0.0.1, or pass --${OPTIONS.insecureListenWithoutAuth.flag}`,
    );
  }
  return config;
}

/** The listeners anyone beyond this machine may call without proving who they are. */
export function unauthenticatedListeners(config: ApiConfig): string[] {
  if (config.auth) return [];
  const exposed: string[] = [];
  const at = (l: Listen) => `${l.host}:${l.port}`;
  if (!isLoopback(config.restListen.host))
    exposed.push(`REST (--${OPTIONS.restListen.flag} ${at(config.restListen)})`);
  if (!isLoopback(config.grpcListen.host) && config.grpcTls?.clientCa === undefined) {
    exposed.push(`gRPC (--${OPTIONS.grpcListen.flag} ${at(config.grpcListen)})`);
  }
  return exposed;
}

/** A boolean option: the flag, else the variable (`true`/`false`, `1`/`0`). */
function parseSwitch(
  values: Record<string, string | string[] | boolean | undefined>,
  env: NodeJS.ProcessEnv,
  key: Key,
): boolean {
  const o = OPTIONS[key];
  if (values[o.flag] === true) return true;
  const text = env[o.env];
  if (text === undefined || text === '' || text === 'false' || text === '0') return false;
  if (text === 'true' || text === '1') return true;
  throw new ConfigError(`${o.env}=${JSON.stringify(text)}: expected true or false`);
}

/** The token from the file the flag names, or from the variable itself. */
function parseAuth(source: string | undefined, fromFile: boolean, probes: string): AuthConfig | undefined {
  if (probes !== 'open' && probes !== 'token') {
    throw new ConfigError(`--${OPTIONS.authProbes.flag} ${JSON.stringify(probes)}: expected open or token`);
  }
  if (source === undefined) {
    if (probes === 'token') throw new ConfigError(`--${OPTIONS.authProbes.flag} token needs a token`);
    return undefined;
  }
  let token = source.trim();
  if (fromFile) {
    try {
      token = fs.readFileSync(source, 'utf8').trim();
    } catch (e) {
      throw new ConfigError(`--${OPTIONS.authToken.flag} ${source}: ${(e as Error).message}`);
    }
  }
  // Never echo the token: it may be a near miss of the real one.
  if (!TOKEN_SYNTAX.test(token)) {
    throw new ConfigError(
      `${fromFile ? `--${OPTIONS.authToken.flag} ${source}` : OPTIONS.authToken.env}: the token must be non-empty and made of A-Z a-z 0-9 - . _ ~ + / (then = padding)`,
    );
  }
  return { token, probes };
}

function parseGrpcTls(
  cert: string | undefined,
  key: string | undefined,
  clientCa: string | undefined,
): GrpcTlsConfig | undefined {
  if (cert === undefined && key === undefined && clientCa === undefined) return undefined;
  if (cert === undefined || key === undefined) {
    throw new ConfigError(
      `--${OPTIONS.grpcTlsCert.flag} and --${OPTIONS.grpcTlsKey.flag} go together (and --${OPTIONS.grpcTlsClientCa.flag} needs both)`,
    );
  }
  return {
    cert: path.resolve(cert),
    key: path.resolve(key),
    ...(clientCa !== undefined ? { clientCa: path.resolve(clientCa) } : {}),
  };
}

function parseBytes(text: string, what: string): bigint {
  const value = u64FromText(text, CANONICAL);
  if (value === undefined) throw new ConfigError(`${what} ${JSON.stringify(text)}: expected a u64`);
  return value;
}

function parseEntries(text: string, what: string): number {
  const n = /^[0-9]+$/.test(text) ? Number(text) : Number.NaN;
  if (!Number.isSafeInteger(n)) throw new ConfigError(`${what} ${JSON.stringify(text)}: expected an integer`);
  return n;
}

/** `DEVICE=bytes:N,entries:N`; "unlimited" lifts a default for that device. */
function parseDeviceQuota(text: string): [string, Quota] {
  const what = `--${OPTIONS.deviceQuota.flag}`;
  const m = /^([^=]+)=(.+)$/.exec(text);
  if (!m || !isValidId(m[1]))
    throw new ConfigError(`${what} ${JSON.stringify(text)}: expected DEVICE=bytes:N,entries:N`);
  // An explicit undefined ("unlimited") overrides the default when merged (quotaOf).
  const quota: Quota = {};
  for (const part of m[2]!.split(',')) {
    const [key, value = ''] = part.split(':', 2);
    const label = `${what} ${m[1]}: ${key}`;
    if (key === 'bytes' && !('maxBytes' in quota)) {
      quota.maxBytes = value === 'unlimited' ? undefined : parseBytes(value, label);
    } else if (key === 'entries' && !('maxEntries' in quota)) {
      quota.maxEntries = value === 'unlimited' ? undefined : parseEntries(value, label);
    } else {
      throw new ConfigError(`${what} ${JSON.stringify(text)}: expected bytes:N and/or entries:N, once each`);
    }
  }
  return [m[1]!, quota];
}

function parseQuotas(
  maxBytes: string | undefined,
  maxEntries: string | undefined,
  devices: readonly string[],
): QuotaConfig | undefined {
  if (maxBytes === undefined && maxEntries === undefined && devices.length === 0) return undefined;
  const parsed = devices.map(parseDeviceQuota);
  const names = new Set(parsed.map(([name]) => name));
  if (names.size !== parsed.length)
    throw new ConfigError(`--${OPTIONS.deviceQuota.flag}: a device is named twice`);
  return {
    defaults: {
      ...(maxBytes !== undefined
        ? { maxBytes: parseBytes(maxBytes, `--${OPTIONS.quotaMaxBytes.flag}`) }
        : {}),
      ...(maxEntries !== undefined
        ? { maxEntries: parseEntries(maxEntries, `--${OPTIONS.quotaMaxEntries.flag}`) }
        : {}),
    },
    devices: new Map(parsed),
  };
}
