/**
 * The API server: the unprivileged process serving the public API (REST and gRPC) over the
 * application core, which talks to the agent and keeps the desired state.
 *
 *   node --import tsx services/api/main.ts --state-dir /tmp/vdpa-mapd --rest-listen 127.0.0.1:8080
 */
import { pathToFileURL } from 'node:url';
import type { Server, ServerCredentials } from '@grpc/grpc-js';
import { type Logger, pino } from 'pino';
import { runUntilSignal } from '../../src/sys/run-until-signal.ts';
import { stdoutLog } from '../../src/sys/stdout-log.ts';
import { AgentClient } from '../../src/agent/client.ts';
import { InFlightBytes } from '../../src/api/inflight.ts';
import { createMetrics } from '../../src/metrics/metrics.ts';
import { createMapdService } from '../../src/service/index.ts';
import { StateDamageError } from '../../src/state/journal.ts';
import { repairStateDir, SEQUENCE_SKIP } from '../../src/state/repair.ts';
import { BearerAuth } from './auth.ts';
import {
  type ApiConfig,
  ConfigError,
  type Listen,
  OPTIONS,
  parseApiConfig,
  USAGE,
  unauthenticatedListeners,
} from './config.ts';
import { buildGrpcServer } from './grpc.ts';
import type { Telemetry } from './observe.ts';
import { buildRestApp } from './rest.ts';
import { grpcServerCredentials } from './tls.ts';

export interface RunningApiServer {
  /** `http://HOST:PORT` */
  restAddress: string;
  /** `HOST:PORT`, a gRPC target. */
  grpcAddress: string;
  /** Stops accepting, lets in-flight requests finish (up to the grace period), closes the core. Idempotent. */
  stop(): Promise<void>;
}

export function createLogger(level: ApiConfig['logLevel']): Logger {
  return pino({ level, base: { service: 'vdpa-mapd-api', pid: process.pid } }, stdoutLog());
}

function hostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

function bindGrpc(server: Server, listen: Listen, credentials: ServerCredentials): Promise<string> {
  return new Promise((resolve, reject) => {
    server.bindAsync(hostPort(listen.host, listen.port), credentials, (err, port) =>
      err ? reject(err) : resolve(hostPort(listen.host, port)),
    );
  });
}

export async function startApiServer(
  config: ApiConfig,
  logger = createLogger(config.logLevel),
): Promise<RunningApiServer> {
  const metrics = createMetrics();
  const telemetry: Telemetry = {
    registry: metrics.registry,
    observe: ({ transport, method, code, seconds }) =>
      metrics.requestDuration.observe({ transport, method, code }, seconds),
  };
  if (config.repairState) await repairState(config.stateDir, logger);
  const agent = new AgentClient({ socketPath: config.agentSocket });
  const service = await createMapdService({
    ...config.core,
    agent,
    stateDir: config.stateDir,
    ...(config.quotas ? { quotas: config.quotas } : {}),
    metrics,
    logger,
  }).catch((err: unknown) => {
    agent.close();
    if (!(err instanceof StateDamageError && err.repairable)) throw err;
    throw new Error(
      `${err.message}. To start anyway, keeping every intact record, run once with --${OPTIONS.repairState.flag} (the damaged file is moved aside, what is dropped is logged)`,
      { cause: err },
    );
  });
  const auth = config.auth && { bearer: new BearerAuth(config.auth.token), probes: config.auth.probes };
  const options = {
    service,
    limits: config.limits,
    connections: config.connections,
    inflight: new InFlightBytes(config.limits.maxInflightBytes),
    telemetry,
    logger,
    ...(auth ? { auth } : {}),
  };
  const rest = await buildRestApp(options);
  const grpc = buildGrpcServer(options);

  const closeTransports = async () => {
    const drained = Promise.all([rest.close(), grpc.stop(config.shutdownGraceMs)]);
    const timer = setTimeout(() => rest.server.closeAllConnections(), config.shutdownGraceMs);
    await drained.finally(() => clearTimeout(timer));
  };

  let restAddress: string;
  let grpcAddress: string;
  try {
    await rest.listen({ host: config.restListen.host, port: config.restListen.port });
    const address = rest.server.address();
    if (address === null || typeof address === 'string') throw new Error('REST server has no TCP address');
    restAddress = `http://${hostPort(config.restListen.host, address.port)}`;
    grpcAddress = await bindGrpc(grpc.server, config.grpcListen, grpcServerCredentials(config.grpcTls));
  } catch (err) {
    await closeTransports();
    await service.close();
    agent.close();
    throw err;
  }
  logger.info(
    {
      rest: restAddress,
      grpc: grpcAddress,
      agentSocket: config.agentSocket,
      auth: config.auth ? 'bearer token' : 'none',
      grpcTls: config.grpcTls ? (config.grpcTls.clientCa ? 'mtls' : 'tls') : 'none',
    },
    'api server listening',
  );
  warnIfExposed(config, logger);

  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      logger.info('api server stopping');
      try {
        await closeTransports();
      } finally {
        await service.close();
        agent.close();
      }
      logger.info('api server stopped');
    })();
    return stopping;
  };
  return { restAddress, grpcAddress, stop };
}

/** --repair-state: repairs a damaged journal, saying exactly what was dropped; nothing when sound. */
async function repairState(stateDir: string, logger: Logger): Promise<void> {
  const report = await repairStateDir(stateDir);
  if (report === undefined) {
    logger.info({ stateDir }, 'state repair: the state is sound, nothing to repair');
    return;
  }
  for (const span of report.dropped) {
    logger.warn({ file: report.file, ...span }, 'state repair dropped damaged bytes');
  }
  logger.warn(
    {
      file: report.file,
      aside: report.aside,
      keptRecords: report.kept,
      droppedSpans: report.dropped.length,
      unfinishedRecords: report.unfinished,
      // Sequence numbers the dropped records may have handed out are never handed out again.
      sequenceSkip: String(SEQUENCE_SKIP),
    },
    'state repaired: the damaged journal is kept aside',
  );
}

/** Anyone who can reach a non-loopback address may change the device mappings when nothing checks who. */
export function warnIfExposed(config: ApiConfig, logger: Logger): void {
  for (const listener of unauthenticatedListeners(config)) {
    logger.warn(
      { listener },
      `${listener} listens beyond loopback without authentication: anyone who reaches it can change DMA mappings`,
    );
  }
}

async function main(): Promise<void> {
  let config: ApiConfig | null;
  try {
    config = parseApiConfig(process.argv.slice(2), process.env);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    process.stderr.write(`api: ${e.message}\n${USAGE}\n`);
    process.exit(2);
  }
  if (config === null) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const logger = createLogger(config.logLevel);
  await runUntilSignal('api', () => startApiServer(config, logger), logger);
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}
