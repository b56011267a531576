/**
 * The REST transport: fastify routes over the MapdService. Bodies are parsed as JSON by fastify
 * (with its prototype-poisoning guards and the body limit) and validated by src/api, like gRPC.
 */
import { Transform } from 'node:stream';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import Fastify, {
  type FastifyError,
  type FastifyInstance,
  type FastifyReply,
  type FastifyRequest,
  LogController,
  type RawReplyDefaultExpression,
  type RawRequestDefaultExpression,
  type RawServerDefault,
} from 'fastify';
import type { Logger } from 'pino';
import { errorBody, httpStatus, retryAfterSeconds, toServiceError } from '../../src/api/errors.ts';
import {
  formatBatchResult,
  formatDevice,
  formatFlushResult,
  formatMapping,
  formatMapResult,
  formatMemory,
  formatSetMemTableResult,
  formatSubmitResult,
  formatUnmapResult,
} from '../../src/api/format.ts';
import {
  type ApiLimits,
  parseAsidFilter,
  parseBatch,
  parseBoolParam,
  parseId,
  parseMap,
  parseRegisterMemory,
  parseSetMemTable,
  parseUnmap,
} from '../../src/api/parse.ts';
import type { InFlightBytes } from '../../src/api/inflight.ts';
import { findDuplicateKey } from '../../src/api/json-keys.ts';
import { invalid } from '../../src/core/u64.ts';
import { ServiceError } from '../../src/core/errors.ts';
import type { MapdService } from '../../src/core/types.ts';
import { type ApiAuth, AuthError, wwwAuthenticate } from './auth.ts';
import type { ConnectionLimits } from './config.ts';
import { withJsonNames } from './json-names.ts';
import type { Telemetry } from './observe.ts';
import { SCHEMAS } from './openapi.ts';

export interface RestOptions {
  service: MapdService;
  limits: ApiLimits;
  connections: ConnectionLimits;
  /** Shared with gRPC. */
  inflight: InFlightBytes;
  telemetry: Telemetry;
  logger: Logger;
  /** Absent: no token asked for. */
  auth?: ApiAuth;
}

interface RouteConfig {
  name?: string;
  /** Health and metrics: open unless the probes need the token too. */
  probe?: boolean;
}

interface Input {
  params: Readonly<Record<string, string | undefined>>;
  query: Readonly<Record<string, unknown>>;
  body: unknown;
}

interface Route {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  url: string;
  /** The API method, as in the proto (and the metrics' `method` label). */
  name: string;
  /** Status of a successful answer. */
  status: number;
  /** Query parameters the route takes; any other is refused. */
  query?: readonly string[];
  schema: object;
  handle(input: Input): Promise<unknown>;
}

/** Methods a known path answers 405 to when it does not take them. */
const HTTP_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'] as const;

/** A device id in the path, followed in the same segment by a `:verb` (find-my-way needs a regex). */
const DEVICE_VERB = ':device(^[^/:]+)';

function device(input: Input): string {
  return parseId(input.params.device, 'device');
}

