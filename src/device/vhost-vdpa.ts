/**
 * The backend both device kinds share: given an open vhost-vdpa transport it becomes the owner,
 * negotiates backend features, reads the device's facts, and applies IOTLB ops as 72-byte
 * messages, each checked first by the guard. Only the transport differs between a kernel device
 * (a real fd) and a simulated one (sim-kernel.ts).
 */
import { FULL_IOVA_RANGE, type IotlbOp, type IovaRange, type Mapping } from '../iotlb/types.ts';
import { U64_LIMIT, U64_MAX } from '../u64.ts';
import type { MemoryRegistry } from '../memory/types.ts';
import {
  type BackendFeatureName,
  backendFeatureMask,
  hasBackendFeature,
  IotlbMsgType,
  VHOST_ACCESS_RO,
  VHOST_ACCESS_RW,
  VHOST_ACCESS_WO,
} from '../uapi/constants.ts';
import { bulkTurn } from '../sys/next-turn.ts';
import { Ioctl } from '../uapi/ioctl.ts';
import { systemPageSize } from '../sys/libc.ts';
import { encodeMsgV1, encodeMsgV2, type IotlbMsg } from '../uapi/message.ts';
import { DeviceError } from './errors.ts';
import { IotlbGuard, type OpFailure } from './guard.ts';
import { type PinnedMemory, processPinnedMemory } from './memlock.ts';
import {
  ioctlReadIovaRange,
  ioctlReadU8,
  ioctlReadU32,
  ioctlReadU64,
  ioctlWriteU8,
  ioctlWriteU64,
  isErrno,
  TransportError,
  type VhostTransport,
} from './transport.ts';
import type {
  Device,
  DeviceCounters,
  DeviceFacts,
  DeviceKind,
  DeviceLogger,
  IommuKind,
  OpResult,
} from './types.ts';
import { pinPageSize } from './types.ts';
import { ZERO_COUNTERS } from './counters.ts';
import { VdpaVrings } from './vrings.ts';

/** The backend features vdpa-mapd understands; it negotiates those the device offers. */
export const UNDERSTOOD_BACKEND_FEATURES: bigint = backendFeatureMask(
  'IOTLB_MSG_V2',
  'IOTLB_BATCH',
  'IOTLB_ASID',
  'SUSPEND',
  'RESUME',
  'IOTLB_PERSIST',
);

const OK: OpResult = { ok: true };
/**
 * Ops applied between two turns of the event loop. Every device shares the agent's one event loop,
 * so a long apply gives it back this often: another device's apply (and every RPC) waits at most
 * one slice, not the whole table. The open batch and this device's order are unaffected: the
 * device's calls are serialized, and the batch is state of this fd alone. 64 ops of a PA-mode
 * simulated parent take about 0.15 ms: with 256 per slice a one-op Apply to another device took
 * 2-3x its idle median while a 65,536-op Apply ran, with 64 about its idle median; the turns given
 * back cost no measurable throughput (bench device-apply, agent-transport). Time slices
 * (TimeSlices) of 1 ms and of 0.25 ms were both worse than 64 ops.
 */
const OPS_PER_SLICE = 64;

const PERM_BITS = { ro: VHOST_ACCESS_RO, wo: VHOST_ACCESS_WO, rw: VHOST_ACCESS_RW } as const;

export interface VhostVdpaDeviceInit {
  name: string;
  kind: DeviceKind;
  node: string | null;
  iommu: IommuKind;
  pinned: boolean;
  /** See {@link VhostVdpaDevice.parentKeepsMapOnReset}; default false. */
  parentKeepsMapOnReset?: boolean;
  /** An open transport; the device owns it from here on (and closes it if setup fails). */
  transport: VhostTransport;
  memory: MemoryRegistry;
  logger?: DeviceLogger;
  /** Where a pinning device charges its pages; default the agent process's own account. */
  pins?: PinnedMemory;
  /** The kernel's PAGE_SIZE; default this machine's. */
  pageSize?: bigint;
}

