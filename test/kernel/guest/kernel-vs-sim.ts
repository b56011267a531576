/**
 * Guest step: the same raw requests (ioctls and vhost messages, byte for byte) sent to the real
 * /dev/vhost-vdpa-0 (a VDUSE device under Linux 6.12) and to the simulator of src/device/sim-kernel.ts
 * configured like it (device id 2, one address space, backend features 0xe, a set_map parent).
 * For each probe the answers, the device's table and its set_map pushes are compared.
 *
 *   node --import tsx test/kernel/guest/kernel-vs-sim.ts [probe ...]
 *
 * Every probe's expected kernel answer is pinned below, and so is the simulator's where it differs
 * (each such difference is written down in docs/kernel-notes.md). A probe fails when either side
 * answers otherwise: a kernel that changed, a simulator that was fixed (then update the table and
 * the notes) or one that regressed.
 */
import fs from 'node:fs';
import path from 'node:path';
import { SimulatedVdpa } from '../../../src/device/sim-kernel.ts';
import { FULL_IOVA_RANGE } from '../../../src/iotlb/types.ts';
import { SharedMemoryRegistry } from '../../../src/memory/registry.ts';
import {
  MAP_SHARED,
  MFD_CLOEXEC,
  memfdCreate,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
  ftruncate,
} from '../../../src/sys/libc.ts';
import {
  backendFeatureMask,
  encodeMsgV1,
  encodeMsgV2,
  IotlbMsgType,
  Ioctl,
  VHOST_ACCESS_RO,
  VHOST_ACCESS_RW,
} from '../../../src/uapi/index.ts';
import { assert, devicePath, hex, pushEmptyTable, runChecks, showMap, vduse } from './harness.ts';
import { answer, type RawFile, RealFile, SimFile } from './raw.ts';

const MiB = 1n << 20n;
const U64_MAX = (1n << 64n) - 1n;
const MAP_PRIVATE = 0x02;

interface Side {
  name: 'kernel' | 'sim';
  open(): RawFile;
  /** The device's (parent's) own table of address space 0, as `showMap` prints it. */
  table(): Promise<string>;
  /** set_map pushes so far. */
  pushes(): Promise<number>;
}

const root = fs.mkdtempSync('/tmp/kernel-vs-sim-');
const registry = new SharedMemoryRegistry({ allowedRoots: [], stateDir: path.join(root, 'state') });
const ram = registry.create({ id: 'ram', size: 4n * MiB, kind: 'memfd' });

const kernel: Side = {
  name: 'kernel',
  open: () => RealFile.open(devicePath),
  table: async () => showMap(await vduse.map()),
  pushes: async () => (await vduse.stats()).updates,
};

/**
 * A fresh simulated parent like the VDUSE device: set_map ("onchip"), VA mode, features 0xe, and
 * its table kept across reset and release.
 */
function simSide(): Side {
  const parent = new SimulatedVdpa(
    {
      deviceId: 2,
      iommu: 'onchip',
      iovaRange: FULL_IOVA_RANGE,
      asNum: 1,
      groupNum: 1,
      vqCount: 1,
      configSize: 72,
      offeredFeatures: backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID'),
      pushDelayMs: 0,
      keepsMapOnReset: true,
    },
    registry,
  );
  return {
    name: 'sim',
    open: () => new SimFile(parent.open()),
    table: async () =>
      showMap(
        [...(parent.deviceTable(0)?.entries() ?? [])].map((r) => ({
          start: r.iova,
          last: r.iova + r.size - 1n,
          perm: r.perm,
          offset: r.offset,
        })),
      ),
    pushes: async () => parent.counters.setMapPushes,
  };
}

// Message and ioctl helpers.
interface Fields {
  iova?: bigint;
  size?: bigint;
  uaddr?: bigint;
  perm?: number;
  asid?: number;
}
const v2 = (type: number, f: Fields = {}) =>
  encodeMsgV2(f.asid ?? 0, {
    type: type as IotlbMsgType,
    iova: f.iova ?? 0n,
    size: f.size ?? 0n,
    uaddr: f.uaddr ?? 0n,
    perm: f.perm ?? 0,
  });
