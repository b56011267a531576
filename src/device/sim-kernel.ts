/**
 * An in-memory vhost-vdpa: the vDPA parent (its own IOTLB, which simulated DMA goes through, and
 * its cost counters) and the vhost-vdpa driver's per-open state. It answers the same ioctl
 * requests and the same 72-byte messages as drivers/vhost/vdpa.c and vhost.c (around v6.12),
 * decoding them with src/uapi. A SimulatedDevice hands it each message's fields instead
 * (writeFields), which run the same checks on the same values without an encode and a decode.
 *
 * The parent works in one of the kernel's two modes:
 * - PA mode (pinning; the only mode of a platform IOMMU, and vdpa_sim use_va=0, mlx5):
 *   vhost_vdpa_pa_map pins every page from `uaddr & PAGE_MASK` and maps each physically contiguous
 *   run as its own entry from `iova & PAGE_MASK`, charging the owner's pinned_vm (VmPin) under
 *   RLIMIT_MEMLOCK. Physical contiguity is modelled by `contiguousPages`: the pages of one memory
 *   form runs of that many pages, aligned to the memory's offset 0 (1 for shmem as measured, 512
 *   for THP). Any memory of the owner pins: registered memory, and the process's own vmas
 *   (private anonymous memory too, read from /proc/self/maps); a page in no vma fails the UPDATE
 *   (EFAULT) and everything it mapped is unmapped again.
 * - VA mode (use_va: VDUSE, vdpa_sim use_va=1): an UPDATE maps the parts of [uaddr, +size) that
 *   lie in registered shared memory and silently skips the rest; nothing is pinned.
 *
 * Known simplifications, each refused rather than guessed: perm must be RO/WO/RW (the kernel
 * stores any value, docs/kernel-notes.md S5), and in VA mode only registered memory resolves (the
 * kernel maps any MAP_SHARED file-backed vma of the owner, S7); neither is reachable through
 * VhostVdpaDevice, whose guard checks both first. `keepsMapOnReset` gives VDUSE's reset and
 * release, which keep the parent's table.
 */
import fs from 'node:fs';
import { IovaTable, lastByte } from '../iotlb/table.ts';
import { hex, type IovaRange, type Mapping, type Perm, type Region } from '../iotlb/types.ts';
import { U64_MAX } from '../u64.ts';
import type { MemoryInfo, MemoryRegistry } from '../memory/types.ts';
import {
  type BackendFeatureName,
  DeviceStatus,
  hasBackendFeature,
  IotlbMsgType,
  KNOWN_BACKEND_FEATURES,
  VHOST_ACCESS_RO,
  VHOST_ACCESS_RW,
  VHOST_ACCESS_WO,
} from '../uapi/constants.ts';
import { Ioctl } from '../uapi/ioctl.ts';
import { decodeVhostMsg, type IotlbMsg, UapiError, VHOST_MSG_SIZE, type VhostMsg } from '../uapi/message.ts';
import {
  decodeVdpaConfigHeader,
  decodeVringAddr,
  decodeVringFile,
  decodeVringState,
  VDPA_CONFIG_HEADER_SIZE,
  VHOST_FILE_UNBIND,
  VHOST_VRING_F_LOG,
  VRING_ADDR_SIZE,
  VRING_FILE_SIZE,
  VRING_STATE_SIZE,
  vdpaConfigBuf,
} from '../uapi/vring.ts';
import { RLIM_INFINITY } from '../sys/libc.ts';
import { ownVmas, type Vma } from '../sys/proc-self.ts';
import { PAGE_SIZE, PinnedMemory, pagesOf } from './memlock.ts';
import { SIM_QUEUE_MAX, type SimDisk, SimVrings } from './sim-vrings.ts';
import { TransportError, type VhostTransport } from './transport.ts';
import type { DeviceLogger } from './types.ts';

/** The shortest write vhost_chr_write_iter takes: type, asid (or padding), vhost_iotlb_msg. */
const MIN_WRITE = 40;
/** vhost_vdpa_pa_map pins at most PAGE_SIZE / sizeof(struct page *) pages per pin_user_pages call. */
const PIN_BATCH_PAGES = 512n;

/**
 * platform: the parent has neither set_map nor dma_map; vhost-vdpa maps each entry in the platform
 * IOMMU (iommu_map / iommu_unmap), always in PA mode. onchip: the parent translates itself, with
 * set_map (the whole table per push) or dma_map (one call per entry): see `onchipMap`.
 */
export type SimIommu = 'platform' | 'onchip';
/** The op an onchip parent implements. */
export type SimOnchipMap = 'set_map' | 'dma_map';

/** Chooses UPDATE/INVALIDATE messages to fail with EFAULT, as a failed pin or dma_map would. */
export interface FaultInjection {
  /** Messages number `failAfter` and later fail (numbered from 0 since the simulator was made). */
  failAfter?: number;
  /** Fails the messages for which it returns true; `msg.asid` is the asid the kernel uses. */
  failOn?: (msg: VhostMsg, seq: number) => boolean;
}