export class VhostVdpaDevice implements Device {
  readonly name: string;
  private readonly transport: VhostTransport;
  private readonly logger: DeviceLogger | undefined;
  private readonly info: DeviceFacts;
  private readonly guard: IotlbGuard;
  private readonly stats = { messagesWritten: 0, batches: 0 };
  private closed = false;
  /** Calls run one at a time, in order (a batch must not interleave with another). */
  private tail: Promise<unknown> = Promise.resolve();

  /** The device's features, vrings, config and status (vrings.ts). */
  readonly vrings: VdpaVrings;
  /**
   * The parent keeps its mappings at a virtio reset even without IOTLB_PERSIST, as VDUSE does
   * (vduse_vdpa_reset ignores VDPA_RESET_F_CLEAN_MAP: docs/kernel-notes.md R7). Known from where
   * the device sits (discovery.ts: under /sys/devices/virtual/vduse), never from its name. Not one
   * of the reported facts: only the agent's vring relay needs it.
   */
  readonly parentKeepsMapOnReset: boolean;
  private readonly registry: MemoryRegistry;
  /** IOTLB_MSG_V2 and IOTLB_BATCH were negotiated (read once: every message asks). */
  private readonly msgV2: boolean;
  private readonly batching: boolean;

  constructor(init: VhostVdpaDeviceInit) {
    this.name = init.name;
    this.transport = init.transport;
    this.logger = init.logger;
    this.parentKeepsMapOnReset = init.parentKeepsMapOnReset ?? false;
    this.registry = init.memory;
    this.vrings = new VdpaVrings(init.transport, (what, fn) => {
      this.assertOpen();
      try {
        return fn();
      } catch (e) {
        throw toDeviceError(e, `${this.name}: ${what}`);
      }
    });
    try {
      this.info = this.setUp(init);
    } catch (e) {
      init.transport.close();
      throw toDeviceError(e, `${init.name}: setting up the device`);
    }
    this.msgV2 = this.has('IOTLB_MSG_V2');
    this.batching = this.has('IOTLB_BATCH');
    this.guard = new IotlbGuard(
      this.info.asNum,
      this.info.iovaRange,
      this.info.negotiatedFeatures,
      init.memory,
      init.pinned ? (init.pins ?? processPinnedMemory()) : undefined,
      pinPageSize(this.info),
    );
  }

  facts(): DeviceFacts {
    return { ...this.info, iovaRange: { ...this.info.iovaRange } };
  }

  counters(): DeviceCounters {
    return { ...ZERO_COUNTERS, ...this.stats };
  }

  mappings(): Mapping[] {
    return this.guard.mappings();
  }

  /**
   * `length` bytes at `iova` of address space `asid` as the owner sees them: read from the memory
   * the owner mapped there (its own mmap of it, not a DMA). They must lie in one mapping.
   */
  readMapped(asid: number, iova: bigint, length: number): Buffer {
    const end = iova + BigInt(length);
    const m = this.guard
      .mappings()
      .find((x) => x.asid === this.guard.effectiveAsid(asid) && x.iova <= iova && end <= x.iova + x.size);
    if (m === undefined) {
      throw new DeviceError(
        'KERNEL',
        `${this.name}: [0x${iova.toString(16)}, +${length}) of asid ${asid} lies in no one mapping`,
        { errno: 'EFAULT' },
      );
    }
    return this.registry.read(m.memory, m.offset + (iova - m.iova), length);
  }

  /**
   * Ops on different address spaces are independent, so they are grouped by (effective) asid,
   * each group keeping its order: the kernel refuses any message whose asid differs from the open
   * batch's (vhost_vdpa_process_iotlb_msg), so each group gets its own BATCH_BEGIN/BATCH_END, sent
   * lazily before its first write (none when the guard refuses every op of the group).
   */
  apply(ops: readonly IotlbOp[]): Promise<OpResult[]> {
    return this.serialize(() => this.applyNow(ops));
  }

  suspend(): Promise<void> {
    return this.serialize(async () => this.lifecycleIoctl('SUSPEND', Ioctl.VHOST_VDPA_SUSPEND));
  }