const u64 = (value: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(value);
  return b;
};
const { UPDATE, INVALIDATE, BATCH_BEGIN, BATCH_END } = IotlbMsgType;
const A = { iova: 0x1000_0000n, size: MiB, uaddr: ram.uaddr, perm: VHOST_ACCESS_RW };
const V2_BATCH = backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH');
const V2_BATCH_ASID = backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH', 'IOTLB_ASID');

/** Opens, becomes the owner and sets `features`; each step's answer is recorded. */
async function owner(s: Side, out: string[], features = V2_BATCH): Promise<RawFile> {
  const f = s.open();
  out.push(`owner ${await answer(() => f.ioctl(Ioctl.VHOST_SET_OWNER))}`);
  out.push(
    `features(${hex(features)}) ${await answer(() => f.ioctl(Ioctl.VHOST_SET_BACKEND_FEATURES, u64(features)))}`,
  );
  return f;
}

/** `label answer` for one write. */
async function send(out: string[], label: string, f: RawFile, bytes: Uint8Array): Promise<void> {
  out.push(`${label} ${await answer(() => f.write(bytes))}`);
}

/** A probe runs on one side, returns what it saw; the device starts empty and unowned. */
type Probe = (s: Side, out: string[]) => Promise<void>;

/** The device's table and the set_map pushes since `p0`. */
async function device(s: Side, out: string[], p0: number): Promise<void> {
  out.push(`pushes +${(await s.pushes()) - p0}`, `table ${await s.table()}`);
}

