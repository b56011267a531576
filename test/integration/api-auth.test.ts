/**
 * Authentication against the real API server: the bearer token on REST and gRPC, probes open or
 * not, and gRPC mTLS with certificates made by openssl for this run.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, describe, test } from 'node:test';
import {
  type ChannelCredentials,
  type Client,
  credentials,
  Metadata,
  type ServiceError,
  status,
} from '@grpc/grpc-js';
import type { ApiConfig } from '../../services/api/config.ts';
import { type RunningApiServer, startApiServer } from '../../services/api/main.ts';
import { DeviceServiceClient, HealthClient } from '../../services/api/proto.ts';
import { until } from './agent-harness.ts';
import { type Agent, apiConfig, type GrpcFailure, spawnAgent, tempDir } from './api-harness.ts';
import { makePki, type Pki } from './certs.ts';

const TOKEN = 'c2VjcmV0LXRva2VuLWZvci10ZXN0cw==';

// biome-ignore lint/suspicious/noExplicitAny: answers are asserted field by field
type Answer = any;
type Unary = (
  req: object,
  md: Metadata,
  opts: object,
  cb: (e: ServiceError | null, a: Answer) => void,
) => void;

/** One unary call with an optional bearer token; resolves to the answer or the failure. */
function call(client: Client, method: string, token?: string): Promise<Answer | GrpcFailure> {
  const md = new Metadata();
  if (token !== undefined) md.set('authorization', `Bearer ${token}`);
  const fn = (client as unknown as Record<string, Unary>)[method]!;
  return new Promise((resolve) => {
    fn.call(
      client,
      method === 'check' ? { service: '' } : {},
      md,
      { deadline: Date.now() + 10_000 },
      (err, a) => resolve(err ? { code: err.code, details: err.details, metadata: err.metadata } : a),
    );
  });
}

