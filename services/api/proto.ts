/**
 * The public API's gRPC definitions, loaded once from proto/vdpa/mapd/v1/mapd.proto together with
 * grpc.health.v1 (so that reflection describes both). Servers and clients (tests) load the same.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadPackageDefinition, type ServiceClientConstructor } from '@grpc/grpc-js';
import { loadSync, type Options } from '@grpc/proto-loader';
import { protoPath as healthProtoPath } from 'grpc-health-check';

const PROTO_ROOT = fileURLToPath(new URL('../../proto/', import.meta.url));
const HEALTH_ROOT = path.resolve(path.dirname(healthProtoPath), '../..');

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
  includeDirs: [PROTO_ROOT, HEALTH_ROOT],
};

export const packageDefinition = loadSync([MAPD_PROTO_FILE, 'health/v1/health.proto'], LOADER_OPTIONS);

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
