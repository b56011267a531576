/**
 * Slice-by-slice coding of big messages (here Apply's, as protobufjs objects) is byte-for-byte protobuf: what it encodes,
 * protobufjs decodes whole into the same message; what protobufjs encodes whole, it decodes into
 * the same objects; a message too small to slice is coded in one go.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type AgentMethod, agentService } from '../../src/agent/proto.ts';
import { deserializeInSlices, serializeInSlices } from '../../src/agent/sliced-codec.ts';

/** Apply's messages as protobufjs objects: a request and an answer with a repeated field each. */
type Message = Record<string, unknown>;
const apply = agentService.Apply as AgentMethod<Message, Message>;

function request(n: number): Message {
  return {
    device: 'vdpa0',
    ops: Array.from({ length: n }, (_, k) => {
      const iova = String(k * 0x1000);
      return k % 3 === 2
        ? { invalidate: { asid: k % 2, iova, size: '4096' } }
        : { update: { asid: 0, iova, size: '4096', memory: `m${k % 7}`, offset: '0', perm: 'PERM_RW' } };
    }),
  };
}

function response(n: number): Message {
  return {
    bootId: 'b00t',
    results: Array.from({ length: n }, (_, k) =>
      k % 5 === 0 ? { ok: false, errno: 'EFAULT', code: 'KERNEL', message: `op ${k}` } : { ok: true },
    ),
  };
}

for (const n of [0, 1, 127, 128, 129, 2048, 20_000]) {
  test(`an Apply of ${n} ops and its answer, sliced, equal the whole-message coding`, async () => {
    const req = request(n);
    const sliced = await serializeInSlices(apply.requestSerialize, req, 'ops');
    assert.deepEqual(apply.requestDeserialize(sliced), apply.requestDeserialize(apply.requestSerialize(req)));

    const res = response(n);
    const whole = apply.responseSerialize(res);
    assert.deepEqual(
      await deserializeInSlices(apply.responseDeserialize, whole, 'results', 1024),
      apply.responseDeserialize(whole),
    );
    assert.deepEqual(
      await deserializeInSlices(apply.requestDeserialize, sliced, 'ops', 1024),
      apply.requestDeserialize(sliced),
    );
  });
}