describe('API authentication', () => {
  let dir: string;
  let agent: Agent;
  let pki: Pki;
  const servers: RunningApiServer[] = [];
  const clients: Client[] = [];

  const start = async (overrides: Partial<ApiConfig>) => {
    const server = await startApiServer(apiConfig(dir, agent.socket, overrides));
    servers.push(server);
    const ready = { headers: { authorization: `Bearer ${TOKEN}` } };
    await until(
      'the API server to be ready',
      async () => (await fetch(`${server.restAddress}/readyz`, ready)).status === 200,
    );
    return server;
  };
  const client = <T extends Client>(
    Ctor: new (t: string, c: ChannelCredentials, o: object) => T,
    target: string,
    c: ChannelCredentials,
  ) => {
    // The server certificate names 127.0.0.1 and localhost; TLS's SNI takes only names.
    const made = new Ctor(target, c, { 'grpc.ssl_target_name_override': 'localhost' });
    clients.push(made);
    return made;
  };

  before(async () => {
    dir = tempDir('auth');
    pki = makePki(dir);
    agent = await spawnAgent(dir);
  });
  after(async () => {
    for (const c of clients) c.close();
    for (const s of servers) await s.stop();
    await agent?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('token and mTLS: REST and gRPC refuse without the token, probes stay open', async () => {
    const api = await start({
      auth: { token: TOKEN, probes: 'open' },
      grpcTls: { cert: pki.serverCert, key: pki.serverKey, clientCa: pki.ca },
    });
    const rest = (url: string, init: RequestInit = {}) => fetch(`${api.restAddress}${url}`, init);
    const bearer = (token: string, init: RequestInit = {}): RequestInit => ({
      ...init,
      headers: { ...(init.headers as Record<string, string>), authorization: `Bearer ${token}` },
    });

    // REST: missing, wrong, other scheme, unknown route: 401 with the error body and the challenge.
    for (const [init, challenge] of [
      [{}, 'Bearer realm="vdpa-mapd"'],
      [bearer('wrong'), 'Bearer realm="vdpa-mapd", error="invalid_token"'],
      [bearer(`${TOKEN}x`), 'Bearer realm="vdpa-mapd", error="invalid_token"'],
      [{ headers: { authorization: `Basic ${TOKEN}` } }, 'Bearer realm="vdpa-mapd", error="invalid_token"'],
    ] as [RequestInit, string][]) {
      const res = await rest('/v1/devices', init);
      assert.equal(res.status, 401);
      assert.equal(res.headers.get('www-authenticate'), challenge);
      const body = (await res.json()) as { error: { code: string; message: string } };
      assert.equal(body.error.code, 'UNAUTHENTICATED');
      assert.equal(typeof body.error.message, 'string');
      assert.ok(!body.error.message.includes(TOKEN));
    }
    assert.equal((await rest('/v1/nowhere')).status, 401);

    // A write without the token changes nothing (it is refused before its body is read).
    const write = await rest('/v1/memory', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ id: 'sneaky', size: '4096' }),
    });
    assert.equal(write.status, 401);
    const memory = await rest('/v1/memory', bearer(TOKEN));
    assert.equal(memory.status, 200);
    assert.deepEqual(((await memory.json()) as { memory: unknown[] }).memory, []);

    // The right token, with the scheme in any case.
    assert.equal((await rest('/v1/devices', bearer(TOKEN))).status, 200);
    assert.equal((await rest('/v1/devices', { headers: { authorization: `bearer ${TOKEN}` } })).status, 200);

    // Probes are open; the refusals are counted.
    assert.equal((await rest('/healthz')).status, 200);
    assert.equal((await rest('/readyz')).status, 200);
    const metrics = await rest('/metrics');
    assert.equal(metrics.status, 200);
    assert.match(
      await metrics.text(),
      /vdpa_mapd_request_duration_seconds_count\{[^}]*code="UNAUTHENTICATED"[^}]*\} [1-9]/,
    );

    // gRPC over mTLS.
    const pem = (file: string) => fs.readFileSync(file);
    const ca = pem(pki.ca);
    const mtls = credentials.createSsl(ca, pem(pki.clientKey), pem(pki.clientCert));
    const devices = client(DeviceServiceClient, api.grpcAddress, mtls);
    for (const token of [undefined, 'wrong']) {
      const f = (await call(devices, 'listDevices', token)) as GrpcFailure;
      assert.equal(f.code, status.UNAUTHENTICATED, f.details);
      assert.equal(f.metadata.get('error-code')[0], 'UNAUTHENTICATED');
    }
    const listed = await call(devices, 'listDevices', TOKEN);
    assert.deepEqual(listed.devices.map((d: { id: string }) => d.id).sort(), ['vdpa0', 'vdpa1']);
    const health = client(HealthClient, api.grpcAddress, mtls);
    assert.deepEqual(await call(health, 'check'), { status: 'SERVING' });

    // Without a client certificate, with one another CA signed, or in plaintext: no connection.
    for (const creds of [
      credentials.createSsl(ca),
      credentials.createSsl(ca, pem(pki.rogueKey), pem(pki.rogueCert)),
      credentials.createInsecure(),
    ]) {
      const other = client(DeviceServiceClient, api.grpcAddress, creds);
      const f = (await call(other, 'listDevices', TOKEN)) as GrpcFailure;
      assert.equal(f.code, status.UNAVAILABLE, f.details);
    }
  });

  test('--auth-probes token: health and metrics need the token too', async () => {
    const api = await start({ auth: { token: TOKEN, probes: 'token' } });
    const auth = { headers: { authorization: `Bearer ${TOKEN}` } };
    for (const url of ['/healthz', '/readyz', '/metrics']) {
      assert.equal((await fetch(`${api.restAddress}${url}`)).status, 401, url);
      assert.equal((await fetch(`${api.restAddress}${url}`, auth)).status, 200, url);
    }
    const health = client(HealthClient, api.grpcAddress, credentials.createInsecure());
    assert.equal(((await call(health, 'check')) as GrpcFailure).code, status.UNAUTHENTICATED);
    assert.deepEqual(await call(health, 'check', TOKEN), { status: 'SERVING' });
  });
});
