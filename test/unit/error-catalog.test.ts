/**
 * The error catalog (src/core/errors.ts): a row for every code, and REST, gRPC, the agent's errors
 * and vdpactl's exit codes answering what the row says, nothing of their own.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { AgentError } from '../../src/agent/errors.ts';
import { grpcStatus, httpStatus, retryAfterSeconds } from '../../src/api/errors.ts';
import { fromAgentError } from '../../src/core/agent-errors.ts';
import { ERROR_CATALOG, EXIT, ServiceError, type ServiceErrorCode } from '../../src/core/errors.ts';
import { EXIT_CODES_HELP, exitCodeFor } from '../../services/cli/exit-codes.ts';

const CODES = Object.keys(ERROR_CATALOG) as ServiceErrorCode[];

/** Written out independently of the catalog: [http, gRPC status, exit code, retry-after ms]. */
const EXPECTED: Record<string, [number, status, number, number | undefined]> = {
  INVALID_ARGUMENT: [400, status.INVALID_ARGUMENT, 2, undefined],
  NOT_FOUND: [404, status.NOT_FOUND, 3, undefined],
  ALREADY_EXISTS: [409, status.ALREADY_EXISTS, 4, undefined],
  CONFLICT: [409, status.ABORTED, 4, undefined],
  FAILED_PRECONDITION: [409, status.FAILED_PRECONDITION, 4, undefined],
  PERMISSION_DENIED: [403, status.PERMISSION_DENIED, 6, undefined],
  UNAUTHENTICATED: [401, status.UNAUTHENTICATED, 6, undefined],
  RESOURCE_EXHAUSTED: [429, status.RESOURCE_EXHAUSTED, 5, 1000],
  QUOTA_EXCEEDED: [409, status.RESOURCE_EXHAUSTED, 4, undefined],
  UNAVAILABLE: [503, status.UNAVAILABLE, 5, 1000],
  DEVICE_ERROR: [502, status.INTERNAL, 1, undefined],
  UNSUPPORTED_MEDIA_TYPE: [415, status.INVALID_ARGUMENT, 2, undefined],
  METHOD_NOT_ALLOWED: [405, status.UNIMPLEMENTED, 1, undefined],
  INTERNAL: [500, status.INTERNAL, 1, undefined],
};

describe('error catalog', () => {
  test('every code has a meaning, an HTTP status, a gRPC status and an exit code', () => {
    const exits = new Set<number>(Object.values(EXIT));
    for (const code of CODES) {
      const row = ERROR_CATALOG[code];
      assert.match(row.meaning, /^[^\n]{10,}$/, `${code}: a one-line meaning`);
      assert.ok(
        Number.isInteger(row.http) && row.http >= 400 && row.http < 600,
        `${code}: an HTTP error status`,
      );
      assert.equal(typeof status[row.grpc], 'number', `${code}: ${row.grpc} is a gRPC status`);
      assert.notEqual(row.grpc, 'OK', code);
      assert.ok(exits.has(row.exit) && row.exit > EXIT.OK, `${code}: a failing exit code`);
    }
    assert.deepEqual(
      Object.fromEntries(
        CODES.map((code) => {
          const row = ERROR_CATALOG[code];
          return [
            code,
            [row.http, status[row.grpc], row.exit, 'retryAfterMs' in row ? row.retryAfterMs : undefined],
          ];
        }),
      ),
      EXPECTED,
    );
  });

  test('REST and gRPC answer the statuses of the row, and Retry-After only where it has one', () => {
    for (const code of CODES) {
      const row = ERROR_CATALOG[code];
      const err = new ServiceError(code, 'x');
      assert.equal(httpStatus(err), row.http, code);
      assert.equal(grpcStatus(err), status[row.grpc], code);
      const retry = 'retryAfterMs' in row ? row.retryAfterMs : undefined;
      assert.equal(retryAfterSeconds(err), retry === undefined ? undefined : Math.ceil(retry / 1000), code);
      // A thrower's own hint wins, but never makes a code retryable that the catalog says is not.
      const hinted = new ServiceError(code, 'x', { retryAfterMs: 2500 });
      assert.equal(retryAfterSeconds(hinted), retry === undefined ? undefined : 3, code);
    }
  });

  test("vdpactl's exit code is the row's, from the error-code the server sends", () => {
    for (const code of CODES) {
      const err = new ServiceError(code, 'x');
      assert.equal(exitCodeFor(grpcStatus(err), code), ERROR_CATALOG[code].exit, code);
    }
  });

  test('without error-code a status means the code of its own name (back-pressure, not a quota)', () => {
    assert.equal(exitCodeFor(status.RESOURCE_EXHAUSTED), ERROR_CATALOG.RESOURCE_EXHAUSTED.exit);
    assert.equal(exitCodeFor(status.INVALID_ARGUMENT), ERROR_CATALOG.INVALID_ARGUMENT.exit);
    assert.equal(exitCodeFor(status.INTERNAL), ERROR_CATALOG.INTERNAL.exit);
    assert.equal(exitCodeFor(status.ABORTED), ERROR_CATALOG.CONFLICT.exit);
    assert.equal(exitCodeFor(status.UNIMPLEMENTED), ERROR_CATALOG.METHOD_NOT_ALLOWED.exit);
    // What only the client side produces: no answer in time, a value out of range, nothing known.
    assert.equal(exitCodeFor(status.DEADLINE_EXCEEDED), EXIT.UNAVAILABLE);
    assert.equal(exitCodeFor(status.OUT_OF_RANGE), EXIT.USAGE);
    assert.equal(exitCodeFor(status.UNKNOWN), EXIT.OTHER);
    assert.equal(exitCodeFor(status.UNKNOWN, 'NOT_A_CODE'), EXIT.OTHER);
  });

  test("the agent's errors get the catalog's retry-after for the code they become", () => {
    const unreached = fromAgentError(new AgentError(status.UNAVAILABLE, 'UNAVAILABLE', 'gone'), 'map');
    assert.equal(unreached.code, 'UNAVAILABLE');
    assert.equal(unreached.details.retryAfterMs, ERROR_CATALOG.UNAVAILABLE.retryAfterMs);
    const exhausted = fromAgentError(
      new AgentError(status.RESOURCE_EXHAUSTED, 'SYSTEM', 'EMFILE', undefined, 'EMFILE'),
      'open',
    );
    assert.equal(exhausted.code, 'RESOURCE_EXHAUSTED');
    assert.equal(exhausted.details.retryAfterMs, ERROR_CATALOG.RESOURCE_EXHAUSTED.retryAfterMs);
    const inUse = fromAgentError(new AgentError(status.FAILED_PRECONDITION, 'IN_USE', 'mapped'), 'drop');
    assert.equal(inUse.code, 'FAILED_PRECONDITION');
    assert.equal(inUse.details.retryAfterMs, undefined);
  });

  test('the exit code table of --help is in README, row for row', () => {
    const readme = fs.readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
    for (const line of EXIT_CODES_HELP.split('\n').slice(1)) {
      const [, exit, meaning] = /^\s+(\d)\s+(.*)$/.exec(line)!;
      assert.ok(
        readme.includes(`| ${exit} | ${meaning} |`),
        `README is stale: exit code ${exit} is "${meaning}"`,
      );
    }
  });
});
