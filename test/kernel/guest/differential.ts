/**
 * Guest step, one per parent kind: seeded random sequences of raw IOTLB messages (fast-check)
 * sent byte for byte to the real /dev/vhost-vdpa-0 and to the simulator configured as the same
 * kind (./kinds.ts). After every message both must have answered the same (72 or the errno), pin
 * the same bytes (the kernel's VmPin of this process, the owner; the simulator's count), and hold
 * the same table as far as userspace can see it: a one-page UPDATE probe of every page of the
 * window (refused: something overlaps it), and for VDUSE the device's own table (GET_FD).
 *
 *   node --import tsx test/kernel/run-vm.ts --kind vp-vdpa test/kernel/guest/differential.ts
 *
 * Differences the simulator keeps on purpose are listed in `KNOWN` (and in docs/kernel-notes.md);
 * any other difference fails the step with the sequence that led to it.
 */
import path from 'node:path';
import fc from 'fast-check';
import type { SimulatedVdpa } from '../../../src/device/sim-kernel.ts';
import { SharedMemoryRegistry } from '../../../src/memory/registry.ts';
import {
  backendFeatureMask,
  encodeMsgV2,
  IotlbMsgType,
  Ioctl,
  VHOST_ACCESS_RW,
} from '../../../src/uapi/index.ts';
import { assert, devicePath, hex, runChecks, showMap, vduse } from './harness.ts';
import { currentKind, pageFrames, simulatorFor, vmPinOf } from './kinds.ts';
import { answer, type RawFile, RealFile, SimFile } from './raw.ts';

const kind = currentKind();
const PAGE = 4096n;
/** The IOVA window the ops and the probes cover, and the backing memory's size in pages. */
const WINDOW_BASE = 0x10_0000n;
const WINDOW_PAGES = 24;
const MEMORY_PAGES = 64;
/** Op sequences per kind and their length: a few hundred ops in all. */
const RUNS = Number(process.env.DIFFERENTIAL_RUNS ?? 4);
const OPS_PER_RUN = Number(process.env.DIFFERENTIAL_OPS ?? 60);
const SEED = Number(process.env.DIFFERENTIAL_SEED ?? 0x5eed12);

const root = `/tmp/differential-${process.pid}`;
const registry = new SharedMemoryRegistry({ allowedRoots: [], stateDir: path.join(root, 'state') });
const probeMemory = registry.create({ id: 'probe', size: PAGE, kind: 'memfd' });

/** Neighbouring pages of memory `id` that are physically contiguous (their index), from pagemap. */
function contiguousNeighbours(id: string, uaddr: bigint): number[] {
  // Every page allocated now, so its frame stays what pageFrames reads (pinning would fault it
  // in), last page first: consecutive faults tend to get ascending frames.
  for (let p = MEMORY_PAGES - 1; p >= 0; p--) registry.write(id, BigInt(p) * PAGE, Buffer.alloc(1));
  const frames = pageFrames(uaddr, MEMORY_PAGES);
  assert(
    frames.every((f) => f !== 0n),
    `pagemap shows no frame for some page of ${id}: ${frames.join(' ')}`,
  );
  const pairs: number[] = [];
  for (let p = 0; p + 1 < MEMORY_PAGES; p++) if (frames[p + 1] === frames[p]! + 1n) pairs.push(p);
  return pairs;
}

/**
 * The memory the ops map: one whose neighbouring pages are not physically contiguous, so that in
 * PA mode the kernel's runs are single pages, as the simulator's shmem model says (S8). Up to 8
 * tries, each memory kept so that the allocator does not hand out the same pages again.
 */
function pickMemory(): { ram: { uaddr: bigint }; contiguousPairs: number[]; tries: number } {
  for (let t = 1; ; t++) {
    const mem = registry.create({ id: `ram${t}`, size: BigInt(MEMORY_PAGES) * PAGE, kind: 'memfd' });
    const pairs = contiguousNeighbours(`ram${t}`, mem.uaddr);
    if (pairs.length === 0 || t === 8) return { ram: mem, contiguousPairs: pairs, tries: t };
  }
}
const { ram, contiguousPairs, tries } = pickMemory();

type Op =
  | { t: 'update'; page: number; pages: number; sub: bigint; short: bigint; mem: number; perm: number }
  | { t: 'invalidate'; page: number; pages: number; sub: bigint; short: bigint }
  | { t: 'batch-begin' }
  | { t: 'batch-end' }
  | { t: 'edge'; which: 'last-page' | 'past-end' | 'drop-last-page' | 'zero-size' };

