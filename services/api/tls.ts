/** The gRPC server's credentials: plaintext, TLS, or TLS with required client certificates (mTLS). */
import fs from 'node:fs';
import { ServerCredentials } from '@grpc/grpc-js';
import type { GrpcTlsConfig } from './config.ts';

export function grpcServerCredentials(tls: GrpcTlsConfig | undefined): ServerCredentials {
  if (tls === undefined) return ServerCredentials.createInsecure();
  const clientCa = tls.clientCa === undefined ? null : fs.readFileSync(tls.clientCa);
  return ServerCredentials.createSsl(
    clientCa,
    [{ cert_chain: fs.readFileSync(tls.cert), private_key: fs.readFileSync(tls.key) }],
    // With a client CA, a client without a certificate it signed fails the handshake.
    clientCa !== null,
  );
}
