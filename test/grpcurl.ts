/**
 * `grpcurl`, for the tests that run README's examples: grpcurl itself (a Go program) is served by
 * none of the registries this project can reach, so this stands in for the part the README uses,
 * with grpcurl's rules: Go flag parsing (flags end at the first argument that is not one, so the
 * address comes after every flag), `-plaintext`, `-d` (JSON, or `@` for stdin), `-H 'name: value'`,
 * `-max-time`, then `ADDRESS (list [SERVICE] | describe SYMBOL | SERVICE/METHOD)`.
 *
 * It knows nothing of vdpa-mapd: every message type comes from the server's reflection service, and
 * JSON goes through protobufjs's ProtoJSON (fields printed by their JSON name, proto names accepted
 * too). Exit codes as grpcurl's: 2 bad usage, 1 no answer (connection, reflection, bad -d), 64 +
 * the status code when the call failed (printed as `ERROR:\n  Code: ...\n  Message: ...`).
 *
 *   node --import tsx test/grpcurl.ts -plaintext -d '{"device":"vdpa0"}' 127.0.0.1:50051 \
 *     vdpa.mapd.v1.DeviceService/GetDevice
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  type Client,
  credentials,
  type ClientDuplexStream,
  loadPackageDefinition,
  Metadata,
  makeGenericClientConstructor,
  type ServiceClientConstructor,
  type ServiceError,
  status,
} from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';
import protobuf from 'protobufjs';
import descriptor from 'protobufjs/ext/descriptor.js';
import protojson from 'protobufjs/ext/protojson.js';

class UsageError extends Error {}

interface Flags {
  plaintext: boolean;
  data?: string;
  headers: string[];
  maxTimeSeconds?: number;
}

const BOOL_FLAGS = new Set(['plaintext']);
const VALUE_FLAGS = new Set(['d', 'H', 'max-time']);

/** Go's `flag` package: `-f`, `--f`, `-f=v`, `-f v`; stops at `--` or the first non-flag argument. */
function parseFlags(argv: string[]): { flags: Flags; rest: string[] } {
  const flags: Flags = { plaintext: false, headers: [] };
  let i = 0;
  for (; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      i++;
      break;
    }
    if (!arg.startsWith('-') || arg === '-') break;
    const body = arg.replace(/^--?/, '');
    const eq = body.indexOf('=');
    const name = eq < 0 ? body : body.slice(0, eq);
    let value = eq < 0 ? undefined : body.slice(eq + 1);
    if (BOOL_FLAGS.has(name)) {
      if (value !== undefined && value !== 'true' && value !== 'false') {
        throw new UsageError(`invalid boolean value "${value}" for -${name}`);
      }
      flags.plaintext = value !== 'false';
      continue;
    }
    if (!VALUE_FLAGS.has(name)) throw new UsageError(`flag provided but not defined: -${name}`);
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new UsageError(`flag needs an argument: -${name}`);
      value = argv[++i]!;
    }
    if (name === 'd') flags.data = value;
    else if (name === 'H') flags.headers.push(value);
    else flags.maxTimeSeconds = Number(value);
  }
  return { flags, rest: argv.slice(i) };
}

const REFLECTION_PROTO = path.join(
  path.dirname(fileURLToPath(import.meta.resolve('@grpc/reflection'))),
  '../proto/grpc/reflection/v1/reflection.proto',
);

interface ReflectionResponse {
  fileDescriptorResponse?: { fileDescriptorProto: Buffer[] };
  listServicesResponse?: { service: { name: string }[] };
  errorResponse?: { errorCode: number; errorMessage: string };
}

/** One reflection stream: each question gets its answer in order (the protocol answers in order). */
class Reflection {
  private readonly stream: ClientDuplexStream<object, ReflectionResponse>;
  private readonly waiting: ((r: ReflectionResponse | Error) => void)[] = [];

  constructor(client: Client, metadata: Metadata) {
    const rpc = (client as unknown as Record<string, (m: Metadata) => typeof this.stream>)
      .serverReflectionInfo!;
    this.stream = rpc.call(client, metadata);
    this.stream.on('data', (r: ReflectionResponse) => this.waiting.shift()?.(r));
    this.stream.on('error', (e: Error) => {
      for (const w of this.waiting.splice(0)) w(e);
    });
  }