const { UPDATE, INVALIDATE, BATCH_BEGIN, BATCH_END } = IotlbMsgType;
const lastPage = kind.iovaRange.last + 1n - PAGE;

function encode(op: Op): Uint8Array {
  const msg = (type: IotlbMsgType, iova = 0n, size = 0n, uaddr = 0n, perm = 0) =>
    encodeMsgV2(0, { type, iova, size, uaddr, perm });
  switch (op.t) {
    case 'update': {
      const iova = WINDOW_BASE + BigInt(op.page) * PAGE + op.sub;
      const size = BigInt(op.pages) * PAGE - op.short;
      return msg(UPDATE, iova, size, ram.uaddr + BigInt(op.mem) * PAGE + op.sub, op.perm);
    }
    case 'invalidate': {
      const iova = WINDOW_BASE + BigInt(op.page) * PAGE + op.sub;
      return msg(INVALIDATE, iova, BigInt(op.pages) * PAGE - op.short);
    }
    case 'batch-begin':
      return msg(BATCH_BEGIN);
    case 'batch-end':
      return msg(BATCH_END);
    case 'edge':
      switch (op.which) {
        case 'last-page':
          return msg(UPDATE, lastPage, PAGE, ram.uaddr, VHOST_ACCESS_RW);
        case 'past-end':
          return msg(UPDATE, lastPage, 2n * PAGE, ram.uaddr, VHOST_ACCESS_RW);
        case 'drop-last-page':
          return msg(INVALIDATE, lastPage, PAGE);
        case 'zero-size':
          return msg(UPDATE, WINDOW_BASE, 0n, ram.uaddr, VHOST_ACCESS_RW);
      }
  }
}

function show(op: Op): string {
  switch (op.t) {
    case 'update':
    case 'invalidate': {
      const iova = WINDOW_BASE + BigInt(op.page) * PAGE + op.sub;
      const size = BigInt(op.pages) * PAGE - op.short;
      const tail = op.t === 'update' ? ` mem+${hex(BigInt(op.mem) * PAGE + op.sub)} perm ${op.perm}` : '';
      return `${op.t.toUpperCase()} [${hex(iova)},+${hex(size)})${tail}`;
    }
    case 'edge':
      return `edge ${op.which}`;
    default:
      return op.t.toUpperCase();
  }
}

const subPage = fc.constantFrom(0n, 0n, 0n, 0x800n);
const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      t: fc.constant('update' as const),
      page: fc.integer({ min: 0, max: WINDOW_PAGES - 1 }),
      pages: fc.integer({ min: 1, max: 6 }),
      sub: subPage,
      short: fc.constantFrom(0n, 0n, 0n, 0x800n),
      mem: fc.integer({ min: 0, max: MEMORY_PAGES - 8 }),
      perm: fc.constantFrom(1, 2, 3),
    }),
  },
  {
    weight: 4,
    arbitrary: fc.record({
      t: fc.constant('invalidate' as const),
      page: fc.integer({ min: 0, max: WINDOW_PAGES - 1 }),
      pages: fc.integer({ min: 1, max: 8 }),
      sub: subPage,
      short: fc.constantFrom(0n, 0n, 0x800n),
    }),
  },
  { weight: 1, arbitrary: fc.constant({ t: 'batch-begin' as const }) },
  { weight: 1, arbitrary: fc.constant({ t: 'batch-end' as const }) },
  {
    weight: 1,
    arbitrary: fc.record({
      t: fc.constant('edge' as const),
      which: fc.constantFrom('last-page', 'past-end', 'drop-last-page', 'zero-size'),
    }),
  },
);

/** One side of the comparison: an owner of the device, real or simulated. */
interface Side {
  name: 'kernel' | 'sim';
  file: RawFile;
  /** Bytes the kernel (or the simulator) pins for this owner. */
  pinned(): bigint;
  /** The device's own table, where it can be read (VDUSE, the simulator). */
  deviceTable(): Promise<string | undefined>;
}

function kernelSide(): Side {
  return {
    name: 'kernel',
    file: RealFile.open(devicePath),
    pinned: () => vmPinOf(),
    deviceTable: async () => (kind.name === 'vduse' ? showMap(await vduse.map()) : undefined),
  };
}

function simSide(parent: SimulatedVdpa): Side {
  return {
    name: 'sim',
    file: new SimFile(parent.open()),
    pinned: () => parent.pins?.pinnedBytes ?? 0n,
    deviceTable: async () =>
      kind.name === 'vduse'
        ? showMap(
            [...(parent.deviceTable(0)?.entries() ?? [])].map((r) => ({
              start: r.iova,
              last: r.iova + r.size - 1n,
              perm: r.perm,
              offset: r.offset,
            })),
          )
        : undefined,
  };
}

