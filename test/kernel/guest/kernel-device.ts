/**
 * Guest step: the agent's own device code (KernelDevice over the real fd transport, with memory
 * from SharedMemoryRegistry) against the real /dev/vhost-vdpa-0, a VDUSE virtio-blk device under
 * stock Linux 6.12. The device's side is read back from vduse-daemon (./vduse.ts): its update
 * count (one per set_map push), its table (VDUSE_IOTLB_GET_FD) and DMA reads and writes.
 *
 *   node --import tsx test/kernel/guest/kernel-device.ts
 *
 * The device's transport is wrapped to record every ioctl and write the agent makes, and to let a
 * check send the kernel a raw message on the agent's own fd (a second open is EBUSY).
 */
import fs from 'node:fs';
import path from 'node:path';
import { DeviceError } from '../../../src/device/errors.ts';
import { KernelDevice } from '../../../src/device/kernel.ts';
import { TransportError, type VhostTransport } from '../../../src/device/transport.ts';
import type { OpResult } from '../../../src/device/types.ts';
import { toDeviceError, UNDERSTOOD_BACKEND_FEATURES } from '../../../src/device/vhost-vdpa.ts';
import { openVhostVdpaFd } from '../../../src/device/vhost-vdpa-fd.ts';
import type { IotlbOp, Mapping } from '../../../src/iotlb/types.ts';
import { SharedMemoryRegistry } from '../../../src/memory/registry.ts';
import { backendFeatureNames, IotlbMsgType, Ioctl, VHOST_ACCESS_RW } from '../../../src/uapi/index.ts';
import {
  assert,
  devicePath,
  deviceBusy,
  deviceTableIs,
  deviceUpdates,
  errnoOf,
  expectedEntries,
  hex,
  invalidateOp as invalidate,
  pushEmptyTable,
  runChecks,
  sendRaw,
  showMap,
  updateOp as update,
  vduse,
} from './harness.ts';

const KiB = 1024n;
const MiB = 1024n * KiB;
const U64_MAX = (1n << 64n) - 1n;
const IOCTL_NAMES = new Map<number, string>(Object.entries(Ioctl).map(([name, nr]) => [nr, name]));

/** The agent's transport, recorded; `raw` is the real one (same fd) for the kernel's own answers. */
class Recorder {
  ioctls: string[] = [];
  writes = 0;
  raw: VhostTransport | undefined;

  open = (node: string): VhostTransport => {
    const t = openVhostVdpaFd(node);
    this.raw = t;
    return {
      ioctl: (request, arg) => {
        const name = IOCTL_NAMES.get(request) ?? hex(request);
        const value =
          request === Ioctl.VHOST_SET_BACKEND_FEATURES && arg
            ? `(${hex(Buffer.from(arg).readBigUInt64LE(0))})`
            : '';
        this.ioctls.push(`${name.replace(/^VHOST_(VDPA_)?/, '')}${value}`);
        t.ioctl(request, arg);
      },
      write: (msg) => {
        this.writes++;
        return t.write(msg);
      },
      close: () => t.close(),
    };
  };
}

const root = fs.mkdtempSync('/tmp/kernel-device-');
const stateDir = path.join(root, 'state');
const sharedDir = path.join(root, 'shared');
fs.mkdirSync(sharedDir);
const imagePath = path.join(sharedDir, 'image.bin');
fs.writeFileSync(imagePath, '');
fs.truncateSync(imagePath, Number(64n * KiB));
const registry = new SharedMemoryRegistry({ allowedRoots: [sharedDir], stateDir });

const rec = new Recorder();
let device: KernelDevice | undefined;
let device2: KernelDevice | undefined;
const dev = () => {
  assert(device !== undefined, 'the device is not open');
  return device;
};

