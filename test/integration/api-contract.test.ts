/**
 * REST, gRPC and the OpenAPI document agree with the proto, the contract: the document lists
 * exactly the proto's google.api.http rules and each of its routes answers on REST; every RPC of
 * the proto's services is served on gRPC; and the real answers of a scripted session (each success
 * and error status) validate against the response schemas the document publishes.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { Client, credentials, status as GrpcStatus } from '@grpc/grpc-js';
import { Ajv, type ValidateFunction } from 'ajv';
import protobuf from 'protobufjs';
import { loadRoot } from '../../services/api/api-table.ts';
import { type Http, startStack } from './api-harness.ts';

interface Operation {
  operationId?: string;
  responses: Record<string, { content?: { 'application/json'?: { schema: object } } }>;
}
type Document = { openapi: string; paths: Record<string, Record<string, Operation>> };

let stack: Awaited<ReturnType<typeof startStack>>;
let doc: Document;
before(async () => {
  stack = await startStack('vdpa-contract-');
  const res = await stack.http('GET', '/docs/json');
  assert.equal(res.status, 200);
  doc = res.body as Document;
});
after(() => stack?.stop());

/** The proto's services and RPCs, read from the .proto here, not from the server's table. */
const PROTO = loadRoot();
const SERVICES = (PROTO.lookup('vdpa.mapd.v1') as protobuf.Namespace).nestedArray.filter(
  (n): n is protobuf.Service => n instanceof protobuf.Service,
);
const VERBS = ['get', 'post', 'put', 'delete', 'patch'] as const;

/** `METHOD /path/{var}` of every RPC with a google.api.http rule. */
function protoRoutes(): string[] {
  return SERVICES.flatMap((s) => s.methodsArray).flatMap((m) => {
    const rule = (m.parsedOptions as Record<string, Record<string, string>>[] | undefined)?.find(
      (o) => '(google.api.http)' in o,
    )?.['(google.api.http)'];
    const verb = VERBS.find((v) => rule?.[v] !== undefined);
    return verb ? [`${verb.toUpperCase()} ${rule![verb]}`] : [];
  });
}

