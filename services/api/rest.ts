/**
 * The REST transport: fastify routes over the MapdService. Bodies are parsed as JSON by fastify
 * (with its prototype-poisoning guards and the body limit) and validated by src/api, like gRPC.
 */
import swagger from '@fastify/swagger';
import Fastify, { type FastifyError, type FastifyReply, type FastifyRequest, LogController } from 'fastify';
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
import { invalid } from '../../src/api/u64.ts';
import { ServiceError } from '../../src/service/errors.ts';
import type { MapdService } from '../../src/service/types.ts';
import { type ApiAuth, AuthError, wwwAuthenticate } from './auth.ts';
import type { Telemetry } from './observe.ts';
import { SCHEMAS } from './openapi.ts';

export interface RestOptions {
  service: MapdService;
  limits: ApiLimits;
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
function fromFastify(err: FastifyError): ServiceError | undefined {
  if (err.statusCode !== undefined && err.statusCode >= 400 && err.statusCode < 500) {
    return new ServiceError('INVALID_ARGUMENT', `body: ${err.message}`, { field: 'body' });
  }
  return undefined;
}

export async function buildRestApp(opts: RestOptions) {
  const { service, limits, telemetry } = opts;
  const app = Fastify({
    loggerInstance: opts.logger,
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: limits.bodyLimit,
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    return503OnClosing: true,
  });
  // Schemas document the API; src/api validates and the answers are plain JSON.
  app.setValidatorCompiler(() => () => true);
  app.setSerializerCompiler(() => (data) => JSON.stringify(data));

  // An empty body (curl -X POST -H 'content-type: application/json') is "no body", not an error.
  const json = app.getDefaultJsonParser('error', 'error');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
    const text = body.toString();
    if (text === '') done(null, undefined);
    else json(req, text, done);
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

  app.setErrorHandler((err: FastifyError, request, reply) => {
    const serviceError = err instanceof ServiceError ? err : (fromFastify(err) ?? toServiceError(err));
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

  for (const route of routes(service, limits)) {
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
        checkQuery(request.query as Input['query'], route.query ?? []);
        const answer = await route.handle({
          params: request.params as Input['params'],
          query: request.query as Input['query'],
          body: request.body,
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
  app.get('/docs/json', { config: { name: 'OpenAPI' }, schema: hidden }, async () => app.swagger());
  app.get('/docs', { config: { name: 'OpenAPI' }, schema: hidden }, (_request, reply) =>
    reply.redirect('/docs/json'),
  );

  return app;
}