export interface SimulatedVdpaConfig extends FaultInjection {
  deviceId: number;
  iommu: SimIommu;
  iovaRange: IovaRange;
  asNum: number;
  groupNum: number;
  vqCount: number;
  configSize: number;
  /** What VHOST_GET_BACKEND_FEATURES answers; SET_BACKEND_FEATURES refuses any other bit. */
  offeredFeatures: bigint;
  /** Time each set_map push takes (onchip), awaited by the writer. */
  pushDelayMs: number;
  /**
   * onchip only: set_map (default; VDUSE, mlx5, vdpa_sim batch_mapping=1) or dma_map (vdpa_sim
   * batch_mapping=0, one call per entry and no push at BATCH_END).
   */
  onchipMap?: SimOnchipMap;
  /**
   * VA mode (the parent was allocated with use_va). Default: PA mode with a platform IOMMU (its
   * only mode: __vdpa_alloc_device refuses use_va without set_map or dma_map, and so does this
   * constructor) or when `memlock` is given; else VA mode.
   */
  useVa?: boolean;
  /** PA mode: RLIMIT_MEMLOCK in bytes; default unlimited. Ignored when `vmPin` is given. */
  memlock?: bigint;
  /**
   * PA mode: the owner's mm->pinned_vm (VmPin), with its RLIMIT_MEMLOCK. Give parents owned by one
   * process the same account (the kernel counts per process); default an account of its own.
   */
  vmPin?: PinnedMemory;
  /** The kernel's PAGE_SIZE in bytes; default 4096. */
  pageSize?: bigint;
  /**
   * PA mode: how many pages of a memory are physically contiguous, as runs aligned to its offset 0
   * (to the address, for unregistered memory): each run is one kernel entry. Default 1 (shmem
   * pages, as measured); 512 models THP (2 MiB).
   */
  contiguousPages?: number;
  /**
   * The parent keeps its IOTLB across reset and release, as VDUSE does (no reset_map, and its reset
   * ignores VDPA_RESET_F_CLEAN_MAP): the device can still DMA through the old table until a new
   * owner pushes one. Default false: the table goes with them, as with vdpa_sim and mlx5.
   */
  keepsMapOnReset?: boolean;
  /**
   * The parent cannot tell a vring's state, as vp_vdpa: vp_vdpa_get_vq_state answers -EOPNOTSUPP
   * (the virtio spec has no way to read a device's avail index), so VHOST_GET_VRING_BASE is
   * EOPNOTSUPP; and VHOST_SET_VRING_BASE takes only avail index 0, with FEATURES_OK set and the
   * queue not enabled (vp_vdpa_set_vq_state). Default false: the parent keeps any state (vdpa_sim,
   * VDUSE, mlx5).
   */
  lacksVqState?: boolean;
  /** virtio-blk only: the disk its data path serves (see sim-vrings.ts). */
  disk?: SimDisk;
  /** Where the data path logs I/O errors. */
  logger?: DeviceLogger;
}

export interface SimCounters {
  dmaMapCalls: number;
  dmaUnmapCalls: number;
  setMapPushes: number;
  setMapEntriesPushed: number;
}

/** A refusal inside vhost_vdpa_process_iotlb_msg: userspace sees EFAULT. */
class HandlerError extends Error {
  constructor(
    readonly errno: string,
    message: string,
    readonly injected = false,
  ) {
    super(message);
  }
}

const PERM_BY_BITS: Record<number, Perm> = {
  [VHOST_ACCESS_RO]: 'ro',
  [VHOST_ACCESS_WO]: 'wo',
  [VHOST_ACCESS_RW]: 'rw',
};

/** The vDPA parent. One opener at a time, like the character device. */
export class SimulatedVdpa {
  readonly counters: SimCounters = {
    dmaMapCalls: 0,
    dmaUnmapCalls: 0,
    setMapPushes: 0,
    setMapEntriesPushed: 0,
  };
  private file: SimVhostFile | undefined;
  private deviceTables: IovaTable[];
  private status = 0;
  private suspendedFlag = false;
  /** Number of the next UPDATE/INVALIDATE message, for fault injection. */
  private opSeq = 0;
  /** The registered memory of the last UPDATE (see registeredAt). */
  private lastMemory: MemoryInfo | undefined;
  /**
   * PA mode: the pages the kernel pinned (mm->pinned_vm, what VmPin shows), counted per entry as
   * vhost_vdpa_map and vhost_vdpa_pa_unmap do; undefined in VA mode.
   */
  readonly pins: PinnedMemory | undefined;
  readonly pageSize: bigint;
  /** The parent has set_map (pushes of the whole table) rather than dma_map or the platform IOMMU. */
  readonly hasSetMap: boolean;
  /** Bytes of one physically contiguous run. */
  private readonly runBytes: bigint;
  /** The virtqueues, driver features, config space and data path. */
  readonly vrings: SimVrings;

  constructor(
    readonly config: SimulatedVdpaConfig,
    readonly memory: MemoryRegistry,
  ) {
    const useVa = config.useVa ?? (config.iommu !== 'platform' && config.memlock === undefined);
    if (useVa && config.iommu === 'platform') {
      throw new TransportError('EINVAL', 'a parent without set_map or dma_map cannot use VA mode');
    }
    const contiguous = config.contiguousPages ?? 1;
    if (!Number.isSafeInteger(contiguous) || contiguous < 1) {
      throw new RangeError(`contiguousPages must be a positive integer, got ${contiguous}`);
    }
    this.vrings = new SimVrings(
      config.deviceId,
      config.vqCount,
      config.configSize,
      config.disk,
      config.logger,
    );
    this.pageSize = config.pageSize ?? PAGE_SIZE;
    this.hasSetMap = config.iommu === 'onchip' && (config.onchipMap ?? 'set_map') === 'set_map';
    this.runBytes = BigInt(contiguous) * this.pageSize;
    this.deviceTables = this.emptyTables();
    const memlock = config.memlock ?? RLIM_INFINITY;
    this.pins = useVa ? undefined : (config.vmPin ?? new PinnedMemory(() => memlock, this.pageSize));
  }

  /** Whether the parent maps by address (use_va) and pins nothing. */
  get useVa(): boolean {
    return this.pins === undefined;
  }

