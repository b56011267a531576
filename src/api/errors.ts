/**
 * The one table from ServiceError codes to HTTP and gRPC statuses, and the REST error body.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ServiceError, type ServiceErrorCode } from '../core/errors.ts';
import { formatError } from './format.ts';

interface Wire {
  http: number;
  grpc: GrpcStatus;
}

export const ERROR_TABLE: Readonly<Record<ServiceErrorCode, Wire>> = {
  INVALID_ARGUMENT: { http: 400, grpc: GrpcStatus.INVALID_ARGUMENT },
  NOT_FOUND: { http: 404, grpc: GrpcStatus.NOT_FOUND },
  ALREADY_EXISTS: { http: 409, grpc: GrpcStatus.ALREADY_EXISTS },
  CONFLICT: { http: 409, grpc: GrpcStatus.ABORTED },
  FAILED_PRECONDITION: { http: 409, grpc: GrpcStatus.FAILED_PRECONDITION },
  PERMISSION_DENIED: { http: 403, grpc: GrpcStatus.PERMISSION_DENIED },
  UNAUTHENTICATED: { http: 401, grpc: GrpcStatus.UNAUTHENTICATED },
  RESOURCE_EXHAUSTED: { http: 429, grpc: GrpcStatus.RESOURCE_EXHAUSTED },
  // 409, not 429: the request conflicts with what the device has mapped; a retry cannot succeed
  // until something is unmapped, so no Retry-After either.
  QUOTA_EXCEEDED: { http: 409, grpc: GrpcStatus.RESOURCE_EXHAUSTED },
  UNAVAILABLE: { http: 503, grpc: GrpcStatus.UNAVAILABLE },
  DEVICE_ERROR: { http: 502, grpc: GrpcStatus.INTERNAL },
  // REST's own: gRPC has one content type, and an unknown method there is UNIMPLEMENTED.
  UNSUPPORTED_MEDIA_TYPE: { http: 415, grpc: GrpcStatus.INVALID_ARGUMENT },
  METHOD_NOT_ALLOWED: { http: 405, grpc: GrpcStatus.UNIMPLEMENTED },
  INTERNAL: { http: 500, grpc: GrpcStatus.INTERNAL },
};

/** Codes whose answer tells the client when to retry. */
const RETRYABLE: ReadonlySet<ServiceErrorCode> = new Set(['RESOURCE_EXHAUSTED', 'UNAVAILABLE']);

/** Anything thrown below a handler, as a ServiceError; unknown errors become a bare INTERNAL. */
export function toServiceError(err: unknown): ServiceError {
  if (err instanceof ServiceError) return err;
  return new ServiceError('INTERNAL', 'internal error');
}

/** Whole seconds to wait before retrying (at least 1), for retryable codes; else undefined. */
export function retryAfterSeconds(err: ServiceError): number | undefined {
  if (!RETRYABLE.has(err.code)) return undefined;
  const ms = err.details.retryAfterMs ?? 1000;
  return Math.max(1, Math.ceil(ms / 1000));
}

export function httpStatus(err: ServiceError): number {
  return ERROR_TABLE[err.code].http;
}

export function grpcStatus(err: ServiceError): GrpcStatus {
  return ERROR_TABLE[err.code].grpc;
}

/** REST error body: `{"error": {"code", "message", "field"?, "errno"?}}`. */
export function errorBody(err: ServiceError) {
  return { error: formatError(err.toInfo()) };
}
