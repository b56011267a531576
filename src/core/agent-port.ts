/**
 * What the core needs of the agent: a narrow view of AgentClient (src/agent/client.ts), which
 * satisfies it as is; tests give an in-process port over the agent's real handlers.
 */
import type { ApplyResult, MappedSnapshot } from '../agent/client.ts';
import type { AgentError } from '../agent/errors.ts';
import type {
  AgentInfo,
  AttachmentEvent,
  AttachmentInfo,
  AttachRequest,
  DeviceDescription,
  MemoryTableAnswer,
  RegisterMemoryRequest,
} from '../agent/wire.ts';
import type { DeviceFacts } from '../device/types.ts';
import type { IotlbOp } from '../iotlb/types.ts';
import type { MemoryInfo } from '../memory/types.ts';
import type { Metrics } from '../metrics/metrics.ts';

export interface AgentPortEvents {
  /** The connection that connect() established was lost (said once; connect() again to retry). */
  disconnected: [error: AgentError];
}

/**
 * Which agent answered is in the answers that matter (connect, apply, listMapped: `bootId`); a boot
 * id other than the one a device was reconciled with means the agent restarted and the device lost
 * every mapping. The port neither compares them nor reconnects on its own.
 */
export interface AgentPort {
  /** Waits (up to a deadline) for the agent and watches the connection from then on. */
  connect(): Promise<AgentInfo>;
  listDevices(): Promise<DeviceFacts[]>;
  describeDevice(device: string): Promise<DeviceDescription>;
  apply(device: string, ops: readonly IotlbOp[]): Promise<ApplyResult>;
  listMapped(device: string): Promise<MappedSnapshot>;
  registerMemory(req: RegisterMemoryRequest): Promise<MemoryInfo>;
  releaseMemory(id: string): Promise<void>;
  listMemory(): Promise<MemoryInfo[]>;
  /** Serves a vhost-user socket for the device (agent/attach.ts). */
  attach(req: AttachRequest): Promise<AttachmentInfo>;
  detach(device: string): Promise<void>;
  /** The attached VMMs' events, from `watching` on; `ended` once (with the error if it failed). */
  watchAttachments(
    onEvent: (e: AttachmentEvent) => void,
    ended: (error: AgentError | undefined) => void,
  ): { cancel(): void };
  answerMemoryTable(answer: MemoryTableAnswer): Promise<void>;
  on<K extends keyof AgentPortEvents>(event: K, listener: (...args: AgentPortEvents[K]) => void): unknown;
  off<K extends keyof AgentPortEvents>(event: K, listener: (...args: AgentPortEvents[K]) => void): unknown;
}

function timed<T>(metrics: Metrics, method: string, call: () => Promise<T>): Promise<T> {
  const stop = metrics.agentRoundTrip.startTimer({ method });
  return call().then(
    (value) => {
      stop({ result: 'ok' });
      return value;
    },
    (err: unknown) => {
      stop({ result: 'error' });
      throw err;
    },
  );
}

/** The same port with every call's round trip recorded in `vdpa_mapd_agent_roundtrip_seconds`. */
export function measuredPort(port: AgentPort, metrics: Metrics): AgentPort {
  return {
    connect: () => timed(metrics, 'GetInfo', () => port.connect()),
    listDevices: () => timed(metrics, 'ListDevices', () => port.listDevices()),
    describeDevice: (device) => timed(metrics, 'DescribeDevice', () => port.describeDevice(device)),
    apply: (device, ops) => timed(metrics, 'Apply', () => port.apply(device, ops)),
    listMapped: (device) => timed(metrics, 'ListMapped', () => port.listMapped(device)),
    registerMemory: (req) => timed(metrics, 'RegisterMemory', () => port.registerMemory(req)),
    releaseMemory: (id) => timed(metrics, 'ReleaseMemory', () => port.releaseMemory(id)),
    listMemory: () => timed(metrics, 'ListMemory', () => port.listMemory()),
    attach: (req) => timed(metrics, 'Attach', () => port.attach(req)),
    detach: (device) => timed(metrics, 'Detach', () => port.detach(device)),
    watchAttachments: (onEvent, ended) => port.watchAttachments(onEvent, ended),
    answerMemoryTable: (answer) => timed(metrics, 'AnswerMemoryTable', () => port.answerMemoryTable(answer)),
    on: (event, listener) => port.on(event, listener),
    off: (event, listener) => port.off(event, listener),
  };
}
