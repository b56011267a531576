/**
 * Bearer-token authentication, shared by REST (`Authorization` header) and gRPC (`authorization`
 * metadata). The token is compared in constant time: both sides are hashed to SHA-256 first, so
 * neither the content nor the length of the expected token shows in the comparison's timing.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { ServiceError } from '../../src/core/errors.ts';

/** What the API accepts as a token: RFC 6750's b64token (what fits an Authorization header). */
export const TOKEN_SYNTAX = /^[A-Za-z0-9\-._~+/]+=*$/;

/** `WWW-Authenticate` of a 401: the scheme and realm, plus RFC 6750's error when a token was wrong. */
export function wwwAuthenticate(err: AuthError): string {
  const base = 'Bearer realm="vdpa-mapd"';
  return err.reason === 'invalid' ? `${base}, error="invalid_token"` : base;
}

export class AuthError extends ServiceError {
  constructor(readonly reason: 'missing' | 'invalid') {
    super(
      'UNAUTHENTICATED',
      reason === 'missing'
        ? 'authentication required: send "authorization: Bearer <token>"'
        : 'the bearer token is not valid',
    );
  }
}

function digest(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}

export class BearerAuth {
  private readonly expected: Buffer;

  constructor(token: string) {
    if (!TOKEN_SYNTAX.test(token)) throw new TypeError('the token must be a non-empty RFC 6750 b64token');
    this.expected = digest(token);
  }

  /**
   * Checks the values of the authorization header (one for REST, any number of metadata entries
   * for gRPC): exactly one, `Bearer <token>` with the scheme in any case. Throws AuthError.
   */
  check(values: readonly unknown[]): void {
    if (values.length === 0) throw new AuthError('missing');
    const m =
      values.length === 1 && typeof values[0] === 'string' ? /^Bearer +(\S+)$/i.exec(values[0]) : null;
    if (!m || !timingSafeEqual(digest(m[1]!), this.expected)) throw new AuthError('invalid');
  }
}

/** Whether a listen host can only be reached from this machine. */
export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/** What the transports enforce. */
export interface ApiAuth {
  bearer: BearerAuth;
  /** open: health and metrics answer without a token. */
  probes: 'open' | 'token';
}
