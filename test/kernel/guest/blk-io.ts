/**
 * Guest step of the blk kinds (test/kernel/blk-plan.ts): guest-style block I/O through our
 * mappings, to a virtio-blk device nobody here wrote, on the real kernel.
 *   - vduse-blk: qemu-storage-daemon's VDUSE export (QEMU's libvduse), VA mode;
 *   - vp-vdpa-blk: QEMU's virtio-blk-pci under vp_vdpa behind intel-iommu, PA mode (pinned).
 * A vhost-user server owns /dev/vhost-vdpa-0 and relays the vrings to it; the test front-end
 * (test/frontend/blk-frontend.ts, proven against qemu-storage-daemon's vhost-user export) writes
 * the plan's patterns and reads them back. The host checks the disk image after the VM exits.
 * On vp-vdpa-blk the guest's log must show no DMAR fault, and a buffer in memory we left
 * unmapped must fault (judged by dmesg and data: QEMU still answers such a request OK).
 *
 * The server is behind {@link BlkServer}: today the relay in this process (the owner); the
 * agent's vhost-user attach can stand in for it without changing the checks. The same relay also
 * runs as a process of its own (`blk-io.mjs --serve SOCKET`), which the last checks SIGKILL while
 * a write is in flight, then serve the device again from a new one.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { KernelDevice } from '../../../src/device/kernel.ts';
import type { DeviceFacts } from '../../../src/device/types.ts';
import { backendFeatureNames } from '../../../src/uapi/index.ts';
import { VhostUserBlkFrontend } from '../../frontend/blk-frontend.ts';
import { RelayBlkBackend } from '../../vhost-user/relay-blk.ts';
import {
  BLK_BEFORE_KILL,
  BLK_IMAGE_BYTES,
  BLK_IN_FLIGHT,
  BLK_KINDS,
  BLK_WRITES,
  type BlkKind,
  blkPattern,
  SECTOR_BYTES,
} from '../blk-plan.ts';
import { assert, deviceBusy, devicePath, hex, runChecks, Service, WAIT_MS } from './harness.ts';
import { vmPinOf } from './kinds.ts';

const kind = process.env.VDPA_MAPD_KIND as BlkKind;
if (!BLK_KINDS.includes(kind))
  throw new Error(`VDPA_MAPD_KIND=${kind}: not a blk kind (${BLK_KINDS.join(' ')})`);
/** PA mode: the platform IOMMU translates, the kernel pins what we map. */
const pa = kind === 'vp-vdpa-blk';
const MiB = 1n << 20n;
/**
 * The front-end's guest memory: one memfd region at guest physical 1 MiB (where a PC's RAM above
 * the legacy hole starts; QEMU's virtio takes a ring at address 0 for one not set up), mapped at
 * IOVA = guest physical.
 */
const MEMORY_BASE = MiB;
const MEMORY = 4n * MiB;
/** Memory the front-end adds later from here on is deliberately not mapped (the fault check). */
const UNMAPPED_FROM = MEMORY_BASE + MEMORY;
const QUEUE_SIZE = 64;

/** The piece that owns the device and serves vhost-user for it. */
interface BlkServer {
  readonly socketPath: string;
  /** The device's owner (its VmPin is what the kernel pins for it). */
  readonly ownerPid: number;
  facts(): DeviceFacts;
  /** The device's virtio status byte (VHOST_VDPA_GET_STATUS). */
  status(): number;
  /** The IOTLB entries the owner keeps for the device. */
  mapped(): { iova: bigint; size: bigint }[];
  /** Why the server hung up on the last front-end, if it did. */
  hangUpReason(): string | undefined;
  close(): Promise<void>;
}