  /**
   * PA mode: the physically contiguous runs of the owner's memory from page `uaddr` on, for
   * `npages` pages, as entries from `iova`, and how many pages could be pinned (fewer than
   * `npages` when a page lies in no vma, or in one that does not allow the access).
   */
  pinnableRuns(
    uaddr: bigint,
    npages: bigint,
    iova: bigint,
    perm: Perm,
  ): { runs: Region[]; pinnedPages: bigint } {
    const page = this.pageSize;
    const end = uaddr + npages * page;
    let registered: MemoryInfo[] | undefined;
    let vmas: Vma[] | undefined;
    const runs: Region[] = [];
    let at = uaddr;
    while (at < end) {
      // `base`: where offset 0 of the memory is; runs are aligned to `blocksFrom` (a memory's file
      // offset 0, as shmem's huge pages are; the address, as anonymous huge pages are).
      let segment: { memory: string; base: bigint; blocksFrom: bigint; stop: bigint } | undefined;
      const mem = this.registeredAt(at);
      if (mem)
        segment = { memory: mem.id, base: mem.uaddr, blocksFrom: mem.uaddr, stop: mem.uaddr + mem.size };
      else {
        // Not registered: any vma of the process pins (pin_user_pages), private anonymous memory
        // too; FOLL_WRITE (a WO or RW entry) needs a writable one.
        vmas ??= ownVmas();
        const vma = vmas.find((v) => v.start <= at && at < v.end && v.read && (v.write || perm === 'ro'));
        let next: bigint | undefined;
        registered ??= this.memory.list();
        for (const m of registered)
          if (m.uaddr > at && (next === undefined || m.uaddr < next)) next = m.uaddr;
        if (vma) {
          const stop = next !== undefined && next < vma.end ? next : vma.end;
          segment = { memory: `unregistered@${hex(vma.start)}`, base: vma.start, blocksFrom: 0n, stop };
        }
      }
      if (!segment) break;
      let stop = segment.stop;
      if (end < stop) stop = end;
      while (at < stop) {
        const from = segment.blocksFrom;
        const blockEnd = from + ((at - from) / this.runBytes + 1n) * this.runBytes;
        const runEnd = blockEnd < stop ? blockEnd : stop;
        runs.push({
          iova: iova + (at - uaddr),
          size: runEnd - at,
          memory: segment.memory,
          offset: at - segment.base,
          perm,
        });
        at = runEnd;
      }
    }
    if (at >= end) return { runs, pinnedPages: npages };
    // Only whole pages pin: a run may not end inside a page that is partly outside memory.
    const pinnedPages = (at - uaddr) / page;
    const limit = iova + pinnedPages * page;
    const whole = runs
      .filter((r) => r.iova < limit)
      .map((r) => (r.iova + r.size > limit ? { ...r, size: limit - r.iova } : r));
    return { runs: whole, pinnedPages };
  }

  /**
   * The registered memory whose mapping holds address `uaddr`. Mappings of one process never
   * overlap, so the memory the last UPDATE used, still registered at the same address and size,
   * is the one answer when it holds `uaddr`: most UPDATEs need no look through every memory.
   */
  registeredAt(uaddr: bigint): MemoryInfo | undefined {
    const last = this.lastMemory === undefined ? undefined : this.memory.get(this.lastMemory.id);
    if (
      last !== undefined &&
      last.uaddr === this.lastMemory!.uaddr &&
      last.size === this.lastMemory!.size &&
      last.uaddr <= uaddr &&
      uaddr < last.uaddr + last.size
    ) {
      return last;
    }
    const found = this.memory.list().find((m) => m.uaddr <= uaddr && uaddr < m.uaddr + m.size);
    if (found !== undefined) this.lastMemory = found;
    return found;
  }

  /** vhost_vdpa_open: EBUSY while another file is open; opening resets the device. */
  open(): VhostTransport {
    if (this.file) throw new TransportError('EBUSY', 'vhost-vdpa device is already open');
    this.reset(true);
    this.file = new SimVhostFile(this);
    return this.file;
  }

  /** The parent's own table for `asid`: what the device sees, and what DMA translates through. */
  deviceTable(asid: number): IovaTable | undefined {
    return this.deviceTables[asid];
  }

  /** The kernel's tables (the vhost_iotlb of every allocated address space) of the open file. */
  kernelMappings(): Mapping[] {
    return this.file?.mappings() ?? [];
  }

  get suspended(): boolean {
    return this.suspendedFlag;
  }

  get deviceStatus(): number {
    return this.status;
  }

  nextOpSeq(): number {
    return this.opSeq++;
  }

  shouldFail(version: 1 | 2, asid: number, iotlb: IotlbMsg, seq: number): boolean {
    const { failAfter, failOn } = this.config;
    if (failAfter !== undefined && seq >= failAfter) return true;
    return failOn?.({ version, asid, iotlb }, seq) ?? false;
  }

  /**
   * ops->dma_map, or iommu_map for a platform IOMMU: one call per entry, just added to the vhost
   * table `vhost` without overlap, so nothing to check again. The parent's table holds only
   * entries the vhost table holds (dma_unmap follows every removal, and a reset only empties it).
   * Once the two hold the same entries they stay the same until a reset empties the parent's, so
   * from then on the parent's table is the vhost table itself rather than a copy kept in step.
   */
  dmaMap(asid: number, entry: Region, vhost: IovaTable): void {
    this.counters.dmaMapCalls++;
    const own = this.deviceTables[asid]!;
    if (own === vhost) return;
    if (own.count === 0 && vhost.count === 1) this.deviceTables[asid] = vhost;
    else own.add(entry);
  }

  /**
   * ops->dma_unmap / iommu_unmap, per entry (vhost_vdpa_general_unmap), after its removal from the
   * vhost table `vhost`: the entry dma_map added, unless a reset emptied the parent's table since.
   */
  dmaUnmap(asid: number, entry: Region, vhost: IovaTable): void {
    this.counters.dmaUnmapCalls++;
    const own = this.deviceTables[asid]!;
    if (own !== vhost) own.remove(entry);
  }