const probes: Record<string, Probe> = {
  'write-before-owner': async (s, out) => {
    const f = s.open();
    await send(out, 'UPDATE', f, v2(UPDATE, A));
    f.close();
  },
  'owner-twice': async (s, out) => {
    const f = s.open();
    out.push(`owner ${await answer(() => f.ioctl(Ioctl.VHOST_SET_OWNER))}`);
    out.push(`owner ${await answer(() => f.ioctl(Ioctl.VHOST_SET_OWNER))}`);
    f.close();
  },
  'second-open': async (s, out) => {
    const f = s.open();
    out.push(`open ${await answer(() => s.open().close())}`);
    f.close();
    out.push(`after close: open ${await answer(() => s.open().close())}`);
  },
  'backend-features': async (s, out) => {
    const f = s.open();
    f.ioctl(Ioctl.VHOST_SET_OWNER);
    const got = Buffer.alloc(8);
    f.ioctl(Ioctl.VHOST_GET_BACKEND_FEATURES, got);
    out.push(`offered ${hex(got.readBigUInt64LE(0))}`);
    for (const [label, mask] of [
      ['bit63', 1n << 63n],
      ['SUSPEND', backendFeatureMask('SUSPEND')],
      ['RESUME', backendFeatureMask('RESUME')],
      ['ENABLE_AFTER_DRIVER_OK', backendFeatureMask('ENABLE_AFTER_DRIVER_OK')],
      ['DESC_ASID', backendFeatureMask('DESC_ASID')],
      ['IOTLB_ASID|DESC_ASID', backendFeatureMask('IOTLB_ASID', 'DESC_ASID')],
      ['IOTLB_PERSIST', backendFeatureMask('IOTLB_PERSIST')],
      ['0xe', V2_BATCH_ASID],
      ['0x6', V2_BATCH],
    ] as const) {
      out.push(`${label} ${await answer(() => f.ioctl(Ioctl.VHOST_SET_BACKEND_FEATURES, u64(mask)))}`);
    }
    f.close();
  },
  'suspend-ioctl': async (s, out) => {
    const f = await owner(s, out);
    out.push(`SUSPEND ${await answer(() => f.ioctl(Ioctl.VHOST_VDPA_SUSPEND))}`);
    out.push(`RESUME ${await answer(() => f.ioctl(Ioctl.VHOST_VDPA_RESUME))}`);
    f.close();
  },
  'suspend-after-driver-ok': async (s, out) => {
    const f = await owner(s, out);
    const status = 0x0f; // ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
    out.push(
      `SET_STATUS 0xf ${await answer(() => f.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(status)))}`,
    );
    const got = Buffer.alloc(1);
    out.push(`GET_STATUS ${await answer(() => f.ioctl(Ioctl.VHOST_VDPA_GET_STATUS, got))} ${hex(got[0]!)}`);
    out.push(`SUSPEND ${await answer(() => f.ioctl(Ioctl.VHOST_VDPA_SUSPEND))}`);
    out.push(`RESUME ${await answer(() => f.ioctl(Ioctl.VHOST_VDPA_RESUME))}`);
    out.push(`SET_STATUS 0 ${await answer(() => f.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(0)))}`);
    f.close();
  },
  'fresh-owner-invalidate': async (s, out) => {
    const f = await owner(s, out);
    await send(out, 'INVALIDATE', f, v2(INVALIDATE, { size: 4096n }));
    f.close();
  },
  'fresh-owner-batch-end': async (s, out) => {
    const f = await owner(s, out);
    await send(out, 'BATCH_END', f, v2(BATCH_END));
    f.close();
  },
  'empty-batch': async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out);
    await send(out, 'BATCH_BEGIN', f, v2(BATCH_BEGIN));
    await send(out, 'BATCH_END', f, v2(BATCH_END));
    await device(s, out, p0);
    f.close();
  },
  'batch-end-twice': async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out);
    await send(out, 'BATCH_BEGIN', f, v2(BATCH_BEGIN));
    await send(out, 'UPDATE', f, v2(UPDATE, A));
    await send(out, 'BATCH_BEGIN', f, v2(BATCH_BEGIN));
    await send(out, 'BATCH_END', f, v2(BATCH_END));
    await send(out, 'BATCH_END', f, v2(BATCH_END));
    await device(s, out, p0);
    f.close();
  },
  'update-rules': async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out);
    await send(out, 'size0', f, v2(UPDATE, { ...A, size: 0n }));
    await send(out, 'A', f, v2(UPDATE, A));
    await send(out, 'A-again', f, v2(UPDATE, A));
    await send(out, 'overlap', f, v2(UPDATE, { ...A, iova: A.iova + MiB - 4096n, size: 8192n }));
    await send(out, 'overflow', f, v2(UPDATE, { ...A, iova: U64_MAX - 4095n, size: 8192n }));
    await send(out, 'last-page', f, v2(UPDATE, { ...A, iova: U64_MAX - 4095n, size: 4096n }));
    await device(s, out, p0);
    f.close();
  },
  'update-perm': async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out);
    await send(out, 'perm0', f, v2(UPDATE, { ...A, perm: 0 }));
    await send(out, 'perm4', f, v2(UPDATE, { ...A, iova: 0x2000_0000n, perm: 4 }));
    await send(out, 'permRO', f, v2(UPDATE, { ...A, iova: 0x3000_0000n, perm: VHOST_ACCESS_RO }));
    await device(s, out, p0);
    f.close();
  },
  'update-private-memory': async (s, out) => {
    const fd = memfdCreate('private', MFD_CLOEXEC);
    ftruncate(fd, MiB);
    const addr = mmap(MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd);
    try {
      const p0 = await s.pushes();
      const f = await owner(s, out);
      await send(out, 'UPDATE(MAP_PRIVATE memfd)', f, v2(UPDATE, { ...A, uaddr: addr }));
      await device(s, out, p0);
      f.close();
    } finally {
      munmap(addr, MiB);
      fs.closeSync(fd);
    }
  },
  'update-unregistered-shared-memory': async (s, out) => {
    // Shared file-backed memory the agent's registry does not know.
    const fd = memfdCreate('unregistered', MFD_CLOEXEC);
    ftruncate(fd, MiB);
    const addr = mmap(MiB, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
    try {
      const p0 = await s.pushes();
      const f = await owner(s, out);
      await send(out, 'UPDATE(unregistered MAP_SHARED memfd)', f, v2(UPDATE, { ...A, uaddr: addr }));
      await device(s, out, p0);
      f.close();
    } finally {
      munmap(addr, MiB);
      fs.closeSync(fd);
    }
  },
  'invalidate-rules': async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out);
    await send(out, 'A', f, v2(UPDATE, A));
    await send(out, 'B', f, v2(UPDATE, { ...A, iova: 0x2000_0000n, uaddr: ram.uaddr + MiB }));
    await send(out, 'inside-A', f, v2(INVALIDATE, { iova: A.iova + 0x1000n, size: 0x1000n }));
    await send(out, 'nothing-there', f, v2(INVALIDATE, { iova: 0x7000_0000n, size: 0x1000n }));
    await device(s, out, p0);
    await send(out, 'iova0-size0', f, v2(INVALIDATE, { iova: 0n, size: 0n }));
    await device(s, out, p0);
    f.close();
  },
  asid: async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out, V2_BATCH);
    await send(out, 'asid1 without IOTLB_ASID', f, v2(UPDATE, { ...A, asid: 1 }));
    await device(s, out, p0);
    f.close();
    const g = await owner(s, out, V2_BATCH_ASID);
    await send(out, 'asid1 with IOTLB_ASID', g, v2(UPDATE, { ...A, asid: 1 }));
    await send(out, 'BATCH_BEGIN asid1', g, v2(BATCH_BEGIN, { asid: 1 }));
    g.close();
  },
  framing: async (s, out) => {
    const f = await owner(s, out);
    const good = v2(UPDATE, A);
    for (const n of [16, 39, 40]) {
      await send(out, `${n}-byte`, f, good.subarray(0, n));
      await send(out, 'INVALIDATE', f, v2(INVALIDATE, { iova: A.iova, size: A.size }));
    }
    await send(out, '100-byte', f, Buffer.concat([good, Buffer.alloc(28)]));
    const badMsg = Buffer.from(good);
    badMsg.writeUInt32LE(3, 0);
    await send(out, 'vhost_msg type 3', f, badMsg);
    const t9 = Buffer.from(good);
    t9.writeUInt8(9, 8 + 25);
    await send(out, 'iotlb type 9', f, t9);
    await send(out, 'MISS', f, v2(IotlbMsgType.MISS, A));
    await send(out, 'ACCESS_FAIL', f, v2(IotlbMsgType.ACCESS_FAIL, A));
    f.close();
  },
  'v1-messages': async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out, 0n);
    await send(out, 'v1 UPDATE', f, encodeMsgV1({ type: UPDATE, ...A }));
    await send(
      out,
      'v1 BATCH_BEGIN',
      f,
      encodeMsgV1({ type: BATCH_BEGIN, iova: 0n, size: 0n, uaddr: 0n, perm: 0 }),
    );
    await send(out, 'v2 INVALIDATE', f, v2(INVALIDATE, { iova: A.iova, size: A.size }));
    await send(
      out,
      'v1 BATCH_END',
      f,
      encodeMsgV1({ type: BATCH_END, iova: 0n, size: 0n, uaddr: 0n, perm: 0 }),
    );
    await device(s, out, p0);
    f.close();
  },
  close: async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out);
    await send(out, 'A', f, v2(UPDATE, A));
    f.close();
    out.push('closed');
    await device(s, out, p0);
    const g = await owner(s, out);
    await send(out, 'A', g, v2(UPDATE, A));
    g.close();
  },
  'close-inside-batch': async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out);
    await send(out, 'BATCH_BEGIN', f, v2(BATCH_BEGIN));
    await send(out, 'A', f, v2(UPDATE, A));
    f.close();
    out.push('closed');
    await device(s, out, p0);
  },
  reset: async (s, out) => {
    const p0 = await s.pushes();
    const f = await owner(s, out);
    await send(out, 'A', f, v2(UPDATE, A));
    out.push(`SET_STATUS 0 ${await answer(() => f.ioctl(Ioctl.VHOST_VDPA_SET_STATUS, Uint8Array.of(0)))}`);
    await device(s, out, p0);
    await send(out, 'A-again', f, v2(UPDATE, A));
    await send(out, 'INVALIDATE A', f, v2(INVALIDATE, { iova: A.iova, size: A.size }));
    await device(s, out, p0);
    f.close();
  },
};

