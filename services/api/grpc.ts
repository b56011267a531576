/**
 * The gRPC transport: vdpa.mapd.v1 over the MapdService, with the same parsing, formatting and
 * error table as REST, plus grpc.health.v1 (SERVING once the core is ready) and server reflection.
 */
import {
  Metadata,
  ResponderBuilder,
  Server,
  type ServerInterceptor,
  ServerInterceptingCall,
  ServerListenerBuilder,
  type handleUnaryCall,
  type ServerWritableStream,
  type sendUnaryData,
  type status as GrpcStatus,
  type ServerUnaryCall,
  type ServiceDefinition,
  type UntypedServiceImplementation,
} from '@grpc/grpc-js';
import { HealthImplementation, type ServingStatus } from 'grpc-health-check';
import type { Logger } from 'pino';
import { grpcStatus, retryAfterSeconds, toServiceError } from '../../src/api/errors.ts';
import type { InFlightBytes } from '../../src/api/inflight.ts';
import { formatEvent, formatSubscribed } from '../../src/api/format.ts';
import { type ApiLimits, parseId } from '../../src/api/parse.ts';
import { parseU64 } from '../../src/core/u64.ts';
import { ServiceError } from '../../src/core/errors.ts';
import type { MapdService } from '../../src/core/types.ts';
import { mapInTimeSlices, requestArrived } from '../../src/sys/next-turn.ts';
import { type ApiAuth, AuthError } from './auth.ts';
import type { ConnectionLimits } from './config.ts';
import type { Telemetry } from './observe.ts';
import { API_METHODS } from './api-table.ts';
import {
  decodeSetMemTableRequest,
  encodeSetMemTableAnswer,
  withBytesSetMemTable,
} from './grpc-set-mem-table.ts';
import { decodeBatchRequest, encodeBatchAnswer, withBytesBatch } from './grpc-batch.ts';
import { apiHandlers } from './methods.ts';
import { API_SERVICES, packageDefinition } from './proto.ts';
import { addReflection } from './reflection.ts';

export interface GrpcOptions {
  service: MapdService;
  limits: ApiLimits;
  connections: ConnectionLimits;
  /** Shared with REST. */
  inflight: InFlightBytes;
  telemetry: Telemetry;
  logger: Logger;
  /** Absent: no token asked for. */
  auth?: ApiAuth;
}

export interface GrpcServer {
  server: Server;
  /** Ends watch streams, refuses new calls, waits for the running ones (at most `graceMs`). */
  stop(graceMs: number): Promise<void>;
}

type Message = Record<string, unknown>;

/** How often health watchers are told of readiness changes (Check looks at readiness itself). */
const HEALTH_POLL_MS = 500;
/** Events buffered for a watcher that does not read; past this its stream ends. */
const MAX_PENDING_EVENTS = 10_000;
const TOO_SLOW = new ServiceError('RESOURCE_EXHAUSTED', `watcher fell ${MAX_PENDING_EVENTS} events behind`);

/**
 * A decoded message as src/api reads a JSON body. proto3 cannot tell an unset string from an empty
 * one (many clients never send ''), so '' is absent.
 */
function body(message: object): Message {
  const out: Message = {};
  const fields = message as Message;
  for (const key of Object.keys(fields)) {
    const value = fields[key];
    if (value === '') continue;
    out[key] = Array.isArray(value) ? value.map(element) : value;
  }
  return out;
}

const element = (v: unknown): unknown => (typeof v === 'object' && v !== null ? body(v) : v);

/** {@link body} of a message whose lists are long (a SetMemTable's 65,536 regions), in time slices. */
async function bodyInSlices(message: object): Promise<Message> {
  const out: Message = {};
  for (const [key, value] of Object.entries(message)) {
    if (value === '') continue;
    out[key] = Array.isArray(value) ? await mapInTimeSlices(value, element) : value;
  }
  return out;
}

/** The device field read on its own ('' is unset, as in {@link body}). */
function device(message: Message): string {
  return parseId(message.device === '' ? undefined : message.device, 'device');
}