function routes(service: MapdService, limits: ApiLimits): Route[] {
  return [
    {
      method: 'GET',
      url: '/v1/devices',
      name: 'ListDevices',
      status: 200,
      schema: SCHEMAS.listDevices,
      handle: async () => ({ devices: (await service.listDevices()).map(formatDevice) }),
    },
    {
      method: 'GET',
      url: '/v1/devices/:device',
      name: 'GetDevice',
      status: 200,
      schema: SCHEMAS.getDevice,
      handle: async (i) => ({ device: formatDevice(await service.getDevice(device(i))) }),
    },
    {
      method: 'GET',
      url: '/v1/devices/:device/mappings',
      name: 'ListMappings',
      status: 200,
      query: ['asid'],
      schema: SCHEMAS.listMappings,
      handle: async (i) => {
        const id = device(i);
        const mappings = await service.listMappings(id, parseAsidFilter(i.query.asid));
        return { mappings: mappings.map(formatMapping) };
      },
    },
    {
      method: 'POST',
      url: '/v1/devices/:device/mappings',
      name: 'Map',
      status: 201,
      schema: SCHEMAS.map,
      handle: async (i) => formatMapResult(await service.map(parseMap(device(i), i.body))),
    },
    {
      method: 'POST',
      url: '/v1/devices/:device/mappings::unmap',
      name: 'Unmap',
      status: 200,
      schema: SCHEMAS.unmap,
      handle: async (i) => formatUnmapResult(await service.unmap(parseUnmap(device(i), i.body))),
    },
    {
      method: 'PUT',
      url: '/v1/devices/:device/memtable',
      name: 'SetMemTable',
      status: 200,
      query: ['dryRun'],
      schema: SCHEMAS.setMemTable,
      handle: async (i) => {
        const dryRun = parseBoolParam(i.query.dryRun, 'dryRun');
        const req = parseSetMemTable(device(i), i.body, dryRun, limits);
        return formatSetMemTableResult(await service.setMemTable(req));
      },
    },
    {
      method: 'POST',
      url: `/v1/devices/${DEVICE_VERB}::batch`,
      name: 'Batch',
      status: 200,
      schema: SCHEMAS.batch,
      handle: async (i) => formatBatchResult(await service.batch(parseBatch(device(i), i.body, limits))),
    },
    {
      method: 'POST',
      url: `/v1/devices/${DEVICE_VERB}::submit`,
      name: 'Submit',
      status: 202,
      schema: SCHEMAS.submit,
      handle: async (i) => formatSubmitResult(await service.submit(parseBatch(device(i), i.body, limits))),
    },
    {
      method: 'POST',
      url: `/v1/devices/${DEVICE_VERB}::flush`,
      name: 'Flush',
      status: 200,
      schema: SCHEMAS.flush,
      handle: async (i) => formatFlushResult(await service.flush(device(i))),
    },
    {
      method: 'GET',
      url: '/v1/memory',
      name: 'ListMemory',
      status: 200,
      schema: SCHEMAS.listMemory,
      handle: async () => ({ memory: (await service.listMemory()).map(formatMemory) }),
    },
    {
      method: 'POST',
      url: '/v1/memory',
      name: 'RegisterMemory',
      status: 201,
      schema: SCHEMAS.registerMemory,
      handle: async (i) => ({
        memory: formatMemory(await service.registerMemory(parseRegisterMemory(i.body))),
      }),
    },
    {
      method: 'DELETE',
      url: '/v1/memory/:id',
      name: 'UnregisterMemory',
      status: 204,
      schema: SCHEMAS.unregisterMemory,
      handle: async (i) => {
        await service.unregisterMemory(parseId(i.params.id, 'id'));
        return undefined;
      },
    },
  ];
}

function checkQuery(query: Readonly<Record<string, unknown>>, allowed: readonly string[]): void {
  for (const key of Object.keys(query)) {
    if (!allowed.includes(key)) throw invalid(key, 'unknown query parameter');
  }
}

/** Errors fastify raises before a handler runs (JSON syntax, body limit, media type, poisoning). */
function fromFastify(err: FastifyError, request: FastifyRequest): ServiceError | undefined {
  if (err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
    const type = request.headers['content-type'];
    return new ServiceError(
      'UNSUPPORTED_MEDIA_TYPE',
      `body: send JSON with content-type: application/json (got ${type === undefined ? 'no content-type' : JSON.stringify(type)})`,
      { field: 'body' },
    );
  }
  if (err.statusCode !== undefined && err.statusCode >= 400 && err.statusCode < 500) {
    return new ServiceError('INVALID_ARGUMENT', `body: ${err.message}`, { field: 'body' });
  }
  return undefined;
}

/** The app as built here (its logger is pino's). */
type App = FastifyInstance<RawServerDefault, RawRequestDefaultExpression, RawReplyDefaultExpression, Logger>;

