/**
 * The REST transport: fastify routes over the MapdService, one per `google.api.http` rule of the
 * proto (services/api/api-table.ts). Bodies are parsed as JSON (src/api/json-body.ts: fastify's
 * prototype-poisoning guards, large bodies in slices) within fastify's body limit, checked against
 * the route's schema (generated from the proto), then read by src/api like gRPC's messages.
 */
import { Readable, Transform } from 'node:stream';
import { SerializerSelector, type SerializerFactory } from '@fastify/fast-json-stringify-compiler';
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
import { Ajv, type ValidateFunction } from 'ajv';
import { errorBody, httpStatus, retryAfterSeconds, toServiceError } from '../../src/api/errors.ts';
import type { ApiLimits } from '../../src/api/parse.ts';
import type { InFlightBytes } from '../../src/api/inflight.ts';
import { setMemTableAnswer } from '../../src/api/json-answer.ts';
import { parseJsonBody } from '../../src/api/json-body.ts';
import { ServiceError } from '../../src/core/errors.ts';
import type { MapdService } from '../../src/core/types.ts';
import { requestArrived } from '../../src/sys/next-turn.ts';
import { REST_METHODS, routerPath } from './api-table.ts';
import { type ApiAuth, AuthError, wwwAuthenticate } from './auth.ts';
import type { ConnectionLimits } from './config.ts';
import { withJsonNames, withJsonNamesInSlices } from './json-names.ts';
import { compileRequestSchema, schemaError } from './json-schema.ts';
import { apiHandlers } from './methods.ts';
import type { Telemetry } from './observe.ts';
import { routeSchema } from './openapi.ts';

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

/** Methods a known path answers 405 to when it does not take them. */
const HTTP_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'] as const;

/** Errors fastify raises before a handler runs (JSON syntax, body limit, media type, poisoning). */
function fromFastify(err: FastifyError, request: FastifyRequest): ServiceError | undefined {
  const failed = err.validation?.[0];
  if (failed !== undefined) return schemaError(failed, err.validationContext ?? 'body');
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
 * JSON bodies only: a key given twice is refused by name, an empty body is "no body" (curl -X POST
 * -H 'content-type: application/json'), and any other content type (text/plain included) is 415.
 */
function parseJsonBodies(app: App): void {
  app.removeAllContentTypeParsers();
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, parseJsonBody);
}

/**
 * Requests are checked against their route's schema (built from the proto), compiled on the
 * route's first request rather than at start: compiling every route's was a good part of a start.
 */
function validateBySchema(app: App): void {
  app.setValidatorCompiler(({ schema, httpPart }) =>
    compiledWhenFirstUsed(() => compileRequestSchema(schema, httpPart ?? 'body')),
  );
}

/** `compile()`'s validator, compiled on the first call; fastify reads `errors` and `schemaEnv` of it. */
function compiledWhenFirstUsed(compile: () => ValidateFunction): ValidateFunction {
  let compiled: ValidateFunction | undefined;
  const validator = () => (compiled ??= compile());
  const validate = ((data: unknown, context?: Parameters<ValidateFunction>[1]) =>
    validator()(data, context)) as ValidateFunction;
  Object.defineProperties(validate, {
    errors: { get: () => compiled?.errors },
    schemaEnv: { get: () => validator().schemaEnv },
  });
  return validate;
}

/**
 * fastify's own answer serializers (fast-json-stringify), each compiled on its route's first answer
 * of that status rather than at start, like the validators.
 */
const serializersCompiledWhenFirstUsed: SerializerFactory = (externalSchemas, options) => {
  const compile = SerializerSelector()(externalSchemas, options);
  return (route) => {
    let serialize: ReturnType<typeof compile> | undefined;
    return (answer) => {
      serialize ??= compile(route);
      return serialize(answer);
    };
  };
};

/**
 * fastify serializes each answer by its schema, which would quietly reshape one that drifted from
 * the proto (drop a field, print a number as text): such an answer is refused (500) instead.
 */
function checkAnswers(app: App): void {
  const ajv = new Ajv({ allowUnionTypes: true });
  const checks = new WeakMap<object, ValidateFunction>();
  app.addHook('preSerialization', async (request, reply, payload) => {
    if (reply.statusCode >= 300) return payload;
    const responses = request.routeOptions.schema?.response as Record<string, object> | undefined;
    const schema = responses?.[reply.statusCode];
    if (schema === undefined) return payload;
    let check = checks.get(schema);
    if (check === undefined) {
      check = ajv.compile(schema);
      checks.set(schema, check);
    }
    if (!check(payload)) {
      const name = (request.routeOptions.config as RouteConfig).name;
      throw new Error(`the ${name} answer does not match its schema: ${ajv.errorsText(check.errors)}`);
    }
    return payload;
  });
}

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
  const order = (m: string) => HTTP_METHODS.indexOf(m as (typeof HTTP_METHODS)[number]);
  for (const [url, methods] of allowed) {
    methods.sort((a, b) => order(a) - order(b));
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
    schemaController: { compilersFactory: { buildSerializer: serializersCompiledWhenFirstUsed } },
  });
  app.server.maxConnections = connections.maxConnections;
  parseJsonBodies(app);
  validateBySchema(app);
  checkAnswers(app);

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

  // After the token check, so that an unauthenticated request does not slow bulk work. A body
  // sent in chunks has no length yet: it counts as large.
  app.addHook('onRequest', async (request) => {
    const length = request.headers['content-length'];
    const chunked = request.headers['transfer-encoding'] !== undefined;
    requestArrived(length !== undefined ? Number(length) : chunked ? Number.POSITIVE_INFINITY : 0);
  });
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
        description:
          'DMA mappings (IOTLB) of vhost-vDPA devices. u64 fields are decimal or 0x hex strings (requests also take JSON numbers up to 2^53-1); answers give them in 0x hex.',
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

  // A large SetMemTable answer is a stream of its JSON: fastify neither serializes nor checks it
  // (checkAnswers) but sends it as read; json-answer.ts writes the bytes the schema'd answer has.
  const handlers = apiHandlers(service, limits, { setMemTable: setMemTableAnswer });
  for (const method of REST_METHODS) {
    const { http } = method;
    const handle = handlers[method.name]!;
    app.route({
      method: http.verb,
      url: routerPath(http.template),
      config: { name: method.name },
      schema: routeSchema(method),
      // Proto field names (`request_id`) become JSON names before the schema reads them.
      preValidation: async (request) => {
        request.body = await withJsonNamesInSlices(request.body);
        request.query = withJsonNames(request.query);
      },
      handler: async (request, reply) => {
        const parts = [request.body, request.query, request.params] as (object | undefined)[];
        const answer = await handle(Object.assign({}, ...parts));
        reply.code(http.status);
        if (answer instanceof Readable) void reply.type('application/json; charset=utf-8');
        return http.status === 204 ? reply.send() : answer;
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

  const paths = [
    ...REST_METHODS.map((m) => ({ method: m.http.verb, url: routerPath(m.http.template) })),
    ...['/healthz', '/readyz', '/metrics'].map((url) => ({ method: 'GET', url })),
  ];
  refuseOtherMethods(app, paths, sendError);

  return app;
}
