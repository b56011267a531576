/**
 * The API server's client of the agent: typed calls over the agent's unix socket (bigints in,
 * bigints out), a deadline on every call, and notice of the connection going away.
 *
 * The calls travel in frames (frames.ts) on one connection (frame-client.ts). It keeps no loop of
 * its own: connect() waits (up to its deadline) for the agent, trying the socket with the reconnect
 * backoff, and whoever owns the client decides when to try again (the core: service/agent-link.ts).
 * After connect(), the `disconnected` event says once that the connection was lost; the next
 * connect() watches it again. Calls made while disconnected fail fast with UNAVAILABLE (they do not
 * wait for the agent). Which agent answered is in every answer's boot id; the client does not
 * compare them (the caller knows which agent its state was reconciled with).
 */
import { EventEmitter } from 'node:events';
import { status } from '@grpc/grpc-js';
import type { DeviceFacts } from '../device/types.ts';
import type { IotlbOp, Mapping } from '../iotlb/types.ts';
import type { MemoryInfo } from '../memory/types.ts';
import type { ApplyAnswer, ApplyRequest, ListMappedAnswer } from './mapping-codec.ts';
import { AgentError, callFailed } from './errors.ts';
import { FrameClient, type ReconnectOptions } from './frame-client.ts';
import { agentService } from './proto.ts';
import { decodeMessage, encodeMessage } from './sliced-codec.ts';
import {
  type AgentInfo,
  type AttachmentEvent,
  type AttachmentInfo,
  type AttachRequest,
  answerToWire,
  attachmentEventFromWire,
  attachmentFromWire,
  type MemoryTableAnswer,
  type WireAttachment,
  type WireAttachmentEvent,
  type DeviceDescription,
  descriptionFromWire,
  factsFromWire,
  memoryFromWire,
  type RegisterMemoryRequest,
  registerToWire,
  u64ToWire,
  type WireAgentInfo,
  type WireDeviceDescription,
  type WireDeviceFacts,
  type WireMemoryInfo,
} from './wire.ts';

export type { ReconnectOptions } from './frame-client.ts';

export interface AgentClientOptions {
  /** Path of the agent's unix socket. */
  socketPath: string;
  /** Deadline of every call unless given per call, ms (default 10 s). */
  deadlineMs?: number;
  /** Deadline of Apply, which may pin gigabytes (default 120 s). */
  applyDeadlineMs?: number;
  reconnect?: ReconnectOptions;
}

export interface CallOptions {
  deadlineMs?: number;
}

/** One result per op, in order, and the boot id of the agent that applied them. */
export type ApplyResult = ApplyAnswer;

export interface MappedSnapshot {
  mappings: Mapping[];
  bootId: string;
}

export interface AgentClientEvents {
  disconnected: [error: AgentError];
}

type Phase = 'idle' | 'ready' | 'closed';

export class AgentClient extends EventEmitter<AgentClientEvents> {
  private readonly transport: FrameClient;
  private readonly deadlineMs: number;
  private readonly applyDeadlineMs: number;
  private phase: Phase = 'idle';

  constructor(opts: AgentClientOptions) {
    super();
    this.deadlineMs = opts.deadlineMs ?? 10_000;
    this.applyDeadlineMs = opts.applyDeadlineMs ?? 120_000;
    this.transport = new FrameClient(opts.socketPath, opts.reconnect);
    this.transport.on('lost', (error) => {
      if (this.phase === 'ready') this.lost(error);
    });
  }

  /** Whether the connection is up (after connect(), until a loss). */
  get connected(): boolean {
    return this.phase === 'ready';
  }

  /** Waits (up to the deadline) for the agent to answer, then watches the connection. */
  async connect(opts?: CallOptions): Promise<AgentInfo> {
    this.assertOpen();
    const info = await this.fetchInfo(opts, true);
    this.assertOpen();
    if (!this.transport.connected)
      this.lost(callFailed(status.UNAVAILABLE, 'lost the connection to the agent'));
    else this.phase = 'ready';
    return info;
  }

  getInfo(opts?: CallOptions): Promise<AgentInfo> {
    return this.fetchInfo(opts, false);
  }

  async listDevices(opts?: CallOptions): Promise<DeviceFacts[]> {
    const res = await this.call<{ devices: WireDeviceFacts[] }>('ListDevices', {}, opts);
    return res.devices.map((d, i) => factsFromWire(d, `devices[${i}]`));
  }

  async describeDevice(device: string, opts?: CallOptions): Promise<DeviceDescription> {
    return descriptionFromWire(await this.call<WireDeviceDescription>('DescribeDevice', { device }, opts));
  }

  /** Coded straight between bytes and the library's types, in slices (mapping-codec.ts). */
  apply(device: string, ops: readonly IotlbOp[], opts?: CallOptions): Promise<ApplyResult> {
    const req: ApplyRequest = { device, ops };
    return this.call<ApplyAnswer>('Apply', req, { deadlineMs: opts?.deadlineMs ?? this.applyDeadlineMs });
  }

  /** Its answer coded straight to the library's types, in slices (mapping-codec.ts). */
  listMapped(device: string, opts?: CallOptions): Promise<MappedSnapshot> {
    return this.call<ListMappedAnswer>('ListMapped', { device }, opts);
  }