// The mappings (iova, size, memory, offset, perm) the checks use.
const A = update(0x1000_0000n, MiB, 'ram', 0x10_0000n, 'rw'); // memfd
const B = update(0x2000_0000n, 64n * KiB, 'disk', 0x2000n, 'rw'); // file created under the state dir
const C = update(0x3000_0000n, 4n * KiB, 'ram', 0x30_0000n, 'ro'); // memfd, read-only
const D = update(0x4000_0000n, 16n * KiB, 'image', 0n, 'wo'); // file opened by path, write-only
const E = update(0x5000_0000n, 4n * KiB, 'ram', 0n, 'rw');
const F = update(0x5001_0000n, 8n * KiB, 'disk', 0x1_0000n, 'ro');

function allOk(results: OpResult[], what: string): void {
  const bad = results.findIndex((r) => !r.ok);
  assert(bad < 0, `${what}: op ${bad} refused: ${JSON.stringify(results[bad])}`);
}

/** Applies `ops` and measures what reached the device: messages written and set_map pushes. */
async function applyCounted(d: KernelDevice, ops: IotlbOp[]) {
  const before = { updates: await deviceUpdates(), writes: rec.writes };
  const results = await d.apply(ops);
  return {
    results,
    pushes: (await deviceUpdates()) - before.updates,
    writes: rec.writes - before.writes,
  };
}

const mapped = (d: KernelDevice) => expectedEntries(d.mappings());
const showOps = (ops: readonly Mapping[]) =>
  ops.map((m) => `${hex(m.iova)}+${hex(m.size)}:${m.perm}->${m.memory}@${hex(m.offset)}`).join(' ');

