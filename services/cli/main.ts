/**
 * vdpactl: the command-line client of the public gRPC API.
 *
 *   vdpactl --server 127.0.0.1:50051 mappings list vdpa0 --json
 *
 * Runs on import (bin/vdpactl.js imports it); the exit code follows the outcome (see exit-codes.ts).
 */
import { type ServiceError, status } from '@grpc/grpc-js';
import { type Invocation, parseInvocation, USAGE } from './args.ts';
import { type Connection, connect } from './client.ts';
import { RUNS } from './commands.ts';
import { EXIT, exitCodeFor } from './exit-codes.ts';
import { connectionProblem } from './failures.ts';
import { UsageError } from './values.ts';

function isServiceError(err: unknown): err is ServiceError {
  return typeof err === 'object' && err !== null && 'code' in err && 'metadata' in err;
}

/** `vdpactl: NOT_FOUND: no device "x" (field device)`, or the same as JSON with --json. */
function reportFailure(err: ServiceError, inv: Invocation): number {
  const { json } = inv;
  const first = (key: string) => err.metadata.get(key)[0]?.toString();
  const code = first('error-code');
  const failure = {
    status: status[err.code] ?? String(err.code),
    ...(code === undefined ? {} : { code }),
    // Without error-code the server did not answer: grpc-js' words, said plainly.
    message: (code === undefined && connectionProblem(err, inv.server, inv.tls !== undefined)) || err.details,
    ...(first('field') === undefined ? {} : { field: first('field') }),
    ...(first('errno') === undefined ? {} : { errno: first('errno') }),
  };
  const extras = [failure.field && `field ${failure.field}`, failure.errno && `errno ${failure.errno}`]
    .filter(Boolean)
    .join(', ');
  process.stderr.write(
    json
      ? `${JSON.stringify({ error: failure })}\n`
      : `vdpactl: ${code ?? failure.status}: ${failure.message}${extras ? ` (${extras})` : ''}\n`,
  );
  return exitCodeFor(err.code, code);
}

async function main(argv: readonly string[]): Promise<number> {
  let inv: Invocation | null;
  let conn: Connection;
  try {
    inv = parseInvocation(argv, process.env);
    if (inv === null) {
      process.stdout.write(`${USAGE}\n`);
      return EXIT.OK;
    }
    conn = connect(inv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`vdpactl: ${e.message}\nRun vdpactl --help for usage.\n`);
    return EXIT.USAGE;
  }
  const interrupted = new Promise<void>((resolve) => process.once('SIGINT', () => resolve()));
  try {
    await RUNS[inv.command.name]!(inv, conn, {
      out: (text) => process.stdout.write(`${text}\n`),
      interrupted,
    });
    return EXIT.OK;
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(`vdpactl: ${e.message}\n`);
      return EXIT.USAGE;
    }
    if (isServiceError(e)) return reportFailure(e, inv);
    process.stderr.write(`vdpactl: ${(e as Error).stack ?? e}\n`);
    return EXIT.OTHER;
  } finally {
    conn.close();
  }
}

// Node's deprecation warnings address the code's developers, not vdpactl's users; over TLS to an IP
// address grpc-js would trigger one (DEP0123: an IP address as the TLS server name) on every run.
process.noDeprecation = true;
process.exit(await main(process.argv.slice(2)));
