/**
 * The direct codec of Apply and ListMapped's answer (src/agent/mapping-codec.ts) against
 * protobufjs' own coding of agent.proto,
 * the reference: what one writes the other reads into the same message, both ways, for every u64
 * bit pattern, every perm, unicode memory ids, failures with and without a conflict, and messages
 * long enough to be coded in several slices. Bad ops are refused naming the field.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import fc from 'fast-check';
import {
  decodeApplyAnswer,
  decodeApplyRequest,
  decodeListMappedAnswer,
  encodeApplyAnswer,
  encodeApplyRequest,
  encodeListMappedAnswer,
} from '../../src/agent/mapping-codec.ts';
import { AgentError } from '../../src/agent/errors.ts';
import { agentService } from '../../src/agent/proto.ts';
import type { AgentOpResult } from '../../src/agent/wire.ts';
import type { IotlbOp, Mapping, Perm } from '../../src/iotlb/types.ts';

const apply = agentService.Apply!;
const listMapped = agentService.ListMapped!;
const U64_MAX = (1n << 64n) - 1n;
// Below 2^49 the decoder reads a varint itself, above it protobufjs does: both, and the edges.
const u64 = fc.oneof(
  fc.bigInt({ min: 0n, max: U64_MAX }),
  fc.bigInt({ min: 0n, max: 1n << 60n }),
  fc.bigInt({ min: 0n, max: (1n << 49n) + 1n }),
  fc.constantFrom(0n, 127n, 128n, (1n << 49n) - 1n, 1n << 49n, (1n << 53n) - 1n, 1n << 53n, U64_MAX),
);
const asid = fc.nat({ max: 0xffff_ffff });
const perm = fc.constantFrom<Perm>('ro', 'wo', 'rw');
const PERM_NAME: Record<Perm, string> = { ro: 'PERM_RO', wo: 'PERM_WO', rw: 'PERM_RW' };
const PERM_OF: Record<string, Perm> = { PERM_RO: 'ro', PERM_WO: 'wo', PERM_RW: 'rw' };

const mapping: fc.Arbitrary<Mapping> = fc.record({
  asid,
  iova: u64,
  size: u64,
  memory: fc.string({ unit: 'binary', maxLength: 12 }),
  offset: u64,
  perm,
});
const op: fc.Arbitrary<IotlbOp> = fc.oneof(
  mapping.map((m): IotlbOp => ({ type: 'update', ...m })),
  fc.record({ asid, iova: u64, size: u64 }).map((r): IotlbOp => ({ type: 'invalidate', ...r })),
);
const text = fc.string({ unit: 'binary', maxLength: 200 });
const result: fc.Arbitrary<AgentOpResult> = fc.oneof(
  fc.constant<AgentOpResult>({ ok: true }),
  fc
    .record(
      { errno: text, code: text, message: text, field: text, conflict: mapping },
      { requiredKeys: ['errno', 'code', 'message'] },
    )
    .map((r): AgentOpResult => {
      const { field, conflict, ...rest } = r;
      return {
        ok: false,
        ...rest,
        ...(field ? { field } : {}),
        ...(conflict ? { conflict: { ...conflict } } : {}),
      };
    }),
);

// ---- the reference: protobufjs objects of agent.proto, written and read here by hand ----

const mappingToObject = (m: Mapping) => ({
  asid: m.asid,
  iova: m.iova.toString(),
  size: m.size.toString(),
  memory: m.memory,
  offset: m.offset.toString(),
  perm: PERM_NAME[m.perm],
});
// biome-ignore lint/suspicious/noExplicitAny: protobufjs objects, read field by field
const mappingOfObject = (m: any): Mapping => ({
  asid: m.asid,
  iova: BigInt(m.iova),
  size: BigInt(m.size),
  memory: m.memory,
  offset: BigInt(m.offset),
  perm: PERM_OF[m.perm]!,
});
const opToObject = (o: IotlbOp) =>
  o.type === 'update'
    ? { update: mappingToObject(o) }
    : { invalidate: { asid: o.asid, iova: o.iova.toString(), size: o.size.toString() } };
// biome-ignore lint/suspicious/noExplicitAny: protobufjs objects, read field by field
const opOfObject = (o: any): IotlbOp =>
  o.update
    ? { type: 'update', ...mappingOfObject(o.update) }
    : {
        type: 'invalidate',
        asid: o.invalidate.asid,
        iova: BigInt(o.invalidate.iova),
        size: BigInt(o.invalidate.size),
      };
const resultToObject = (r: AgentOpResult) =>
  r.ok
    ? { ok: true }
    : {
        ok: false,
        errno: r.errno,
        code: r.code,
        message: r.message,
        field: r.field ?? '',
        ...(r.conflict ? { conflict: mappingToObject(r.conflict) } : {}),
      };
// biome-ignore lint/suspicious/noExplicitAny: protobufjs objects, read field by field
const resultOfObject = (r: any): AgentOpResult =>
  r.ok
    ? { ok: true }
    : {
        ok: false,
        errno: r.errno,
        code: r.code,
        message: r.message,
        ...(r.field ? { field: r.field } : {}),
        ...(r.conflict ? { conflict: mappingOfObject(r.conflict) } : {}),
      };

function refusedAs(field: string) {
  return (e: unknown) => {
    assert.ok(e instanceof AgentError, String(e));
    assert.deepEqual([e.status, e.code, e.field], [status.INVALID_ARGUMENT, 'BAD_REQUEST', field]);
    return true;
  };
}

describe('Apply request', () => {
  test('what the codec writes, protobufjs reads as the same ops, and back', async () => {
    await fc.assert(
      fc.asyncProperty(fc.string(), fc.array(op, { maxLength: 20 }), async (device, ops) => {
        // biome-ignore lint/suspicious/noExplicitAny: a protobufjs object
        const read = apply.requestDeserialize(await encodeApplyRequest({ device, ops })) as any;
        assert.equal(read.device, device);
        assert.deepEqual(read.ops.map(opOfObject), ops);
        const written = apply.requestSerialize({ device, ops: ops.map(opToObject) });
        assert.deepEqual(await decodeApplyRequest(written), { device, ops });
      }),
    );
  });

  for (const n of [0, 2047, 2048, 2049, 10_000]) {
    test(`${n} ops, coded in slices, equal protobufjs' coding`, async () => {
      const ops = fc.sample(op, { numRuns: n, seed: n });
      const bytes = await encodeApplyRequest({ device: 'vdpa0', ops });
      // biome-ignore lint/suspicious/noExplicitAny: a protobufjs object
      assert.deepEqual((apply.requestDeserialize(bytes) as any).ops.map(opOfObject), ops);
      assert.deepEqual(await decodeApplyRequest(bytes), { device: 'vdpa0', ops });
    });
  }

  test('an op with neither update nor invalidate, or a perm outside ro/wo/rw, is refused by name', async () => {
    const good = mappingToObject({ asid: 0, iova: 0n, size: 4096n, memory: 'm', offset: 0n, perm: 'rw' });
    const bytes = (ops: object[]) => apply.requestSerialize({ device: 'd', ops });
    await assert.rejects(decodeApplyRequest(bytes([{ update: good }, {}])), refusedAs('ops[1]'));
    for (const bad of ['PERM_UNSPECIFIED', 7]) {
      await assert.rejects(
        decodeApplyRequest(bytes([{ update: good }, { update: good }, { update: { ...good, perm: bad } }])),
        refusedAs('ops[2].update.perm'),
      );
    }
  });

  test('fields left out are their defaults; an op with both update and invalidate is its update', async () => {
    const bytes = apply.requestSerialize({
      device: 'd',
      ops: [
        { invalidate: {} },
        { update: { perm: 'PERM_RO' }, invalidate: { asid: 1, iova: '1', size: '1' } },
      ],
    });
    assert.deepEqual((await decodeApplyRequest(bytes)).ops, [
      { type: 'invalidate', asid: 0, iova: 0n, size: 0n },
      { type: 'update', asid: 0, iova: 0n, size: 0n, memory: '', offset: 0n, perm: 'ro' },
    ]);
  });

  test('a field an InvalidateOp does not have is skipped, though a Mapping has it', async () => {
    // ops[0] = {invalidate: {asid: 1, <field 4 as a varint>: 5}}
    const bytes = Buffer.from([0x12, 0x06, 0x12, 0x04, 0x08, 0x01, 0x20, 0x05]);
    // biome-ignore lint/suspicious/noExplicitAny: a protobufjs object
    const reference = (apply.requestDeserialize(bytes) as any).ops.map(opOfObject);
    assert.deepEqual((await decodeApplyRequest(bytes)).ops, reference);
    assert.deepEqual(reference, [{ type: 'invalidate', asid: 1, iova: 0n, size: 0n }]);
  });

  test('bytes that are no ApplyRequest are refused', async () => {
    const bytes = await encodeApplyRequest({ device: 'vdpa0', ops: fc.sample(op, { numRuns: 3, seed: 1 }) });
    await assert.rejects(decodeApplyRequest(bytes.subarray(0, bytes.length - 2)), RangeError);
    // Field 2 (ops) as a varint rather than a message.
    await assert.rejects(decodeApplyRequest(Buffer.from([0x10, 0x01])), RangeError);
  });
});

describe('Apply answer', () => {
  test('what the codec writes, protobufjs reads as the same results, and back', async () => {
    await fc.assert(
      fc.asyncProperty(fc.string(), fc.array(result, { maxLength: 20 }), async (bootId, results) => {
        // biome-ignore lint/suspicious/noExplicitAny: a protobufjs object
        const read = apply.responseDeserialize(await encodeApplyAnswer({ results, bootId })) as any;
        assert.equal(read.bootId, bootId);
        assert.deepEqual(read.results.map(resultOfObject), results);
        const written = apply.responseSerialize({ bootId, results: results.map(resultToObject) });
        assert.deepEqual(await decodeApplyAnswer(written), { results, bootId });
      }),
    );
  });

  for (const n of [2048, 2049, 10_000]) {
    test(`${n} results, coded in slices, equal protobufjs' coding`, async () => {
      const results = fc.sample(result, { numRuns: n, seed: n });
      const bytes = await encodeApplyAnswer({ results, bootId: 'b00t' });
      // biome-ignore lint/suspicious/noExplicitAny: a protobufjs object
      assert.deepEqual((apply.responseDeserialize(bytes) as any).results.map(resultOfObject), results);
      assert.deepEqual(await decodeApplyAnswer(bytes), { results, bootId: 'b00t' });
    });
  }

  test('an ok result that carries more than ok is read whole', async () => {
    // protobufjs writes every field it is given: ok, then the empty strings.
    const bytes = apply.responseSerialize({
      bootId: 'b',
      results: [
        { ok: true, errno: '', code: '', message: '', field: '' },
        { ok: false, message: 'no' },
      ],
    });
    assert.deepEqual(await decodeApplyAnswer(bytes), {
      results: [{ ok: true }, { ok: false, errno: '', code: '', message: 'no' }],
      bootId: 'b',
    });
  });
});

/** Plain objects, as the codecs make them (fast-check's records have no prototype). */
const plain = (ms: Mapping[]): Mapping[] => ms.map((m) => ({ ...m }));
/** protobufjs' reading of a ListMappedResponse. */
const readListed = (bytes: Buffer) =>
  listMapped.responseDeserialize(bytes) as { bootId: string; mappings: object[] };