  /** ops->set_map: the parent rebuilds its table from the whole vhost table. Returns the delay. */
  setMap(asid: number, table: IovaTable): number {
    this.counters.setMapPushes++;
    this.counters.setMapEntriesPushed += table.count;
    this.deviceTables[asid] = table.clone();
    return this.config.pushDelayMs;
  }

  /**
   * Virtio reset (_compat_vdpa_reset). Without IOTLB_PERSIST the kernel passes
   * VDPA_RESET_F_CLEAN_MAP and the parent drops its mappings (vdpasim_do_reset), while the vhost
   * tables keep theirs.
   */
  reset(cleanMap: boolean): void {
    this.status = 0;
    this.suspendedFlag = false;
    this.vrings.reset();
    if (cleanMap && !this.config.keepsMapOnReset) this.deviceTables = this.emptyTables();
  }

  /** vhost_vdpa_set_status with a non-zero status: bits may only be added. */
  setStatus(status: number): void {
    if ((this.status & ~status) !== 0) {
      throw new TransportError(
        'EINVAL',
        `status 0x${status.toString(16)} clears bits of 0x${this.status.toString(16)}`,
      );
    }
    this.status = status;
    this.vrings.statusChanged(status);
  }

  setSuspended(suspended: boolean): void {
    this.suspendedFlag = suspended;
    this.vrings.setSuspended(suspended, this.status);
  }

  /** vhost_vdpa_release: reset, every address space removed (vhost_vdpa_remove_as), reset_map. */
  release(file: SimVhostFile, cleanMap: boolean): void {
    this.reset(cleanMap);
    this.vrings.release();
    file.removeAllSpaces();
    if (!this.config.keepsMapOnReset) this.deviceTables = this.emptyTables();
    this.file = undefined;
  }

  private emptyTables(): IovaTable[] {
    return Array.from({ length: this.config.asNum }, (_, asid) => new IovaTable(asid));
  }
}

/** The state of one open `/dev/vhost-vdpa-N` (struct vhost_vdpa + vhost_dev while open). */
class SimVhostFile implements VhostTransport {
  private owner = false;
  private closed = false;
  private features = 0n;
  /** vhost_chr_write_iter reads a v2 message's asid only with IOTLB_ASID (set with the features). */
  private asidHonoured = false;
  /** Address spaces allocated so far (vhost_vdpa_find_alloc_as); none right after open. */
  private readonly spaces = new Map<number, IovaTable>();
  private inBatch = false;
  private batchAsid = 0;
  private pendingDelayMs = 0;

  constructor(private readonly parent: SimulatedVdpa) {}

  ioctl(request: number, arg?: Uint8Array): void {
    this.checkOpen();
    const cfg = this.parent.config;
    switch (request) {
      case Ioctl.VHOST_SET_OWNER:
        // vhost_dev_set_owner
        if (this.owner) throw new TransportError('EBUSY', 'the device already has an owner');
        this.owner = true;
        return;
      case Ioctl.VHOST_GET_BACKEND_FEATURES:
        putU64(arg, cfg.offeredFeatures);
        return;
      case Ioctl.VHOST_SET_BACKEND_FEATURES:
        this.setBackendFeatures(getU64(arg));
        return;
      case Ioctl.VHOST_VDPA_GET_DEVICE_ID:
        putU32(arg, cfg.deviceId);
        return;
      case Ioctl.VHOST_VDPA_GET_STATUS:
        putU8(arg, this.parent.deviceStatus);
        return;
      case Ioctl.VHOST_VDPA_SET_STATUS: {
        // vhost_vdpa_set_status: 0 resets (without touching in_batch), anything else adds bits.
        const status = getU8(arg);
        if (status === 0) this.parent.reset(!this.has('IOTLB_PERSIST'));
        else this.parent.setStatus(status);
        return;
      }
      case Ioctl.VHOST_VDPA_GET_IOVA_RANGE: {
        const buf = argBuffer(arg, 16);
        buf.writeBigUInt64LE(cfg.iovaRange.first, 0);
        buf.writeBigUInt64LE(cfg.iovaRange.last, 8);
        return;
      }
      case Ioctl.VHOST_VDPA_GET_CONFIG_SIZE:
        putU32(arg, cfg.configSize);
        return;
      case Ioctl.VHOST_VDPA_GET_AS_NUM:
        putU32(arg, cfg.asNum);
        return;
      case Ioctl.VHOST_VDPA_GET_GROUP_NUM:
        putU32(arg, cfg.groupNum);
        return;
      case Ioctl.VHOST_VDPA_GET_VQS_COUNT:
        putU32(arg, cfg.vqCount);
        return;
      case Ioctl.VHOST_GET_FEATURES:
        putU64(arg, this.parent.vrings.supportedFeatures);
        return;
      case Ioctl.VHOST_SET_FEATURES:
        // vhost_vdpa_set_features: the features may not change once negotiated.
        if (this.parent.deviceStatus & DeviceStatus.FEATURES_OK) {
          throw new TransportError('EBUSY', 'the features were negotiated already (FEATURES_OK is set)');
        }
        if (!this.parent.vrings.setDriverFeatures(getU64(arg))) {
          throw new TransportError(
            'EINVAL',
            'the parent refused the features: VIRTIO_F_ACCESS_PLATFORM is required',
          );
        }
        return;
      case Ioctl.VHOST_VDPA_GET_VRING_NUM:
        argBuffer(arg, 2).writeUInt16LE(SIM_QUEUE_MAX, 0);
        return;
      case Ioctl.VHOST_VDPA_GET_CONFIG:
      case Ioctl.VHOST_VDPA_SET_CONFIG:
        this.configIoctl(request === Ioctl.VHOST_VDPA_SET_CONFIG, arg);
        return;
      case Ioctl.VHOST_SET_VRING_NUM:
      case Ioctl.VHOST_SET_VRING_ADDR:
      case Ioctl.VHOST_SET_VRING_BASE:
      case Ioctl.VHOST_GET_VRING_BASE:
      case Ioctl.VHOST_SET_VRING_KICK:
      case Ioctl.VHOST_SET_VRING_CALL:
      case Ioctl.VHOST_VDPA_SET_VRING_ENABLE:
        this.vringIoctl(request, arg);
        return;
      case Ioctl.VHOST_VDPA_SUSPEND:
      case Ioctl.VHOST_VDPA_RESUME: {
        // vhost_vdpa_suspend / vhost_vdpa_resume: nothing to do (0) before DRIVER_OK, even on a
        // parent without the op; after it, EOPNOTSUPP when the parent lacks the op.
        const suspend = request === Ioctl.VHOST_VDPA_SUSPEND;
        if ((this.parent.deviceStatus & DeviceStatus.DRIVER_OK) === 0) return;
        if (!hasBackendFeature(cfg.offeredFeatures, suspend ? 'SUSPEND' : 'RESUME')) {
          throw new TransportError('EOPNOTSUPP', `the parent cannot ${suspend ? 'suspend' : 'resume'}`);
        }
        this.parent.setSuspended(suspend);
        return;
      }
      default:
        throw new TransportError('ENOTTY', `ioctl 0x${request.toString(16)} is not simulated`);
    }
  }