  resume(): Promise<void> {
    return this.serialize(async () => this.lifecycleIoctl('RESUME', Ioctl.VHOST_VDPA_RESUME));
  }

  /**
   * Virtio reset: VHOST_VDPA_SET_STATUS 0. Without IOTLB_PERSIST the parent drops its mappings
   * while the kernel's tables keep them (a later UPDATE of the same range would get EEXIST), so
   * every entry is then invalidated: afterwards the kernel, the device and mappings() agree that
   * nothing is mapped. With IOTLB_PERSIST everything stays.
   */
  reset(): Promise<void> {
    return this.serialize(async () => {
      this.assertOpen();
      try {
        ioctlWriteU8(this.transport, Ioctl.VHOST_VDPA_SET_STATUS, 0);
        this.info.status = this.optional(
          () => ioctlReadU8(this.transport, Ioctl.VHOST_VDPA_GET_STATUS),
          0,
          'GET_STATUS',
        );
      } catch (e) {
        throw toDeviceError(e, `${this.name}: reset`);
      }
      if (this.has('IOTLB_PERSIST')) return;
      const results = await this.applyNow(this.invalidateEverything());
      const failed = results.find((r): r is OpFailure => !r.ok);
      if (failed) {
        const message = `${this.name}: dropping the mappings after reset failed: ${failed.message}`;
        throw new DeviceError('KERNEL', message, { errno: failed.errno });
      }
    });
  }

  /** Closing the fd makes the kernel drop (and unpin) every mapping in every address space. */
  close(): Promise<void> {
    return this.serialize(async () => {
      if (this.closed) return;
      this.closed = true;
      try {
        this.transport.close();
      } finally {
        this.guard.clear();
      }
    });
  }

  /** SET_OWNER, backend feature negotiation, then the facts (older kernels lack some ioctls). */
  private setUp(init: VhostVdpaDeviceInit): DeviceFacts {
    const t = init.transport;
    t.ioctl(Ioctl.VHOST_SET_OWNER);
    const offered = this.optional<bigint | undefined>(
      () => ioctlReadU64(t, Ioctl.VHOST_GET_BACKEND_FEATURES),
      undefined,
      'GET_BACKEND_FEATURES',
    );
    // Only bits both sides know: VHOST_SET_BACKEND_FEATURES refuses any other with EOPNOTSUPP.
    const negotiated = (offered ?? 0n) & UNDERSTOOD_BACKEND_FEATURES;
    if (offered !== undefined) ioctlWriteU64(t, Ioctl.VHOST_SET_BACKEND_FEATURES, negotiated);
    const deviceId = this.optional(() => ioctlReadU32(t, Ioctl.VHOST_VDPA_GET_DEVICE_ID), 0, 'GET_DEVICE_ID');
    const range = this.optional(
      () => ioctlReadIovaRange(t, Ioctl.VHOST_VDPA_GET_IOVA_RANGE),
      FULL_IOVA_RANGE,
      'GET_IOVA_RANGE',
    );
    checkRange(range);
    const asNum = this.optional(() => ioctlReadU32(t, Ioctl.VHOST_VDPA_GET_AS_NUM), 1, 'GET_AS_NUM');
    const groupNum = this.optional(() => ioctlReadU32(t, Ioctl.VHOST_VDPA_GET_GROUP_NUM), 1, 'GET_GROUP_NUM');
    const vqCount = this.optional(() => ioctlReadU32(t, Ioctl.VHOST_VDPA_GET_VQS_COUNT), 0, 'GET_VQS_COUNT');
    const configSize = this.optional(
      () => ioctlReadU32(t, Ioctl.VHOST_VDPA_GET_CONFIG_SIZE),
      0,
      'GET_CONFIG_SIZE',
    );
    const status = this.optional(() => ioctlReadU8(t, Ioctl.VHOST_VDPA_GET_STATUS), 0, 'GET_STATUS');
    return {
      name: init.name,
      kind: init.kind,
      node: init.node,
      deviceId,
      offeredFeatures: offered ?? 0n,
      negotiatedFeatures: negotiated,
      iovaRange: { ...range },
      asNum: Math.max(1, asNum),
      groupNum,
      vqCount,
      configSize,
      status,
      iommu: init.iommu,
      pinned: init.pinned,
      pageSize: init.pageSize ?? systemPageSize(),
    };
  }

