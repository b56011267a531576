/**
 * Batch over gRPC, coded outside grpc-js: the answer's bytes are exactly those grpc-js's own
 * serializer writes for the formatted answer, and a request decodes to the message src/api reads
 * from grpc-js's own decode (every field present in field order, '' absent), whatever fields each op
 * carries, explicit defaults and unknown fields included.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { MethodDefinition, ServiceDefinition } from '@grpc/grpc-js';
import fc from 'fast-check';
import { decodeBatchRequest, encodeBatchAnswer, withBytesBatch } from '../../services/api/grpc-batch.ts';
import { MAPD_PACKAGE, packageDefinition } from '../../services/api/proto.ts';
import { formatBatchResult } from '../../src/api/format.ts';
import type { ServiceErrorCode } from '../../src/core/errors.ts';
import type { BatchResult } from '../../src/core/types.ts';
import { op } from './api-arbitraries.ts';

const mappingService = packageDefinition[`${MAPD_PACKAGE}.MappingService`] as ServiceDefinition;
const grpcJs = mappingService.Batch as MethodDefinition<object, object>;

const text = fc.string({ unit: 'binary', maxLength: 40 });
const error = fc.record(
  {
    code: fc.constantFrom<ServiceErrorCode>('CONFLICT', 'DEVICE_ERROR', 'INVALID_ARGUMENT'),
    message: text,
    field: text,
    errno: text,
  },
  { requiredKeys: ['code', 'message'] },
);
const batchResult: fc.Arbitrary<BatchResult> = fc.record({
  atomic: fc.boolean(),
  committed: fc.boolean(),
  results: fc.array(
    fc.record(
      { ok: fc.boolean(), error, ops: fc.array(op, { maxLength: 3 }) },
      { requiredKeys: ['ok', 'ops'] },
    ),
    { maxLength: 300 },
  ),
});

test('the answer is coded to the bytes grpc-js writes for it', () => {
  fc.assert(
    fc.property(batchResult, (r) => {
      assert.ok(encodeBatchAnswer(r).equals(grpcJs.responseSerialize(formatBatchResult(r))));
    }),
    { numRuns: 200 },
  );
});

/** What grpc.ts made of grpc-js's decode before: the same object without its '' strings. */
function withoutEmpty(message: object): unknown {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(message)) {
    if (value === '') continue;
    out[key] = Array.isArray(value) ? value.map(withoutEmpty) : value;
  }
  return out;
}

test('a request decodes as grpc-js decodes it, without its empty strings', () => {
  const batchOp = fc.record(
    {
      op: fc.constantFrom('map', 'unmap', '', 'remap'),
      iova: text,
      size: text,
      memory: text,
      offset: text,
      perm: text,
      asid: fc.nat({ max: 0xffff_ffff }),
      exact: fc.boolean(),
    },
    { requiredKeys: [] },
  );
  const request = fc.record(
    { device: text, ops: fc.array(batchOp, { maxLength: 20 }), atomic: fc.boolean(), requestId: text },
    { requiredKeys: [] },
  );
  // Fields the proto does not have, and a scalar given twice (the last one counts), in between.
  const noise = fc.array(fc.constantFrom('unknown', 'again'), { maxLength: 2 });
  fc.assert(
    fc.property(request, noise, (m, extra) => {
      const bytes = Buffer.concat([
        grpcJs.requestSerialize(m) as Buffer,
        ...extra.map((kind) =>
          kind === 'unknown'
            ? Buffer.from([0x78, 0x05, 0x82, 0x01, 0x01, 0x41]) // field 15 varint, field 16 bytes
            : (grpcJs.requestSerialize({ atomic: true, requestId: 'again' }) as Buffer),
        ),
      ]);
      const reference = withoutEmpty(grpcJs.requestDeserialize(bytes));
      assert.deepEqual(decodeBatchRequest(bytes), reference);
      // The same keys in the same order: parse.ts names the first unknown field it meets.
      const ops = (decodeBatchRequest(bytes) as { ops: object[] }).ops;
      const refOps = (reference as { ops: object[] }).ops;
      assert.deepEqual(ops.map(Object.keys), refOps.map(Object.keys));
    }),
    { numRuns: 300 },
  );
});

test('only Batch passes grpc-js as bytes; bytes that are no request are refused', () => {
  const bytes = withBytesBatch(mappingService);
  const raw = Buffer.from([1, 2, 3]);
  assert.equal(bytes.Batch!.requestDeserialize(raw), raw);
  assert.equal(bytes.Batch!.responseSerialize(raw), raw);
  assert.equal(bytes.Submit, mappingService.Submit);
  const other = packageDefinition[`${MAPD_PACKAGE}.MemoryService`] as ServiceDefinition;
  assert.equal(withBytesBatch(other), other);
  assert.throws(() => decodeBatchRequest(Buffer.from([0x12, 0x05, 1])), /Error deserializing request/);
  assert.throws(() => decodeBatchRequest(Buffer.from([0x10, 0x01])), /Error deserializing request/);
});
