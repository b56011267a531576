import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DEFAULT_LIMITS } from '../../src/api/parse.ts';
import {
  ConfigError,
  DEFAULT_CONNECTIONS,
  OPTIONS,
  optionsTable,
  parseApiConfig,
  parseListen,
} from '../../services/api/config.ts';

test('defaults', () => {
  const config = parseApiConfig([], {});
  assert.deepEqual(config, {
    restListen: { host: '127.0.0.1', port: 8080 },
    grpcListen: { host: '127.0.0.1', port: 50051 },
    agentSocket: '/var/lib/vdpa-mapd/agent/agent.sock',
    stateDir: '/var/lib/vdpa-mapd',
    limits: DEFAULT_LIMITS,
    connections: DEFAULT_CONNECTIONS,
    core: {},
    shutdownGraceMs: 10000,
    logLevel: 'info',
  });
});

test('flags win over the environment; the socket follows the state dir', () => {
  const config = parseApiConfig(
    ['--rest-listen', '0.0.0.0:0', '--state-dir', '/tmp/s', '--max-batch-ops', '8'],
    {
      VDPA_MAPD_REST_LISTEN: '127.0.0.1:9',
      VDPA_MAPD_GRPC_LISTEN: '[::1]:6000',
      VDPA_MAPD_STATE_DIR: '/elsewhere',
      VDPA_MAPD_LOG_LEVEL: 'debug',
    },
  );
  assert.ok(config);
  assert.deepEqual(config.restListen, { host: '0.0.0.0', port: 0 });
  assert.deepEqual(config.grpcListen, { host: '::1', port: 6000 });
  assert.equal(config.stateDir, '/tmp/s');
  assert.equal(config.agentSocket, '/tmp/s/agent/agent.sock');
  assert.equal(config.limits.maxBatchOps, 8);
  assert.deepEqual(parseApiConfig(['--max-queued', '16'], { VDPA_MAPD_FLUSH_TIMEOUT_MS: '500' })?.core, {
    maxQueued: 16,
    flushTimeoutMs: 500,
  });
  assert.equal(config.logLevel, 'debug');
  assert.equal(parseApiConfig(['--help'], {}), null);
});

test('bad values are ConfigErrors', () => {
  for (const argv of [
    ['--rest-listen', '8080'],
    ['--grpc-listen', 'host:70000'],
    ['--body-limit', '0'],
    ['--body-limit', '2048', '--max-inflight-bytes', '1024'],
    ['--headers-timeout-ms', '-1'],
    ['--max-connections', 'many'],
    ['--max-regions', '1e3'],
    ['--log-level', 'loud'],
    ['--unknown'],
    ['positional'],
  ]) {
    assert.throws(() => parseApiConfig(argv, {}), ConfigError, argv.join(' '));
  }
  assert.throws(() => parseListen('a:b:1', 'x'), ConfigError);
});

test('the README table lists every option', () => {
  const table = optionsTable();
  for (const o of Object.values(OPTIONS)) assert.ok(table.includes(`\`--${o.flag}\``));
});
