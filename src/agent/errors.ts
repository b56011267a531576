/**
 * Errors of the agent protocol. The agent turns whatever a handler throws into an AgentError: a
 * gRPC status plus our own code (a MemoryErrorCode, DeviceErrorCode, DmaErrorCode,
 * IotlbViolationReason, or one of the agent codes below), the request field at fault, and the
 * errno name when there is one. They travel as a CallError (proto/vdpa/agent/v1) in an error
 * frame (frames.ts); the client rebuilds the same AgentError from it.
 */
import { status } from '@grpc/grpc-js';
import { DeviceError, type DeviceErrorCode, DmaError, type DmaErrorCode } from '../device/errors.ts';
import { TransportError } from '../device/transport.ts';
import { IotlbError } from '../iotlb/types.ts';
import { MemoryError, type MemoryErrorCode } from '../memory/types.ts';

/** Codes the agent itself raises, beside those of the library's errors. */
export type AgentErrorCode =
  | 'BAD_REQUEST' // a request field the agent cannot decode (not a u64, unknown enum, missing)
  | 'DEVICE_NOT_FOUND'
  | 'NOT_SIMULATED' // DMA asked of a device that cannot do it
  | 'KERNEL' // an OS call failed; `errno` names it
  | 'ALREADY_ATTACHED' // Attach of a device that already serves a vhost-user socket
  | 'NOT_ATTACHED' // Detach of a device that serves none
  | 'PATH_REFUSED' // a socket path outside the attach directory
  | 'PATH_IN_USE' // a socket path another process serves, or that is not a socket
  | 'UNKNOWN_GROUP'
  | 'REQUEST_NOT_FOUND' // an answer to a memory-table request that is not pending
  | 'INTERNAL';

export class AgentError extends Error {
  constructor(
    /** gRPC status code. */
    readonly status: status,
    /** AgentErrorCode, MemoryErrorCode, DeviceErrorCode, DmaErrorCode or IotlbViolationReason. */
    readonly code: string,
    message: string,
    readonly field?: string,
    readonly errno?: string,
  ) {
    super(message);
    this.name = 'AgentError';
  }

  /** The status name, e.g. `PERMISSION_DENIED`. */
  get statusName(): string {
    return status[this.status] ?? String(this.status);
  }
}

const MEMORY_STATUS: Record<MemoryErrorCode, status> = {
  INVALID_ID: status.INVALID_ARGUMENT,
  ALREADY_EXISTS: status.ALREADY_EXISTS,
  NOT_FOUND: status.NOT_FOUND,
  PATH_REFUSED: status.PERMISSION_DENIED,
  INVALID_SIZE: status.INVALID_ARGUMENT,
  OUT_OF_BOUNDS: status.INVALID_ARGUMENT,
  IN_USE: status.FAILED_PRECONDITION,
  SYSTEM: status.INTERNAL,
};

const DEVICE_STATUS: Record<DeviceErrorCode, status> = {
  BUSY: status.FAILED_PRECONDITION,
  NOT_FOUND: status.NOT_FOUND,
  PERMISSION_DENIED: status.PERMISSION_DENIED,
  UNSUPPORTED: status.FAILED_PRECONDITION,
  CLOSED: status.FAILED_PRECONDITION,
  KERNEL: status.INTERNAL, // refined by errno below
  INVALID_SPEC: status.INVALID_ARGUMENT,
  DUPLICATE_NAME: status.ALREADY_EXISTS,
};

const DMA_STATUS: Record<DmaErrorCode, [status, string]> = {
  UNMAPPED: [status.FAILED_PRECONDITION, 'iova'],
  PERMISSION: [status.PERMISSION_DENIED, 'iova'],
  BAD_ASID: [status.INVALID_ARGUMENT, 'asid'],
  BAD_LENGTH: [status.INVALID_ARGUMENT, 'length'],
};

/** Status for a failed OS call, by errno name. */
function errnoStatus(errno: string | undefined): status {
  switch (errno) {
    case 'ENOENT':
      return status.NOT_FOUND;
    case 'EACCES':
    case 'EPERM':
      return status.PERMISSION_DENIED;
    case 'EINVAL':
      return status.INVALID_ARGUMENT;
    case 'EBUSY':
    case 'EOPNOTSUPP':
    case 'ENOTSUP':
      return status.FAILED_PRECONDITION;
    case 'ENOMEM':
    case 'ENOSPC':
    case 'EMFILE':
    case 'ENFILE':
      return status.RESOURCE_EXHAUSTED;
    default:
      return status.INTERNAL;
  }
}

/** Agent side: whatever a handler threw, as the AgentError to answer with. */
export function toAgentError(err: unknown): AgentError {
  if (err instanceof AgentError) return err;
  if (err instanceof MemoryError) {
    const code = err.code === 'SYSTEM' ? errnoStatus(err.errno) : MEMORY_STATUS[err.code];
    return new AgentError(code, err.code, err.message, err.field, err.errno);
  }
  if (err instanceof IotlbError) {
    const v = err.violation;
    const code = v.reason === 'OVERLAP' ? status.ALREADY_EXISTS : status.INVALID_ARGUMENT;
    return new AgentError(code, v.reason, v.message, v.field, v.errno);
  }
  if (err instanceof DeviceError) {
    const code = err.code === 'KERNEL' ? errnoStatus(err.errno) : DEVICE_STATUS[err.code];
    return new AgentError(code, err.code, err.message, err.field, err.errno);
  }
  if (err instanceof DmaError) {
    const [code, field] = DMA_STATUS[err.code];
    return new AgentError(code, err.code, err.message, field);
  }
  if (err instanceof TransportError) {
    return new AgentError(errnoStatus(err.errno), err.code, err.message, undefined, err.errno);
  }
  if (err instanceof Error) {
    // SysError (src/sys/libc.ts) carries the errno name in `errno`; Node's own errors in `code`.
    const { errno, code } = err as { errno?: unknown; code?: unknown };
    const name =
      typeof errno === 'string'
        ? errno
        : typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)
          ? code
          : undefined;
    if (name !== undefined) return new AgentError(errnoStatus(name), 'KERNEL', err.message, undefined, name);
    return new AgentError(status.INTERNAL, 'INTERNAL', err.message);
  }
  return new AgentError(status.INTERNAL, 'INTERNAL', String(err));
}

/** A CallError (proto/vdpa/agent/v1) as protobufjs gives it: '' for an absent field or errno. */
export interface WireCallError {
  status: number;
  code: string;
  message: string;
  field: string;
  errno: string;
}

/** Agent side: an AgentError as the CallError of an error frame (proto.ts). */
export function errorToWire(err: AgentError): WireCallError {
  return {
    status: err.status,
    code: err.code,
    message: err.message,
    field: err.field ?? '',
    errno: err.errno ?? '',
  };
}

/** Client side: the AgentError an error frame carries, as the agent raised it. */
export function errorFromWire(w: WireCallError): AgentError {
  const code = w.code === '' ? (status[w.status] ?? 'UNKNOWN') : w.code;
  return new AgentError(w.status, code, w.message, w.field || undefined, w.errno || undefined);
}

/** A call that got no answer from the agent (unreachable, too late, cancelled): the code is the status name. */
export function callFailed(code: status, message: string): AgentError {
  return new AgentError(code, status[code] ?? 'UNKNOWN', message);
}