  async registerMemory(req: RegisterMemoryRequest, opts?: CallOptions): Promise<MemoryInfo> {
    return memoryFromWire(await this.call<WireMemoryInfo>('RegisterMemory', registerToWire(req), opts));
  }

  async releaseMemory(id: string, opts?: CallOptions): Promise<void> {
    await this.call('ReleaseMemory', { id }, opts);
  }

  async listMemory(opts?: CallOptions): Promise<MemoryInfo[]> {
    const res = await this.call<{ memory: WireMemoryInfo[] }>('ListMemory', {}, opts);
    return res.memory.map((m, i) => memoryFromWire(m, `memory[${i}]`));
  }

  /** Simulated devices only: reads `length` bytes at `iova` through the device's IOTLB. */
  async dmaRead(
    device: string,
    asid: number,
    iova: bigint,
    length: number,
    opts?: CallOptions,
  ): Promise<Buffer> {
    const req = { device, asid, iova: u64ToWire(iova, 'iova'), length };
    return (await this.call<{ data: Buffer }>('DmaRead', req, opts)).data;
  }

  /** Simulated devices only: writes `data` at `iova` through the device's IOTLB. */
  async dmaWrite(
    device: string,
    asid: number,
    iova: bigint,
    data: Uint8Array,
    opts?: CallOptions,
  ): Promise<void> {
    await this.call('DmaWrite', { device, asid, iova: u64ToWire(iova, 'iova'), data }, opts);
  }

  suspend(device: string, opts?: CallOptions): Promise<DeviceFacts> {
    return this.deviceStep('Suspend', device, opts);
  }

  resume(device: string, opts?: CallOptions): Promise<DeviceFacts> {
    return this.deviceStep('Resume', device, opts);
  }

  reset(device: string, opts?: CallOptions): Promise<DeviceFacts> {
    return this.deviceStep('Reset', device, opts);
  }

  /** Closes the connection; pending calls fail, no more events. */
  close(): void {
    this.phase = 'closed';
    this.transport.close();
  }

  private async deviceStep(method: string, device: string, opts?: CallOptions): Promise<DeviceFacts> {
    return factsFromWire(await this.call<WireDeviceFacts>(method, { device }, opts));
  }

  private async fetchInfo(opts: CallOptions | undefined, waitForReady: boolean): Promise<AgentInfo> {
    const info = await this.call<WireAgentInfo>('GetInfo', {}, opts, waitForReady);
    return { bootId: info.bootId, version: info.version, pid: info.pid };
  }

  private async call<Res>(name: string, req: object, opts?: CallOptions, waitForReady = false): Promise<Res> {
    const method = this.method(name);
    const deadline = Date.now() + (opts?.deadlineMs ?? this.deadlineMs);
    const payload = await encodeMessage(method, 'request', req);
    const answer = await this.transport.call(name, payload, { deadline, waitForReady });
    try {
      return (await decodeMessage(method, 'response', answer)) as Res;
    } catch (e) {
      throw callFailed(
        status.INTERNAL,
        `${name}: the agent's answer could not be decoded: ${(e as Error).message}`,
      );
    }
  }

  private method(name: string) {
    const method = agentService[name];
    if (method === undefined) throw new Error(`the agent protocol has no method ${name}`);
    return method;
  }

  private lost(error: AgentError): void {
    this.phase = 'idle';
    this.emit('disconnected', error);
  }

  private assertOpen(): void {
    if (this.phase === 'closed') throw callFailed(status.CANCELLED, 'the agent client is closed');
  }

  // ---- attachments (a VMM over vhost-user) ----

  async attach(req: AttachRequest, opts?: CallOptions): Promise<AttachmentInfo> {
    return attachmentFromWire(await this.call<WireAttachment>('Attach', req, opts));
  }

  async detach(device: string, opts?: CallOptions): Promise<void> {
    await this.call('Detach', { device }, opts);
  }

  /**
   * Subscribes to the attached VMMs' events (no deadline: it lasts until cancelled). `ended` is
   * called once, with the error when the stream failed (undefined when cancelled or the agent stopped).
   */
  watchAttachments(
    onEvent: (e: AttachmentEvent) => void,
    ended: (error: AgentError | undefined) => void,
  ): { cancel(): void } {
    const method = this.method('WatchAttachments');
    const deadline = Date.now() + this.deadlineMs; // for reaching the agent only
    let done = false;
    const finish = (error: AgentError | undefined) => {
      if (done) return;
      done = true;
      ended(error);
    };
    const stream = this.transport.stream(
      method.name,
      method.requestSerialize({}),
      { deadline },
      (payload) => {
        try {
          onEvent(attachmentEventFromWire(method.responseDeserialize(payload) as WireAttachmentEvent));
        } catch (e) {
          finish(e instanceof AgentError ? e : new AgentError(status.INTERNAL, 'INTERNAL', String(e)));
          stream.cancel();
        }
      },
      finish,
    );
    return stream;
  }

  async answerMemoryTable(answer: MemoryTableAnswer, opts?: CallOptions): Promise<void> {
    await this.call('AnswerMemoryTable', answerToWire(answer), opts);
  }
}
