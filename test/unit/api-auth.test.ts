/**
 * The bearer token check, the security and quota options of the API server's configuration, and
 * the warning for an unauthenticated non-loopback listener.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { AuthError, BearerAuth, isLoopback, wwwAuthenticate } from '../../services/api/auth.ts';
import { type ApiConfig, ConfigError, parseApiConfig, USAGE } from '../../services/api/config.ts';
import { warnIfExposed } from '../../services/api/main.ts';
import { quotaOf } from '../../src/queue/quota.ts';

const TOKEN = 'abc-DEF_123.~+/xyz==';

function reason(fn: () => void): string {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof AuthError);
    assert.equal(e.code, 'UNAUTHENTICATED');
    return e.reason;
  }
  return 'ok';
}

test('BearerAuth: exactly one "Bearer <token>" with the right token', () => {
  const auth = new BearerAuth(TOKEN);
  assert.equal(
    reason(() => auth.check([`Bearer ${TOKEN}`])),
    'ok',
  );
  assert.equal(
    reason(() => auth.check([`bearer ${TOKEN}`])),
    'ok',
  );
  assert.equal(
    reason(() => auth.check([`BEARER  ${TOKEN}`])),
    'ok',
  );
  assert.equal(
    reason(() => auth.check([])),
    'missing',
  );
  for (const bad of [
    [''],
    ['Bearer'],
    [`Bearer ${TOKEN}x`],
    [`Bearer ${TOKEN.slice(0, -1)}`],
    [`Basic ${TOKEN}`],
    [TOKEN],
    [`Bearer ${TOKEN} extra`],
    [`Bearer ${TOKEN}`, `Bearer ${TOKEN}`],
    [Buffer.from(`Bearer ${TOKEN}`)],
  ]) {
    assert.equal(
      reason(() => auth.check(bad)),
      'invalid',
      String(bad),
    );
  }
  assert.equal(wwwAuthenticate(new AuthError('missing')), 'Bearer realm="vdpa-mapd"');
  assert.equal(wwwAuthenticate(new AuthError('invalid')), 'Bearer realm="vdpa-mapd", error="invalid_token"');
  assert.throws(() => new BearerAuth(''), TypeError);
  assert.throws(() => new BearerAuth('has space'), TypeError);
});

test('loopback hosts', () => {
  for (const h of ['127.0.0.1', '127.1.2.3', '::1', 'localhost']) assert.ok(isLoopback(h), h);
  for (const h of ['0.0.0.0', '::', '10.0.0.1', '192.168.1.1', 'example.com', '127.0.0.1.nip.io']) {
    assert.ok(!isLoopback(h), h);
  }
});

test('the token: from a file (trimmed) or from the variable; the flag wins; probes open by default', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-auth-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'token');
  fs.writeFileSync(file, `${TOKEN}\n`);
  assert.deepEqual(parseApiConfig(['--auth-token-file', file], {})?.auth, { token: TOKEN, probes: 'open' });
  assert.deepEqual(parseApiConfig([], { VDPA_MAPD_AUTH_TOKEN: 'from-env' })?.auth, {
    token: 'from-env',
    probes: 'open',
  });
  assert.equal(
    parseApiConfig(['--auth-token-file', file], { VDPA_MAPD_AUTH_TOKEN: 'env' })?.auth?.token,
    TOKEN,
  );
  assert.deepEqual(parseApiConfig(['--auth-probes', 'token'], { VDPA_MAPD_AUTH_TOKEN: 'x' })?.auth, {
    token: 'x',
    probes: 'token',
  });
  assert.equal(parseApiConfig([], {})?.auth, undefined);

  fs.writeFileSync(path.join(dir, 'empty'), '\n');
  fs.writeFileSync(path.join(dir, 'spaced'), 'two words\n');
  for (const [argv, env] of [
    [['--auth-token-file', path.join(dir, 'missing')], {}],
    [['--auth-token-file', path.join(dir, 'empty')], {}],
    [['--auth-token-file', path.join(dir, 'spaced')], {}],
    [[], { VDPA_MAPD_AUTH_TOKEN: 'tab\there' }],
    [['--auth-probes', 'token'], {}],
    [['--auth-probes', 'maybe'], { VDPA_MAPD_AUTH_TOKEN: 'x' }],
  ] as [string[], NodeJS.ProcessEnv][]) {
    assert.throws(
      () => parseApiConfig(argv, env),
      (e: unknown) => e instanceof ConfigError && !e.message.includes('two words'),
      argv.join(' '),
    );
  }
});

test('gRPC TLS: cert and key together, client CA only with them', () => {
  assert.deepEqual(parseApiConfig(['--grpc-tls-cert', '/c.pem', '--grpc-tls-key', '/k.pem'], {})?.grpcTls, {
    cert: '/c.pem',
    key: '/k.pem',
  });
  assert.deepEqual(
    parseApiConfig([], {
      VDPA_MAPD_GRPC_TLS_CERT: '/c.pem',
      VDPA_MAPD_GRPC_TLS_KEY: '/k.pem',
      VDPA_MAPD_GRPC_TLS_CLIENT_CA: '/ca.pem',
    })?.grpcTls,
    { cert: '/c.pem', key: '/k.pem', clientCa: '/ca.pem' },
  );
  for (const argv of [
    ['--grpc-tls-cert', '/c.pem'],
    ['--grpc-tls-key', '/k.pem'],
    ['--grpc-tls-client-ca', '/ca.pem'],
  ]) {
    assert.throws(() => parseApiConfig(argv, {}), ConfigError, argv.join(' '));
  }
});

test('quotas: defaults, per-device overrides (repeatable, from the variable too), unlimited', () => {
  const config = parseApiConfig(
    [
      '--quota-max-bytes',
      '0x40000000',
      '--quota-max-entries',
      '100',
      '--device-quota',
      'vdpa1=bytes:4096',
      '--device-quota',
      'vdpa2=entries:unlimited,bytes:0',
    ],
    {},
  );
  assert.ok(config?.quotas);
  assert.deepEqual(quotaOf(config.quotas, 'vdpa0'), { maxBytes: 0x40000000n, maxEntries: 100 });
  assert.deepEqual(quotaOf(config.quotas, 'vdpa1'), { maxBytes: 4096n, maxEntries: 100 });
  assert.deepEqual(quotaOf(config.quotas, 'vdpa2'), { maxBytes: 0n, maxEntries: undefined });
  const fromEnv = parseApiConfig([], { VDPA_MAPD_DEVICE_QUOTA: 'a=entries:3  b=bytes:0x1000' });
  assert.deepEqual(quotaOf(fromEnv?.quotas, 'a'), { maxEntries: 3 });
  assert.deepEqual(quotaOf(fromEnv?.quotas, 'b'), { maxBytes: 0x1000n });
  assert.deepEqual(quotaOf(fromEnv?.quotas, 'c'), {});
  assert.equal(parseApiConfig([], {})?.quotas, undefined);
  for (const argv of [
    ['--quota-max-bytes', '-1'],
    ['--quota-max-bytes', '0x10000000000000000'],
    ['--quota-max-bytes', '1.5'],
    ['--quota-max-entries', 'many'],
    ['--device-quota', 'vdpa1'],
    ['--device-quota', 'vdpa1=bytes:1,bytes:2'],
    ['--device-quota', 'vdpa1=pages:1'],
    ['--device-quota', 'bad id=bytes:1'],
    ['--device-quota', 'a=bytes:1', '--device-quota', 'a=entries:1'],
  ]) {
    assert.throws(() => parseApiConfig(argv, {}), ConfigError, argv.join(' '));
  }
});

test('--help lists the security and quota options', () => {
  for (const flag of [
    'auth-token-file',
    'auth-probes',
    'grpc-tls-client-ca',
    'quota-max-bytes',
    'device-quota',
  ]) {
    assert.ok(USAGE.includes(`--${flag}`), flag);
  }
  assert.ok(USAGE.includes('VDPA_MAPD_AUTH_TOKEN;'));
});

test('a listener beyond loopback without authentication is warned about', () => {
  const base = parseApiConfig([], {}) as ApiConfig;
  const warnings = (config: ApiConfig) => {
    const seen: string[] = [];
    warnIfExposed(config, { warn: (_o: object, msg: string) => seen.push(msg) } as never);
    return seen;
  };
  const anyHost = { host: '0.0.0.0', port: 0 };
  assert.deepEqual(warnings(base), []);
  assert.equal(warnings({ ...base, restListen: anyHost }).length, 1);
  assert.equal(warnings({ ...base, restListen: anyHost, grpcListen: anyHost }).length, 2);
  assert.deepEqual(warnings({ ...base, restListen: anyHost, auth: { token: 't', probes: 'open' } }), []);
  const mtls = { cert: '/c', key: '/k', clientCa: '/ca' };
  assert.deepEqual(warnings({ ...base, grpcListen: anyHost, grpcTls: mtls }), []);
  assert.equal(warnings({ ...base, grpcListen: anyHost, grpcTls: { cert: '/c', key: '/k' } }).length, 1);
});

test('beyond loopback with nothing authenticating callers, the server refuses to start unless told it is on purpose', () => {
  const refused = (argv: string[], env: NodeJS.ProcessEnv = {}) => {
    try {
      parseApiConfig(argv, env);
      return undefined;
    } catch (e) {
      assert.ok(e instanceof ConfigError);
      return e.message;
    }
  };
  const message = refused(['--rest-listen', '0.0.0.0:8080', '--grpc-listen', '0.0.0.0:50051']);
  assert.match(
    message ?? '',
    /^REST \(--rest-listen 0\.0\.0\.0:8080\) and gRPC \(--grpc-listen 0\.0\.0\.0:50051\) listen beyond loopback/,
  );
  assert.match(message ?? '', /--auth-token-file FILE or VDPA_MAPD_AUTH_TOKEN/);
  assert.match(message ?? '', /--insecure-listen-without-auth/);
  assert.match(
    refused([], { VDPA_MAPD_GRPC_LISTEN: '[::]:50051' }) ?? '',
    /^gRPC .* listens beyond loopback/,
  );
  // Loopback, a token, or gRPC mTLS: accepted.
  assert.equal(refused([]), undefined);
  assert.equal(refused(['--rest-listen', '0.0.0.0:8080'], { VDPA_MAPD_AUTH_TOKEN: 'abc' }), undefined);
  const mtls = ['--grpc-tls-cert', '/c', '--grpc-tls-key', '/k', '--grpc-tls-client-ca', '/ca'];
  assert.equal(refused(['--grpc-listen', '0.0.0.0:1', ...mtls]), undefined);
  // On purpose: the flag or the variable; then only warned about.
  const insecure = parseApiConfig(['--rest-listen', '0.0.0.0:8080', '--insecure-listen-without-auth'], {});
  assert.equal(insecure?.insecureListenWithoutAuth, true);
  assert.equal(
    refused(['--rest-listen', '0.0.0.0:8080'], { VDPA_MAPD_INSECURE_LISTEN_WITHOUT_AUTH: 'true' }),
    undefined,
  );
  assert.match(
    refused([], { VDPA_MAPD_INSECURE_LISTEN_WITHOUT_AUTH: 'yes' }) ?? '',
    /expected true or false/,
  );
});
