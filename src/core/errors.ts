/**
 * The one error type the application core throws, and the one catalog of its codes: what each
 * means, the HTTP status REST answers, the gRPC status, how long a client should wait before it
 * retries (the codes that say "later"), and vdpactl's exit code. REST, gRPC and the CLI read this
 * table and keep none of their own. `field` names the request field at fault and `errno` keeps the
 * kernel's errno name when there is one.
 */
import type { status } from '@grpc/grpc-js';

/** vdpactl's exit codes: one per kind of outcome a script would branch on. */
export const EXIT = {
  OK: 0,
  /** Anything else: INTERNAL (a device error among them), UNKNOWN, a bug. */
  OTHER: 1,
  /** A bad command line, or an argument the server refused. */
  USAGE: 2,
  NOT_FOUND: 3,
  /** The request clashes with the current state: taken, overlapping, still in use, a quota. */
  CONFLICT: 4,
  /** Try again later: unreachable, no answer in time, back-pressure. */
  UNAVAILABLE: 5,
  /** Not authenticated, or not allowed. */
  DENIED: 6,
} as const;

export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

export interface ErrorCatalogEntry {
  /** One line: when the service answers this code. */
  meaning: string;
  http: number;
  /** The gRPC status, by its name in grpc-js' `status`. */
  grpc: keyof typeof status;
  /** Default wait before a retry, when the code means "later" (a thrower may give its own). */
  retryAfterMs?: number;
  exit: ExitCode;
  /** Answered by REST only (gRPC has one content type, and an unknown method is UNIMPLEMENTED there). */
  restOnly?: true;
}

/** How long "later" is when the thrower cannot tell better: the agent, the store or a device comes back. */
const LATER_MS = 1000;

/**
 * Every code. Where codes share a gRPC status, the one of the status' own name is what a client
 * without the `error-code` metadata assumes (RESOURCE_EXHAUSTED is back-pressure, not a quota).
 */
export const ERROR_CATALOG = {
  INVALID_ARGUMENT: {
    meaning: 'a field is malformed or breaks a rule of its own (`field` names it)',
    http: 400,
    grpc: 'INVALID_ARGUMENT',
    exit: EXIT.USAGE,
  },
  NOT_FOUND: {
    meaning: 'unknown device, memory or mapping',
    http: 404,
    grpc: 'NOT_FOUND',
    exit: EXIT.NOT_FOUND,
  },
  ALREADY_EXISTS: {
    meaning: 'the memory id is taken; the device is attached already, or its socket path is served',
    http: 409,
    grpc: 'ALREADY_EXISTS',
    exit: EXIT.CONFLICT,
  },
  CONFLICT: {
    meaning: 'overlaps a live mapping, a partial unmap with `exact`, or an atomic batch rolled back',
    http: 409,
    grpc: 'ABORTED',
    exit: EXIT.CONFLICT,
  },
  FAILED_PRECONDITION: {
    meaning:
      'the state does not allow it yet: memory still mapped or queued, or unavailable at the agent; a watch resumed from a sequence no longer kept; a desired mapping the device no longer takes; asid 0 of a device attached to a VMM; detaching a device not attached',
    http: 409,
    grpc: 'FAILED_PRECONDITION',
    exit: EXIT.CONFLICT,
  },
  PERMISSION_DENIED: {
    meaning: 'memory path outside the allowed roots, or a socket path outside the attach directory',
    http: 403,
    grpc: 'PERMISSION_DENIED',
    exit: EXIT.DENIED,
  },
  UNAUTHENTICATED: {
    meaning: 'no bearer token, or not the one the server expects',
    http: 401,
    grpc: 'UNAUTHENTICATED',
    exit: EXIT.DENIED,
  },
  RESOURCE_EXHAUSTED: {
    meaning:
      'back-pressure: a queue full, too many requests in flight, a watcher too far behind; retry later',
    http: 429,
    grpc: 'RESOURCE_EXHAUSTED',
    retryAfterMs: LATER_MS,
    exit: EXIT.UNAVAILABLE,
  },
  // 409, not 429: the request conflicts with what the device has mapped; a retry cannot succeed
  // until something is unmapped, so no Retry-After either.
  QUOTA_EXCEEDED: {
    meaning: "the device's quota (bytes, entries) would be exceeded; waiting does not help",
    http: 409,
    grpc: 'RESOURCE_EXHAUSTED',
    exit: EXIT.CONFLICT,
  },
  UNAVAILABLE: {
    meaning:
      'the agent is unreachable, a device not ready, the store cannot write, or shutting down; retry later',
    http: 503,
    grpc: 'UNAVAILABLE',
    retryAfterMs: LATER_MS,
    exit: EXIT.UNAVAILABLE,
  },
  DEVICE_ERROR: {
    meaning: 'the device (the kernel) refused; `errno` says how',
    http: 502,
    grpc: 'INTERNAL',
    exit: EXIT.OTHER,
  },
  UNSUPPORTED_MEDIA_TYPE: {
    meaning: 'a body that is not application/json',
    http: 415,
    grpc: 'INVALID_ARGUMENT',
    exit: EXIT.USAGE,
    restOnly: true,
  },
  METHOD_NOT_ALLOWED: {
    meaning: 'a known path with another method; `Allow` lists them',
    http: 405,
    grpc: 'UNIMPLEMENTED',
    exit: EXIT.OTHER,
    restOnly: true,
  },
  INTERNAL: { meaning: 'a bug: anything not foreseen', http: 500, grpc: 'INTERNAL', exit: EXIT.OTHER },
} as const satisfies Record<string, ErrorCatalogEntry>;

export type ServiceErrorCode = keyof typeof ERROR_CATALOG;

/** The catalog's entry of a code (typed as the general shape, `retryAfterMs` possibly absent). */
export function catalogEntry(code: ServiceErrorCode): ErrorCatalogEntry {
  return ERROR_CATALOG[code];
}

export function isServiceErrorCode(value: unknown): value is ServiceErrorCode {
  return typeof value === 'string' && Object.hasOwn(ERROR_CATALOG, value);
}

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