  /** vhost_chr_write_iter: framing, then vhost_vdpa_process_iotlb_msg (any refusal -> EFAULT). */
  write(bytes: Uint8Array): void | Promise<void> {
    this.checkOpen();
    // vhost_chr_write_iter reads the 4-byte type, 4 more (the v2 asid, or v1's padding) and the
    // 32-byte vhost_iotlb_msg: 40 bytes suffice, whatever follows them is ignored.
    if (bytes.length < MIN_WRITE) {
      throw new TransportError('EINVAL', `a write of ${bytes.length} bytes is shorter than ${MIN_WRITE}`);
    }
    // A write of exactly one record (every device write) is read where it is; a shorter one is
    // padded with zeros, a longer one cut.
    let framed = bytes;
    if (bytes.length !== VHOST_MSG_SIZE) {
      framed = new Uint8Array(VHOST_MSG_SIZE);
      framed.set(bytes.subarray(0, VHOST_MSG_SIZE));
    }
    let msg: VhostMsg;
    try {
      msg = decodeVhostMsg(framed);
    } catch (e) {
      if (!(e instanceof UapiError)) throw e;
      // A short write or an unknown vhost_msg type fails the framing (EINVAL); an unknown IOTLB
      // type reaches the handler's default case, whose EINVAL becomes EFAULT.
      throw new TransportError(e.code === 'UNKNOWN_IOTLB_TYPE' ? 'EFAULT' : 'EINVAL', e.message);
    }
    return this.writeFields(msg.version, msg.asid, msg.iotlb);
  }

  /** What a write of the record encoding these fields does, past its framing and decoding. */
  writeFields(version: 1 | 2, msgAsid: number, m: IotlbMsg): void | Promise<void> {
    this.checkOpen();
    // v1 has no asid; a v2 asid is read only with IOTLB_ASID, else address space 0 is used.
    const asid = version === 2 && this.asidHonoured ? msgAsid : 0;
    if (m.type === IotlbMsgType.UPDATE && m.size === 0n) {
      throw new TransportError('EINVAL', 'UPDATE with size 0');
    }
    const seq =
      m.type === IotlbMsgType.UPDATE || m.type === IotlbMsgType.INVALIDATE ? this.parent.nextOpSeq() : -1;
    try {
      this.processIotlbMsg(asid, m, seq >= 0 && this.parent.shouldFail(version, asid, m, seq));
    } catch (e) {
      if (!(e instanceof HandlerError)) throw e;
      throw new TransportError(
        'EFAULT',
        `${e.message} (the handler returned ${e.errno})`,
        e.injected ? 'INJECTED' : 'KERNEL',
      );
    }
    const delay = this.pendingDelayMs;
    if (delay === 0) return;
    this.pendingDelayMs = 0;
    return new Promise((resolve) => setTimeout(resolve, delay));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.inBatch = false;
    this.parent.release(this, !this.has('IOTLB_PERSIST'));
  }

  mappings(): Mapping[] {
    const all: Mapping[] = [];
    for (const asid of [...this.spaces.keys()].sort((a, b) => a - b)) {
      for (const r of this.spaces.get(asid)!.entries()) all.push({ ...r, asid });
    }
    return all;
  }

  /** vhost_vdpa_cleanup -> vhost_vdpa_remove_as for every address space: unmap [0, U64_MAX]. */
  removeAllSpaces(): void {
    for (const [asid, table] of this.spaces) this.iotlbUnmap(asid, table, 0n, U64_MAX);
    this.spaces.clear();
  }

