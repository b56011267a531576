/**
 * The agent protocol's handlers (transport-neutral: wire object in, wire object out, AgentError
 * thrown); frame-server.ts serves them on the socket. Devices serialize their own changes (apply,
 * suspend, resume, reset run one at a time, in call order), so the handlers add no locking.
 */
import { status } from '@grpc/grpc-js';
import type { ApplyAnswer, ApplyRequest, ListMappedAnswer } from '../../src/agent/mapping-codec.ts';
import type { Attachments } from '../../src/agent/attach.ts';
import { AgentError } from '../../src/agent/errors.ts';
import {
  answerFromWire,
  attachmentToWire,
  countersToWire,
  factsToWire,
  type AgentInfo,
  memoryToWire,
  registerFromWire,
  u64FromWire,
  type WireAgentInfo,
  type WireAttachment,
  type WireAttachRequest,
  type WireMemoryTableAnswer,
  type WireDeviceDescription,
  type WireDeviceFacts,
  type WireDeviceRequest,
  type WireDmaReadRequest,
  type WireDmaWriteRequest,
  type WireMemoryInfo,
  type WireRegisterMemoryRequest,
} from '../../src/agent/wire.ts';
import type { Device, DmaCapable } from '../../src/device/types.ts';
import type { MemoryRegistry } from '../../src/memory/types.ts';

/** Largest DmaRead answer (well under MAX_MESSAGE_BYTES). */
const MAX_DMA_BYTES = 16 << 20;

type Empty = Record<string, never>;

export interface AgentHandlers {
  GetInfo(req: Empty): Promise<WireAgentInfo>;
  ListDevices(req: Empty): Promise<{ devices: WireDeviceFacts[] }>;
  DescribeDevice(req: WireDeviceRequest): Promise<WireDeviceDescription>;
  /** Coded straight to and from the library's types (mapping-codec.ts). */
  Apply(req: ApplyRequest): Promise<ApplyAnswer>;
  /** Coded straight from the library's types (mapping-codec.ts). */
  ListMapped(req: WireDeviceRequest): Promise<ListMappedAnswer>;
  RegisterMemory(req: WireRegisterMemoryRequest): Promise<WireMemoryInfo>;
  ReleaseMemory(req: { id: string }): Promise<Empty>;
  ListMemory(req: Empty): Promise<{ memory: WireMemoryInfo[] }>;
  DmaRead(req: WireDmaReadRequest): Promise<{ data: Buffer }>;
  DmaWrite(req: WireDmaWriteRequest): Promise<Empty>;
  Suspend(req: WireDeviceRequest): Promise<WireDeviceFacts>;
  Resume(req: WireDeviceRequest): Promise<WireDeviceFacts>;
  Reset(req: WireDeviceRequest): Promise<WireDeviceFacts>;
  Attach(req: WireAttachRequest): Promise<WireAttachment>;
  Detach(req: WireDeviceRequest): Promise<Empty>;
  AnswerMemoryTable(req: WireMemoryTableAnswer): Promise<Empty>;
}

export interface AgentState {
  info: AgentInfo;
  devices: readonly Device[];
  registry: MemoryRegistry;
  /** Attached VMMs (vhost-user); without it, Attach and its kin are refused. */
  attachments?: Attachments;
}

function isDmaCapable(device: Device): device is Device & DmaCapable {
  const d = device as Partial<DmaCapable>;
  return typeof d.dmaRead === 'function' && typeof d.dmaWrite === 'function';
}

export function createHandlers(state: AgentState): AgentHandlers {
  const { info, registry } = state;
  const devices = new Map(state.devices.map((d) => [d.name, d]));

  function device(name: string): Device {
    const found = devices.get(name);
    if (found === undefined) {
      const known = [...devices.keys()].join(', ') || 'none';
      throw new AgentError(
        status.NOT_FOUND,
        'DEVICE_NOT_FOUND',
        `no device ${name} (known: ${known})`,
        'device',
      );
    }
    return found;
  }

  function dmaDevice(name: string): Device & DmaCapable {
    const found = device(name);
    if (!isDmaCapable(found)) {
      const why = `device ${name} is ${found.facts().kind}: DMA is only possible on simulated devices`;
      throw new AgentError(status.FAILED_PRECONDITION, 'NOT_SIMULATED', why, 'device');
    }
    return found;
  }

  function attachments(): Attachments {
    if (state.attachments === undefined) {
      throw new AgentError(status.UNIMPLEMENTED, 'UNSUPPORTED', 'this agent serves no vhost-user sockets');
    }
    return state.attachments;
  }

  function lifecycle(step: 'suspend' | 'resume' | 'reset') {
    return async (req: WireDeviceRequest) => {
      const found = device(req.device);
      await found[step]();
      return factsToWire(found.facts());
    };
  }

  return {
    GetInfo: async () => ({ ...info }),
    ListDevices: async () => ({ devices: state.devices.map((d) => factsToWire(d.facts())) }),
    async DescribeDevice(req) {
      const d = device(req.device);
      const attachment = state.attachments?.describe(d.name);
      return {
        facts: factsToWire(d.facts()),
        counters: countersToWire(d.counters()),
        ...(attachment === undefined ? {} : { attachment: attachmentToWire(attachment) }),
      };
    },
    async Apply(req) {
      const results = await device(req.device).apply(req.ops);
      // What the API server unmapped may have been the last use of a detached VMM's memory.
      state.attachments?.releaseUnused();
      return { results, bootId: info.bootId };
    },
    async ListMapped(req) {
      const d = device(req.device);
      return { mappings: d.mappings(), bootId: info.bootId };
    },
    async RegisterMemory(req) {
      const r = registerFromWire(req);
      return memoryToWire('path' in r ? registry.open(r) : registry.create(r));
    },
    async ReleaseMemory(req) {
      registry.release(req.id);
      return {};
    },
    ListMemory: async () => ({ memory: registry.list().map(memoryToWire) }),
    async DmaRead(req) {
      const d = dmaDevice(req.device);
      const iova = u64FromWire(req.iova, 'iova');
      if (req.length > MAX_DMA_BYTES) {
        throw new AgentError(
          status.INVALID_ARGUMENT,
          'BAD_REQUEST',
          `length ${req.length} is over the ${MAX_DMA_BYTES}-byte limit`,
          'length',
        );
      }
      return { data: d.dmaRead(req.asid, iova, req.length) };
    },
    async DmaWrite(req) {
      dmaDevice(req.device).dmaWrite(req.asid, u64FromWire(req.iova, 'iova'), req.data);
      return {};
    },
    Suspend: lifecycle('suspend'),
    Resume: lifecycle('resume'),
    Reset: lifecycle('reset'),
    async Attach(req) {
      const d = device(req.device);
      const group = req.group === undefined ? {} : { group: req.group };
      return attachmentToWire(await attachments().attach(d, { socketPath: req.socketPath, ...group }));
    },
    async Detach(req) {
      attachments().detach(device(req.device).name);
      return {};
    },
    async AnswerMemoryTable(req) {
      attachments().answer(answerFromWire(req));
      return {};
    },
  };
}
