/** The agent's errors (AgentError: a code, a gRPC status, field, errno) as the core's ServiceError. */
import { AgentError } from '../agent/errors.ts';
import { catalogEntry, ServiceError, type ServiceErrorCode } from './errors.ts';

/** Agent codes (MemoryErrorCode and the agent's own) with the ServiceError code they become. */
const BY_CODE: Record<string, ServiceErrorCode> = {
  INVALID_ID: 'INVALID_ARGUMENT',
  ALREADY_EXISTS: 'ALREADY_EXISTS',
  NOT_FOUND: 'NOT_FOUND',
  PATH_REFUSED: 'PERMISSION_DENIED',
  INVALID_SIZE: 'INVALID_ARGUMENT',
  OUT_OF_BOUNDS: 'INVALID_ARGUMENT',
  IN_USE: 'FAILED_PRECONDITION',
  DEVICE_NOT_FOUND: 'NOT_FOUND',
  // Attach / Detach (agent/attach.ts, attach-socket.ts); the field (device, socketPath, group) is kept.
  ALREADY_ATTACHED: 'ALREADY_EXISTS',
  PATH_IN_USE: 'ALREADY_EXISTS',
  NOT_ATTACHED: 'FAILED_PRECONDITION',
  UNKNOWN_GROUP: 'INVALID_ARGUMENT',
};

/** gRPC statuses of a failed OS call (SYSTEM, KERNEL) with the ServiceError code they become. */
const BY_STATUS: Record<string, ServiceErrorCode> = {
  NOT_FOUND: 'NOT_FOUND',
  PERMISSION_DENIED: 'PERMISSION_DENIED',
  INVALID_ARGUMENT: 'INVALID_ARGUMENT',
  FAILED_PRECONDITION: 'FAILED_PRECONDITION',
  RESOURCE_EXHAUSTED: 'RESOURCE_EXHAUSTED',
};

/** Status names a call gets when it never reached the agent or got no answer. */
const UNREACHED = new Set(['UNAVAILABLE', 'DEADLINE_EXCEEDED', 'CANCELLED', 'UNKNOWN']);

export function fromAgentError(err: unknown, context: string): ServiceError {
  if (err instanceof ServiceError) return err;
  if (!(err instanceof AgentError)) return new ServiceError('INTERNAL', `${context}: ${String(err)}`);
  const message = `${context}: ${err.message}`;
  const details = {
    ...(err.field !== undefined ? { field: err.field } : {}),
    ...(err.errno !== undefined ? { errno: err.errno } : {}),
  };
  const code = UNREACHED.has(err.code)
    ? 'UNAVAILABLE'
    : (BY_CODE[err.code] ?? (err.code === 'SYSTEM' ? BY_STATUS[err.statusName] : undefined) ?? 'INTERNAL');
  // The agent gives no retry hint of its own: "later" is the catalog's default for the code.
  const retryAfterMs = catalogEntry(code).retryAfterMs;
  return new ServiceError(code, message, {
    ...details,
    ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
  });
}
