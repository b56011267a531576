/**
 * The public API's gRPC definitions, loaded once from proto/vdpa/mapd/v1/mapd.proto together with
 * grpc.health.v1 (so that reflection describes both). Servers and clients (tests) load the same.
 */
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadPackageDefinition, type ServiceClientConstructor } from '@grpc/grpc-js';
import { loadSync, type Options } from '@grpc/proto-loader';
import { protoPath as healthProtoPath } from 'grpc-health-check';

export const PROTO_ROOT = fileURLToPath(new URL('../../proto/', import.meta.url));
const HEALTH_ROOT = path.resolve(path.dirname(healthProtoPath), '../..');
/** protobufjs ships google/api/{annotations,http}.proto and google/protobuf/descriptor.proto. */
export const GOOGLE_API_ROOT = path.resolve(
  path.dirname(createRequire(import.meta.url).resolve('protobufjs/google/api/annotations.proto')),
  '../..',
);

export const MAPD_PROTO_FILE = 'vdpa/mapd/v1/mapd.proto';
export const MAPD_PACKAGE = 'vdpa.mapd.v1';
export const HEALTH_SERVICE = 'grpc.health.v1.Health';

/**
 * Messages as plain objects with lowerCamelCase fields (the REST shapes); no defaults, so an unset
 * field is absent (an unset string still arrives as '' from some clients: see grpc.ts). Repeated
 * fields are the exception: proto3 cannot tell an empty list from an unset one, so both are [].
 */
export const LOADER_OPTIONS: Options = {
  keepCase: false,
  longs: String,
  enums: String,
  defaults: false,
  arrays: true,
  oneofs: false,
  includeDirs: [PROTO_ROOT, HEALTH_ROOT, GOOGLE_API_ROOT],
};

const PROTO_FILES = [MAPD_PROTO_FILE, 'health/v1/health.proto'];

/** What the handlers and clients use: lowerCamelCase fields (see {@link LOADER_OPTIONS}). */
export const packageDefinition = loadSync(PROTO_FILES, LOADER_OPTIONS);

/**
 * What reflection serves: the .proto's own field names (`request_id`), as protoc would describe it.
 * Field numbers and types are the same as {@link packageDefinition}'s, so either decodes the other's
 * messages; a JSON client derives `requestId` from the name, as protobuf's JSON mapping says.
 */
export const reflectionDefinition = once(() => loadSync(PROTO_FILES, { ...LOADER_OPTIONS, keepCase: true }));

/** Loaded when first asked for: clients (vdpactl) never need it. */
function once<T>(make: () => T): () => T {
  let value: T | undefined;
  return () => {
    value ??= make();
    return value;
  };
}

/** protobuf's JSON name of a field: each `_x` becomes `X` (`request_id` -> `requestId`). */
export function jsonName(protoName: string): string {
  return protoName.replace(/_([a-z0-9])/g, (_m, c: string) => c.toUpperCase());
}

interface MessageDescriptor {
  field?: { name: string }[];
}

/**
 * Every field of vdpa.mapd.v1 whose proto name differs from its JSON name, proto name -> JSON
 * name: the names a JSON body may use instead of the lowerCamelCase ones.
 */
export const originalFieldNames = once(
  (): ReadonlyMap<string, string> =>
    new Map(
      Object.entries(reflectionDefinition())
        .filter(([name, entry]) => name.startsWith(`${MAPD_PACKAGE}.`) && 'type' in entry)
        .flatMap(([, entry]) => ((entry.type as MessageDescriptor).field ?? []).map((f) => f.name))
        .filter((name) => jsonName(name) !== name)
        .map((name) => [name, jsonName(name)]),
    ),
);

const grpcObject = loadPackageDefinition(packageDefinition) as unknown as {
  vdpa: {
    mapd: {
      v1: Record<'DeviceService' | 'MappingService' | 'MemoryService', ServiceClientConstructor>;
    };
  };
  grpc: { health: { v1: { Health: ServiceClientConstructor } } };
};

/** Client constructors (their `.service` is the definition for `server.addService`). */
export const DeviceServiceClient = grpcObject.vdpa.mapd.v1.DeviceService;
export const MappingServiceClient = grpcObject.vdpa.mapd.v1.MappingService;
export const MemoryServiceClient = grpcObject.vdpa.mapd.v1.MemoryService;
export const HealthClient = grpcObject.grpc.health.v1.Health;

export const API_SERVICES = [
  `${MAPD_PACKAGE}.DeviceService`,
  `${MAPD_PACKAGE}.MappingService`,
  `${MAPD_PACKAGE}.MemoryService`,
] as const;