/**
 * Pinned answers: `kernel` is what Linux 6.12 + VDUSE answered; `sim` only where the simulator
 * answers otherwise (each one in docs/kernel-notes.md).
 */
const EXPECTED: Record<string, { kernel: string[]; sim?: string[] }> = {
  'write-before-owner': { kernel: ['UPDATE EFAULT'] },
  'owner-twice': { kernel: ['owner ok', 'owner EBUSY'] },
  'second-open': { kernel: ['open EBUSY', 'after close: open ok'] },
  // Was docs/kernel-notes.md S3; the simulator now answers the same.
  'backend-features': {
    kernel: [
      'offered 0xe',
      'bit63 EOPNOTSUPP',
      'SUSPEND EOPNOTSUPP',
      'RESUME EOPNOTSUPP',
      'ENABLE_AFTER_DRIVER_OK ok',
      'DESC_ASID EINVAL',
      'IOTLB_ASID|DESC_ASID EOPNOTSUPP',
      'IOTLB_PERSIST EOPNOTSUPP',
      '0xe ok',
      '0x6 ok',
    ],
  },
  // Was docs/kernel-notes.md S4; the simulator now answers the same.
  'suspend-ioctl': {
    kernel: ['owner ok', 'features(0x6) ok', 'SUSPEND ok', 'RESUME ok'],
  },
  'suspend-after-driver-ok': {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'SET_STATUS 0xf ok',
      'GET_STATUS ok 0xf',
      'SUSPEND EOPNOTSUPP',
      'RESUME EOPNOTSUPP',
      'SET_STATUS 0 ok',
    ],
  },
  'fresh-owner-invalidate': { kernel: ['owner ok', 'features(0x6) ok', 'INVALIDATE EFAULT'] },
  'fresh-owner-batch-end': { kernel: ['owner ok', 'features(0x6) ok', 'BATCH_END EFAULT'] },
  'empty-batch': {
    kernel: ['owner ok', 'features(0x6) ok', 'BATCH_BEGIN 72', 'BATCH_END 72', 'pushes +1', 'table (empty)'],
  },
  'batch-end-twice': {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'BATCH_BEGIN 72',
      'UPDATE 72',
      'BATCH_BEGIN 72',
      'BATCH_END 72',
      'BATCH_END 72',
      'pushes +1',
      'table 0x10000000-0x100fffff:rw@0x0',
    ],
  },
  'update-rules': {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'size0 EINVAL',
      'A 72',
      'A-again EFAULT',
      'overlap EFAULT',
      'overflow EFAULT',
      'last-page 72',
      'pushes +2',
      'table 0x10000000-0x100fffff:rw@0x0 0xfffffffffffff000-0xffffffffffffffff:rw@0x0',
    ],
  },
  // Differs: docs/kernel-notes.md S5.
  'update-perm': {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'perm0 72',
      'perm4 72',
      'permRO 72',
      'pushes +3',
      'table 0x10000000-0x100fffff:0x0@0x0 0x20000000-0x200fffff:0x4@0x0 0x30000000-0x300fffff:ro@0x0',
    ],
    sim: [
      'owner ok',
      'features(0x6) ok',
      'perm0 EFAULT',
      'perm4 EFAULT',
      'permRO 72',
      'pushes +1',
      'table 0x30000000-0x300fffff:ro@0x0',
    ],
  },
  'update-private-memory': {
    kernel: ['owner ok', 'features(0x6) ok', 'UPDATE(MAP_PRIVATE memfd) 72', 'pushes +0', 'table (empty)'],
  },
  // Differs: docs/kernel-notes.md S7.
  'update-unregistered-shared-memory': {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'UPDATE(unregistered MAP_SHARED memfd) 72',
      'pushes +1',
      'table 0x10000000-0x100fffff:rw@0x0',
    ],
    sim: [
      'owner ok',
      'features(0x6) ok',
      'UPDATE(unregistered MAP_SHARED memfd) 72',
      'pushes +0',
      'table (empty)',
    ],
  },
  'invalidate-rules': {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'A 72',
      'B 72',
      'inside-A 72',
      'nothing-there 72',
      'pushes +4',
      'table 0x20000000-0x200fffff:rw@0x100000',
      'iova0-size0 72',
      'pushes +5',
      'table (empty)',
    ],
  },
  asid: {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'asid1 without IOTLB_ASID 72',
      'pushes +1',
      'table 0x10000000-0x100fffff:rw@0x0',
      'owner ok',
      'features(0xe) ok',
      'asid1 with IOTLB_ASID EFAULT',
      'BATCH_BEGIN asid1 EFAULT',
    ],
  },
  // Was docs/kernel-notes.md S6; the simulator now answers the same.
  framing: {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      '16-byte EINVAL',
      'INVALIDATE EFAULT',
      '39-byte EINVAL',
      'INVALIDATE EFAULT',
      '40-byte 72',
      'INVALIDATE 72',
      '100-byte 72',
      'vhost_msg type 3 EINVAL',
      'iotlb type 9 EFAULT',
      'MISS EFAULT',
      'ACCESS_FAIL EFAULT',
    ],
  },
  'v1-messages': {
    kernel: [
      'owner ok',
      'features(0x0) ok',
      'v1 UPDATE 72',
      'v1 BATCH_BEGIN 72',
      'v2 INVALIDATE 72',
      'v1 BATCH_END 72',
      'pushes +2',
      'table (empty)',
    ],
  },
  // Was docs/kernel-notes.md S1; the simulator now answers the same.
  close: {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'A 72',
      'closed',
      'pushes +1',
      'table 0x10000000-0x100fffff:rw@0x0',
      'owner ok',
      'features(0x6) ok',
      'A 72',
    ],
  },
  'close-inside-batch': {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'BATCH_BEGIN 72',
      'A 72',
      'closed',
      'pushes +0',
      'table (empty)',
    ],
  },
  // Was docs/kernel-notes.md S2; the simulator now answers the same.
  reset: {
    kernel: [
      'owner ok',
      'features(0x6) ok',
      'A 72',
      'SET_STATUS 0 ok',
      'pushes +1',
      'table 0x10000000-0x100fffff:rw@0x0',
      'A-again EFAULT',
      'INVALIDATE A 72',
      'pushes +2',
      'table (empty)',
    ],
  },
};

