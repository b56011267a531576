/**
 * Whether a vhost-vdpa parent pins (PA mode), asked of the kernel instead of guessed from the
 * device's name: on a fresh open, one page of a new memfd is mapped at the lowest page of the
 * device's IOVA range and invalidated again, inside one batch, and the owner's VmPin
 * (mm->pinned_vm) is read before and after the UPDATE. A PA-mode parent pins the page at once,
 * batch or not (vhost_vdpa_pa_map: VmPin grows by a page); a VA-mode one maps it by address and
 * pins nothing (vhost_vdpa_va_map). An UPDATE a VA-mode parent would take, refused (EFAULT), is a
 * pin that failed (RLIMIT_MEMLOCK): PA mode too. The node is closed again with nothing mapped.
 */
import { IotlbMsgType, VHOST_ACCESS_RW } from '../uapi/constants.ts';
import { Ioctl } from '../uapi/ioctl.ts';
import { encodeMsgV1, type IotlbMsg } from '../uapi/message.ts';
import {
  ftruncate,
  MAP_SHARED,
  MFD_CLOEXEC,
  memfdCreate,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
  systemPageSize,
} from '../sys/libc.ts';
import { ownVmPin } from '../sys/proc-self.ts';
import fs from 'node:fs';
import { ioctlReadIovaRange, isErrno, TransportError, type VhostTransport } from './transport.ts';
import { U64_MAX } from '../u64.ts';

export interface PinProbe {
  /** Opens the node (a fresh owner: nothing mapped). */
  open: () => VhostTransport;
  /** This process's pinned bytes; default VmPin of /proc/self/status. */
  readVmPin?: () => bigint | undefined;
  /** default this machine's PAGE_SIZE */
  pageSize?: bigint;
}

/** true: the parent pins; false: it does not; undefined: the kernel does not show VmPin. */
export async function probePinning(probe: PinProbe): Promise<boolean | undefined> {
  const readVmPin = probe.readVmPin ?? ownVmPin;
  if (readVmPin() === undefined) return undefined;
  const page = probe.pageSize ?? systemPageSize();
  const t = probe.open();
  const fd = memfdCreate('vdpa-mapd-pin-probe', MFD_CLOEXEC);
  let uaddr: bigint | undefined;
  try {
    ftruncate(fd, page);
    uaddr = mmap(page, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
    t.ioctl(Ioctl.VHOST_SET_OWNER);
    const iova = lowestPage(t, page);
    const send = (iotlb: Omit<IotlbMsg, 'uaddr' | 'perm'> & Partial<IotlbMsg>) =>
      t.write(encodeMsgV1({ uaddr: 0n, perm: 0, ...iotlb }));
    // The kernel takes v1 messages and batches without negotiated features (docs/kernel-notes.md R3).
    await send({ type: IotlbMsgType.BATCH_BEGIN, iova: 0n, size: 0n });
    const before = readVmPin()!;
    let pinned: boolean;
    try {
      await send({ type: IotlbMsgType.UPDATE, iova, size: page, uaddr, perm: VHOST_ACCESS_RW });
      pinned = (readVmPin() ?? before) > before;
      await send({ type: IotlbMsgType.INVALIDATE, iova, size: page });
    } catch (e) {
      if (!isErrno(e, 'EFAULT')) throw e;
      pinned = true;
    }
    await send({ type: IotlbMsgType.BATCH_END, iova: 0n, size: 0n });
    return pinned;
  } finally {
    t.close();
    if (uaddr !== undefined) munmap(uaddr, page);
    fs.closeSync(fd);
  }
}

/** The first whole page of the device's IOVA range (GET_IOVA_RANGE; the whole space without it). */
function lowestPage(t: VhostTransport, page: bigint): bigint {
  let first = 0n;
  let last = U64_MAX;
  try {
    ({ first, last } = ioctlReadIovaRange(t, Ioctl.VHOST_VDPA_GET_IOVA_RANGE));
  } catch (e) {
    if (!isErrno(e, 'ENOTTY', 'EOPNOTSUPP')) throw e;
  }
  const iova = ((first + page - 1n) / page) * page;
  if (iova + page - 1n > last) {
    throw new TransportError('ERANGE', `the IOVA range [${first}, ${last}] holds no whole page`);
  }
  return iova;
}
