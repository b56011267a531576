/** The agent protocol's gRPC service definition, loaded once from proto/vdpa/agent/v1/agent.proto. */
import { fileURLToPath } from 'node:url';
import type { ServiceDefinition } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import { WIRE_OBJECT_OPTIONS } from './wire.ts';

export const AGENT_PROTO_PATH = fileURLToPath(
  new URL('../../proto/vdpa/agent/v1/agent.proto', import.meta.url),
);

/** Method table of `vdpa.agent.v1.Agent`: paths and (de)serializers producing the wire shapes. */
export const agentService = loadSync(AGENT_PROTO_PATH, WIRE_OBJECT_OPTIONS)[
  'vdpa.agent.v1.Agent'
] as ServiceDefinition;

/** Largest message either end accepts: ListMapped of a big table exceeds grpc-js' 4 MiB default. */
export const MAX_MESSAGE_BYTES = 64 << 20;
