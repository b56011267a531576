/**
 * MappingService methods whose messages pass grpc-js as bytes, for their handlers to code
 * themselves (grpc-set-mem-table.ts, grpc-batch.ts).
 */
import type { MethodDefinition, ServiceDefinition } from '@grpc/grpc-js';
import { MAPD_PACKAGE, packageDefinition } from './proto.ts';

const passThrough = (b: Buffer): Buffer => b;

/** MappingService's method `name`, as proto-loader codes it. */
export function mappingMethod(name: string): MethodDefinition<object, object> {
  const service = packageDefinition[`${MAPD_PACKAGE}.MappingService`] as ServiceDefinition;
  return service[name] as MethodDefinition<object, object>;
}

/** A function giving `definition` with method `name` of MappingService (when it has it) taking and giving bytes. */
export function withBytes(name: string): (definition: ServiceDefinition) => ServiceDefinition {
  const method = mappingMethod(name);
  return (definition) => {
    if (definition[name] !== method) return definition;
    const bytes = { ...method, requestDeserialize: passThrough, responseSerialize: passThrough };
    return { ...definition, [name]: bytes as unknown as MethodDefinition<object, object> };
  };
}