  private processIotlbMsg(asid: number, m: IotlbMsg, inject: boolean): void {
    // vhost_dev_check_owner: only the process that called VHOST_SET_OWNER may write.
    if (!this.owner) throw new HandlerError('EPERM', 'the writer is not the owner (VHOST_SET_OWNER first)');
    // UPDATE and BATCH_BEGIN allocate the address space (vhost_vdpa_find_alloc_as); other types
    // need it to exist already (asid_to_iotlb).
    const allocate = m.type === IotlbMsgType.UPDATE || m.type === IotlbMsgType.BATCH_BEGIN;
    const table = allocate ? this.findAllocAs(asid) : this.spaces.get(asid);
    if (!table) {
      throw new HandlerError(
        'EINVAL',
        allocate
          ? `can't find and alloc asid ${asid}: the device has ${this.parent.config.asNum} address space(s)`
          : `no iotlb for asid ${asid}`,
      );
    }
    if (this.inBatch && this.batchAsid !== asid) {
      throw new HandlerError('EINVAL', `asid ${asid} differs from the open batch's asid ${this.batchAsid}`);
    }
    switch (m.type) {
      case IotlbMsgType.UPDATE:
        this.processIotlbUpdate(asid, table, m, inject);
        return;
      case IotlbMsgType.INVALIDATE:
        if (inject) throw new HandlerError('EFAULT', 'injected fault on INVALIDATE', true);
        this.unmap(asid, table, m.iova, m.size);
        return;
      case IotlbMsgType.BATCH_BEGIN:
        this.batchAsid = asid;
        this.inBatch = true;
        return;
      case IotlbMsgType.BATCH_END:
        // Only the push happens here; a BATCH_END with no batch open changes nothing.
        if (this.inBatch && this.parent.hasSetMap) this.push(asid, table);
        this.inBatch = false;
        return;
      default:
        throw new HandlerError('EINVAL', `IOTLB message type ${m.type} cannot be written by userspace`);
    }
  }

  /** vhost_vdpa_process_iotlb_update, then vhost_vdpa_pa_map or vhost_vdpa_va_map. */
  private processIotlbUpdate(asid: number, table: IovaTable, m: IotlbMsg, inject: boolean): void {
    const range = this.parent.config.iovaRange;
    // In bigint arithmetic iova + size - 1 cannot wrap, so the range test also covers the
    // kernel's explicit overflow test (iova > U64_MAX - size + 1).
    const last = m.iova + m.size - 1n;
    if (m.iova < range.first || m.size === 0n || last > range.last) {
      throw new HandlerError('EINVAL', 'iova/size outside the IOVA range or overflowing');
    }
    // The overlap test is on the range as given; PA-mode entries are whole pages, so a range
    // sharing a page with one overlaps it.
    if (table.firstOverlapThrough(m.iova, last)) {
      throw new HandlerError('EEXIST', 'the range overlaps a mapping');
    }
    const perm = PERM_BY_BITS[m.perm];
    if (perm === undefined)
      throw new HandlerError('EINVAL', `perm ${m.perm} is not RO/WO/RW (not simulated)`);
    if (inject) throw new HandlerError('EFAULT', 'injected fault on UPDATE', true);
    if (this.parent.useVa) {
      // vhost_vdpa_va_map: one entry per piece of shared file-backed memory; holes are skipped.
      for (const entry of this.resolve(m.iova, m.size, m.uaddr, perm)) this.map(asid, table, entry);
    } else {
      this.paMap(asid, table, m, perm);
    }
  }

  /**
   * vhost_vdpa_pa_map: the lock limit first (`npages + pinned_vm > PFN_DOWN(RLIMIT_MEMLOCK)`:
   * ENOMEM), then pin_user_pages 512 pages at a time from `uaddr & PAGE_MASK`, each physically
   * contiguous run mapped (vhost_vdpa_map) as soon as the next page breaks it, from
   * `iova & PAGE_MASK`. When a batch of pages cannot be pinned, the runs mapped so far are
   * unmapped again over the UPDATE's range (vhost_vdpa_unmap, a set_map push outside a batch):
   * nothing stays, and userspace sees EFAULT.
   */
  private paMap(asid: number, table: IovaTable, m: IotlbMsg, perm: Perm): void {
    const { pageSize: page, pins } = this.parent;
    const overLimit = pins!.refusal(m.iova, m.size);
    if (overLimit !== undefined) throw new HandlerError('ENOMEM', overLimit);
    const npages = pagesOf(m.iova, m.size, page);
    const iova = m.iova - (m.iova % page);
    const { runs, pinnedPages } = this.parent.pinnableRuns(m.uaddr - (m.uaddr % page), npages, iova, perm);
    if (pinnedPages === npages) {
      for (const run of runs) this.map(asid, table, run);
      return;
    }
    // The pin batch holding the first unpinnable page fails; a run was mapped only if the page
    // after it was in an earlier batch.
    const failedBatch = (pinnedPages / PIN_BATCH_PAGES) * PIN_BATCH_PAGES;
    for (const run of runs) {
      if ((run.iova + run.size - iova) / page < failedBatch) this.map(asid, table, run);
    }
    this.unmap(asid, table, m.iova, m.size);
    const hole = m.uaddr - (m.uaddr % page) + pinnedPages * page;
    throw new HandlerError(
      'EFAULT',
      `pin_user_pages failed at ${hex(hole)}: no vma of the owner allows ${perm === 'ro' ? 'reading' : 'writing'} that page`,
    );
  }

  /** vhost_vdpa_map: add to the vhost table, then dma_map / iommu_map, or set_map outside a batch. */
  private map(asid: number, table: IovaTable, entry: Region): void {
    // The UPDATE's whole range was tested for overlap (processIotlbUpdate), as the kernel does.
    table.add(entry);
    this.parent.pins?.pin(entry.iova, entry.size);
    if (!this.parent.hasSetMap) this.parent.dmaMap(asid, entry, table);
    else if (!this.inBatch) this.push(asid, table);
  }

  /** vhost_vdpa_unmap: every overlapping entry goes whole; then set_map outside a batch. */
  private unmap(asid: number, table: IovaTable, iova: bigint, size: bigint): void {
    this.iotlbUnmap(asid, table, iova, lastByte(iova, size));
    if (this.parent.hasSetMap && !this.inBatch) this.push(asid, table);
  }

