/**
 * vdpactl's exit codes: the error catalog's (src/core/errors.ts), by the service's `error-code`;
 * a failure without one (the server never answered) by its gRPC status.
 */
import { status } from '@grpc/grpc-js';
import {
  catalogEntry,
  ERROR_CATALOG,
  EXIT,
  isServiceErrorCode,
  type ServiceErrorCode,
} from '../../src/core/errors.ts';

export { EXIT };

const CODES = Object.keys(ERROR_CATALOG) as ServiceErrorCode[];

/** Statuses only grpc-js produces (the call failed on the client's side), with what they mean here. */
const CLIENT_SIDE: Partial<Record<status, number>> = {
  [status.OK]: EXIT.OK,
  [status.DEADLINE_EXCEEDED]: EXIT.UNAVAILABLE,
  [status.OUT_OF_RANGE]: EXIT.USAGE,
};

/** A status as the code of its own name, else the first code the catalog sends it for (ABORTED: CONFLICT). */
function codeOfStatus(code: status): ServiceErrorCode | undefined {
  const name = status[code];
  if (isServiceErrorCode(name) && ERROR_CATALOG[name].grpc === name) return name;
  return CODES.find((c) => status[ERROR_CATALOG[c].grpc] === code);
}

/**
 * The exit code for a failed call. `errorCode` (the service's code) decides where it is known:
 * RESOURCE_EXHAUSTED is both back-pressure (retry later) and an exceeded quota (retrying cannot
 * help until something is unmapped).
 */
export function exitCodeFor(code: status, errorCode?: string): number {
  if (isServiceErrorCode(errorCode)) return ERROR_CATALOG[errorCode].exit;
  const own = CLIENT_SIDE[code];
  if (own !== undefined) return own;
  const byStatus = codeOfStatus(code);
  return byStatus === undefined ? EXIT.OTHER : ERROR_CATALOG[byStatus].exit;
}

/** The service codes (of the gRPC API vdpactl calls) that lead to `exit`, for `--help`. */
function codesFor(exit: number): string {
  return CODES.filter((c) => ERROR_CATALOG[c].exit === exit && !catalogEntry(c).restOnly).join(', ');
}

/** The table for `--help` and the README. */
export const EXIT_CODES_HELP = `exit codes:
  0  ok
  1  other failure (${codesFor(EXIT.OTHER)}; UNKNOWN)
  2  usage: bad command line, or the server refused an argument (${codesFor(EXIT.USAGE)})
  3  not found (${codesFor(EXIT.NOT_FOUND)})
  4  conflict with the current state (${codesFor(EXIT.CONFLICT)})
  5  unavailable, retry later (${codesFor(EXIT.UNAVAILABLE)}, DEADLINE_EXCEEDED)
  6  not allowed (${codesFor(EXIT.DENIED)})`;
