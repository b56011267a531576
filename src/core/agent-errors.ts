/** The agent's errors (AgentError: a code, a gRPC status, field, errno) as the core's ServiceError. */
import { AgentError } from '../agent/errors.ts';
import { ServiceError, type ServiceErrorCode } from './errors.ts';

export const AGENT_RETRY_AFTER_MS = 1000;

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
  if (UNREACHED.has(err.code)) {
    return new ServiceError('UNAVAILABLE', message, { ...details, retryAfterMs: AGENT_RETRY_AFTER_MS });
  }
  const code =
    BY_CODE[err.code] ?? (err.code === 'SYSTEM' ? BY_STATUS[err.statusName] : undefined) ?? 'INTERNAL';
  return new ServiceError(code, message, {
    ...details,
    ...(code === 'RESOURCE_EXHAUSTED' ? { retryAfterMs: AGENT_RETRY_AFTER_MS } : {}),
  });
}
