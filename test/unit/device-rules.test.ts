/**
 * The kernel's IOTLB rules (reference/kernel-iotlb.md, the answers of reference/kernel-vm.md):
 * first as the precise results Device.apply gives (the guard), then as the bare errnos the
 * simulated kernel answers to raw 72-byte writes, as a real kernel does.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { DEFAULT_SIM_FEATURES, SimulatedDevice } from '../../src/device/simulated.ts';
import { type SimulatedVdpaConfig, SimulatedVdpa } from '../../src/device/sim-kernel.ts';
import { ioctlWriteU64, type VhostTransport } from '../../src/device/transport.ts';
import type { OpResult } from '../../src/device/types.ts';
import { FULL_IOVA_RANGE, type IotlbOp, type Perm } from '../../src/iotlb/types.ts';
import { backendFeatureMask, IotlbMsgType } from '../../src/uapi/constants.ts';
import { Ioctl } from '../../src/uapi/ioctl.ts';
import { errnoOf, PAGE, rawMsg, type TmpRegistry, tmpRegistry } from './device-helpers.ts';

const U64_MAX = (1n << 64n) - 1n;
const RANGE = { first: 0x1000n, last: 0xffff_ffffn };

let tmp: TmpRegistry;
before(() => {
  tmp = tmpRegistry();
  tmp.registry.create({ id: 'm0', size: 16n * PAGE, kind: 'memfd' });
});
after(() => tmp.cleanup());

const update = (
  iova: bigint,
  size: bigint,
  extra: Partial<Extract<IotlbOp, { type: 'update' }>> = {},
): IotlbOp => ({
  type: 'update',
  asid: 0,
  iova,
  size,
  memory: 'm0',
  offset: 0n,
  perm: 'rw',
  ...extra,
});
const invalidate = (iova: bigint, size: bigint, asid = 0): IotlbOp => ({
  type: 'invalidate',
  asid,
  iova,
  size,
});

/**
 * A VA-mode parent, where the kernel's table is the agent's entry for entry (the rules checked
 * here hold in PA mode too; its own rules are in pinning-rules and sim-pa-mode). By default a
 * dma_map parent (vdpa_sim batch_mapping=0 use_va=1): one call per entry.
 */
function device(opts: { features?: bigint; iommu?: 'onchip' } = {}): SimulatedDevice {
  return new SimulatedDevice(
    {
      name: 'sim0',
      iovaRange: RANGE,
      asNum: 2,
      ...(opts.iommu ? {} : { onchipMap: 'dma_map' }),
      iommu: 'onchip',
      ...opts,
    },
    tmp.registry,
  );
}

function failure(r: OpResult | undefined): Extract<OpResult, { ok: false }> {
  assert.ok(r && !r.ok, `expected a failure, got ${JSON.stringify(r)}`);
  return r;
}