await runChecks(
  [
    [
      'open',
      async () => {
        assert(!deviceBusy(), `${devicePath} is already held by someone`);
        device = new KernelDevice({
          node: devicePath,
          name: 'vdpa0',
          memory: registry,
          openTransport: rec.open,
          pinned: false, // VDUSE maps in VA mode (what discovery finds for it)
        });
        const f = device.facts();
        assert(f.kind === 'kernel' && f.node === devicePath, `facts kind ${f.kind} node ${f.node}`);
        let second: unknown;
        try {
          new KernelDevice({ node: devicePath, name: 'again', memory: registry });
        } catch (e) {
          second = e;
        }
        assert(second instanceof DeviceError, `second open: ${String(second)}`);
        assert(
          second.code === 'BUSY' &&
            second.errno === 'EBUSY' &&
            /in use by another process/.test(second.message),
          `second open: code ${second.code} errno ${second.errno}: ${second.message}`,
        );
        return `opened; second open -> DeviceError ${second.code}/${second.errno}: "${second.message}"`;
      },
    ],
    [
      'set-owner',
      async () => {
        const raw = rec.raw!;
        assert(rec.ioctls[0] === 'SET_OWNER', `first ioctl ${rec.ioctls[0]}`);
        // The kernel's own answer on the agent's fd: it already is the owner.
        const again = await errnoOf(() => raw.ioctl(Ioctl.VHOST_SET_OWNER));
        assert(again === 'EBUSY', `SET_OWNER again on the agent's fd: ${again}`);
        return `ioctls at open: ${rec.ioctls.join(' ')}; SET_OWNER again -> ${again}`;
      },
    ],
    [
      'backend-features',
      async () => {
        const f = dev().facts();
        const buf = Buffer.alloc(8);
        rec.raw!.ioctl(Ioctl.VHOST_GET_BACKEND_FEATURES, buf);
        const offered = buf.readBigUInt64LE(0);
        const want = offered & UNDERSTOOD_BACKEND_FEATURES;
        assert(
          f.offeredFeatures === offered,
          `facts offered ${hex(f.offeredFeatures)}, kernel ${hex(offered)}`,
        );
        assert(
          f.negotiatedFeatures === want,
          `negotiated ${hex(f.negotiatedFeatures)}, expected ${hex(want)}`,
        );
        const set = rec.ioctls.find((i) => i.startsWith('SET_BACKEND_FEATURES'));
        assert(set === `SET_BACKEND_FEATURES(${hex(want)})`, `the agent sent ${set}`);
        const names = (m: bigint) => `${hex(m)} ${backendFeatureNames(m).join('|') || '-'}`;
        return `offered ${names(offered)}; understood ${names(UNDERSTOOD_BACKEND_FEATURES)}; negotiated ${names(want)}`;
      },
    ],
    [
      'unsupported',
      async () => {
        // The kernel's EOPNOTSUPP (errno 95, "ENOTSUP" to libuv) through the agent's own transport.
        let refused: unknown;
        try {
          rec.raw!.ioctl(
            Ioctl.VHOST_SET_BACKEND_FEATURES,
            Buffer.from(new BigUint64Array([1n << 63n]).buffer),
          );
        } catch (e) {
          refused = e;
        }
        assert(refused instanceof TransportError, `SET_BACKEND_FEATURES(bit 63): ${String(refused)}`);
        assert(refused.errno === 'EOPNOTSUPP', `the transport names the kernel's errno ${refused.errno}`);
        const mapped = toDeviceError(refused, 'vdpa0');
        assert(
          mapped instanceof DeviceError && mapped.code === 'UNSUPPORTED',
          `as a DeviceError: ${String(mapped)}`,
        );
        // SUSPEND is not offered: the agent refuses it itself (the kernel would answer 0 while
        // DRIVER_OK is not set, see kernel-vs-sim).
        const suspend = await dev()
          .suspend()
          .then(
            () => 'ok',
            (e: DeviceError) => `${e.code}/${e.errno}`,
          );
        assert(suspend === 'UNSUPPORTED/EOPNOTSUPP', `suspend: ${suspend}`);
        return `SET_BACKEND_FEATURES(bit 63) -> TransportError ${refused.errno} -> DeviceError ${mapped.code}; suspend() -> ${suspend}`;
      },
    ],
    [
      'facts',
      async () => {
        const f = dev().facts();
        assert(f.deviceId === 2, `device id ${f.deviceId} (virtio-blk is 2)`);
        assert(
          f.iovaRange.first === 0n && f.iovaRange.last === U64_MAX,
          `IOVA range ${hex(f.iovaRange.first)}-${hex(f.iovaRange.last)}`,
        );
        assert(
          f.asNum === 1 && f.groupNum === 1 && f.vqCount === 1,
          `as ${f.asNum} groups ${f.groupNum} vqs ${f.vqCount}`,
        );
        return `device id ${f.deviceId}, IOVA ${hex(f.iovaRange.first)}-${hex(f.iovaRange.last)}, address spaces ${f.asNum}, groups ${f.groupNum}, vqs ${f.vqCount}, config ${f.configSize} B, status ${hex(f.status)}`;
      },
    ],
    [
      'map-batch',
      async () => {
        registry.create({ id: 'ram', size: 4n * MiB, kind: 'memfd' });
        const disk = registry.create({ id: 'disk', size: MiB, kind: 'file' });
        const image = registry.open({ id: 'image', path: imagePath });
        assert(
          disk.path.startsWith(`${root}/`) && image.path === imagePath,
          `paths ${disk.path} ${image.path}`,
        );
        const { results, pushes, writes } = await applyCounted(dev(), [A, B, C, D]);
        allOk(results, 'map');
        assert(writes === 6, `${writes} messages written (BATCH_BEGIN + 4 UPDATE + BATCH_END expected)`);
        assert(pushes === 1, `the device got ${pushes} table updates for one batch`);
        const table = await deviceTableIs(mapped(dev()), 'after the batch');
        const refs = ['ram', 'disk', 'image'].map((id) => `${id}:${registry.get(id)!.mappedEntries}`);
        return `4 UPDATEs (memfd, file created in ${path.dirname(disk.path)}, file opened by path) -> ${writes} writes, ${pushes} device update; device table ${table}; entries per memory ${refs.join(' ')}`;
      },
    ],
    [
      'translation',
      async () => {
        // memfd, RW: the agent writes, the device reads at the IOVA; the device writes, the agent reads.
        const p1 = Buffer.from('agent -> device through the memfd');
        registry.write('ram', A.offset + 0x345n, p1);
        const r1 = await vduse.read(A.iova + 0x345n, p1.length);
        assert(r1.equals(p1), `device read ${r1.toString('hex')} at ${hex(A.iova + 0x345n)}`);
        const d1 = Buffer.from('device -> agent');
        await vduse.write(A.iova + 0x10n, d1);
        const b1 = registry.read('ram', 0x10_0010n, d1.length);
        assert(b1.equals(d1), `agent read back ${JSON.stringify(b1.toString())}`);
        // file, RW: both directions, and the device's write reaches the file itself.
        const p2 = Buffer.from('agent -> device through the file');
        registry.write('disk', 0x2000n + 0x80n, p2);
        const r2 = await vduse.read(B.iova + 0x80n, p2.length);
        assert(r2.equals(p2), `device read ${r2.toString('hex')} at ${hex(B.iova + 0x80n)}`);
        const d2 = Buffer.from('device -> file');
        await vduse.write(B.iova + 0x100n, d2);
        const onDisk = Buffer.alloc(d2.length);
        const fd = fs.openSync(registry.get('disk')!.path, 'r');
        fs.readSync(fd, onDisk, 0, d2.length, 0x2100);
        fs.closeSync(fd);
        assert(onDisk.equals(d2) && registry.read('disk', 0x2100n, d2.length).equals(d2), 'file not written');
        // RO and WO entries: the device honours perm (vduse-daemon checks it, like an IOMMU would).
        const p3 = Buffer.from('read-only');
        registry.write('ram', 0x30_0000n, p3);
        assert((await vduse.read(C.iova, p3.length)).equals(p3), 'RO entry not readable');
        const roWrite = await vduse.write(C.iova, Buffer.from('x')).then(
          () => 'ok',
          (e: Error) => e.message,
        );
        assert(/read-only/.test(roWrite), `device write to the RO entry: ${roWrite}`);
        const d4 = Buffer.from('device -> write-only file');
        await vduse.write(D.iova + 0x40n, d4);
        assert(registry.read('image', 0x40n, d4.length).equals(d4), 'WO write not seen');
        const fd4 = fs.openSync(imagePath, 'r');
        const onDisk4 = Buffer.alloc(d4.length);
        fs.readSync(fd4, onDisk4, 0, d4.length, 0x40);
        fs.closeSync(fd4);
        assert(onDisk4.equals(d4), 'WO write not in the opened file');
        const woRead = await vduse.read(D.iova, 4).then(
          () => 'ok',
          (e: Error) => e.message,
        );
        assert(/write-only/.test(woRead), `device read of the WO entry: ${woRead}`);
        return `memfd RW both ways at ${hex(A.iova)}+0x345/0x10; file RW both ways (device write on disk at file offset 0x2100); RO entry readable, device write refused; WO entry written (on disk), read refused`;
      },
    ],
    [
      'fd-ignores-perm',
      async () => {
        // VDUSE_IOTLB_GET_FD hands out the owner's file: receive_fd() gets the perm only as fd
        // flags, so the fd is as writable as the owner's own. A device that skipped the check
        // could write into a read-only mapping.
        const data = Buffer.from('poked');
        await vduse.poke(C.iova + 0x100n, data);
        const seen = registry.read('ram', 0x30_0100n, data.length);
        assert(seen.equals(data), `poke into the RO entry did not land: ${seen.toString('hex')}`);
        return `write through the VDUSE_IOTLB_GET_FD fd of the RO entry at ${hex(C.iova)} landed in the memfd: the fd does not enforce perm`;
      },
    ],
    [
      'overlap-guard',
      async () => {
        const before = { table: showMap(await vduse.map()), agent: showOps(dev().mappings()) };
        const overlap = update(A.iova + 0x8_0000n, MiB, 'disk', 0n, 'rw');
        const { results, pushes, writes } = await applyCounted(dev(), [overlap]);
        const r = results[0]!;
        assert(!r.ok, 'the overlapping UPDATE was accepted');
        assert(
          r.errno === 'EEXIST' && r.code === 'OVERLAP' && r.field === 'iova',
          `refusal ${JSON.stringify(r)}`,
        );
        assert(
          /memory ram at offset 0x100000, perm rw/.test(r.message),
          `message names no conflict: ${r.message}`,
        );
        assert(
          writes === 0 && pushes === 0,
          `the agent wrote ${writes} messages, the device got ${pushes} updates`,
        );
        // What the kernel itself answers for the same message on the same fd: EFAULT, no reason.
        const uaddr = registry.translate('disk', 0n, MiB);
        const kernel = await errnoOf(() =>
          sendRaw(rec.raw!, IotlbMsgType.UPDATE, overlap.iova, MiB, uaddr, VHOST_ACCESS_RW),
        );
        assert(kernel === 'EFAULT', `the kernel answered the overlapping UPDATE with ${kernel}`);
        const after = { table: showMap(await vduse.map()), agent: showOps(dev().mappings()) };
        assert(after.table === before.table && after.agent === before.agent, 'tables changed');
        return `agent: ${r.errno}/${r.code} "${r.message}", 0 messages written, 0 device updates; the kernel for the same UPDATE: ${kernel}`;
      },
    ],
    [
      'memory-guard',
      async () => {
        // The kernel would answer 72 and map only the shared part (or nothing): the agent refuses.
        const past = update(0x6000_0000n, 2n * MiB, 'disk', 0n, 'rw');
        const unknown = update(0x6100_0000n, 4n * KiB, 'nope', 0n, 'rw');
        const { results, pushes, writes } = await applyCounted(dev(), [past, unknown]);
        const [r1, r2] = results;
        assert(
          !r1!.ok && r1!.code === 'OUT_OF_BOUNDS' && r1!.errno === 'EFAULT',
          `past the end: ${JSON.stringify(r1)}`,
        );
        assert(!r2!.ok && r2!.code === 'NOT_FOUND', `unknown memory: ${JSON.stringify(r2)}`);
        assert(writes === 0 && pushes === 0, `${writes} writes, ${pushes} device updates`);
        return `past the end of disk -> ${r1!.ok ? '' : r1!.code}; unknown memory -> ${r2!.ok ? '' : r2!.code}; nothing written`;
      },
    ],
    [
      'one-update-per-batch',
      async () => {
        const ops = [invalidate(C.iova, 4n * KiB), E, F, invalidate(F.iova, 8n * KiB)];
        const { results, pushes, writes } = await applyCounted(dev(), ops);
        allOk(results, 'mixed batch');
        assert(writes === 6, `${writes} messages written`);
        assert(pushes === 1, `the device got ${pushes} table updates for one batch of 4 ops`);
        const table = await deviceTableIs(mapped(dev()), 'after the mixed batch');
        return `INVALIDATE, UPDATE, UPDATE, INVALIDATE -> ${writes} writes, ${pushes} device update; device table ${table}`;
      },
    ],
    [
      'unmap',
      async () => {
        const exact = await applyCounted(dev(), [invalidate(A.iova, MiB)]);
        allOk(exact.results, 'unmap A');
        assert(exact.pushes === 1, `${exact.pushes} device updates`);
        assert(!(await vduse.map()).some((e) => e.start === A.iova), 'A is still on the device');
        const gone = await vduse.read(A.iova, 1).then(
          () => 'readable',
          (e: Error) => e.message,
        );
        assert(/unmapped/.test(gone), `device read at the unmapped IOVA: ${gone}`);
        // 4 KiB inside B's 64 KiB: the kernel removes the whole entry (VA mode), and so does the agent.
        const partial = await applyCounted(dev(), [invalidate(B.iova + 0x1000n, 0x1000n)]);
        allOk(partial.results, 'partial unmap');
        assert(
          !dev()
            .mappings()
            .some((m) => m.memory === 'disk'),
          `agent still maps ${showOps(dev().mappings())}`,
        );
        const table = await deviceTableIs(mapped(dev()), 'after the unmaps');
        return `exact INVALIDATE removed ${hex(A.iova)} (device read: "${gone}"); 4 KiB INVALIDATE inside ${hex(B.iova)}+64K removed the whole entry on both sides; device table ${table}`;
      },
    ],
    [
      'close',
      async () => {
        const d = dev();
        const left = mapped(d);
        assert(left.length === 2, `expected D and E mapped, agent has ${showMap(left)}`);
        const secret = Buffer.from('still reachable after close');
        registry.write('ram', E.offset, secret);
        const before = await deviceUpdates();
        await d.close();
        device = undefined;
        assert(d.mappings().length === 0, 'the closed device still lists mappings');
        const refs = registry.list().filter((m) => m.mappedEntries !== 0);
        assert(refs.length === 0, `memory still referenced: ${refs.map((m) => m.id).join(' ')}`);
        const pushes = (await deviceUpdates()) - before;
        const table = await vduse.map();
        assert(!deviceBusy(), 'the node is still busy after close');
        // VDUSE (6.12) has no .reset_map: release empties the vhost table without a set_map.
        assert(pushes === 0, `closing pushed ${pushes} updates to the device`);
        assert(showMap(table) === showMap(left), `device table after close: ${showMap(table)}`);
        // ...and still translates: the device reads the memory behind a mapping the agent dropped.
        const seen = await vduse.read(E.iova, secret.length);
        assert(seen.equals(secret), `device read after close: ${seen.toString('hex')}`);
        return `closed with ${left.length} entries: agent lists none, memory unreferenced, node free; device updates +${pushes}, device still shows its last table ${showMap(table)} (VDUSE has no reset_map) and still reads the memory at ${hex(E.iova)}`;
      },
    ],
    [
      'reopen',
      async () => {
        device2 = new KernelDevice({
          node: devicePath,
          name: 'vdpa0',
          memory: registry,
          openTransport: rec.open,
          pinned: false, // VDUSE maps in VA mode (what discovery finds for it)
        });
        const d = device2;
        // A fresh owner has no address space: the guard skips the INVALIDATE the kernel refuses.
        const skip = await applyCounted(d, [invalidate(0n, U64_MAX)]);
        allOk(skip.results, 'INVALIDATE on a fresh owner');
        assert(skip.writes === 0 && skip.pushes === 0, `${skip.writes} writes, ${skip.pushes} updates`);
        const kernel = await errnoOf(() => sendRaw(rec.raw!, IotlbMsgType.INVALIDATE, 0n, 4096n));
        assert(kernel === 'EFAULT', `raw INVALIDATE on the fresh owner: ${kernel}`);
        // UPDATE of exactly the ranges mapped at close: accepted (the new owner's vhost table starts
        // empty); the INVALIDATEs in the same batch leave it empty, and BATCH_END pushes that to the
        // device, replacing the table it kept from the closed owner.
        const again = await applyCounted(d, [
          D,
          E,
          invalidate(D.iova, 16n * KiB),
          invalidate(E.iova, 4n * KiB),
        ]);
        allOk(again.results, 'remap of the closed ranges');
        assert(again.pushes === 1, `${again.pushes} device updates`);
        const table = await deviceTableIs([], 'after the new owner pushed');
        return `INVALIDATE on a fresh owner skipped by the guard (0 writes; the kernel answers ${kernel}); UPDATE of the ranges mapped at close accepted (the new owner's vhost table starts empty); its one push replaced the stale device table: ${table}`;
      },
    ],
    [
      'reset',
      async () => {
        const d = device2!;
        allOk(await d.apply([E]), 'map E');
        const before = (await vduse.stats()).setStatus;
        await d.reset();
        const setStatus = (await vduse.stats()).setStatus - before;
        assert(d.mappings().length === 0, `after reset the agent lists ${showOps(d.mappings())}`);
        const table = await deviceTableIs([], 'after reset');
        // The kernel table is empty too: the same UPDATE is accepted again.
        allOk(await d.apply([E]), 'map E after reset');
        await deviceTableIs(mapped(d), 'E after reset');
        allOk(await d.apply([invalidate(E.iova, 4n * KiB)]), 'unmap E');
        return `SET_STATUS 0 (${setStatus} SET_STATUS request at the device), then the agent invalidated everything: agent and device ${table}; E maps again`;
      },
    ],
  ],
  async () => {
    for (const d of [device, device2]) await d?.close();
    const table = await pushEmptyTable();
    registry.closeAll();
    fs.rmSync(root, { recursive: true, force: true });
    assert(table.length === 0, `device table after the final push: ${showMap(table)}`);
    return `devices closed, device table ${showMap(table)}`;
  },
);