/** The status, message and metadata (`error-code`, `field`, `errno`, `retry-after-ms`) of a failure. */
function grpcError(err: ServiceError): { code: GrpcStatus; details: string; metadata: Metadata } {
  const metadata = new Metadata();
  metadata.set('error-code', err.code);
  if (err.field !== undefined) metadata.set('field', err.field);
  if (err.errno !== undefined) metadata.set('errno', err.errno);
  const retryAfter = retryAfterSeconds(err);
  if (retryAfter !== undefined) {
    metadata.set('retry-after-ms', String(err.details.retryAfterMs ?? retryAfter * 1000));
  }
  return { code: grpcStatus(err), details: err.message, metadata };
}

/** Encoded size of each decoded request, for the in-flight bound (grpc-js gives handlers no size). */
const messageBytes = new WeakMap<object, number>();

/** `definition` with each request's encoded size recorded in {@link messageBytes} as it is decoded. */
function measured(definition: ServiceDefinition): ServiceDefinition {
  return Object.fromEntries(
    Object.entries(definition).map(([name, method]) => [
      name,
      {
        ...method,
        requestDeserialize: (bytes: Buffer) => {
          const message = method.requestDeserialize(bytes) as object;
          messageBytes.set(message, bytes.length);
          return message;
        },
      },
    ]),
  );
}

/** Refuses, before any message is read, a call whose metadata lacks the bearer token. */
function authInterceptor(auth: ApiAuth, telemetry: Telemetry): ServerInterceptor {
  return (method, call) => {
    const open = auth.probes === 'open' && method.path.startsWith('/grpc.health.v1.Health/');
    const listener = new ServerListenerBuilder()
      .withOnReceiveMetadata((metadata, next) => {
        try {
          auth.bearer.check(metadata.get('authorization'));
        } catch (e) {
          if (!(e instanceof AuthError)) throw e;
          const name = method.path.slice(method.path.lastIndexOf('/') + 1);
          telemetry.observe({ transport: 'grpc', method: name, code: e.code, seconds: 0 });
          call.sendStatus(grpcError(e));
          return;
        }
        next(metadata);
      })
      .build();
    const responder = new ResponderBuilder().withStart((next) => next(open ? undefined : listener)).build();
    return new ServerInterceptingCall(call, responder);
  };
}