function documentedRoutes(): string[] {
  return Object.entries(doc.paths).flatMap(([p, ops]) =>
    Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`),
  );
}

test('the OpenAPI document lists exactly the routes of the proto, and each answers on REST', async () => {
  const routes = protoRoutes();
  assert.equal(routes.length, 14);
  assert.deepEqual(documentedRoutes().sort(), [...routes].sort());
  for (const route of routes) {
    const [method, template] = route.split(' ') as [string, string];
    const url = template.replace('{device}', 'vdpa0').replace('{id}', 'no-such-memory');
    const withBody = method === 'POST' || method === 'PUT';
    const res = await stack.http(method, url, withBody ? {} : undefined);
    assert.notEqual(res.status, 405, `${route}: ${JSON.stringify(res.body)}`);
    assert.ok(!(res.status === 404 && /no route/.test(res.body.error?.message)), `${route} is not routed`);
  }
});

test('every RPC of the proto is served on gRPC', async () => {
  const client = new Client(stack.api.grpcAddress, credentials.createInsecure());
  try {
    for (const service of SERVICES) {
      for (const method of service.methodsArray) {
        method.resolve();
        const request = method.resolvedRequestType as protobuf.Type;
        const response = method.resolvedResponseType as protobuf.Type;
        const path = `/${service.fullName.slice(1)}/${method.name}`;
        const encode = (v: object) => Buffer.from(request.encode(request.create(v)).finish());
        const decode = (b: Buffer) => response.decode(b);
        const code = await new Promise<number>((resolve) => {
          if (method.responseStream) {
            // Watching every device: the first answers are the "subscribed" events.
            const call = client.makeServerStreamRequest(path, encode, decode, {});
            call.once('data', () => {
              call.cancel();
              resolve(GrpcStatus.OK);
            });
            call.once('error', (e: { code: number }) => resolve(e.code));
            return;
          }
          client.makeUnaryRequest(path, encode, decode, {}, (err) => resolve(err ? err.code : GrpcStatus.OK));
        });
        assert.notEqual(code, GrpcStatus.UNIMPLEMENTED, `${path} is not served`);
      }
    }
  } finally {
    client.close();
  }
});

test('answers of a scripted session validate against the documented response schemas', async () => {
  const ajv = new Ajv({ allErrors: true, allowUnionTypes: true });
  const validators = new Map<object, ValidateFunction>();
  const seen = new Set<string>();

  /** Calls `template` (a documented path) and checks the status and the answer against the document. */
  const call = async (
    method: string,
    template: string,
    expected: number,
    body?: unknown,
    query = '',
  ): Promise<Http> => {
    const url = template.replace('{device}', 'vdpa0').replace('{id}', String((body as { id?: string })?.id));
    const res = await stack.http(method, `${url}${query}`, method === 'DELETE' ? undefined : body);
    const where = `${method} ${template}${query} -> ${res.status}`;
    assert.equal(res.status, expected, `${where}: ${JSON.stringify(res.body)}`);
    const op = doc.paths[template]?.[method.toLowerCase()];
    assert.ok(op, `${method} ${template} is documented`);
    const answer = op.responses[String(res.status)] ?? op.responses.default;
    assert.ok(answer, `${where} is documented`);
    seen.add(`${method} ${template} ${res.status}`);
    if (res.status === 204) {
      assert.equal(res.body, '');
      return res;
    }
    const schema = answer.content?.['application/json']?.schema;
    assert.ok(schema, `${where} has a schema`);
    let validate = validators.get(schema);
    if (validate === undefined) {
      validate = ajv.compile(schema);
      validators.set(schema, validate);
    }
    assert.ok(
      validate(res.body),
      `${where}: ${ajv.errorsText(validate.errors)} in ${JSON.stringify(res.body)}`,
    );
    return res;
  };

  const MiB = 1024 * 1024;
  await call('POST', '/v1/memory', 201, { id: 'ram0', size: String(16 * MiB) });
  await call('POST', '/v1/memory', 201, { id: 'ram1', size: 4096 });
  await call('GET', '/v1/memory', 200);
  await call('GET', '/v1/devices', 200);
  await call('GET', '/v1/devices/{device}', 200);

  const map = { iova: '0x100000', size: '0x4000', memory: 'ram0', perm: 'rw', requestId: 'map-1' };
  const mapped = await call('POST', '/v1/devices/{device}/mappings', 201, map);
  assert.equal(mapped.body.mapping.iova, '0x100000');
  await call('POST', '/v1/devices/{device}/mappings', 201, map); // the retry: the first answer
  await call('GET', '/v1/devices/{device}/mappings', 200, undefined, '?asid=0');
  // A split: the mapping's remainders are mapped again.
  const unmapped = await call('POST', '/v1/devices/{device}/mappings:unmap', 200, {
    iova: '0x101000',
    size: 4096,
  });
  assert.equal(unmapped.body.remapped.length, 2);
  const table = { regions: [{ iova: '0x200000', size: '0x2000', memory: 'ram0', offset: '0x1000' }] };
  await call('PUT', '/v1/devices/{device}/memtable', 200, table, '?dryRun=true');
  await call('PUT', '/v1/devices/{device}/memtable', 200, table);
  const batch = await call('POST', '/v1/devices/{device}:batch', 200, {
    ops: [
      { op: 'map', iova: '0x300000', size: '0x1000', memory: 'ram0' },
      { op: 'map', iova: '0x300000', size: '0x1000', memory: 'ram0' },
      { op: 'unmap', iova: '0x300000', size: '0x1000', exact: true },
    ],
  });
  assert.equal(batch.body.results[1].ok, false, 'the overlapping op fails, with its error');
  await call('POST', '/v1/devices/{device}:submit', 202, {
    ops: [{ op: 'map', iova: '0x400000', size: '0x1000', memory: 'ram0' }],
  });
  await call('POST', '/v1/devices/{device}:submit', 202, {
    ops: [{ op: 'map', iova: '0x400000', size: '0x1000', memory: 'ram0' }],
  });
  const flushed = await call('POST', '/v1/devices/{device}:flush', 200);
  assert.equal(flushed.body.failures.length, 1, 'the second submit overlapped the first');
  await call('GET', '/v1/devices/{device}/mappings', 200);
  await call('DELETE', '/v1/memory/{id}', 204, { id: 'ram1' });

  // Errors: each answers the documented error shape.
  await call('POST', '/v1/devices/{device}/mappings', 400, { ...map, iova: '-1' });
  await call('POST', '/v1/devices/{device}/mappings', 400, { ...map, colour: 'red' });
  await call('PUT', '/v1/devices/{device}/memtable', 400, { regions: [] }, '?dryRun=maybe');
  await call('POST', '/v1/devices/{device}/mappings', 404, {
    iova: '0x900000',
    size: '0x1000',
    memory: 'ghost',
  });
  await call('POST', '/v1/devices/{device}/mappings', 409, {
    iova: '0x200000',
    size: '0x1000',
    memory: 'ram0',
  });
  await call('DELETE', '/v1/memory/{id}', 409, { id: 'ram0' });
  await call('DELETE', '/v1/memory/{id}', 404, { id: 'ram1' });
  await call('POST', '/v1/devices/{device}:batch', 400, '{"ops": [');
  await call('POST', '/v1/devices/{device}:attach', 400, { socketPath: '' });
  // asid 0 holds the orchestrator's mappings: a VMM's table would replace them.
  await call('POST', '/v1/devices/{device}:attach', 409, { socketPath: '/etc/vdpa0.sock' });
  await call('POST', '/v1/devices/{device}:detach', 409);

  // Every documented operation took part.
  const operations = new Set([...seen].map((s) => s.split(' ').slice(0, 2).join(' ')));
  assert.deepEqual([...operations].sort(), documentedRoutes().sort());
});