  ask(request: object): Promise<ReflectionResponse> {
    return new Promise((resolve, reject) => {
      this.waiting.push((r) => (r instanceof Error ? reject(r) : resolve(r)));
      this.stream.write(request);
    });
  }

  async services(): Promise<string[]> {
    const answer = await this.ask({ listServices: '' });
    return (answer.listServicesResponse?.service ?? []).map((s) => s.name).sort();
  }

  /** The root of every file the symbol needs (its file and, transitively, their imports). */
  async rootFor(symbol: string): Promise<protobuf.Root> {
    const files = new Map<string, descriptor.IFileDescriptorProto>();
    const add = (answer: ReflectionResponse, what: string) => {
      if (answer.errorResponse) throw new Error(`${what}: ${answer.errorResponse.errorMessage}`);
      for (const bytes of answer.fileDescriptorResponse?.fileDescriptorProto ?? []) {
        const file = descriptor.FileDescriptorProto.decode(bytes) as descriptor.IFileDescriptorProto;
        files.set(file.name ?? '', file);
      }
    };
    add(await this.ask({ fileContainingSymbol: symbol }), `Symbol not found: ${symbol}`);
    for (let pending = true; pending; ) {
      pending = false;
      for (const file of [...files.values()]) {
        for (const dep of file.dependency ?? []) {
          if (files.has(dep)) continue;
          add(await this.ask({ fileByFilename: dep }), dep);
          pending = true;
        }
      }
    }
    return (
      protobuf.Root as unknown as { fromDescriptor(d: object, o: object): protobuf.Root }
    ).fromDescriptor({ file: [...files.values()] }, { keepCase: true });
  }

  close(): void {
    this.stream.end();
  }
}

function describe(symbol: string, root: protobuf.Root): string {
  const found = root.lookup(symbol);
  if (found instanceof protobuf.Service) {
    const rpcs = found.methodsArray.map((m) => {
      const req = m.requestStream
        ? `stream .${m.resolvedRequestType!.fullName.slice(1)}`
        : `.${m.resolvedRequestType!.fullName.slice(1)}`;
      const res = m.responseStream
        ? `stream .${m.resolvedResponseType!.fullName.slice(1)}`
        : `.${m.resolvedResponseType!.fullName.slice(1)}`;
      return `  rpc ${m.name} ( ${req} ) returns ( ${res} );`;
    });
    return `${symbol} is a service:\nservice ${found.name} {\n${rpcs.join('\n')}\n}`;
  }
  if (found instanceof protobuf.Type) {
    const fields = found.fieldsArray.map((f) => {
      f.resolve();
      const type = f.resolvedType ? `.${f.resolvedType.fullName.slice(1)}` : f.type;
      return `  ${f.repeated ? 'repeated ' : ''}${type} ${f.name} = ${f.id};`;
    });
    return `${symbol} is a message:\nmessage ${found.name} {\n${fields.join('\n')}\n}`;
  }
  throw new Error(`Symbol not found: ${symbol}`);
}

/** grpcurl's names for status codes (Go's codes.Code.String()). */
function codeName(code: number): string {
  const name = status[code] ?? String(code);
  return name === 'OK'
    ? 'OK'
    : name.toLowerCase().replace(/(^|_)([a-z])/g, (_m, _u, c: string) => c.toUpperCase());
}

