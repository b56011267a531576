/**
 * Guest-side entry point of the real-kernel tier, run inside the VM from the project root:
 *   node --import tsx test/kernel/guest/main.ts [check ...]      (default: every check)
 * Each check prints `GUEST: <name> PASS|FAIL <detail>`; the exit code is 1 if any failed,
 * which fails the step on the host (run-vm.ts).
 *
 * Environment given by the VM's /init: VHOST_VDPA_DEV (/dev/vhost-vdpa-0, a VDUSE
 * virtio-blk device bound to vhost_vdpa), VDUSE_CTL (vduse-daemon's socket, see ./vduse.ts),
 * VDPA_MAPD_ROOT (the project tree, read-only, also the working directory).
 */
import fs from 'node:fs';
import {
  copyFromAddress,
  copyToAddress,
  ftruncate,
  ioctlBuffer,
  ioctlNoArg,
  MAP_SHARED,
  MFD_CLOEXEC,
  memfdCreate,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
  SysError,
} from '../../../src/sys/libc.ts';
import {
  backendFeatureMask,
  backendFeatureNames,
  encodeMsgV2,
  type IotlbMsgType,
  IotlbMsgType as MsgType,
  Ioctl,
  VHOST_ACCESS_RW,
} from '../../../src/uapi/index.ts';
import { VduseClient } from './vduse.ts';
import { ioctlReadU64, TransportError } from '../../../src/device/transport.ts';
import { openVhostVdpaFd } from '../../../src/device/vhost-vdpa-fd.ts';

const devicePath = process.env.VHOST_VDPA_DEV ?? '/dev/vhost-vdpa-0';
const device = new VduseClient();
const wanted = backendFeatureMask('IOTLB_MSG_V2', 'IOTLB_BATCH');

/** A check returns its detail line, or throws to fail. */
type Check = () => Promise<string>;

function errnoOf(fn: () => unknown): string {
  try {
    fn();
    return 'ok';
  } catch (err) {
    if (err instanceof SysError || err instanceof TransportError) return err.errno;
    throw err;
  }
}

function assert(ok: boolean, message: string): asserts ok {
  if (!ok) throw new Error(message);
}

function send(fd: number, type: IotlbMsgType, iova = 0n, size = 0n, uaddr = 0n, perm = 0): void {
  const n = fs.writeSync(fd, encodeMsgV2(0, { iova, size, uaddr, perm, type }));
  assert(n === 72, `short write: ${n}`);
}

/** The project's koffi binding (src/sys/libc.ts), under the device transport, drives the owner ioctls of the real driver. */
const koffiOwner: Check = async () => {
  const t = openVhostVdpaFd(devicePath);
  try {
    assert(errnoOf(() => t.ioctl(Ioctl.VHOST_SET_OWNER)) === 'ok', 'VHOST_SET_OWNER failed');
    const again = errnoOf(() => t.ioctl(Ioctl.VHOST_SET_OWNER));
    assert(again === 'EBUSY', `second VHOST_SET_OWNER: ${again}`);
    const features = ioctlReadU64(t, Ioctl.VHOST_GET_BACKEND_FEATURES);
    assert((features & wanted) === wanted, `backend features 0x${features.toString(16)}`);
    return `SET_OWNER ok, again EBUSY, backend features ${backendFeatureNames(features).join('|')}`;
  } finally {
    t.close();
  }
};

/** Memory written by the owner is what the device reads at the IOVA, and the other way round. */
const dataPath: Check = async () => {
  const size = 1n << 20n;
  const iova = 0x4000_0000n;
  const mfd = memfdCreate('guest-main', MFD_CLOEXEC);
  ftruncate(mfd, size);
  const addr = mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd);
  const fd = fs.openSync(devicePath, 'r+');
  try {
    ioctlNoArg(fd, Ioctl.VHOST_SET_OWNER);
    ioctlBuffer(fd, Ioctl.VHOST_SET_BACKEND_FEATURES, new Uint8Array(BigUint64Array.of(wanted).buffer));
    const pattern = Buffer.from('written by the owner, read by the device');
    copyToAddress(addr + 0x345n, pattern);

    const before = (await device.stats()).updates;
    send(fd, MsgType.BATCH_BEGIN);
    send(fd, MsgType.UPDATE, iova, size, addr, VHOST_ACCESS_RW);
    send(fd, MsgType.BATCH_END);
    const pushes = (await device.stats()).updates - before;
    assert(pushes === 1, `device got ${pushes} table updates for one batch`);

    const seen = await device.read(iova + 0x345n, pattern.length);
    assert(seen.equals(pattern), `device read ${seen.toString('hex')}`);
    await device.write(iova + 0x10n, Buffer.from('device'));
    const back = copyFromAddress(addr + 0x10n, 6).toString();
    assert(back === 'device', `owner read back ${JSON.stringify(back)}`);
    const table = await device.map();
    return `1 push per batch, device map ${table.map((e) => `0x${e.start.toString(16)}-0x${e.last.toString(16)}:${e.perm}`).join(' ')}`;
  } finally {
    fs.closeSync(fd);
    munmap(addr, size);
    fs.closeSync(mfd);
  }
};

const checks: Record<string, Check> = { 'koffi-owner': koffiOwner, 'data-path': dataPath };

const selected = process.argv.slice(2);
const unknown = selected.filter((name) => !(name in checks));
if (unknown.length > 0)
  throw new Error(`unknown checks: ${unknown.join(' ')} (known: ${Object.keys(checks).join(' ')})`);
let failed = 0;
for (const name of selected.length > 0 ? selected : Object.keys(checks)) {
  const started = performance.now();
  try {
    const detail = await checks[name]!();
    console.log(`GUEST: ${name} PASS ${detail} (${Math.round(performance.now() - started)} ms)`);
  } catch (err) {
    failed++;
    console.log(`GUEST: ${name} FAIL ${err instanceof Error ? err.message : String(err)}`);
  }
}
process.exitCode = failed > 0 ? 1 : 0;
