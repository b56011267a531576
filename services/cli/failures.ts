/**
 * What vdpactl says when the failure is not an answer of the server: a command line Node's parseArgs
 * refused, or a call grpc-js could not make (no connection, TLS trouble, no answer in time). Their
 * own messages speak of their internals (`as in '-- "--memroy"'`, `Resolution note:`, OpenSSL's
 * `ssl3_get_record:wrong version number`); these say what happened and what to do.
 */
import { type ServiceError, status } from '@grpc/grpc-js';

/** parseArgs' errors, by code; anything else keeps its message. */
export function commandLineProblem(err: Error & { code?: string }, knownOptions: readonly string[]): string {
  const option = /'(?:-\w, )?(--?[\w-]+)/.exec(err.message)?.[1];
  switch (err.code) {
    case 'ERR_PARSE_ARGS_UNKNOWN_OPTION': {
      const near = option === undefined ? undefined : closest(option.replace(/^--?/, ''), knownOptions);
      return `unknown option ${option ?? ''}${near === undefined ? '' : ` (did you mean --${near}?)`}`;
    }
    case 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE':
      return /argument missing/.test(err.message) ? `${option} needs a value` : `${option} takes no value`;
    case 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL':
      return `unexpected argument ${/'([^']*)'/.exec(err.message)?.[1] ?? ''}`.trim();
    default:
      return err.message;
  }
}

/** The known option within two edits of `typed`, if exactly one is nearest. */
function closest(typed: string, known: readonly string[]): string | undefined {
  const scored = known.map((k) => ({ k, d: editDistance(typed, k) })).filter((s) => s.d <= 2);
  scored.sort((a, b) => a.d - b.d);
  return scored.length > 0 && scored[0]!.d !== scored[1]?.d ? scored[0]!.k : undefined;
}

function editDistance(a: string, b: string): number {
  let row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const next = [i];
    for (let j = 1; j <= b.length; j++) {
      next[j] = Math.min(row[j]! + 1, next[j - 1]! + 1, row[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    row = next;
  }
  return row[b.length]!;
}

/** grpc-js' last connection error without its wrapping, OpenSSL's location or the timestamp. */
function lastError(details: string): string {
  return details
    .replace(/^No connection established\. Last error: /, '')
    .replace(/\s*Resolution note:\s*$/s, '')
    .replace(/\s*\(\d{4}-\d\d-\d\dT[^)]*\)\.?\s*$/, '')
    .replace(/^Error(?: \[\w+\])?: /, '')
    .replace(
      /^[0-9A-F]+:error:[0-9A-F]+:SSL routines:[\w]+:([^:]+):\S*(?:\s*SSL alert number \d+)?/s,
      'TLS: $1',
    )
    .replace(/[\s.]+$/, '')
    .trim();
}

/**
 * A failed call the server did not answer (no `error-code` metadata), in words; undefined when the
 * details are the server's own.
 */
export function connectionProblem(err: ServiceError, server: string, tls: boolean): string | undefined {
  const details = err.details ?? '';
  if (err.code === status.DEADLINE_EXCEEDED) return `no answer from ${server} in time (--timeout)`;
  if (err.code !== status.UNAVAILABLE) return undefined;
  const reason = lastError(details);
  if (/wrong version number|WRONG_VERSION_NUMBER|packet length too long/i.test(details)) {
    return `${server} does not speak TLS (it answered in plaintext): drop the --tls-* options, or give the server a certificate (--grpc-tls-cert)`;
  }
  if (/alert certificate required/.test(details)) {
    return `${server} asks for a client certificate: give --tls-cert and --tls-key (mTLS)`;
  }
  if (/alert (unknown ca|bad certificate|certificate unknown|decrypt error)/.test(details)) {
    return `${server} refused our client certificate (${reason}): it must be signed by the CA the server trusts`;
  }
  if (/certificate|self.signed|unable to (get|verify)|CERT_|altnames/i.test(details)) {
    return `${server}'s certificate was not accepted: ${reason} (--tls-ca, --tls-server-name)`;
  }
  if (/ECONNREFUSED/.test(details))
    return `nothing listens on ${server} (connection refused); is the API server running?`;
  if (/Name resolution failed|ENOTFOUND|EAI_AGAIN/.test(details))
    return `cannot resolve the host of ${server}`;
  if (!tls && /Failed to connect|Connection dropped|Protocol error|ECONNRESET|GOAWAY/i.test(details)) {
    return `${server} dropped the connection before any answer (${reason}): if it takes TLS only, give --tls-ca FILE`;
  }
  return `cannot reach ${server}: ${reason}`;
}
