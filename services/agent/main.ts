/**
 * The agent: the only privileged process. It opens the devices (becoming their vhost owner), maps
 * the backing memory, and serves the agent protocol on a unix socket. It keeps no policy and no
 * durable state: when it stops, the kernel drops every mapping of its devices.
 *
 *   node --import tsx services/agent/main.ts --device sim:vdpa0 --state-dir /tmp/vdpa-mapd
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { type Logger, pino } from 'pino';
import { runUntilSignal } from '../../src/sys/run-until-signal.ts';
import { stdoutLog } from '../../src/sys/stdout-log.ts';
import { Attachments, type DeviceSideFactory } from '../../src/agent/attach.ts';
import { deviceSideFor } from '../../src/agent/attach-device-side.ts';
import type { AgentInfo, RegisterMemoryRequest } from '../../src/agent/wire.ts';
import { openDevices } from '../../src/device/factory.ts';
import type { Device } from '../../src/device/types.ts';
import { SharedMemoryRegistry } from '../../src/memory/registry.ts';
import { memoryDir } from '../../src/memory/allowlist.ts';
import type { MemoryInfo, MemoryRegistry } from '../../src/memory/types.ts';
import { type AgentConfig, ConfigError, defaultAttachDir, parseAgentConfig, USAGE } from './config.ts';
import { type FrameServer, serveFrames } from './frame-server.ts';
import { type AgentState, createHandlers } from './server.ts';
import { prepareSocketPath, restrictSocket } from './socket.ts';

export interface RunningAgent {
  /** `unix:///path/to/agent.sock` */
  address: string;
  bootId: string;
  /** Stops serving, closes every device, unmaps memory, removes the socket. Idempotent. */
  stop(): Promise<void>;
}

/** How long in-flight calls get to finish at shutdown before they are cut. */
const SHUTDOWN_GRACE_MS = 5_000;

const VERSION: string = JSON.parse(
  fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8'),
).version;

export function createLogger(level: AgentConfig['logLevel']): Logger {
  return pino({ level, base: { service: 'vdpa-mapd-agent', pid: process.pid } }, stdoutLog());
}

/** Closes every device, logging what the kernel drops with it; then unmaps all memory. */
async function release(devices: readonly Device[], registry: MemoryRegistry, logger: Logger): Promise<void> {
  for (const device of devices) {
    const mappings = device.mappings();
    const bytes = mappings.reduce((sum, m) => sum + m.size, 0n);
    try {
      await device.close();
      logger.info(
        { device: device.name, entries: mappings.length, bytes: bytes.toString() },
        'closed device: the kernel dropped its mappings',
      );
    } catch (err) {
      logger.error({ device: device.name, err }, 'closing device failed');
    }
  }
  try {
    registry.closeAll();
  } catch (err) {
    logger.error({ err }, 'unmapping backing memory failed');
  }
}

/** What one agent run owns, apart from its socket: identity, devices, backing memory, attachments. */
export interface AgentCore extends AgentState {
  attachments: Attachments;
  /** Detaches every VMM, closes every device (the kernel drops their mappings), unmaps all memory. */
  close(): Promise<void>;
}

export interface AgentWiring {
  /** The device side of an attached device's vhost-user backend (default: deviceSideFor). */
  deviceSide?: DeviceSideFactory;
}

/**
 * `--memory` at start. A file created by an earlier run of the agent is opened again, not
 * recreated: it may hold guest data, and the agent must restart with the same flags.
 */
function registerAtStart(registry: MemoryRegistry, req: RegisterMemoryRequest, stateDir: string): MemoryInfo {
  if ('path' in req) return registry.open(req);
  const earlier = path.join(memoryDir(stateDir), req.id);
  if (req.kind !== 'file' || !fs.existsSync(earlier)) return registry.create(req);
  const m = registry.open({ id: req.id, path: earlier });
  if (m.size !== req.size) {
    registry.release(req.id);
    throw new ConfigError(
      `--memory ${req.id}: ${earlier}, left by an earlier run, has ${m.size} bytes, not ${req.size}`,
    );
  }
  return m;
}

/** Opens the configured devices and registers the configured memory. */
export async function openAgentCore(
  config: AgentConfig,
  logger: Logger,
  wiring: AgentWiring = {},
): Promise<AgentCore> {
  const info: AgentInfo = { bootId: randomUUID(), version: VERSION, pid: process.pid };
  // Traversable by a VMM of another user that a socket's group admits; not listable.
  const attachDir = config.attachDir ?? defaultAttachDir(config.stateDir);
  fs.mkdirSync(attachDir, { recursive: true, mode: 0o711 });
  const registry = new SharedMemoryRegistry({ allowedRoots: config.allowedRoots, stateDir: config.stateDir });
  let devices: Device[] = [];
  try {
    devices = await openDevices(config.devices, registry, logger);
    if (devices.length === 0) logger.warn('no devices configured: serving memory calls only');
    for (const req of config.memory) {
      const m = registerAtStart(registry, req, config.stateDir);
      logger.info(
        { memory: m.id, path: m.path, size: m.size.toString(), created: m.created },
        'registered memory',
      );
    }
  } catch (err) {
    await release(devices, registry, logger);
    throw err;
  }
  const attachments = new Attachments({
    attachDir,
    registry,
    deviceSide: wiring.deviceSide ?? deviceSideFor,
    ...(config.attachAnswerMs === undefined ? {} : { answerTimeoutMs: config.attachAnswerMs }),
    logger: logger.child({ part: 'vhost-user' }),
  });
  const close = async () => {
    await attachments.close();
    await release(devices, registry, logger);
  };
  return { info, devices, registry, attachments, close };
}

/** The core's handlers served on the socket, which only the agent's user may reach. */
async function serveCore(socketPath: string, core: AgentCore, logger: Logger): Promise<FrameServer> {
  const server = await serveFrames(socketPath, createHandlers(core), logger, core.attachments);
  try {
    restrictSocket(socketPath);
  } catch (err) {
    await server.close(0);
    throw err;
  }
  return server;
}

export async function startAgent(
  config: AgentConfig,
  logger = createLogger(config.logLevel),
  wiring: AgentWiring = {},
): Promise<RunningAgent> {
  const address = `unix://${config.socketPath}`;
  await prepareSocketPath(config.socketPath, logger);
  const core = await openAgentCore(config, logger, wiring);
  let server: FrameServer;
  try {
    server = await serveCore(config.socketPath, core, logger);
  } catch (err) {
    fs.rmSync(config.socketPath, { force: true });
    await core.close();
    throw err;
  }
  const { bootId, version } = core.info;
  logger.info(
    { socket: config.socketPath, bootId, version, devices: core.devices.map((d) => d.name) },
    'agent serving',
  );

  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      logger.info('agent stopping');
      // First the VMMs and the attachment watchers, whose streams would hold up the shutdown.
      await core.attachments.close();
      await server.close(SHUTDOWN_GRACE_MS);
      await core.close();
      fs.rmSync(config.socketPath, { force: true });
      logger.info('agent stopped');
    })();
    return stopping;
  };
  return { address, bootId, stop };
}

async function main(): Promise<void> {
  let config: AgentConfig | null;
  try {
    config = parseAgentConfig(process.argv.slice(2), process.env);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    process.stderr.write(`agent: ${e.message}\n${USAGE}\n`);
    process.exit(2);
  }
  if (config === null) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const logger = createLogger(config.logLevel);
  await runUntilSignal('agent', () => startAgent(config, logger), logger);
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}
