/**
 * vdpactl's connection to the API server: the public API's gRPC clients (the same proto loading as
 * the server), plaintext or TLS, the bearer token as call metadata, a deadline on every unary call.
 */
import { type Client, type ClientReadableStream, Metadata, type ServiceError } from '@grpc/grpc-js';
import { DeviceServiceClient, MappingServiceClient, MemoryServiceClient } from '../api/proto.ts';
import { channelSecurity, type TlsOptions } from './tls.ts';

// biome-ignore lint/suspicious/noExplicitAny: answers are read field by field by the renderers
export type Answer = any;

export interface ConnectionOptions {
  server: string;
  token: string | undefined;
  tls: TlsOptions | undefined;
  timeoutMs: number;
}

type Unary = (
  request: object,
  metadata: Metadata,
  options: { deadline: number },
  callback: (err: ServiceError | null, answer: Answer) => void,
) => void;

export interface Connection {
  devices(method: string, request: object): Promise<Answer>;
  mappings(method: string, request: object): Promise<Answer>;
  memory(method: string, request: object): Promise<Answer>;
  /** WatchMappings, with no deadline: it runs until cancelled. */
  watch(request: object): ClientReadableStream<Answer>;
  close(): void;
}

/** Reads the TLS files first: an unreadable or bad one throws UsageError. */
export function connect({ server, token, tls, timeoutMs }: ConnectionOptions): Connection {
  const { credentials, options } = channelSecurity(tls);
  const devices = new DeviceServiceClient(server, credentials, options);
  const mappings = new MappingServiceClient(server, credentials, options);
  const memory = new MemoryServiceClient(server, credentials, options);
  const metadata = () => {
    const m = new Metadata();
    if (token !== undefined) m.set('authorization', `Bearer ${token}`);
    return m;
  };
  const unary = (client: Client) => (method: string, request: object) =>
    new Promise<Answer>((resolve, reject) => {
      const fn = (client as unknown as Record<string, Unary>)[method]!;
      fn.call(client, request, metadata(), { deadline: Date.now() + timeoutMs }, (err, answer) =>
        err ? reject(err) : resolve(answer),
      );
    });
  return {
    devices: unary(devices),
    mappings: unary(mappings),
    memory: unary(memory),
    watch: (request) =>
      (
        mappings as unknown as {
          watchMappings(r: object, m: Metadata): ClientReadableStream<Answer>;
        }
      ).watchMappings(request, metadata()),
    close: () => {
      for (const c of [devices, mappings, memory]) c.close();
    },
  };
}