  /**
   * vhost_vdpa_iotlb_unmap over [start, last] (inclusive; a last below start matches nothing):
   * in PA mode vhost_vdpa_pa_unmap unpins each entry's pages.
   */
  private iotlbUnmap(asid: number, table: IovaTable, start: bigint, last: bigint): void {
    const removed = table.invalidateThrough(start, last);
    for (let i = 0; i < removed.length; i++) {
      const entry = removed[i]!;
      this.parent.pins?.unpin(entry.iova, entry.size);
      if (!this.parent.hasSetMap) this.parent.dmaUnmap(asid, entry, table);
    }
  }

  private push(asid: number, table: IovaTable): void {
    this.pendingDelayMs += this.parent.setMap(asid, table);
  }

  private findAllocAs(asid: number): IovaTable | undefined {
    const existing = this.spaces.get(asid);
    if (existing) return existing;
    if (asid >= this.parent.config.asNum) return undefined;
    const table = new IovaTable(asid);
    this.spaces.set(asid, table);
    return table;
  }

  /** The pieces of [uaddr, +size) inside registered memory (the shared file-backed vmas). */
  private resolve(iova: bigint, size: bigint, uaddr: bigint, perm: Perm): Region[] {
    const end = uaddr + size;
    // Most UPDATEs lie in one memory, and then in no other: mappings never overlap.
    const holder = this.parent.registeredAt(uaddr);
    if (holder !== undefined && end <= holder.uaddr + holder.size) {
      return [{ iova, size, memory: holder.id, offset: uaddr - holder.uaddr, perm }];
    }
    const pieces: Region[] = [];
    for (const mem of this.parent.memory.list()) {
      let start = uaddr;
      if (mem.uaddr > start) start = mem.uaddr;
      let stop = mem.uaddr + mem.size;
      if (end < stop) stop = end;
      if (start >= stop) continue;
      pieces.push({
        iova: iova + (start - uaddr),
        size: stop - start,
        memory: mem.id,
        offset: start - mem.uaddr,
        perm,
      });
    }
    return pieces;
  }

  /**
   * vhost_vdpa_get_config / vhost_vdpa_set_config, checked by vhost_vdpa_config_validate: an empty
   * read or one starting past the config space is EINVAL, one running past its end E2BIG.
   */
  private configIoctl(set: boolean, arg: Uint8Array | undefined): void {
    const { off, len } = decodeVdpaConfigHeader(argBuffer(arg, VDPA_CONFIG_HEADER_SIZE));
    const size = this.parent.config.configSize;
    if (len === 0 || off > size)
      throw new TransportError('EINVAL', `config [${off}, +${len}) of ${size} bytes`);
    if (len > size - off)
      throw new TransportError('E2BIG', `config [${off}, +${len}) runs past ${size} bytes`);
    const buf = vdpaConfigBuf(argBuffer(arg, VDPA_CONFIG_HEADER_SIZE + len)).subarray(0, len);
    if (set) this.parent.vrings.setConfig(off, buf);
    else buf.set(this.parent.vrings.getConfig(off, len));
  }

  /**
   * The vring ioctls reach vhost_vdpa_vring_ioctl through vhost_dev_ioctl, which checks the owner
   * first (vhost_dev_check_owner: EPERM); an index past the device's vqs is ENOBUFS. The checks
   * on the values are vhost_vring_ioctl's; the device then gets set_vq_num / set_vq_address /
   * set_vq_state / set_vq_cb / set_vq_ready. The size is not checked against the device's
   * maximum (VHOST_VDPA_GET_VRING_NUM): that is userspace's job.
   */
  private vringIoctl(request: number, arg: Uint8Array | undefined): void {
    if (!this.owner) throw new TransportError('EPERM', 'the caller is not the owner (VHOST_SET_OWNER first)');
    const index = argBuffer(arg, 4).readUInt32LE(0);
    const vqCount = this.parent.config.vqCount;
    if (index >= vqCount) throw new TransportError('ENOBUFS', `vring ${index}: the device has ${vqCount}`);
    const vrings = this.parent.vrings;
    const status = this.parent.deviceStatus;
    switch (request) {
      case Ioctl.VHOST_SET_VRING_NUM: {
        const { num } = decodeVringState(argBuffer(arg, VRING_STATE_SIZE));
        // vhost_vring_set_num
        if (num === 0 || num > 0xffff || (num & (num - 1)) !== 0) {
          throw new TransportError('EINVAL', `vring ${index}: size ${num} is not a power of two up to 32768`);
        }
        vrings.setNum(index, num);
        return;
      }
      case Ioctl.VHOST_SET_VRING_ADDR: {
        const a = decodeVringAddr(argBuffer(arg, VRING_ADDR_SIZE));
        // vhost_vring_set_addr: only VHOST_VRING_F_LOG is a flag; the avail ring is 2-byte and
        // the used ring (and the log) 4-byte aligned. The descriptor table is not checked.
        if ((a.flags & ~(1 << VHOST_VRING_F_LOG)) !== 0) {
          throw new TransportError('EOPNOTSUPP', `vring ${index}: flags 0x${a.flags.toString(16)}`);
        }
        if ((a.avail & 1n) !== 0n || (a.used & 3n) !== 0n || (a.log & 3n) !== 0n) {
          throw new TransportError(
            'EINVAL',
            `vring ${index}: avail ${hex(a.avail)} or used ${hex(a.used)} misaligned`,
          );
        }
        vrings.setAddress(index, a.desc, a.avail, a.used);
        return;
      }
      case Ioctl.VHOST_SET_VRING_BASE: {
        const { num } = decodeVringState(argBuffer(arg, VRING_STATE_SIZE));
        if (num > 0xffff) throw new TransportError('EINVAL', `vring ${index}: base ${num} is not a u16`);
        // Then the device's set_vq_state. vp_vdpa_set_vq_state takes only what a device starts
        // with: avail index 0, once FEATURES_OK is set and before the queue is enabled.
        if (
          this.parent.config.lacksVqState &&
          (num !== 0 || (status & DeviceStatus.FEATURES_OK) === 0 || vrings.isReady(index))
        ) {
          throw new TransportError('EOPNOTSUPP', `vring ${index}: the parent cannot set base ${num}`);
        }
        vrings.setLastAvail(index, num);
        return;
      }
      case Ioctl.VHOST_GET_VRING_BASE:
        // vhost_vdpa_vring_ioctl asks the device (get_vq_state) before vhost answers, and
        // returns its error as it is.
        if (this.parent.config.lacksVqState) {
          throw new TransportError('EOPNOTSUPP', `vring ${index}: the parent cannot tell its state`);
        }
        argBuffer(arg, VRING_STATE_SIZE).writeUInt32LE(vrings.lastAvail(index), 4);
        return;
      case Ioctl.VHOST_SET_VRING_KICK:
      case Ioctl.VHOST_SET_VRING_CALL: {
        const { fd } = decodeVringFile(argBuffer(arg, VRING_FILE_SIZE));
        if (fd !== VHOST_FILE_UNBIND) checkEventfd(fd);
        const which = request === Ioctl.VHOST_SET_VRING_KICK ? 'kickFd' : 'callFd';
        vrings.setEventfd(index, which, fd === VHOST_FILE_UNBIND ? null : fd, status);
        return;
      }
      case Ioctl.VHOST_VDPA_SET_VRING_ENABLE: {
        const { num } = decodeVringState(argBuffer(arg, VRING_STATE_SIZE));
        vrings.setReady(index, num !== 0, status);
        return;
      }
    }
  }