async function run(argv: string[]): Promise<number> {
  const { flags, rest } = parseFlags(argv);
  const [address, verb, ...more] = rest;
  if (address === undefined) throw new UsageError('Too few arguments.');
  if (!flags.plaintext) throw new UsageError('this grpcurl speaks plaintext only: pass -plaintext');
  const metadata = new Metadata();
  for (const header of flags.headers) {
    const colon = header.indexOf(':');
    if (colon < 0) throw new UsageError(`invalid header: ${header}`);
    metadata.add(header.slice(0, colon).trim().toLowerCase(), header.slice(colon + 1).trim());
  }
  const isList = verb === 'list';
  const isDescribe = verb === 'describe';
  if (verb === undefined) throw new UsageError('Too few arguments.');
  if ((isList || isDescribe) && more.length > 1) throw new UsageError('Too many arguments.');
  if (!isList && !isDescribe && more.length > 0) throw new UsageError('Too many arguments.');
  if (isDescribe && more.length === 0) throw new UsageError('describe needs a symbol');

  const reflectionPkg = loadPackageDefinition(
    loadSync(REFLECTION_PROTO, {
      keepCase: false,
      longs: String,
      enums: String,
      defaults: false,
      oneofs: true,
    }),
  ) as unknown as { grpc: { reflection: { v1: { ServerReflection: ServiceClientConstructor } } } };
  const creds = credentials.createInsecure();
  const reflectionClient = new reflectionPkg.grpc.reflection.v1.ServerReflection(address, creds);
  const reflection = new Reflection(reflectionClient, metadata);
  try {
    if (isList) {
      if (more.length === 0) {
        process.stdout.write(`${(await reflection.services()).join('\n')}\n`);
      } else {
        const service = (await reflection.rootFor(more[0]!)).lookupService(more[0]!);
        process.stdout.write(`${service.methodsArray.map((m) => `${more[0]}.${m.name}`).join('\n')}\n`);
      }
      return 0;
    }
    if (isDescribe) {
      process.stdout.write(`${describe(more[0]!, await reflection.rootFor(more[0]!))}\n`);
      return 0;
    }
    const m = /^(.+)[/.]([^/.]+)$/.exec(verb);
    if (!m) throw new UsageError(`bad method name: ${verb}`);
    const [, serviceName, methodName] = m as unknown as [string, string, string];
    const root = await reflection.rootFor(serviceName);
    const method = root.lookupService(serviceName).methods[methodName];
    if (!method) throw new Error(`service "${serviceName}" does not include a method named "${methodName}"`);
    method.resolve();
    const requestType = method.resolvedRequestType!;
    const responseType = method.resolvedResponseType!;
    const text = flags.data === '@' ? fs.readFileSync(0, 'utf8') : (flags.data ?? '{}');
    let request: protobuf.Message;
    try {
      request = protojson.fromJsonString(requestType, text);
    } catch (e) {
      process.stderr.write(
        `Error invoking method "${verb}": error getting request data: ${(e as Error).message}\n`,
      );
      return 1;
    }
    const Generic = makeGenericClientConstructor(
      {
        [methodName]: {
          path: `/${serviceName}/${methodName}`,
          requestStream: false,
          responseStream: method.responseStream === true,
          requestSerialize: (msg: protobuf.Message) => Buffer.from(requestType.encode(msg).finish()),
          requestDeserialize: (b: Buffer) => requestType.decode(b),
          responseSerialize: (msg: protobuf.Message) => Buffer.from(responseType.encode(msg).finish()),
          responseDeserialize: (b: Buffer) => responseType.decode(b),
        },
      },
      serviceName,
    );
    const client = new Generic(address, creds);
    const options = flags.maxTimeSeconds ? { deadline: Date.now() + flags.maxTimeSeconds * 1000 } : {};
    const print = (answer: protobuf.Message) =>
      process.stdout.write(`${JSON.stringify(protojson.toJson(responseType, answer), null, 2)}\n`);
    const call = (client as unknown as Record<string, (...a: unknown[]) => unknown>)[methodName]!.bind(
      client,
    );
    const failure = await new Promise<ServiceError | undefined>((resolve) => {
      if (method.responseStream) {
        const stream = call(request, metadata, options) as NodeJS.EventEmitter;
        stream.on('data', print);
        stream.on('error', (e: ServiceError) => resolve(e));
        stream.on('end', () => resolve(undefined));
      } else {
        call(request, metadata, options, (err: ServiceError | null, answer: protobuf.Message) => {
          if (!err) print(answer);
          resolve(err ?? undefined);
        });
      }
    });
    client.close();
    if (!failure) return 0;
    process.stderr.write(`ERROR:\n  Code: ${codeName(failure.code)}\n  Message: ${failure.details}\n`);
    return 64 + failure.code;
  } finally {
    reflection.close();
    reflectionClient.close();
  }
}

try {
  process.exitCode = await run(process.argv.slice(2));
} catch (e) {
  if (e instanceof UsageError) {
    process.stderr.write(`${e.message}\nTry 'grpcurl -help' for more details.\n`);
    process.exitCode = 2;
  } else {
    process.stderr.write(`Failed: ${(e as Error).message}\n`);
    process.exitCode = 1;
  }
}
