import assert from 'node:assert/strict';
import { test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { decodeApplyRequest } from '../../src/agent/mapping-codec.ts';
import { AgentError } from '../../src/agent/errors.ts';
import { agentService } from '../../src/agent/proto.ts';
import { ZERO_COUNTERS } from '../../src/device/counters.ts';
import type { Device, DeviceFacts } from '../../src/device/types.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import type { MemoryRegistry } from '../../src/memory/types.ts';
import { createHandlers } from '../../services/agent/server.ts';

const FACTS: DeviceFacts = {
  name: 'vdpa-k',
  kind: 'kernel',
  node: '/dev/vhost-vdpa-0',
  deviceId: 1,
  offeredFeatures: 0n,
  negotiatedFeatures: 0n,
  iovaRange: { first: 0n, last: (1n << 64n) - 1n },
  asNum: 1,
  groupNum: 1,
  vqCount: 2,
  configSize: 0,
  status: 0,
  iommu: 'platform',
  pinned: true,
  pageSize: 4096n,
};

/** A kernel-like device (no DMA) that records what it is asked to apply. */
function fakeKernelDevice(applied: IotlbOp[][]): Device {
  const unused = async () => undefined;
  return {
    name: FACTS.name,
    facts: () => FACTS,
    counters: () => ({ ...ZERO_COUNTERS }),
    async apply(ops) {
      applied.push([...ops]);
      return ops.map(() => ({ ok: true }));
    },
    mappings: () => [],
    suspend: unused,
    resume: unused,
    reset: unused,
    close: unused,
  };
}

async function refused(
  promise: Promise<unknown>,
  code: string,
  grpcStatus: status,
  field: string,
): Promise<void> {
  await assert.rejects(promise, (e: unknown) => {
    assert.ok(e instanceof AgentError);
    assert.deepEqual([e.code, e.status, e.field], [code, grpcStatus, field], e.message);
    return true;
  });
}

test('Apply refuses bad input naming the field, and leaves the device untouched', async () => {
  const applied: IotlbOp[][] = [];
  const info = { bootId: 'b', version: '0', pid: 1 };
  const handlers = createHandlers({
    info,
    devices: [fakeKernelDevice(applied)],
    registry: {} as MemoryRegistry,
  });
  const good = { asid: 0, iova: '4096', size: '4096', memory: 'm', offset: '0', perm: 'PERM_RW' };
  // The request's bytes as protobufjs writes them, decoded as the agent serves them.
  const bytes = (ops: object[]) => agentService.Apply!.requestSerialize({ device: 'vdpa-k', ops });
  const serve = async (ops: object[]) => handlers.Apply(await decodeApplyRequest(bytes(ops)));

  const unspecified = { ...good, perm: 'PERM_UNSPECIFIED' };
  await refused(
    serve([{ update: good }, { update: unspecified }]),
    'BAD_REQUEST',
    status.INVALID_ARGUMENT,
    'ops[1].update.perm',
  );
  await refused(serve([{ update: good }, {}]), 'BAD_REQUEST', status.INVALID_ARGUMENT, 'ops[1]');
  await refused(handlers.Apply({ device: 'nope', ops: [] }), 'DEVICE_NOT_FOUND', status.NOT_FOUND, 'device');
  assert.deepEqual(applied, [], 'nothing reached the device');

  const res = await serve([{ update: good }]);
  assert.deepEqual(res, { results: [{ ok: true }], bootId: 'b' });
  assert.deepEqual(applied, [
    [{ type: 'update', asid: 0, iova: 4096n, size: 4096n, memory: 'm', offset: 0n, perm: 'rw' }],
  ]);
});

test('DMA is refused on a device that is not simulated', async () => {
  const info = { bootId: 'b', version: '0', pid: 1 };
  const handlers = createHandlers({ info, devices: [fakeKernelDevice([])], registry: {} as MemoryRegistry });
  await refused(
    handlers.DmaRead({ device: 'vdpa-k', asid: 0, iova: '0', length: 8 }),
    'NOT_SIMULATED',
    status.FAILED_PRECONDITION,
    'device',
  );
  await refused(
    handlers.DmaWrite({ device: 'vdpa-k', asid: 0, iova: '0', data: new Uint8Array(8) }),
    'NOT_SIMULATED',
    status.FAILED_PRECONDITION,
    'device',
  );
});