const selected = process.argv.slice(2);
const names = selected.length > 0 ? selected : Object.keys(probes);
for (const n of names) assert(n in probes, `unknown probe ${n}`);

let diffs = 0;
const checks: [string, () => Promise<string>][] = names.map((name) => [
  name,
  async () => {
    const seen: Record<'kernel' | 'sim', string> = { kernel: '', sim: '' };
    for (const side of [kernel, simSide()]) {
      // Each probe starts from an unowned device with an empty table on both sides.
      if (side.name === 'kernel') await pushEmptyTable();
      const out: string[] = [];
      try {
        await probes[name]!(side, out);
      } catch (e) {
        out.push(`threw ${e instanceof Error ? e.message : String(e)}`);
      }
      seen[side.name] = out.join('; ');
    }
    const same = seen.kernel === seen.sim;
    if (!same) diffs++;
    const shown = same ? `SAME: ${seen.kernel}` : `DIFF: kernel: ${seen.kernel} || sim: ${seen.sim}`;
    const pinned = EXPECTED[name];
    assert(pinned !== undefined, `no pinned answer: ${shown}`);
    const want = { kernel: pinned.kernel.join('; '), sim: pinned.sim?.join('; ') };
    assert(
      seen.kernel === want.kernel,
      `the kernel answered otherwise: ${seen.kernel}\n    pinned: ${want.kernel}`,
    );
    const simWant = want.sim ?? want.kernel;
    assert(
      seen.sim === simWant,
      want.sim === undefined
        ? `the simulator no longer matches the kernel: ${seen.sim}`
        : seen.sim === seen.kernel
          ? 'the simulator now matches the kernel: drop the pinned difference here and in docs/kernel-notes.md'
          : `the simulator answered otherwise: ${seen.sim}\n    pinned: ${simWant}`,
    );
    return shown;
  },
]);

await runChecks(
  checks,
  async () => {
    const table = await pushEmptyTable();
    registry.closeAll();
    fs.rmSync(root, { recursive: true, force: true });
    assert(table.length === 0, `device table: ${showMap(table)}`);
    return `${names.length} probes, ${diffs} with a difference; device table ${showMap(table)}`;
  },
  { independent: true },
);
