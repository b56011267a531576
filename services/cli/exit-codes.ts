/**
 * vdpactl's exit codes: one per kind of outcome a script would branch on, derived from the gRPC
 * status (and, where one status covers two kinds, the service's `error-code`).
 */
import { status } from '@grpc/grpc-js';

export const EXIT = {
  OK: 0,
  /** Anything else: INTERNAL (a device error among them), UNKNOWN, a bug. */
  OTHER: 1,
  /** A bad command line, or an argument the server refused (INVALID_ARGUMENT, OUT_OF_RANGE). */
  USAGE: 2,
  NOT_FOUND: 3,
  /** The request clashes with the current state: ALREADY_EXISTS, ABORTED, FAILED_PRECONDITION, a quota. */
  CONFLICT: 4,
  /** Try again later: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (back-pressure). */
  UNAVAILABLE: 5,
  /** UNAUTHENTICATED, PERMISSION_DENIED. */
  DENIED: 6,
} as const;

const BY_STATUS: Partial<Record<status, number>> = {
  [status.OK]: EXIT.OK,
  [status.INVALID_ARGUMENT]: EXIT.USAGE,
  [status.OUT_OF_RANGE]: EXIT.USAGE,
  [status.NOT_FOUND]: EXIT.NOT_FOUND,
  [status.ALREADY_EXISTS]: EXIT.CONFLICT,
  [status.ABORTED]: EXIT.CONFLICT,
  [status.FAILED_PRECONDITION]: EXIT.CONFLICT,
  [status.UNAVAILABLE]: EXIT.UNAVAILABLE,
  [status.DEADLINE_EXCEEDED]: EXIT.UNAVAILABLE,
  [status.RESOURCE_EXHAUSTED]: EXIT.UNAVAILABLE,
  [status.UNAUTHENTICATED]: EXIT.DENIED,
  [status.PERMISSION_DENIED]: EXIT.DENIED,
};

/**
 * The exit code for a failed call. RESOURCE_EXHAUSTED is both back-pressure (retry later) and an
 * exceeded quota (retrying cannot help until something is unmapped): `error-code` tells them apart.
 */
export function exitCodeFor(code: status, errorCode?: string): number {
  if (errorCode === 'QUOTA_EXCEEDED') return EXIT.CONFLICT;
  return BY_STATUS[code] ?? EXIT.OTHER;
}

/** The table for `--help` and the README. */
export const EXIT_CODES_HELP = `exit codes:
  0  ok
  1  other failure (INTERNAL, e.g. a device error; UNKNOWN)
  2  usage: bad command line, or the server refused an argument (INVALID_ARGUMENT)
  3  not found (NOT_FOUND)
  4  conflict with the current state (ALREADY_EXISTS, ABORTED, FAILED_PRECONDITION, quota exceeded)
  5  unavailable, retry later (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED)
  6  not allowed (UNAUTHENTICATED, PERMISSION_DENIED)`;
