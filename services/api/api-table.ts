/**
 * The API definition, read once from proto/vdpa/mapd/v1/mapd.proto with protobufjs: every RPC of
 * vdpa.mapd.v1 with its `google.api.http` rule (verb, path template, body), so that the REST
 * routes, the gRPC wiring and the OpenAPI document are all built from this one table.
 */
import fs from 'node:fs';
import path from 'node:path';
import protobuf from 'protobufjs';
import { GOOGLE_API_ROOT, MAPD_PACKAGE, MAPD_PROTO_FILE, PROTO_ROOT } from './proto.ts';

export type HttpVerb = 'GET' | 'POST' | 'PUT' | 'DELETE';

export interface HttpBinding {
  verb: HttpVerb;
  /** The rule's path template: `/v1/devices/{device}:batch`. */
  template: string;
  /** Status of a successful answer. */
  status: number;
  /** Request fields bound by the path, the query string and the body (JSON names). */
  pathFields: readonly string[];
  queryFields: readonly string[];
  /** Absent: the rule takes no body. */
  bodyFields?: readonly string[];
}

export interface ApiMethod {
  /** `vdpa.mapd.v1.MappingService`. */
  service: string;
  /** The RPC's name (`Map`); also the metrics' `method` label. */
  name: string;
  /** The RPC's comment in the proto: the first sentence is its summary. */
  comment: string | undefined;
  request: protobuf.Type;
  response: protobuf.Type;
  serverStreaming: boolean;
  /** Absent: gRPC only (WatchMappings). */
  http?: HttpBinding;
}

/**
 * What a `google.api.http` rule cannot say: a success status other than 200, and a field read from
 * the query string although the rule's body is `*` (`?dryRun=true`, kept from the first REST API,
 * and `?summary=true` beside it).
 */
const REST_EXTRAS: Readonly<Record<string, { status?: number; query?: readonly string[] }>> = {
  Map: { status: 201 },
  SetMemTable: { query: ['dryRun', 'summary'] },
  Submit: { status: 202 },
  RegisterMemory: { status: 201 },
  UnregisterMemory: { status: 204 },
};

const VERBS: readonly HttpVerb[] = ['GET', 'POST', 'PUT', 'DELETE'];

interface HttpRule {
  get?: string;
  post?: string;
  put?: string;
  delete?: string;
  body?: string;
}

/** The proto files with google/api on the path, as protoc would be given them (`-I proto -I ...`). */
export function loadRoot(options: protobuf.IParseOptions = {}): protobuf.Root {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) =>
    [PROTO_ROOT, GOOGLE_API_ROOT].map((dir) => path.join(dir, target)).find((f) => fs.existsSync(f)) ??
    target;
  root.loadSync(MAPD_PROTO_FILE, { alternateCommentMode: true, ...options });
  root.resolveAll();
  return root;
}

function httpRule(method: protobuf.Method): HttpRule | undefined {
  const found = (method.parsedOptions as Record<string, unknown>[] | undefined)?.find(
    (o) => '(google.api.http)' in o,
  );
  return found?.['(google.api.http)'] as HttpRule | undefined;
}

function binding(method: protobuf.Method, request: protobuf.Type): HttpBinding | undefined {
  const rule = httpRule(method);
  if (rule === undefined) return undefined;
  const verb = VERBS.find((v) => rule[v.toLowerCase() as keyof HttpRule] !== undefined);
  if (verb === undefined) throw new Error(`${method.name}: a google.api.http rule without a verb`);
  const template = rule[verb.toLowerCase() as keyof HttpRule] as string;
  const extras = REST_EXTRAS[method.name] ?? {};
  const pathFields = [...template.matchAll(/\{([a-z_][a-z0-9_]*)\}/g)].map((m) =>
    protobuf.util.camelCase(m[1]!),
  );
  const rest = request.fieldsArray.map((f) => f.name).filter((f) => !pathFields.includes(f));
  for (const f of [...pathFields, ...(extras.query ?? [])]) {
    if (!request.fields[f]) throw new Error(`${method.name}: ${f} is no field of ${request.name}`);
  }
  if (rule.body === undefined)
    return { verb, template, status: extras.status ?? 200, pathFields, queryFields: rest };
  if (rule.body !== '*') throw new Error(`${method.name}: only body "*" is supported`);
  const queryFields = extras.query ?? [];
  const bodyFields = rest.filter((f) => !queryFields.includes(f));
  return { verb, template, status: extras.status ?? 200, pathFields, queryFields, bodyFields };
}

function readTable(root: protobuf.Root): ApiMethod[] {
  const pkg = root.lookup(MAPD_PACKAGE) as protobuf.Namespace;
  return pkg.nestedArray
    .filter((n): n is protobuf.Service => n instanceof protobuf.Service)
    .flatMap((service) =>
      service.methodsArray.map((method) => {
        const request = method.resolvedRequestType as protobuf.Type;
        const http = binding(method, request);
        return {
          service: service.fullName.slice(1),
          name: method.name,
          comment: method.comment ?? undefined,
          request,
          response: method.resolvedResponseType as protobuf.Type,
          serverStreaming: method.responseStream === true,
          ...(http ? { http } : {}),
        };
      }),
    );
}

export const API_ROOT = loadRoot();

/** Every RPC of vdpa.mapd.v1, in the proto's order. */
export const API_METHODS: readonly ApiMethod[] = readTable(API_ROOT);

/** The RPCs REST serves too. */
export const REST_METHODS = API_METHODS.filter(
  (m): m is ApiMethod & { http: HttpBinding } => m.http !== undefined,
);

/**
 * A path template as fastify's router reads it: `{device}` is `:device` and a literal `:` is `::`;
 * a variable followed by `:verb` in the same segment needs a regex to end before the `:`.
 */
export function routerPath(template: string): string {
  return template
    .replace(/:/g, '::')
    .replace(/\{([a-z_][a-z0-9_]*)\}(::)?/g, (_m, name: string, verb?: string) =>
      verb ? `:${protobuf.util.camelCase(name)}(^[^/:]+)::` : `:${protobuf.util.camelCase(name)}`,
    );
}