  /**
   * VHOST_SET_BACKEND_FEATURES in vhost_vdpa_unlocked_ioctl's order: bits it does not know, then
   * SUSPEND / RESUME the parent cannot do (EOPNOTSUPP), DESC_ASID without IOTLB_ASID (EINVAL), then
   * DESC_ASID / IOTLB_PERSIST the parent lacks (EOPNOTSUPP). ENABLE_AFTER_DRIVER_OK is taken even
   * when not offered. MSG_V2, BATCH and ASID not offered count as unknown: an older kernel.
   */
  private setBackendFeatures(features: bigint): void {
    const offered = this.parent.config.offeredFeatures;
    const lacks = (name: BackendFeatureName) =>
      hasBackendFeature(features, name) && !hasBackendFeature(offered, name);
    const hex = `0x${features.toString(16)}`;
    if (
      (features & ~KNOWN_BACKEND_FEATURES) !== 0n ||
      lacks('IOTLB_MSG_V2') ||
      lacks('IOTLB_BATCH') ||
      lacks('IOTLB_ASID')
    ) {
      throw new TransportError(
        'EOPNOTSUPP',
        `backend features ${hex} include bits this kernel does not know`,
      );
    }
    if (lacks('SUSPEND') || lacks('RESUME')) {
      throw new TransportError('EOPNOTSUPP', `backend features ${hex}: the parent cannot suspend or resume`);
    }
    if (hasBackendFeature(features, 'DESC_ASID') && !hasBackendFeature(features, 'IOTLB_ASID')) {
      throw new TransportError('EINVAL', 'DESC_ASID needs IOTLB_ASID');
    }
    if (lacks('DESC_ASID') || lacks('IOTLB_PERSIST')) {
      throw new TransportError(
        'EOPNOTSUPP',
        `backend features ${hex}: the parent lacks DESC_ASID or IOTLB_PERSIST`,
      );
    }
    this.features = features;
    this.asidHonoured = hasBackendFeature(features, 'IOTLB_ASID');
  }

  private has(name: BackendFeatureName): boolean {
    return hasBackendFeature(this.features, name);
  }

  private checkOpen(): void {
    if (this.closed) throw new TransportError('EBADF', 'the vhost-vdpa file is closed');
  }
}

/** eventfd_fget / eventfd_ctx_fdget: EBADF for a closed fd, EINVAL for one that is no eventfd. */
function checkEventfd(fd: number): void {
  let target: string;
  try {
    target = fs.readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    throw new TransportError('EBADF', `fd ${fd} is not open`);
  }
  if (target !== 'anon_inode:[eventfd]')
    throw new TransportError('EINVAL', `fd ${fd} is not an eventfd (${target})`);
}

function argBuffer(arg: Uint8Array | undefined, size: number): Buffer {
  // copy_to_user / copy_from_user of a missing or short argument fails.
  if (!arg || arg.byteLength < size)
    throw new TransportError('EFAULT', `ioctl argument must be ${size} bytes`);
  return Buffer.from(arg.buffer, arg.byteOffset, arg.byteLength);
}

function putU64(arg: Uint8Array | undefined, value: bigint): void {
  argBuffer(arg, 8).writeBigUInt64LE(value, 0);
}

function getU64(arg: Uint8Array | undefined): bigint {
  return argBuffer(arg, 8).readBigUInt64LE(0);
}

function putU32(arg: Uint8Array | undefined, value: number): void {
  argBuffer(arg, 4).writeUInt32LE(value, 0);
}

function putU8(arg: Uint8Array | undefined, value: number): void {
  argBuffer(arg, 1).writeUInt8(value, 0);
}

function getU8(arg: Uint8Array | undefined): number {
  return argBuffer(arg, 1).readUInt8(0);
}