describe('ListMapped answer', () => {
  test('what the codec writes, protobufjs reads as the same mappings, and back', async () => {
    await fc.assert(
      fc.asyncProperty(fc.string(), fc.array(mapping, { maxLength: 20 }), async (bootId, mappings) => {
        const read = readListed(await encodeListMappedAnswer({ mappings, bootId }));
        assert.equal(read.bootId, bootId);
        assert.deepEqual(read.mappings.map(mappingOfObject), plain(mappings));
        const written = listMapped.responseSerialize({ bootId, mappings: mappings.map(mappingToObject) });
        assert.deepEqual(await decodeListMappedAnswer(written), { mappings: plain(mappings), bootId });
      }),
    );
  });

  for (const n of [0, 2048, 2049, 10_000]) {
    test(`${n} mappings, coded in slices, equal protobufjs' coding`, async () => {
      const mappings = plain(fc.sample(mapping, { numRuns: n, seed: n }));
      const bytes = await encodeListMappedAnswer({ mappings, bootId: 'b00t' });
      assert.deepEqual(readListed(bytes).mappings.map(mappingOfObject), mappings);
      assert.deepEqual(await decodeListMappedAnswer(bytes), { mappings, bootId: 'b00t' });
    });
  }

  test('a mapping with a perm outside ro/wo/rw is refused by name; fields left out are their defaults', async () => {
    const good = mappingToObject({ asid: 0, iova: 0n, size: 4096n, memory: 'm', offset: 0n, perm: 'rw' });
    for (const bad of ['PERM_UNSPECIFIED', 7]) {
      const bytes = listMapped.responseSerialize({ bootId: 'b', mappings: [good, { ...good, perm: bad }] });
      await assert.rejects(decodeListMappedAnswer(bytes), refusedAs('mappings[1].perm'));
    }
    const bytes = listMapped.responseSerialize({ mappings: [{ perm: 'PERM_WO' }] });
    assert.deepEqual(await decodeListMappedAnswer(bytes), {
      mappings: [{ asid: 0, iova: 0n, size: 0n, memory: '', offset: 0n, perm: 'wo' }],
      bootId: '',
    });
  });
});