export function buildGrpcServer(opts: GrpcOptions): GrpcServer {
  const { service, limits, telemetry, logger } = opts;
  const server = new Server({
    'grpc.max_receive_message_length': limits.bodyLimit,
    // grpc-js has no connection cap nor header timeout: connections without calls are closed.
    'grpc.max_connection_idle_ms': opts.connections.idleTimeoutMs,
    ...(opts.auth ? { interceptors: [authInterceptor(opts.auth, telemetry)] } : {}),
  });
  const watches = new Set<ServerWritableStream<Message, Message>>();

  const observe = (method: string, code: string, started: bigint) =>
    telemetry.observe({
      transport: 'grpc',
      method,
      code,
      seconds: Number(process.hrtime.bigint() - started) / 1e9,
    });

  const fail = (method: string, started: bigint, err: unknown) => {
    const serviceError = toServiceError(err);
    if (serviceError.code === 'INTERNAL') logger.error({ err, method }, 'request failed');
    observe(method, serviceError.code, started);
    return grpcError(serviceError);
  };

  const unary =
    (method: string, handle: (req: Message) => Promise<object>) =>
    (call: ServerUnaryCall<Message, object>, callback: sendUnaryData<object>) => {
      const started = process.hrtime.bigint();
      const bytes = messageBytes.get(call.request) ?? 0;
      requestArrived(bytes);
      let release: () => void;
      try {
        release = opts.inflight.acquire(bytes);
      } catch (err) {
        callback(fail(method, started, err));
        return;
      }
      handle(call.request)
        .finally(release)
        .then(
          (answer) => {
            observe(method, 'OK', started);
            callback(null, answer);
          },
          (err: unknown) => callback(fail(method, started, err)),
        );
    };

  const watchMappings = (call: ServerWritableStream<Message, Message>) => {
    const started = process.hrtime.bigint();
    const subscribe = async () => {
      const filter = call.request.device ? device(call.request) : undefined;
      const from = call.request.fromSequence;
      const fromSequence = from ? parseU64(from, 'from_sequence') : undefined;
      if (filter !== undefined) await service.getDevice(filter);
      if (call.cancelled) return;
      let open = true;
      const done = (code: string) => {
        if (!open) return;
        open = false;
        subscription.close();
        watches.delete(call);
        observe('WatchMappings', code, started);
      };
      const subscription = service.watch(
        filter,
        (event) => {
          if (call.writableLength < MAX_PENDING_EVENTS) {
            call.write(formatEvent(event));
            return;
          }
          done(TOO_SLOW.code);
          call.emit('error', grpcError(TOO_SLOW));
        },
        fromSequence,
      );
      watches.add(call);
      // Synchronously after subscribing: no new event can come before these.
      for (const position of subscription.positions) call.write(formatSubscribed(position));
      for (const event of subscription.replay) call.write(formatEvent(event));
      for (const event of ['cancelled', 'finish', 'close', 'error']) call.on(event, () => done('OK'));
    };
    subscribe().catch((err: unknown) => call.emit('error', fail('WatchMappings', started, err)));
  };

  // Every RPC of the proto: the unary ones by the handlers REST shares, the stream by its own.
  // SetMemTable's messages pass grpc-js as bytes, coded in slices (grpc-set-mem-table.ts); so do
  // Batch's, coded with no object per op in between (grpc-batch.ts).
  const handlers = apiHandlers(service, limits, {
    setMemTable: encodeSetMemTableAnswer,
    batch: encodeBatchAnswer,
  });
  const streams: Readonly<Record<string, UntypedServiceImplementation[string]>> = {
    WatchMappings: watchMappings,
  };
  for (const name of new Set(API_METHODS.map((m) => m.service))) {
    const implementation: UntypedServiceImplementation = {};
    for (const method of API_METHODS.filter((m) => m.service === name)) {
      const stream = streams[method.name];
      const handle = handlers[method.name];
      if (method.serverStreaming && stream) implementation[method.name] = stream;
      else if (method.name === 'SetMemTable' && handle)
        implementation[method.name] = unary(method.name, async (r) =>
          handle(await bodyInSlices(await decodeSetMemTableRequest(r as unknown as Buffer))),
        );
      else if (method.name === 'Batch' && handle)
        implementation[method.name] = unary(method.name, (r) =>
          handle(decodeBatchRequest(r as unknown as Buffer)),
        );
      else if (!method.serverStreaming && handle)
        implementation[method.name] = unary(method.name, (r) => handle(body(r)));
      else throw new Error(`${name}/${method.name} has no implementation`);
    }
    server.addService(
      measured(withBytesBatch(withBytesSetMemTable(packageDefinition[name] as ServiceDefinition))),
      implementation,
    );
  }

  const health = new HealthImplementation();
  let serving: ServingStatus | undefined;
  const followReadiness = (status: ServingStatus) => {
    if (status === serving) return;
    serving = status;
    for (const name of ['', ...API_SERVICES]) health.setStatus(name, status);
  };
  const syncHealth = () => followReadiness(service.isReady() ? 'SERVING' : 'NOT_SERVING');
  syncHealth();
  const poll = setInterval(syncHealth, HEALTH_POLL_MS);
  poll.unref();
  health.addToServer({
    addService: (definition, implementation) =>
      server.addService(definition, {
        ...implementation,
        check: (call: ServerUnaryCall<unknown, unknown>, callback: sendUnaryData<unknown>) => {
          syncHealth();
          (implementation.check as handleUnaryCall<unknown, unknown>)(call, callback);
        },
      }),
  });
  addReflection(server);

  return {
    server,
    stop: async (graceMs) => {
      clearInterval(poll);
      followReadiness('NOT_SERVING');
      for (const call of watches) call.end();
      await new Promise<void>((resolve) => {
        const force = setTimeout(() => server.forceShutdown(), graceMs);
        server.tryShutdown(() => {
          clearTimeout(force);
          resolve();
        });
      });
    },
  };
}