async function ownerOf(side: Side): Promise<void> {
  side.file.ioctl(Ioctl.VHOST_SET_OWNER);
  const f = Buffer.alloc(8);
  f.writeBigUInt64LE(backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH'));
  side.file.ioctl(Ioctl.VHOST_SET_BACKEND_FEATURES, f);
}

/**
 * Which window pages something occupies: a one-page UPDATE of the probe page is refused (EFAULT)
 * where an entry overlaps it; one that was taken is invalidated again, which removes only itself.
 * Outside a batch the probes run in one (a set_map parent then pushes once, not twice a page).
 */
async function occupied(side: Side, inBatch: boolean): Promise<string> {
  const wrap = async (type: IotlbMsgType) => {
    const r = await answer(() =>
      side.file.write(encodeMsgV2(0, { type, iova: 0n, size: 0n, uaddr: 0n, perm: 0 })),
    );
    assert(r === '72', `${side.name}: the probes' batch message ${type}: ${r}`);
  };
  if (!inBatch) await wrap(BATCH_BEGIN);
  let seen = '';
  for (let p = 0; p < WINDOW_PAGES; p++) {
    const iova = WINDOW_BASE + BigInt(p) * PAGE;
    const put = encodeMsgV2(0, {
      type: UPDATE,
      iova,
      size: PAGE,
      uaddr: probeMemory.uaddr,
      perm: VHOST_ACCESS_RW,
    });
    const r = await answer(() => side.file.write(put));
    if (r === '72') {
      seen += '.';
      const drop = encodeMsgV2(0, { type: INVALIDATE, iova, size: PAGE, uaddr: 0n, perm: 0 });
      const d = await answer(() => side.file.write(drop));
      assert(d === '72', `${side.name}: INVALIDATE of the probe at ${hex(iova)}: ${d}`);
    } else seen += r === 'EFAULT' ? '#' : `(${r})`;
  }
  if (!inBatch) await wrap(BATCH_END);
  return seen;
}

interface State {
  answer: string;
  pinned: bigint;
  window: string;
  device: string | undefined;
}

async function stateAfter(side: Side, op: Op, inBatch: boolean): Promise<State> {
  const a = await answer(() => side.file.write(encode(op)));
  // The probes come after the pinned count: they pin and unpin a page each.
  const pinned = side.pinned();
  return { answer: a, pinned, window: await occupied(side, inBatch), device: await side.deviceTable() };
}

/**
 * Differences between the simulator and the kernel, each with its note in docs/kernel-notes.md
 * (section 3): returns the note's id when `k` and `s` differ only as that note says, else
 * undefined. After one, both sides are emptied and the sequence goes on.
 */
const KNOWN: ((op: Op, k: State, s: State) => string | undefined)[] = [
  // S8: PA mode keeps one entry per run of physically contiguous pages (vhost_vdpa_pa_map) and an
  // INVALIDATE drops the runs it touches whole (vhost_vdpa_iotlb_unmap). The simulator models
  // shmem as one page per run (contiguousPages 1, as measured); where pagemap shows two pages of
  // ram that happen to be contiguous, the kernel drops (or keeps) both where the simulator drops one.
  (op, k, s) =>
    kind.pinned && op.t === 'invalidate' && k.answer === s.answer && contiguousPairs.length > 0
      ? 'S8'
      : undefined,
];

/** INVALIDATE of everything (the whole u64 range): both sides empty, nothing pinned. */
async function emptyBoth(sides: Side[], inBatch: boolean): Promise<void> {
  const all = encodeMsgV2(0, { type: INVALIDATE, iova: 0n, size: (1n << 64n) - 1n, uaddr: 0n, perm: 0 });
  for (const side of sides) {
    const r = await answer(() => side.file.write(all));
    const window = await occupied(side, inBatch);
    assert(
      r === '72' && !window.includes('#') && side.pinned() === 0n,
      `${side.name}: emptying: ${r} [${window}] pinned ${hex(side.pinned())}`,
    );
  }
}

const totals = { ops: 0, agreed: 0, known: new Map<string, number>() };
/** The first difference found (fast-check reports only that the property failed). */
let failure: Error | undefined;

/**
 * One simulated parent for the whole step, as there is one real device: a parent keeps state
 * across owners (VDUSE its table, R1), so each sequence is a new owner of the same two devices.
 */
const parent = simulatorFor(kind, registry);

async function runSequence(ops: Op[]): Promise<void> {
  const kernel = kernelSide();
  const sim = simSide(parent);
  try {
    await ownerOf(kernel);
    await ownerOf(sim);
    const trail: string[] = [];
    let inBatch = false;
    for (const op of ops) {
      // BATCH_BEGIN opens a batch (also inside one); BATCH_END closes it (also with none open).
      if (op.t === 'batch-begin') inBatch = true;
      else if (op.t === 'batch-end') inBatch = false;
      const k = await stateAfter(kernel, op, inBatch);
      const s = await stateAfter(sim, op, inBatch);
      totals.ops++;
      const line = `${show(op)} -> kernel ${k.answer} pinned ${hex(k.pinned)} [${k.window}]${k.device ? ` ${k.device}` : ''}`;
      const same =
        k.answer === s.answer && k.pinned === s.pinned && k.window === s.window && k.device === s.device;
      if (same) {
        totals.agreed++;
        trail.push(line);
        continue;
      }
      const known = KNOWN.map((f) => f(op, k, s)).find((id) => id !== undefined);
      if (known) {
        totals.known.set(known, (totals.known.get(known) ?? 0) + 1);
        trail.push(
          `${line} (sim: ${s.answer} pinned ${hex(s.pinned)} [${s.window}], as ${known}; both emptied)`,
        );
        await emptyBoth([kernel, sim], inBatch);
        continue;
      }
      failure = new Error(
        `${kind.name}: the simulator differs after op ${trail.length + 1}:\n` +
          `    ${trail.slice(-12).join('\n    ')}\n` +
          `    ${show(op)}\n      kernel: ${k.answer} pinned ${hex(k.pinned)} [${k.window}] ${k.device ?? ''}\n` +
          `      sim:    ${s.answer} pinned ${hex(s.pinned)} [${s.window}] ${s.device ?? ''}`,
      );
      throw failure;
    }
  } finally {
    kernel.file.close();
    sim.file.close();
  }
}

await runChecks(
  [
    [
      'facts',
      async () => {
        // The kind's facts the simulator is configured with are the kernel's.
        const f = RealFile.open(devicePath);
        try {
          f.ioctl(Ioctl.VHOST_SET_OWNER);
          const u64 = Buffer.alloc(8);
          f.ioctl(Ioctl.VHOST_GET_BACKEND_FEATURES, u64);
          const offered = u64.readBigUInt64LE(0);
          const asNum = Buffer.alloc(4);
          f.ioctl(Ioctl.VHOST_VDPA_GET_AS_NUM, asNum);
          const range = Buffer.alloc(16);
          f.ioctl(Ioctl.VHOST_VDPA_GET_IOVA_RANGE, range);
          const [first, last] = [range.readBigUInt64LE(0), range.readBigUInt64LE(8)];
          const seen = `offered ${hex(offered)}, ${asNum.readUInt32LE(0)} address spaces, IOVA ${hex(first)}-${hex(last)}`;
          const want = `offered ${hex(kind.offeredFeatures)}, ${kind.asNum} address spaces, IOVA ${hex(kind.iovaRange.first)}-${hex(kind.iovaRange.last)}`;
          assert(seen === want, `${kind.what}: ${seen}; the simulator is configured with ${want}`);
          return `${kind.what}: ${seen}; the ops' memory (try ${tries}) has ${contiguousPairs.length} physically contiguous neighbours${contiguousPairs.length ? ` (at pages ${contiguousPairs.join(' ')})` : ''}`;
        } finally {
          f.close();
        }
      },
    ],
    [
      'differential',
      async () => {
        const sequences = fc.array(opArb, { minLength: OPS_PER_RUN, maxLength: OPS_PER_RUN });
        const verdict = await fc.check(fc.asyncProperty(sequences, runSequence), {
          seed: SEED,
          numRuns: RUNS,
          endOnFailure: true,
        });
        if (verdict.failed) {
          throw (
            failure ??
            new Error(
              `seed ${verdict.seed} path ${verdict.counterexamplePath}: ${String(verdict.errorInstance)}`,
            )
          );
        }
        assert(vmPinOf() === 0n, `VmPin ${hex(vmPinOf())} after every owner closed`);
        const known = [...totals.known].map(([id, n]) => `${id} x${n}`).join(', ') || 'none';
        return `${kind.name}: ${totals.ops} ops in ${RUNS} sequences (seed ${hex(SEED)}), ${totals.agreed} agreed (answer, pinned bytes, ${WINDOW_PAGES}-page window${kind.name === 'vduse' ? ', device table' : ''}); known differences: ${known}`;
      },
    ],
  ],
  async () => {
    registry.closeAll();
    return 'memory released';
  },
);