  /** An ioctl an older kernel may lack (ENOTTY / EOPNOTSUPP): its default instead. */
  private optional<T>(read: () => T, fallback: T, what: string): T {
    try {
      return read();
    } catch (e) {
      if (!isErrno(e, 'ENOTTY', 'EOPNOTSUPP')) throw e;
      this.logger?.info(
        { device: this.name, ioctl: what, errno: e.errno },
        'ioctl not supported: using default',
      );
      return fallback;
    }
  }

  private async applyNow(ops: readonly IotlbOp[]): Promise<OpResult[]> {
    this.assertOpen();
    const results: OpResult[] = new Array(ops.length);
    const groups = new Map<number, number[]>();
    ops.forEach((op, i) => {
      const asid = this.guard.effectiveAsid(op.asid);
      const group = groups.get(asid);
      if (group) group.push(i);
      else groups.set(asid, [i]);
    });
    let sliced = 0;
    const began = performance.now();
    for (const [asid, indexes] of groups) {
      let batchOpen = false;
      try {
        for (const i of indexes) {
          if (sliced > 0 && sliced % OPS_PER_SLICE === 0) await bulkTurn(began);
          sliced++;
          const op = ops[i]!;
          const decision = this.guard.admit(op);
          if (decision.action !== 'write') {
            results[i] = decision.action === 'refuse' ? decision.result : OK;
            continue;
          }
          if (!batchOpen && this.batching) {
            batchOpen = await this.batchMessage(IotlbMsgType.BATCH_BEGIN, asid);
          }
          // A write the transport finished at once (the simulator's) costs no turn of the microtask queue.
          const result = this.writeOp(op, decision.asid, decision.uaddr);
          results[i] = result instanceof Promise ? await result : result;
        }
      } finally {
        if (batchOpen) await this.batchMessage(IotlbMsgType.BATCH_END, asid);
      }
    }
    return results;
  }

  private writeOp(op: IotlbOp, asid: number, uaddr: bigint): OpResult | Promise<OpResult> {
    const iotlb: IotlbMsg =
      op.type === 'update'
        ? { type: IotlbMsgType.UPDATE, iova: op.iova, size: op.size, uaddr, perm: PERM_BITS[op.perm] }
        : { type: IotlbMsgType.INVALIDATE, iova: op.iova, size: op.size, uaddr: 0n, perm: 0 };
    // An UPDATE allocates its address space before anything else can fail (vhost_vdpa_find_alloc_as).
    if (op.type === 'update') this.guard.noteAllocated(asid);
    let sent: void | Promise<void>;
    try {
      sent = this.send(iotlb, asid);
    } catch (e) {
      return this.refusedWrite(op, e);
    }
    if (sent instanceof Promise) {
      return sent.then(
        () => this.wrote(op, asid),
        (e: unknown) => this.refusedWrite(op, e),
      );
    }
    return this.wrote(op, asid);
  }

  private wrote(op: IotlbOp, asid: number): OpResult {
    this.guard.commit(op, asid);
    return OK;
  }

  private refusedWrite(op: IotlbOp, e: unknown): OpResult {
    this.guard.abort(op);
    if (!(e instanceof TransportError)) throw e;
    return {
      ok: false,
      errno: e.errno,
      code: e.code,
      message: `the kernel refused the ${op.type === 'update' ? 'UPDATE' : 'INVALIDATE'} after vdpa-mapd's checks passed: ${e.message}`,
    };
  }