/**
 * Bodies count against the in-flight bound from before they are read until the answer is sent:
 * by their content-length when given (refused unread), else chunk by chunk as they arrive.
 */
function meterBodies(app: App, inflight: InFlightBytes, bodyLimit: number): void {
  app.addHook('preParsing', async (request, reply, payload) => {
    const releases: (() => void)[] = [];
    reply.raw.once('close', () => {
      for (const release of releases) release();
    });
    const length = Number(request.headers['content-length']);
    if (Number.isSafeInteger(length) && length > 0) {
      releases.push(inflight.acquire(Math.min(length, bodyLimit)));
      return payload;
    }
    if (request.headers['transfer-encoding'] === undefined) return payload;
    return payload.pipe(
      new Transform({
        transform(chunk: Buffer, _encoding, next) {
          try {
            releases.push(inflight.acquire(chunk.length));
            next(null, chunk);
          } catch (e) {
            next(e as Error);
          }
        },
      }),
    );
  });
}

/** Any other method on a known path: 405 naming the ones it takes (fastify adds HEAD to each GET). */
function refuseOtherMethods(
  app: App,
  paths: readonly { method: string; url: string }[],
  sendError: (err: ServiceError, request: FastifyRequest, reply: FastifyReply) => FastifyReply,
): void {
  const allowed = new Map<string, string[]>();
  for (const { method, url } of paths) allowed.set(url, [...(allowed.get(url) ?? []), method]);
  for (const [url, methods] of allowed) {
    const allow = methods.includes('GET') ? [...methods, 'HEAD'] : methods;
    app.route({
      method: HTTP_METHODS.filter((m) => !allow.includes(m)),
      url,
      schema: { hide: true },
      handler: (request, reply) => {
        void reply.header('allow', allow.join(', '));
        const message = `${request.method} is not allowed here; use ${allow.join(', ')}`;
        return sendError(new ServiceError('METHOD_NOT_ALLOWED', message), request, reply);
      },
    });
  }
}

