/**
 * Reflection, REST and the proto agree on field names: reflection describes the .proto's own names
 * (`request_id`, `dry_run`), a JSON client built from it may send either form (protobuf's JSON
 * mapping), and REST takes the proto names as well as the lowerCamelCase ones it prints.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import protobuf from 'protobufjs';
import { loadRoot } from '../../services/api/api-table.ts';
import { startStack } from './api-harness.ts';
import { grpcurlCommand } from './grpcurl-tool.ts';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const run = promisify(execFile);

let stack: Awaited<ReturnType<typeof startStack>>;
before(async () => {
  stack = await startStack('vdpa-names-');
  assert.equal((await stack.http('POST', '/v1/memory', { id: 'ram0', size: '0x1000000' })).status, 201);
});
after(() => stack.stop());

async function grpcurl(...args: string[]): Promise<{ stdout: string; stderr: string; code: number }> {
  try {
    const [node, script] = await grpcurlCommand();
    const { stdout, stderr } = await run(node!, [script!, ...args], { cwd: ROOT });
    return { stdout, stderr, code: 0 };
  } catch (e) {
    const err = e as { stdout: string; stderr: string; code: number };
    return { stdout: err.stdout, stderr: err.stderr, code: err.code };
  }
}

test('reflection describes every message with the field names of mapd.proto', async () => {
  const proto = loadRoot({ keepCase: true });
  const pkg = proto.lookup('vdpa.mapd.v1') as protobuf.Namespace;
  // The requests with a field whose proto name is not its JSON name (`request_id`, `dry_run`), and
  // Device (`iova_range`, `mapped_bytes`, ...): one grpcurl run each.
  const messages = pkg.nestedArray
    .filter((n): n is protobuf.Type => n instanceof protobuf.Type)
    .filter(
      (m) =>
        m.name === 'Device' ||
        (m.name.endsWith('Request') && m.fieldsArray.some((f) => f.name.includes('_'))),
    );
  assert.ok(messages.some((m) => m.fieldsArray.some((f) => f.name === 'request_id')));
  for (const message of messages) {
    const { stdout, code } = await grpcurl(
      '-plaintext',
      stack.api.grpcAddress,
      'describe',
      `vdpa.mapd.v1.${message.name}`,
    );
    assert.equal(code, 0, message.name);
    const described = [...stdout.matchAll(/^\s+\S+(?: \S+)? (\w+) = \d+;$/gm)].map((m) => m[1]);
    assert.deepEqual(
      described,
      message.fieldsArray.map((f) => f.name),
      message.name,
    );
  }
});

test('a gRPC JSON client may send proto names or JSON names, and reads JSON names', async () => {
  const map = (body: object) =>
    grpcurl(
      '-plaintext',
      '-d',
      JSON.stringify(body),
      stack.api.grpcAddress,
      'vdpa.mapd.v1.MappingService/Map',
    );
  const first = await map({
    device: 'vdpa0',
    iova: '0x1000',
    size: '0x1000',
    memory: 'ram0',
    request_id: 'names-1',
  });
  assert.equal(first.code, 0, first.stderr);
  const again = await map({
    device: 'vdpa0',
    iova: '0x1000',
    size: '0x1000',
    memory: 'ram0',
    requestId: 'names-1',
  });
  assert.equal(again.code, 0, again.stderr);
  assert.deepEqual(
    JSON.parse(again.stdout),
    JSON.parse(first.stdout),
    'the same request id: the recorded answer',
  );

  const plan = await grpcurl(
    '-plaintext',
    '-d',
    JSON.stringify({ device: 'vdpa0', dry_run: true, regions: [] }),
    stack.api.grpcAddress,
    'vdpa.mapd.v1.MappingService/SetMemTable',
  );
  assert.equal(plan.code, 0, plan.stderr);
  assert.equal(JSON.parse(plan.stdout).dryRun, true, 'printed by its JSON name');
  const devices = JSON.parse(
    (await grpcurl('-plaintext', stack.api.grpcAddress, 'vdpa.mapd.v1.DeviceService/ListDevices')).stdout,
  );
  assert.ok('mappedBytes' in devices.devices[0] && !('mapped_bytes' in devices.devices[0]));
});

test('REST takes proto names in bodies and queries, and refuses a field given under both', async () => {
  const body = { iova: '0x10000', size: '0x1000', memory: 'ram0' };
  const first = await stack.http('POST', '/v1/devices/vdpa1/mappings', { ...body, request_id: 'names-2' });
  assert.equal(first.status, 201);
  // Same key under the other name: the recorded answer, not a second mapping (which would conflict).
  const again = await stack.http('POST', '/v1/devices/vdpa1/mappings', { ...body, requestId: 'names-2' });
  assert.equal(again.status, 201);
  assert.deepEqual(again.body, first.body);

  const plan = await stack.http('PUT', '/v1/devices/vdpa1/memtable?dry_run=true', { regions: [] });
  assert.equal(plan.status, 200);
  assert.equal(plan.body.dryRun, true);
  const listed = await stack.http('GET', '/v1/devices/vdpa1/mappings');
  assert.equal(listed.body.mappings.length, 1, 'a dry run changed nothing');

  const both = await stack.http('POST', '/v1/devices/vdpa1/mappings', {
    ...body,
    request_id: 'a',
    requestId: 'b',
  });
  assert.equal(both.status, 400);
  assert.equal(both.body.error.field, 'requestId');
  const nested = await stack.http('POST', '/v1/devices/vdpa1:batch', {
    ops: [{ op: 'map', ...body, iova: '0x20000', request_id: 'x' }],
  });
  assert.equal(nested.status, 400, 'a proto name is renamed, then refused where the field does not exist');
  assert.equal(nested.body.error.field, 'ops[0].requestId');
});