  /** BATCH_BEGIN / BATCH_END. A refusal only costs the batching, so it is logged, not returned. */
  private async batchMessage(
    type: typeof IotlbMsgType.BATCH_BEGIN | typeof IotlbMsgType.BATCH_END,
    asid: number,
  ) {
    try {
      await this.send({ type, iova: 0n, size: 0n, uaddr: 0n, perm: 0 }, asid);
    } catch (e) {
      if (!(e instanceof TransportError)) throw e;
      this.logger?.warn({ device: this.name, asid, errno: e.errno, err: e.message }, 'batch message refused');
      return false;
    }
    if (type === IotlbMsgType.BATCH_BEGIN) {
      this.stats.batches++;
      this.guard.noteAllocated(asid);
    }
    return true;
  }

  /**
   * One message, one write(): v2 (with the asid) once IOTLB_MSG_V2 is negotiated, else v1. A
   * transport that takes the fields (the simulator) gets them instead of bytes it would decode.
   */
  private send(iotlb: IotlbMsg, asid: number): void | Promise<void> {
    this.stats.messagesWritten++;
    const v2 = this.msgV2;
    const t = this.transport;
    if (t.writeFields !== undefined) return t.writeFields(v2 ? 2 : 1, v2 ? asid : 0, iotlb);
    return t.write(v2 ? encodeMsgV2(asid, iotlb) : encodeMsgV1(iotlb));
  }

  /**
   * INVALIDATEs that empty every address space, each covering whole mappings (a pinning device
   * takes no other): [0, the start of the mapping holding the last byte), then that mapping. No
   * single INVALIDATE names all 2^64 bytes, but iova 0 size 0, which older kernels lack.
   */
  private invalidateEverything(): IotlbOp[] {
    const ops: IotlbOp[] = [];
    const mappings = this.guard.mappings();
    for (const asid of new Set(mappings.map((m) => m.asid))) {
      const top = mappings.find((m) => m.asid === asid && m.iova + m.size === U64_LIMIT);
      const below = top ? top.iova : U64_MAX;
      if (below > 0n) ops.push({ type: 'invalidate', asid, iova: 0n, size: below });
      if (top) ops.push({ type: 'invalidate', asid, iova: top.iova, size: top.size });
    }
    return ops;
  }

  private lifecycleIoctl(feature: 'SUSPEND' | 'RESUME', request: number): void {
    this.assertOpen();
    if (!this.has(feature)) {
      throw new DeviceError('UNSUPPORTED', `${this.name}: the device does not offer ${feature}`, {
        errno: 'EOPNOTSUPP',
      });
    }
    try {
      this.transport.ioctl(request);
    } catch (e) {
      throw toDeviceError(e, `${this.name}: ${feature}`);
    }
  }

  private has(name: BackendFeatureName): boolean {
    return hasBackendFeature(this.info.negotiatedFeatures, name);
  }

  private assertOpen(): void {
    if (this.closed) throw new DeviceError('CLOSED', `${this.name} is closed`);
  }

  private serialize<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(fn, fn);
    this.tail = run.catch(() => undefined);
    return run;
  }
}

function checkRange(range: IovaRange): void {
  if (range.first > range.last) {
    throw new DeviceError(
      'KERNEL',
      `the device reports an empty IOVA range [0x${range.first.toString(16)}, 0x${range.last.toString(16)}]`,
    );
  }
}

/** A transport refusal as a DeviceError; anything else passes through unchanged. */
export function toDeviceError(e: unknown, context: string): unknown {
  if (!(e instanceof TransportError)) return e;
  switch (e.errno) {
    case 'EBUSY':
      return new DeviceError('BUSY', `${context}: the device is in use by another process (EBUSY)`, {
        errno: e.errno,
      });
    case 'EACCES':
    case 'EPERM':
      return new DeviceError('PERMISSION_DENIED', `${context}: permission denied (${e.errno})`, {
        errno: e.errno,
      });
    case 'ENOENT':
    case 'ENXIO':
    case 'ENODEV':
      return new DeviceError('NOT_FOUND', `${context}: no such device (${e.errno})`, { errno: e.errno });
    case 'EOPNOTSUPP':
      return new DeviceError('UNSUPPORTED', `${context}: not supported (EOPNOTSUPP)`, { errno: e.errno });
    default:
      return new DeviceError('KERNEL', `${context}: ${e.message}`, { errno: e.errno });
  }
}