export async function buildRestApp(opts: RestOptions) {
  const { service, limits, telemetry, connections } = opts;
  const app = Fastify({
    loggerInstance: opts.logger,
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: limits.bodyLimit,
    // Slow clients (slowloris) are cut: Node checks the two timeouts every connectionsCheckingInterval.
    http: {
      headersTimeout: connections.headersTimeoutMs,
      connectionsCheckingInterval: Math.min(1000, connections.headersTimeoutMs),
    },
    requestTimeout: connections.requestTimeoutMs,
    keepAliveTimeout: connections.idleTimeoutMs,
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    return503OnClosing: true,
  });
  app.server.maxConnections = connections.maxConnections;
  // Schemas document the API; src/api validates and the answers are plain JSON.
  app.setValidatorCompiler(() => () => true);
  app.setSerializerCompiler(() => (data) => JSON.stringify(data));

  // An empty body (curl -X POST -H 'content-type: application/json') is "no body", not an error.
  // JSON only: any other content type (text/plain included) is 415.
  app.removeAllContentTypeParsers();
  const json = app.getDefaultJsonParser('error', 'error');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
    const text = body.toString();
    if (text === '') return done(null, undefined);
    json(req, text, (err, value) => {
      if (err) return done(err);
      const duplicate = findDuplicateKey(text);
      if (duplicate !== undefined) return done(invalid(duplicate, 'given twice'));
      done(null, value);
    });
  });

  const outcome = new WeakMap<FastifyRequest, string>();
  const sendError = (err: ServiceError, request: FastifyRequest, reply: FastifyReply) => {
    outcome.set(request, err.code);
    const retryAfter = retryAfterSeconds(err);
    if (retryAfter !== undefined) void reply.header('retry-after', String(retryAfter));
    return reply.code(httpStatus(err)).send(errorBody(err));
  };

  const { auth } = opts;
  if (auth) {
    // onRequest: before the body is read, so no one unauthenticated gets a body parsed.
    app.addHook('onRequest', async (request, reply) => {
      if (auth.probes === 'open' && (request.routeOptions.config as RouteConfig).probe) return;
      const header = request.headers.authorization;
      try {
        auth.bearer.check(header === undefined ? [] : [header]);
      } catch (e) {
        if (!(e instanceof AuthError)) throw e;
        void reply.header('www-authenticate', wwwAuthenticate(e));
        return sendError(e, request, reply);
      }
    });
  }

  meterBodies(app, opts.inflight, limits.bodyLimit);

  app.setErrorHandler((err: FastifyError, request, reply) => {
    const serviceError =
      err instanceof ServiceError ? err : (fromFastify(err, request) ?? toServiceError(err));
    if (serviceError.code === 'INTERNAL') request.log.error({ err }, 'request failed');
    return sendError(serviceError, request, reply);
  });
  app.setNotFoundHandler((request, reply) =>
    sendError(new ServiceError('NOT_FOUND', `no route ${request.method} ${request.url}`), request, reply),
  );
  app.addHook('onResponse', async (request, reply) => {
    const name = (request.routeOptions.config as RouteConfig).name ?? 'Unknown';
    const code = outcome.get(request) ?? 'OK';
    telemetry.observe({ transport: 'rest', method: name, code, seconds: reply.elapsedTime / 1000 });
    request.log.debug({ method: name, code, status: reply.statusCode, ms: reply.elapsedTime }, 'request');
  });

  await app.register(swagger, {
    openapi: {
      info: {
        title: 'vdpa-mapd',
        description: 'DMA mappings (IOTLB) of vhost-vDPA devices. u64 fields are decimal or 0x hex strings.',
        version: 'v1',
      },
    },
  });

  // The browsable page at /docs, the document at /docs/json (and /docs/yaml), all served locally.
  const docs: RouteConfig = { name: 'OpenAPI' };
  app.addHook('onRoute', (route) => {
    if (route.url.startsWith('/docs')) route.config = { ...route.config, ...docs };
  });
  await app.register(swaggerUi, { routePrefix: '/docs', uiConfig: { validatorUrl: null } });

  const table = routes(service, limits);
  for (const route of table) {
    app.route({
      method: route.method,
      url: route.url,
      config: { name: route.name },
      schema: {
        ...route.schema,
        operationId: route.name,
        response: { ...(route.schema as { response?: object }).response, default: SCHEMAS.error },
      },
      handler: async (request, reply) => {
        const query = withJsonNames(request.query) as Input['query'];
        checkQuery(query, route.query ?? []);
        const answer = await route.handle({
          params: request.params as Input['params'],
          query,
          body: withJsonNames(request.body),
        });
        reply.code(route.status);
        return answer === undefined ? reply.send() : answer;
      },
    });
  }

  const hidden = { hide: true };
  const probe = (name: string): RouteConfig => ({ name, probe: true });
  app.get('/healthz', { config: probe('Healthz'), schema: hidden }, async () => ({ status: 'ok' }));
  app.get('/readyz', { config: probe('Readyz'), schema: hidden }, async (request, reply) => {
    // Degraded devices serve every mapping but the missing ones: ready, and said so.
    if (service.isReady()) {
      const degraded = service.degraded();
      return degraded.length === 0 ? { ready: true } : { ready: true, status: 'degraded', degraded };
    }
    outcome.set(request, 'UNAVAILABLE');
    return reply.code(503).header('retry-after', '1').send({ ready: false });
  });
  app.get('/metrics', { config: probe('Metrics'), schema: hidden }, async (_request, reply) => {
    const text = await telemetry.registry.metrics();
    return reply.header('content-type', telemetry.registry.contentType).send(text);
  });

  const paths = [...table, ...['/healthz', '/readyz', '/metrics'].map((url) => ({ method: 'GET', url }))];
  refuseOtherMethods(app, paths, sendError);

  return app;
}
