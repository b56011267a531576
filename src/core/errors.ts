/**
 * The one error type the application core throws. Transports map `code` to an HTTP status and a
 * gRPC status in exactly one place each; `field` names the request field at fault and `errno`
 * keeps the kernel's errno name when there is one.
 */
export type ServiceErrorCode =
  | 'INVALID_ARGUMENT' // 400 / INVALID_ARGUMENT: a field is malformed or violates a rule of its own
  | 'NOT_FOUND' // 404 / NOT_FOUND: unknown device, memory or mapping
  | 'ALREADY_EXISTS' // 409 / ALREADY_EXISTS: memory id taken
  | 'CONFLICT' // 409 / ABORTED: overlaps a live mapping, partial unmap with exact, atomic batch rolled back
  | 'FAILED_PRECONDITION' // 409 / FAILED_PRECONDITION: memory still mapped, device not ready
  | 'PERMISSION_DENIED' // 403 / PERMISSION_DENIED: memory path outside the allowed roots
  | 'UNAUTHENTICATED' // 401 / UNAUTHENTICATED
  | 'RESOURCE_EXHAUSTED' // 429 / RESOURCE_EXHAUSTED: queue full; `retryAfterMs` set
  | 'QUOTA_EXCEEDED' // 409 / RESOURCE_EXHAUSTED: the device's quota (bytes, entries); waiting does not help
  | 'UNAVAILABLE' // 503 / UNAVAILABLE: agent unreachable or store cannot write; retry later
  | 'DEVICE_ERROR' // 502 / INTERNAL: the device (kernel) refused; `errno` says how
  | 'UNSUPPORTED_MEDIA_TYPE' // 415 (REST only): a body that is not application/json
  | 'METHOD_NOT_ALLOWED' // 405 (REST only): a known path, another method; `Allow` lists them
  | 'INTERNAL'; // 500 / INTERNAL

export interface ServiceErrorInfo {
  code: ServiceErrorCode;
  message: string;
  field?: string;
  errno?: string;
}

export class ServiceError extends Error {
  constructor(
    readonly code: ServiceErrorCode,
    message: string,
    readonly details: { field?: string; errno?: string; retryAfterMs?: number } = {},
  ) {
    super(message);
    this.name = 'ServiceError';
  }

  get field(): string | undefined {
    return this.details.field;
  }

  get errno(): string | undefined {
    return this.details.errno;
  }

  toInfo(): ServiceErrorInfo {
    return {
      code: this.code,
      message: this.message,
      ...(this.details.field !== undefined ? { field: this.details.field } : {}),
      ...(this.details.errno !== undefined ? { errno: this.details.errno } : {}),
    };
  }
}
