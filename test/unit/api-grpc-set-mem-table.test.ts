/**
 * SetMemTable over gRPC, coded in slices outside grpc-js: the answer's bytes are exactly those
 * grpc-js's own serializer writes for the formatted answer, at any size, and a request decodes to
 * what grpc-js's own deserializer gives (fields after the regions included).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { MethodDefinition, ServiceDefinition } from '@grpc/grpc-js';
import fc from 'fast-check';
import {
  decodeSetMemTableRequest,
  encodeSetMemTableAnswer,
  withBytesSetMemTable,
} from '../../services/api/grpc-set-mem-table.ts';
import { MAPD_PACKAGE, packageDefinition } from '../../services/api/proto.ts';
import { formatSetMemTableResult } from '../../src/api/format.ts';
import { setMemTableResult } from './api-arbitraries.ts';

const mappingService = packageDefinition[`${MAPD_PACKAGE}.MappingService`] as ServiceDefinition;
const grpcJs = mappingService.SetMemTable as MethodDefinition<object, object>;

const result = setMemTableResult({ minLength: 2_049, maxLength: 5_000 });

test('the answer is coded to the bytes grpc-js writes for it', async () => {
  await fc.assert(
    fc.asyncProperty(result, async (r) => {
      const sliced = await encodeSetMemTableAnswer(r);
      assert.ok(sliced.equals(grpcJs.responseSerialize(formatSetMemTableResult(r))));
    }),
    { numRuns: 40, endOnFailure: true },
  );
});

test('a summary answer is the counts alone, as grpc-js writes them', async () => {
  await fc.assert(
    fc.asyncProperty(result, async (r) => {
      const bytes = await encodeSetMemTableAnswer(r, true);
      const counts = {
        dryRun: r.dryRun,
        unchanged: r.unchanged,
        opCount: r.ops.length,
        invalidatedCount: r.invalidated.length,
        mappedCount: r.mapped.length,
      };
      assert.ok(bytes.equals(grpcJs.responseSerialize(counts)));
      const decoded = grpcJs.responseDeserialize(bytes) as Record<string, unknown>;
      assert.deepEqual([decoded.ops, decoded.invalidated, decoded.mapped], [[], [], []]);
      assert.equal(decoded.opCount, r.ops.length);
    }),
    { numRuns: 10, endOnFailure: true },
  );
});

test('a request decodes as grpc-js decodes it, the fields after a long list of regions included', async () => {
  const hex = (n: number) => `0x${n.toString(16)}`;
  const region = fc.record({ iova: fc.nat().map(hex), size: fc.nat().map(hex), memory: fc.string() });
  const request = fc.record(
    {
      device: fc.string({ minLength: 1 }),
      asid: fc.nat(),
      regions: fc.oneof(
        fc.array(region, { maxLength: 4 }),
        fc.array(region, { minLength: 5_000, maxLength: 6_000 }),
      ),
      dryRun: fc.boolean(),
      requestId: fc.string({ minLength: 1 }),
      summary: fc.boolean(),
    },
    { requiredKeys: ['regions'] },
  );
  await fc.assert(
    fc.asyncProperty(request, async (m) => {
      const bytes = grpcJs.requestSerialize(m);
      assert.deepEqual(await decodeSetMemTableRequest(bytes), grpcJs.requestDeserialize(bytes));
    }),
    { numRuns: 30, endOnFailure: true },
  );
});

test('only SetMemTable passes grpc-js as bytes; bytes that are no request are refused', async () => {
  const bytes = withBytesSetMemTable(mappingService);
  const raw = Buffer.from([1, 2, 3]);
  assert.equal(bytes.SetMemTable!.requestDeserialize(raw), raw);
  assert.equal(bytes.SetMemTable!.responseSerialize(raw), raw);
  assert.equal(bytes.Map, mappingService.Map);
  const other = packageDefinition[`${MAPD_PACKAGE}.MemoryService`] as ServiceDefinition;
  assert.equal(withBytesSetMemTable(other), other);
  await assert.rejects(decodeSetMemTableRequest(Buffer.from([0x1a, 0x05, 1])), /Error deserializing request/);
});