/** The relay in this process over the KernelDevice, as test/vhost-user/relay-blk.ts maps it. */
function serveInProcess(socketPath: string): BlkServer {
  const backend = new RelayBlkBackend({
    socketPath,
    openDevice: (memory) =>
      new KernelDevice({
        node: devicePath,
        name: kind,
        memory,
        pinned: pa,
        iommu: pa ? 'platform' : 'onchip',
        // VDUSE offers no IOTLB_PERSIST but keeps its table at reset (docs/kernel-notes.md R7).
        parentKeepsMapOnReset: !pa,
      }),
    unmappedFrom: UNMAPPED_FROM,
  });
  return {
    socketPath,
    ownerPid: process.pid,
    facts: () => backend.device.facts(),
    status: () => backend.device.vrings.status(),
    mapped: () => backend.mappings().map((m) => ({ iova: m.iova, size: m.size })),
    hangUpReason: () => backend.backends.at(-1)?.error?.message,
    close: () => backend.close(),
  };
}

/**
 * The DMAR fault reports in the guest's kernel log (`DMAR: [DMA Read NO_PASID] ... fault addr X`)
 * since this step began (an earlier kind's deliberate fault is not this step's).
 */
function dmarFaults(): string[] {
  return dmarLines().slice(faultsBefore);
}
function dmarLines(): string[] {
  const log = execFileSync('dmesg', { encoding: 'utf8' });
  return log.split('\n').filter((l) => /DMAR: \[(DMA|INTR)/.test(l) || /DMAR:.*fault addr/.test(l));
}
const faultsBefore = dmarLines().length;

/**
 * While a check waits long, what the device's side shows (reported, never a limit: only the tier's
 * budget bounds the wait): the device status, the end of the guest's kernel log and of
 * qemu-storage-daemon's output (init.sh writes it to /tmp/qsd.log).
 */
function reportStall(since: number): void {
  const tail = (text: string, n: number) => text.trimEnd().split('\n').slice(-n).join('\n    ');
  let status = 'no device';
  try {
    if (server) status = hex(server.status());
  } catch (e) {
    status = (e as Error).message;
  }
  const qsd = fs.existsSync('/tmp/qsd.log') ? fs.readFileSync('/tmp/qsd.log', 'utf8') : '';
  // The ring of QUEUE_SIZE entries at the memory base (test/frontend/split-ring.ts): avail at
  // 16 bytes per entry, used on the next page.
  const idx = (at: bigint) => fe?.memory.read(MEMORY_BASE + at + 2n, 2).readUInt16LE(0) ?? '-';
  const ring = `avail.idx ${idx(BigInt(16 * QUEUE_SIZE))}, used.idx ${idx(0x1000n)}`;
  console.log(
    `GUEST-WAIT: ${Math.round((performance.now() - since) / 1000)} s into the step; device status ${status}; ${requests} requests done; ${ring}\n` +
      `    dmesg: ${tail(execFileSync('dmesg', { encoding: 'utf8' }), 12)}\n    qemu-storage-daemon: ${tail(qsd, 8) || '(nothing)'}`,
  );
}
const stepStarted = performance.now();
setInterval(() => reportStall(stepStarted), 45_000).unref();

const pinBefore = vmPinOf();
let server: BlkServer | undefined;
let fe: VhostUserBlkFrontend | undefined;
let requests = 0;
let verified = 0;
const front = () => {
  assert(fe !== undefined, 'no front-end');
  return fe;
};
const pinned = () => vmPinOf(server?.ownerPid ?? 'self') - pinBefore;

/** The front-end every check here uses: the tier's bounds, the memory at MEMORY_BASE. */
function connect(socketPath: string): Promise<VhostUserBlkFrontend> {
  return VhostUserBlkFrontend.connect(socketPath, {
    memoryBase: MEMORY_BASE,
    memoryBytes: MEMORY,
    queueSize: QUEUE_SIZE,
    requestWaitMs: WAIT_MS,
    replyWaitMs: WAIT_MS,
  });
}

/** The relay as a process of its own (this script with --serve), the device's owner. */
async function startOwnerProcess(socketPath: string): Promise<Service> {
  const ready = (l: string) => l.startsWith('BLK-OWNER serving');
  return (await Service.start('blk-owner', 'blk-io', ['--serve', socketPath], ready)).service;
}

/** Mlocked and Unevictable of /proc/meminfo (kB). */
function lockedMemory(): string {
  const text = fs.readFileSync('/proc/meminfo', 'utf8');
  return ['Mlocked', 'Unevictable']
    .map((k) => `${k} ${new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(text)?.[1]} kB`)
    .join(', ');
}

/** Reads `w` back (through another buffer than the one written from) and compares. */
async function readsBack(w: (typeof BLK_WRITES)[number], what: string): Promise<void> {
  const back = await front().read(w.sector, w.bytes, { guestAddr: front().dataArea + 0x20000n });
  requests++;
  const want = blkPattern(kind, w);
  if (!back.equals(want)) {
    let at = 0;
    while (back[at] === want[at]) at++;
    throw new Error(`${what}: sector ${w.sector}, byte ${at} is ${hex(back[at]!)}, wrote ${hex(want[at]!)}`);
  }
  verified += w.bytes;
}

let owner: Service | undefined;

if (process.argv[2] === '--serve') {
  const s = serveInProcess(process.argv[3]!);
  console.log(`BLK-OWNER serving ${s.socketPath} pid ${process.pid}`);
  setInterval(() => {}, 1 << 30); // until killed
} else {
  await runChecks(
    [
      [
        'owner',
        async () => {
          assert(!deviceBusy(), `${devicePath} is held by someone`);
          server = serveInProcess('/tmp/blk-io.sock');
          const f = server.facts();
          assert(f.deviceId === 2, `device id ${f.deviceId} (virtio-blk is 2)`);
          return `${kind}: device id ${f.deviceId}, vqs ${f.vqCount}, config ${f.configSize} B, backend features ${hex(f.negotiatedFeatures)} ${backendFeatureNames(f.negotiatedFeatures).join('|')}, IOVA ${hex(f.iovaRange.first)}-${hex(f.iovaRange.last)}; serving ${server.socketPath}`;
        },
      ],
      [
        'connect',
        async () => {
          fe = await connect(server!.socketPath);
          const n = fe.negotiated;
          const capacity = BigInt(BLK_IMAGE_BYTES / SECTOR_BYTES);
          assert(n.capacity === capacity, `capacity ${n.capacity} sectors, the image has ${capacity}`);
          const mapped = server!.mapped();
          assert(
            mapped.length === 1 && mapped[0]!.iova === MEMORY_BASE && mapped[0]!.size === MEMORY,
            `mapped ${mapped.map((m) => `${hex(m.iova)}+${hex(m.size)}`).join(' ')}`,
          );
          const pin = pinned();
          assert(pin === (pa ? MEMORY : 0n), `the owner's VmPin grew by ${pin} bytes`);
          return `features offered ${hex(n.offeredFeatures)}, acked ${hex(n.features)}; capacity ${n.capacity} sectors; guest memory [${hex(MEMORY_BASE)}, ${hex(UNMAPPED_FROM)}) mapped at IOVA = guest physical; VmPin +${pin / 1024n} kB`;
        },
      ],
      [
        'write-read',
        async () => {
          const t0 = performance.now();
          for (const w of BLK_WRITES) {
            await front().write(w.sector, blkPattern(kind, w));
            requests++;
          }
          await front().flush();
          requests++;
          const tw = performance.now();
          for (const w of BLK_WRITES) await readsBack(w, 'read back');
          const ms = (t: number) => Math.round(t);
          return `${BLK_WRITES.length} writes (${BLK_WRITES.reduce((n, w) => n + w.bytes, 0)} bytes) + flush in ${ms(tw - t0)} ms, read back intact: ${verified} bytes verified in ${ms(performance.now() - tw)} ms`;
        },
      ],
      [
        'no-dmar-fault',
        async () => {
          const faults = dmarFaults();
          assert(faults.length === 0, `DMAR faults in the guest's log:\n${faults.join('\n')}`);
          return pa
            ? 'no DMAR fault in the guest log after the I/O'
            : 'no DMAR fault in the guest log (VA mode: no platform IOMMU on the path)';
        },
      ],
      ...(pa
        ? ([
            [
              'unmapped-faults',
              async () => {
                // A region the front-end adds that the owner leaves unmapped: the device's write into it
                // must be refused by the IOMMU (a DMAR fault at that IOVA), not land in the memory.
                const region = await front().addMemory(64n * 1024n);
                assert(region.guestAddr >= UNMAPPED_FROM, `the new region is at ${hex(region.guestAddr)}`);
                assert(server!.mapped().length === 1, 'the new region was mapped');
                const w = BLK_WRITES[0]!;
                const status = await front()
                  .read(w.sector, w.bytes, { guestAddr: region.guestAddr })
                  .then(
                    (b) =>
                      b.equals(blkPattern(kind, w))
                        ? 'the data arrived'
                        : `OK, buffer ${b.subarray(0, 4).toString('hex')}..`,
                    (e: Error) => e.message,
                  );
                requests++;
                assert(status !== 'the data arrived', 'the device wrote into memory nobody mapped');
                const faults = dmarFaults();
                const addrs = faults
                  .map((l) => /fault addr (?:0x)?([0-9a-f]+)/.exec(l)?.[1])
                  .map((a) => (a ? BigInt(`0x${a}`) : -1n));
                assert(
                  faults.length > 0,
                  `no DMAR fault for the unmapped IOVA ${hex(region.guestAddr)} (request: ${status})`,
                );
                const outside = addrs.filter(
                  (a) => a < region.guestAddr || a >= region.guestAddr + region.size,
                );
                assert(
                  outside.length === 0,
                  `DMAR faults outside the unmapped region:\n${faults.join('\n')}`,
                );
                // The device goes on: the next request, into mapped memory, works.
                const back = await front().read(w.sector, w.bytes);
                requests++;
                assert(back.equals(blkPattern(kind, w)), 'the request after the fault read wrong data');
                return `READ into [${hex(region.guestAddr)}, +64K) (not mapped): ${status}; ${faults.length} DMAR fault(s), all in it: ${faults[0]!.trim()}; the next request works`;
              },
            ],
          ] as [string, () => Promise<string>][])
        : []),
      [
        'close',
        async () => {
          const base = await front().close();
          fe = undefined;
          const s = server!;
          await s.close();
          server = undefined;
          // vp_vdpa cannot tell a vring's base (vp_vdpa_get_vq_state: EOPNOTSUPP, not in the virtio
          // spec), so the relay cannot answer GET_VRING_BASE and hangs up; VDUSE asks its daemon.
          const why = s.hangUpReason();
          let stopped: string;
          if (pa) {
            assert(base === null && /EOPNOTSUPP/.test(why ?? ''), `GET_VRING_BASE ${base}, hang-up: ${why}`);
            stopped = `GET_VRING_BASE refused, the relay hung up (${why})`;
          } else {
            assert(base === requests, `GET_VRING_BASE ${base}, ${requests} requests made; hang-up: ${why}`);
            stopped = `the front-end stopped the ring at avail index ${base} (= ${requests} requests)`;
          }
          const pin = vmPinOf() - pinBefore;
          assert(pin === 0n, `VmPin +${pin} bytes after the device closed`);
          assert(!deviceBusy(), 'the node is still held');
          return `${stopped}; device closed, VmPin back to where it was, node free`;
        },
      ],
      [
        'sigkill-in-flight',
        async () => {
          const locked = lockedMemory();
          owner = await startOwnerProcess('/tmp/blk-io-1.sock');
          fe = await connect('/tmp/blk-io-1.sock');
          await front().write(BLK_BEFORE_KILL.sector, blkPattern(kind, BLK_BEFORE_KILL));
          requests++;
          const ownerPin = vmPinOf(owner.pid);
          assert(ownerPin === (pa ? MEMORY : 0n), `the owner process pins ${ownerPin} bytes`);
          // Published and kicked at once; the owner dies while the device serves it (or just after).
          let settled = Number.POSITIVE_INFINITY;
          const inFlight = front()
            .write(BLK_IN_FLIGHT.sector, blkPattern(kind, BLK_IN_FLIGHT))
            .then(
              () => 'completed',
              (e: Error) => `failed: ${e.message}`,
            )
            .finally(() => {
              settled = performance.now();
            });
          // VDUSE: the owner's death resets the device (vhost_vdpa_release), and qemu-storage-daemon
          // 7.2 aborts on a reset with a request in use (libvduse vduse_queue_disable: assertion
          // `vq->inuse == 0`), after which the dead owner's exit waits for the daemon's answer for
          // ever (msg_timeout 0) and the node stays held (docs/kernel-notes.md B6). So on VDUSE the
          // owner is killed only once the write is done; on vp_vdpa while it is in flight.
          if (!pa) await inFlight;
          await new Promise((r) => setImmediate(r));
          const pid = owner.pid;
          const killed = await owner.stop('SIGKILL');
          const dead = performance.now();
          owner = undefined;
          const result = await inFlight;
          // A device that still holds the table (VDUSE keeps it, R1) can finish it after the owner died.
          const outcome = `${result} ${settled < dead ? 'before the owner was seen dead' : `${Math.round(settled - dead)} ms after the owner had died`}`;
          const next = await front()
            .read(0n, 4096)
            .then(
              () => 'served',
              (e: Error) => e.message,
            );
          assert(next !== 'served', 'a request was served after the owner died');
          await front().close();
          fe = undefined;
          // The kernel released the dead owner's fd (vhost_vdpa_release: reset, unmap, unpin).
          assert(!deviceBusy(), 'the node is still held after its owner died');
          const lockedAfter = lockedMemory();
          assert(lockedAfter === locked, `locked memory ${locked} before, ${lockedAfter} after`);
          const daemon = fs.existsSync('/tmp/qsd.log') ? fs.readFileSync('/tmp/qsd.log', 'utf8').trim() : '';
          const said = kind === 'vduse-blk' ? `; qemu-storage-daemon said: ${daemon || 'nothing'}` : '';
          return `owner pid ${pid} killed (${killed.signal}), it pinned ${ownerPin / 1024n} kB; the ${BLK_IN_FLIGHT.bytes}-byte write ${pa ? 'published and kicked before the SIGKILL' : 'done before the SIGKILL (B6)'}: ${outcome}; the next request: ${next}; node free; ${lockedAfter} (unchanged)${said}`;
        },
      ],
      [
        'new-owner-serves',
        async () => {
          owner = await startOwnerProcess('/tmp/blk-io-2.sock');
          fe = await connect('/tmp/blk-io-2.sock');
          await readsBack(BLK_BEFORE_KILL, 'the write before the kill');
          await front().write(BLK_IN_FLIGHT.sector, blkPattern(kind, BLK_IN_FLIGHT));
          requests++;
          await readsBack(BLK_IN_FLIGHT, 'the in-flight write, written again');
          const ownerPin = vmPinOf(owner.pid);
          assert(ownerPin === (pa ? MEMORY : 0n), `the new owner pins ${ownerPin} bytes`);
          await front().close();
          fe = undefined;
          const stopped = await owner.stop('SIGTERM');
          owner = undefined;
          assert(!deviceBusy(), 'the node is still held after the new owner exited');
          return `a new owner process served: the write from before the kill read back, the in-flight one written again and read back; VmPin ${ownerPin / 1024n} kB; it stopped (${stopped.code ?? stopped.signal}), node free`;
        },
      ],
    ],
    async () => {
      await fe?.close();
      await server?.close();
      await owner?.kill();
      return `${kind}: ${verified} bytes verified`;
    },
  );
}
