/**
 * vdpactl's transport security: plaintext, TLS verified against a CA, or TLS with a client
 * certificate (mTLS). The PEM files are read and checked before anything connects, so a bad file is
 * a usage error that names its flag rather than a failed handshake.
 */
import { createPrivateKey, X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import { type ChannelCredentials, type ChannelOptions, credentials } from '@grpc/grpc-js';
import { UsageError } from './values.ts';

/** The --tls-* settings (files are paths); any of them turns TLS on. */
export interface TlsOptions {
  ca?: string;
  cert?: string;
  key?: string;
  serverName?: string;
}

const TLS_FLAGS = {
  ca: { flag: 'tls-ca', env: 'VDPA_MAPD_TLS_CA' },
  cert: { flag: 'tls-cert', env: 'VDPA_MAPD_TLS_CERT' },
  key: { flag: 'tls-key', env: 'VDPA_MAPD_TLS_KEY' },
  serverName: { flag: 'tls-server-name', env: 'VDPA_MAPD_TLS_SERVER_NAME' },
} as const;

type TlsField = keyof typeof TLS_FLAGS;

/**
 * The TLS settings of a command line: each flag, else its environment variable (empty counts as
 * unset). Undefined when none is given. A client certificate needs its key and the other way round.
 */
export function tlsOptions(
  flags: Partial<Record<TlsField, string>>,
  env: NodeJS.ProcessEnv,
): TlsOptions | undefined {
  const tls: TlsOptions = {};
  for (const field of Object.keys(TLS_FLAGS) as TlsField[]) {
    const value = flags[field] ?? (env[TLS_FLAGS[field].env] || undefined);
    if (value !== undefined) tls[field] = value;
  }
  if ((tls.cert === undefined) !== (tls.key === undefined)) {
    const [given, missing] = tls.cert === undefined ? ['key', 'cert'] : ['cert', 'key'];
    throw new UsageError(`--tls-${given} needs --tls-${missing} (the client certificate and its key)`);
  }
  return Object.keys(tls).length === 0 ? undefined : tls;
}

export interface ChannelSecurity {
  credentials: ChannelCredentials;
  options: ChannelOptions;
}

/** Reads one PEM file; a failure is a usage error naming the flag. */
function readPem(field: TlsField, file: string, check: (pem: Buffer) => unknown): Buffer {
  try {
    const pem = fs.readFileSync(file);
    check(pem);
    return pem;
  } catch (e) {
    throw new UsageError(`--${TLS_FLAGS[field].flag} ${file}: ${(e as Error).message}`);
  }
}

/** The credentials (and the name checked in the server certificate) of a connection. Throws UsageError. */
export function channelSecurity(tls: TlsOptions | undefined): ChannelSecurity {
  if (tls === undefined) return { credentials: credentials.createInsecure(), options: {} };
  // Node accepts a CA file that holds no certificate and then trusts nothing: refuse it here.
  const ca = tls.ca === undefined ? null : readPem('ca', tls.ca, (pem) => new X509Certificate(pem));
  const cert = tls.cert === undefined ? null : readPem('cert', tls.cert, (pem) => new X509Certificate(pem));
  const key = tls.key === undefined ? null : readPem('key', tls.key, (pem) => createPrivateKey(pem));
  let made: ChannelCredentials;
  try {
    // Without --tls-ca, the server is verified against Node's default CAs.
    made = credentials.createSsl(ca, key, cert);
  } catch (e) {
    throw new UsageError(`--tls-cert ${tls.cert} with --tls-key ${tls.key}: ${(e as Error).message}`);
  }
  return {
    credentials: made,
    options: tls.serverName === undefined ? {} : { 'grpc.ssl_target_name_override': tls.serverName },
  };
}
