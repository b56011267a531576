/**
 * gRPC server reflection (what grpcurl lists and describes) whose descriptors are built on the
 * first reflection call, not at start: @grpc/reflection decodes and indexes every file descriptor
 * of the API when it is constructed, a good part of a start, and being ready needs none of it.
 */
import type { Server, ServiceDefinition, UntypedServiceImplementation } from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import { reflectionDefinition } from './proto.ts';

type Handler = UntypedServiceImplementation[string];

interface Registration {
  definition: ServiceDefinition;
  implementation: UntypedServiceImplementation;
}

/** What `service.addToServer` would serve (each reflection version's service), recorded. */
function registrationsOf(service: ReflectionService): Registration[] {
  const out: Registration[] = [];
  service.addToServer({
    addService: (definition, implementation) => {
      out.push({ definition, implementation });
    },
  });
  return out;
}

/** Each method's handler, by its path (`/grpc.reflection.v1.ServerReflection/ServerReflectionInfo`). */
function handlersByPath(registrations: readonly Registration[]): Map<string, Handler> {
  return new Map(
    registrations.flatMap(({ definition, implementation }) =>
      Object.entries(definition).map(([method, { path }]) => [path, implementation[method]!] as const),
    ),
  );
}

/** Serves reflection of the API's services on `server`; the descriptors are built when first asked. */
export function addReflection(server: Server): void {
  let real: Map<string, Handler> | undefined;
  const handler = (path: string) => {
    real ??= handlersByPath(registrationsOf(new ReflectionService(reflectionDefinition())));
    return real.get(path)!;
  };
  // A service that describes nothing yields the same service definitions (v1, v1alpha) cheaply.
  for (const { definition } of registrationsOf(new ReflectionService({}))) {
    const implementation: UntypedServiceImplementation = {};
    for (const [method, { path }] of Object.entries(definition)) {
      implementation[method] = ((call: never) => (handler(path) as (call: never) => void)(call)) as Handler;
    }
    server.addService(definition, implementation);
  }
}
