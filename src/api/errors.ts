/**
 * The error catalog (core/errors.ts) as the transports answer it: the HTTP and gRPC statuses, the
 * retry-after hint and the REST error body. No table of its own.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import { catalogEntry, ServiceError } from '../core/errors.ts';
import { formatError } from './format.ts';

/** Anything thrown below a handler, as a ServiceError; unknown errors become a bare INTERNAL. */
export function toServiceError(err: unknown): ServiceError {
  if (err instanceof ServiceError) return err;
  return new ServiceError('INTERNAL', 'internal error');
}

/**
 * Whole seconds to wait before retrying (at least 1), for the codes the catalog gives a retry-after;
 * the thrower's own `retryAfterMs` wins over the catalog's default. Else undefined.
 */
export function retryAfterSeconds(err: ServiceError): number | undefined {
  const fallback = catalogEntry(err.code).retryAfterMs;
  if (fallback === undefined) return undefined;
  const ms = err.details.retryAfterMs ?? fallback;
  return Math.max(1, Math.ceil(ms / 1000));
}

export function httpStatus(err: ServiceError): number {
  return catalogEntry(err.code).http;
}

export function grpcStatus(err: ServiceError): GrpcStatus {
  return GrpcStatus[catalogEntry(err.code).grpc];
}

/** REST error body: `{"error": {"code", "message", "field"?, "errno"?}}`. */
export function errorBody(err: ServiceError) {
  return { error: formatError(err.toInfo()) };
}