describe('Device.apply: the guard gives the precise reason before anything is written', () => {
  // Every case starts from one mapping: asid 0, [0x10000, 0x14000) -> m0 at 0.
  const cases: {
    name: string;
    op: IotlbOp;
    errno?: string;
    code?: string;
    field?: string;
    message?: RegExp;
  }[] = [
    { name: 'size 0', op: update(0x20000n, 0n), errno: 'EINVAL', code: 'ZERO_SIZE', field: 'size' },
    {
      name: 'identical range',
      op: update(0x10000n, 0x4000n),
      errno: 'EEXIST',
      code: 'OVERLAP',
      field: 'iova',
      message: /\[0x10000, 0x14000\).*memory m0 at offset 0x0.*EFAULT/,
    },
    { name: 'one byte of overlap at the end', op: update(0x13fffn, 0x10n), errno: 'EEXIST', code: 'OVERLAP' },
    { name: 'covering the entry', op: update(0xf000n, 0x6000n), errno: 'EEXIST', code: 'OVERLAP' },
    { name: 'adjacent after', op: update(0x14000n, 0x1000n) },
    { name: 'adjacent before', op: update(0xf000n, 0x1000n) },
    {
      name: 'iova + size overflows',
      op: update(U64_MAX - 0xfffn, 0x2000n),
      errno: 'EINVAL',
      code: 'OVERFLOW',
    },
    {
      name: 'below the IOVA range',
      op: update(0n, 0x1000n),
      errno: 'EINVAL',
      code: 'OUT_OF_RANGE',
      field: 'iova',
    },
    { name: 'past the IOVA range', op: update(0xffff_f000n, 0x2000n), errno: 'EINVAL', code: 'OUT_OF_RANGE' },
    { name: 'ending on the last IOVA', op: update(0xffff_f000n, 0x1000n) },
    {
      name: 'asid out of range',
      op: update(0x20000n, 0x1000n, { asid: 2 }),
      errno: 'EINVAL',
      code: 'BAD_ASID',
      field: 'asid',
    },
    { name: 'same IOVA in another address space', op: update(0x10000n, 0x4000n, { asid: 1 }) },
    {
      name: 'bad perm',
      op: update(0x20000n, 0x1000n, { perm: 'x' as Perm }),
      errno: 'EINVAL',
      code: 'BAD_PERM',
      field: 'perm',
    },
    {
      name: 'unknown memory',
      op: update(0x20000n, 0x1000n, { memory: 'nope' }),
      errno: 'EFAULT',
      code: 'NOT_FOUND',
      field: 'memory',
      message: /hole/,
    },
    {
      name: 'offset past the memory',
      op: update(0x20000n, 0x1000n, { offset: 16n * PAGE }),
      errno: 'EFAULT',
      code: 'OUT_OF_BOUNDS',
      field: 'offset',
    },
    {
      name: 'size past the memory',
      op: update(0x20000n, 0x2000n, { offset: 15n * PAGE }),
      errno: 'EFAULT',
      code: 'OUT_OF_BOUNDS',
      field: 'size',
    },
    {
      name: 'INVALIDATE of an asid out of range',
      op: invalidate(0n, 0n, 5),
      errno: 'EINVAL',
      code: 'BAD_ASID',
    },
    { name: 'INVALIDATE of an empty range', op: invalidate(0x30000n, 0x1000n) },
    {
      name: 'INVALIDATE with a size that is not a u64',
      op: invalidate(0n, 1n << 64n),
      errno: 'EINVAL',
      code: 'OVERFLOW',
      field: 'size',
    },
  ];
  for (const c of cases) {
    test(c.name, async () => {
      const dev = device();
      try {
        assert.deepEqual(await dev.apply([update(0x10000n, 0x4000n)]), [{ ok: true }]);
        const written = dev.counters().messagesWritten;
        const [result] = await dev.apply([c.op]);
        if (c.errno === undefined) {
          assert.deepEqual(result, { ok: true });
          return;
        }
        const f = failure(result);
        assert.equal(f.errno, c.errno);
        assert.equal(f.code, c.code);
        if (c.field) assert.equal(f.field, c.field);
        if (c.message) assert.match(f.message, c.message);
        assert.equal(dev.counters().messagesWritten, written, 'a refused op writes nothing');
        assert.equal(dev.mappings().length, 1);
        assert.deepEqual(dev.simulator.kernelMappings(), dev.mappings());
      } finally {
        await dev.close();
      }
    });
  }

  test('size 0 surfaces as EINVAL from the framing; the others note the EFAULT a kernel reports', async () => {
    const dev = device();
    await dev.apply([update(0x10000n, 0x1000n)]);
    const [zero, overlap] = await dev.apply([update(0x20000n, 0n), update(0x10000n, 0x1000n)]);
    assert.doesNotMatch(failure(zero).message, /EFAULT/);
    assert.match(failure(overlap).message, /EFAULT/);
    await dev.close();
  });

  test('INVALIDATE removes every overlapping entry whole, and their memory references', async () => {
    const dev = device();
    await dev.apply([
      update(0x10000n, 0x1000n),
      update(0x11000n, 0x1000n, { offset: PAGE }),
      update(0x13000n, 0x1000n, { offset: 3n * PAGE }),
    ]);
    assert.equal(tmp.registry.get('m0')?.mappedEntries, 3);
    assert.deepEqual(await dev.apply([invalidate(0x10800n, 0x1000n)]), [{ ok: true }]);
    assert.deepEqual(
      dev.mappings().map((m) => m.iova),
      [0x13000n],
    );
    assert.deepEqual(dev.simulator.kernelMappings(), dev.mappings());
    assert.equal(tmp.registry.get('m0')?.mappedEntries, 1);
    await dev.close();
    assert.equal(tmp.registry.get('m0')?.mappedEntries, 0);
  });

  test('iova 0 / size 0 invalidates everything in that address space only', async () => {
    const dev = device();
    await dev.apply([
      update(0x10000n, 0x1000n),
      update(0xffff_f000n, 0x1000n),
      update(0x10000n, 0x1000n, { asid: 1 }),
    ]);
    assert.deepEqual(await dev.apply([invalidate(0n, 0n)]), [{ ok: true }]);
    assert.deepEqual(
      dev.mappings().map((m) => [m.asid, m.iova]),
      [[1, 0x10000n]],
    );
    await dev.close();
  });

  test('an INVALIDATE whose last byte wraps past 2^64 matches nothing', async () => {
    const dev = device();
    await dev.apply([update(0x10000n, 0x1000n)]);
    // last = iova + size - 1 wraps below iova (vhost_vdpa_iotlb_unmap): nothing is removed.
    assert.deepEqual(await dev.apply([invalidate(0x10000n, U64_MAX)]), [{ ok: true }]);
    assert.equal(dev.mappings().length, 1);
    await dev.close();
  });

  test('an INVALIDATE of an address space the kernel never allocated is not written', async () => {
    // Without batching nothing allocates asid 0 before the INVALIDATE; the kernel would refuse it.
    const dev = device({ features: backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_ASID') });
    assert.deepEqual(await dev.apply([invalidate(0x1000n, 0x1000n)]), [{ ok: true }]);
    assert.equal(dev.counters().messagesWritten, 0);
    // Once an UPDATE has allocated it, INVALIDATEs are written.
    await dev.apply([update(0x10000n, 0x1000n), invalidate(0x10000n, 0x1000n)]);
    assert.equal(dev.counters().messagesWritten, 2);
    assert.deepEqual(dev.mappings(), []);
    await dev.close();
  });

  test('without IOTLB_ASID every op lands in address space 0, as the kernel does', async () => {
    const dev = device({ features: backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH') });
    assert.deepEqual(await dev.apply([update(0x10000n, 0x1000n, { asid: 1 })]), [{ ok: true }]);
    assert.deepEqual(
      dev.mappings().map((m) => m.asid),
      [0],
    );
    assert.equal(failure((await dev.apply([update(0x10000n, 0x1000n)]))[0]).code, 'OVERLAP');
    await dev.close();
  });

  test('ops on several address spaces get one batch per address space, every op accepted', async () => {
    const dev = device({ iommu: 'onchip' });
    const results = await dev.apply([
      update(0x10000n, 0x1000n),
      update(0x10000n, 0x1000n, { asid: 1 }),
      update(0x20000n, 0x1000n),
      invalidate(0x10000n, 0x1000n, 1),
    ]);
    assert.deepEqual(results, Array(4).fill({ ok: true }));
    assert.deepEqual(
      dev.mappings().map((m) => [m.asid, m.iova]),
      [
        [0, 0x10000n],
        [0, 0x20000n],
      ],
    );
    const c = dev.counters();
    assert.equal(c.batches, 2);
    assert.equal(c.setMapPushes, 2);
    await dev.close();
  });
});

// ---------------------------------------------------------------------------------------------

function simConfig(over: Partial<SimulatedVdpaConfig> = {}): SimulatedVdpaConfig {
  return {
    deviceId: 2,
    iommu: 'onchip',
    iovaRange: FULL_IOVA_RANGE,
    asNum: 1,
    groupNum: 1,
    vqCount: 1,
    configSize: 60,
    offeredFeatures: backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID'),
    pushDelayMs: 0,
    ...over,
  };
}

/** Opens a simulated kernel, becomes its owner and sets `features` (default all offered). */
function ownedFile(sim: SimulatedVdpa, features = sim.config.offeredFeatures): VhostTransport {
  const t = sim.open();
  t.ioctl(Ioctl.VHOST_SET_OWNER);
  ioctlWriteU64(t, Ioctl.VHOST_SET_BACKEND_FEATURES, features);
  return t;
}

const { UPDATE, INVALIDATE, BATCH_BEGIN, BATCH_END, MISS } = IotlbMsgType;

describe('the simulated kernel answers raw writes as vhost-vdpa does (kernel-vm.md)', () => {
  let base: bigint;
  before(() => {
    base = tmp.registry.get('m0')!.uaddr;
  });

  test('write before SET_OWNER: EFAULT; second SET_OWNER: EBUSY; second open: EBUSY', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const t = sim.open();
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3))),
      'EFAULT',
    );
    t.ioctl(Ioctl.VHOST_SET_OWNER);
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_SET_OWNER)),
      'EBUSY',
    );
    assert.equal(
      errnoOf(() => sim.open()),
      'EBUSY',
    );
    t.close();
    assert.doesNotThrow(() => sim.open().close());
  });

  test('UPDATE of shared memory: accepted; identical, overlapping or overflowing: EFAULT; size 0: EINVAL', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const t = ownedFile(sim);
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x10000n, 4n * PAGE, base, 3))),
      undefined,
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x10000n, 4n * PAGE, base, 3))),
      'EFAULT',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x13000n, 4n * PAGE, base, 3))),
      'EFAULT',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, U64_MAX - 0xfffn, 2n * PAGE, base, 3))),
      'EFAULT',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x40000n, 0n, base, 3))),
      'EINVAL',
    );
    assert.equal(sim.kernelMappings().length, 1);
    t.close();
  });

  test('framing: unknown IOTLB type EFAULT, unknown message type EINVAL, 16-byte write EINVAL, MISS EFAULT', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const t = ownedFile(sim);
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, 9))),
      'EFAULT',
    );
    const badType = rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3);
    badType.writeUInt32LE(7, 0);
    assert.equal(
      errnoOf(() => t.write(badType)),
      'EINVAL',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3).subarray(0, 16))),
      'EINVAL',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, MISS, 0x1000n, PAGE))),
      'EFAULT',
    );
    t.close();
  });

  test('framing: 40 bytes are a whole message, 39 are not, and bytes past 72 are ignored (R4)', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const t = ownedFile(sim);
    const update = rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3);
    assert.equal(
      errnoOf(() => t.write(update.subarray(0, 39))),
      'EINVAL',
    );
    assert.equal(sim.kernelMappings().length, 0);
    t.write(update.subarray(0, 40));
    assert.deepEqual(
      sim.kernelMappings().map((m) => [m.iova, m.size]),
      [[0x1000n, PAGE]],
    );
    t.write(Buffer.concat([rawMsg(2, 0, INVALIDATE, 0x1000n, PAGE), Buffer.alloc(28, 0xff)]));
    assert.deepEqual(sim.kernelMappings(), []);
    t.close();
  });

  test('a uaddr in a hole maps nothing; a range running past the shared memory maps only its part', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const t = ownedFile(sim);
    const size = tmp.registry.get('m0')!.size;
    // Below the mapping: no registered memory at all there.
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x100000n, PAGE, base - 16n * PAGE, 3))),
      undefined,
    );
    assert.deepEqual(sim.kernelMappings(), []);
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x200000n, 8n * PAGE, base + size - 2n * PAGE, 3))),
      undefined,
    );
    assert.deepEqual(
      sim.kernelMappings().map((m) => [m.iova, m.size, m.memory, m.offset]),
      [[0x200000n, 2n * PAGE, 'm0', size - 2n * PAGE]],
    );
    t.close();
  });

  test('an INVALIDATE of 4 KiB inside an entry removes the whole entry', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const t = ownedFile(sim);
    t.write(rawMsg(2, 0, UPDATE, 0x100000n, 16n * PAGE, base, 3));
    t.write(rawMsg(2, 0, INVALIDATE, 0x104000n, PAGE));
    assert.deepEqual(sim.kernelMappings(), []);
    t.close();
  });

  test('BATCH_BEGIN, 3 UPDATEs, INVALIDATE, BATCH_END: one table update, at the end', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const t = ownedFile(sim);
    t.write(rawMsg(2, 0, BATCH_BEGIN));
    for (let i = 0n; i < 3n; i++)
      t.write(rawMsg(2, 0, UPDATE, 0x100000n + i * PAGE, PAGE, base + i * PAGE, 3));
    t.write(rawMsg(2, 0, INVALIDATE, 0x100000n, PAGE));
    assert.equal(sim.counters.setMapPushes, 0);
    assert.equal(sim.deviceTable(0)?.count, 0, 'the device has not seen the batch yet');
    t.write(rawMsg(2, 0, BATCH_END));
    assert.equal(sim.counters.setMapPushes, 1);
    assert.equal(sim.counters.setMapEntriesPushed, 2);
    assert.equal(sim.deviceTable(0)?.count, 2);
    t.close();
  });

  test('asid 1 without IOTLB_ASID goes to space 0; with IOTLB_ASID but one address space: EFAULT', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const noAsid = ownedFile(sim, backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH'));
    assert.equal(
      errnoOf(() => noAsid.write(rawMsg(2, 1, UPDATE, 0x1000n, PAGE, base, 3))),
      undefined,
    );
    assert.deepEqual(
      sim.kernelMappings().map((m) => m.asid),
      [0],
    );
    noAsid.close();
    const withAsid = ownedFile(sim);
    assert.equal(
      errnoOf(() => withAsid.write(rawMsg(2, 1, UPDATE, 0x1000n, PAGE, base, 3))),
      'EFAULT',
    );
    withAsid.close();
  });

  test('batch asid rules: another asid inside a batch is refused; BATCH_END needs the batch asid', () => {
    const sim = new SimulatedVdpa(simConfig({ asNum: 2, groupNum: 2 }), tmp.registry);
    const t = ownedFile(sim);
    t.write(rawMsg(2, 0, BATCH_BEGIN));
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 1, UPDATE, 0x1000n, PAGE, base, 3))),
      'EFAULT',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 1, BATCH_END))),
      'EFAULT',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 1, BATCH_BEGIN))),
      'EFAULT',
      'no nested batch of another asid',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3))),
      undefined,
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, BATCH_END))),
      undefined,
    );
    // After the batch, asid 1 is fine (the refused UPDATE allocated its address space).
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 1, UPDATE, 0x1000n, PAGE, base, 3))),
      undefined,
    );
    assert.deepEqual(
      sim.kernelMappings().map((m) => m.asid),
      [0, 1],
    );
    t.close();
  });

  test('BATCH_END without a batch is a no-op once the address space exists; before that EFAULT', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const t = ownedFile(sim);
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, BATCH_END))),
      'EFAULT',
      'asid_to_iotlb finds no address space',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, INVALIDATE, 0n, 0n))),
      'EFAULT',
    );
    t.write(rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3));
    const pushes = sim.counters.setMapPushes;
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, BATCH_END))),
      undefined,
    );
    assert.equal(sim.counters.setMapPushes, pushes);
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, INVALIDATE, 0x9000n, PAGE))),
      undefined,
      'empty INVALIDATE',
    );
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, INVALIDATE, 0n, 0n))),
      undefined,
      'everything',
    );
    assert.deepEqual(sim.kernelMappings(), []);
    t.close();
  });

  test('v1 messages go to address space 0; the kernel accepts v2 framing even without MSG_V2', () => {
    const sim = new SimulatedVdpa(simConfig({ asNum: 2 }), tmp.registry);
    const t = ownedFile(sim, backendFeatureMask('IOTLB_ASID'));
    t.write(rawMsg(1, 0, UPDATE, 0x1000n, PAGE, base, 3));
    t.write(rawMsg(2, 1, UPDATE, 0x1000n, PAGE, base, 3));
    assert.deepEqual(
      sim.kernelMappings().map((m) => m.asid),
      [0, 1],
    );
    t.close();
  });

  test('SET_BACKEND_FEATURES answers per feature, in the kernel order (kernel-notes R5); unknown ioctls: ENOTTY', () => {
    const sim = new SimulatedVdpa(simConfig(), tmp.registry);
    const t = sim.open();
    // Offered 0xe (MSG_V2, BATCH, ASID), as the VDUSE device in the kernel tier; its answers.
    const answers = (
      [
        ['SUSPEND', backendFeatureMask('SUSPEND')],
        ['RESUME', backendFeatureMask('RESUME')],
        ['bit40', 1n << 40n],
        ['ENABLE_AFTER_DRIVER_OK', backendFeatureMask('ENABLE_AFTER_DRIVER_OK')],
        ['DESC_ASID', backendFeatureMask('DESC_ASID')],
        ['IOTLB_ASID|DESC_ASID', backendFeatureMask('IOTLB_ASID', 'DESC_ASID')],
        ['IOTLB_PERSIST', backendFeatureMask('IOTLB_PERSIST')],
        ['0xe', 0xen],
      ] as const
    ).map(([name, bits]) => {
      const errno = errnoOf(() => ioctlWriteU64(t, Ioctl.VHOST_SET_BACKEND_FEATURES, bits));
      return `${name} ${errno ?? 'ok'}`;
    });
    assert.deepEqual(answers, [
      'SUSPEND EOPNOTSUPP',
      'RESUME EOPNOTSUPP',
      'bit40 EOPNOTSUPP',
      'ENABLE_AFTER_DRIVER_OK ok',
      'DESC_ASID EINVAL',
      'IOTLB_ASID|DESC_ASID EOPNOTSUPP',
      'IOTLB_PERSIST EOPNOTSUPP',
      '0xe ok',
    ]);
    // A kernel that does not know BATCH refuses it as an unknown bit.
    const old = new SimulatedVdpa(
      simConfig({ offeredFeatures: backendFeatureMask('IOTLB_MSG_V2') }),
      tmp.registry,
    );
    const u = old.open();
    assert.equal(
      errnoOf(() => ioctlWriteU64(u, Ioctl.VHOST_SET_BACKEND_FEATURES, backendFeatureMask('IOTLB_BATCH'))),
      'EOPNOTSUPP',
    );
    u.close();
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_SET_CONFIG_CALL, Buffer.alloc(4))),
      'ENOTTY',
    );
    // SUSPEND/RESUME do nothing and succeed before DRIVER_OK, even on a parent that cannot (R6).
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_SUSPEND)),
      undefined,
    );
    t.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(0xf));
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_SUSPEND)),
      'EOPNOTSUPP',
    );
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_RESUME)),
      'EOPNOTSUPP',
    );
    t.close();
  });

  test('SET_STATUS only adds bits; 0 resets, and without IOTLB_PERSIST the parent forgets its table', () => {
    const sim = new SimulatedVdpa(simConfig({ iommu: 'platform' }), tmp.registry);
    const t = ownedFile(sim);
    t.write(rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3));
    t.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(0x3));
    assert.equal(
      errnoOf(() => t.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(0x1))),
      'EINVAL',
    );
    assert.equal(sim.deviceStatus, 0x3);
    t.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(0));
    assert.equal(sim.deviceStatus, 0);
    assert.equal(sim.deviceTable(0)?.count, 0, 'the parent dropped its mapping');
    assert.equal(sim.kernelMappings().length, 1, 'the vhost table kept it');
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3))),
      'EFAULT',
      'EEXIST inside',
    );
    t.close();
  });

  test('a VDUSE-like parent (keepsMapOnReset) keeps its table across reset and close (R1, R7)', () => {
    const sim = new SimulatedVdpa(simConfig({ keepsMapOnReset: true }), tmp.registry);
    const t = ownedFile(sim);
    t.write(rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3));
    t.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(0));
    assert.equal(sim.deviceTable(0)?.count, 1, 'reset kept the parent table');
    t.close();
    assert.deepEqual(sim.kernelMappings(), []);
    assert.equal(sim.deviceTable(0)?.count, 1, 'the device can still DMA through it after close');
    // Until a new owner pushes its own table.
    const u = ownedFile(sim);
    assert.equal(sim.deviceTable(0)?.count, 1);
    u.write(rawMsg(2, 0, UPDATE, 0x8000n, PAGE, base, 3));
    assert.deepEqual(
      [...sim.deviceTable(0)!.entries()].map((r) => r.iova),
      [0x8000n],
    );
    u.close();
  });

  test('closing drops every entry of every address space', () => {
    const sim = new SimulatedVdpa(simConfig({ iommu: 'platform', asNum: 2 }), tmp.registry);
    const t = ownedFile(sim);
    t.write(rawMsg(2, 0, UPDATE, 0x1000n, PAGE, base, 3));
    t.write(rawMsg(2, 1, UPDATE, 0x1000n, PAGE, base, 3));
    assert.equal(sim.deviceTable(1)?.count, 1);
    t.close();
    assert.deepEqual(sim.kernelMappings(), []);
    assert.equal(sim.deviceTable(0)?.count, 0);
    assert.equal(sim.deviceTable(1)?.count, 0);
    assert.equal(sim.counters.dmaUnmapCalls, 2);
    assert.equal(
      errnoOf(() => t.write(rawMsg(2, 0, BATCH_BEGIN))),
      'EBADF',
    );
  });
});

test('DEFAULT_SIM_FEATURES is MSG_V2|BATCH|ASID|SUSPEND|RESUME|IOTLB_PERSIST', () => {
  assert.equal(DEFAULT_SIM_FEATURES, 0x13en);
});
