import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError, parseAgentConfig, parseMemorySpec, parseSize } from '../../services/agent/config.ts';

test('defaults follow the state directory', () => {
  const c = parseAgentConfig(['--state-dir', '/srv/mapd'], {})!;
  assert.equal(c.socketPath, '/srv/mapd/agent/agent.sock');
  assert.deepEqual(c.devices, []);
  assert.ok(c.allowedRoots.includes('/srv/mapd/memory'));
  assert.equal(c.logLevel, 'info');
  assert.equal(c.attachDir, '/srv/mapd/vhost-user');
  assert.equal(parseAgentConfig([], {})!.stateDir, '/var/lib/vdpa-mapd');
  assert.equal(
    parseAgentConfig(['--attach-dir', '/run/vu'], { VDPA_MAPD_ATTACH_DIR: '/e/vu' })!.attachDir,
    '/run/vu',
  );
  assert.equal(parseAgentConfig([], { VDPA_MAPD_ATTACH_DIR: '/e/vu' })!.attachDir, '/e/vu');
  assert.equal(parseAgentConfig(['--attach-answer-ms', '500'], {})!.attachAnswerMs, 500);
  assert.throws(() => parseAgentConfig(['--attach-answer-ms', '0'], {}), ConfigError);
});

test('env is read, flags win over it', () => {
  const env = {
    VDPA_MAPD_STATE_DIR: '/e/state',
    VDPA_MAPD_AGENT_SOCKET: '/e/agent.sock',
    VDPA_MAPD_DEVICES: 'sim:a,iommu=onchip,sim:b; kernel:/dev/vhost-vdpa-0 ,kernel:auto',
    VDPA_MAPD_ALLOWED_ROOTS: '/dev/shm/x,/hugepages',
    VDPA_MAPD_LOG_LEVEL: 'debug',
  };
  const c = parseAgentConfig([], env)!;
  assert.deepEqual(c.devices, ['sim:a,iommu=onchip', 'sim:b', 'kernel:/dev/vhost-vdpa-0', 'kernel:auto']);
  // The agent's own memory directory stays allowed whatever roots are given.
  assert.deepEqual(c.allowedRoots, ['/dev/shm/x', '/hugepages', '/e/state/memory']);
  assert.deepEqual([c.stateDir, c.socketPath, c.logLevel], ['/e/state', '/e/agent.sock', 'debug']);

  const f = parseAgentConfig(
    ['--device', 'sim:z', '--device', 'sim:y,iommu=platform', '--socket', '/f.sock', '--log-level', 'warn'],
    env,
  )!;
  assert.deepEqual(f.devices, ['sim:z', 'sim:y,iommu=platform']);
  assert.deepEqual([f.socketPath, f.logLevel], ['/f.sock', 'warn']);
});

test('memory specs: sizes with suffixes, memfd, paths', () => {
  assert.equal(parseSize('4096'), 4096n);
  assert.equal(parseSize('0x1000'), 4096n);
  assert.equal(parseSize('2M'), 2n << 20n);
  assert.equal(parseSize('1t'), 1n << 40n);
  assert.equal(parseSize('16777216T'), 1n << 64n); // past u64: the registry refuses it, naming the size
  assert.deepEqual(parseMemorySpec('ram=1G'), { id: 'ram', size: 1n << 30n, kind: 'file' });
  assert.deepEqual(parseMemorySpec('ram=memfd:64K'), { id: 'ram', size: 64n << 10n, kind: 'memfd' });
  assert.deepEqual(parseMemorySpec('g=/dev/shm/g'), { id: 'g', path: '/dev/shm/g' });
  assert.equal((parseMemorySpec('g=./x') as { path: string }).path, `${process.cwd()}/x`);
});

test('bad input is a ConfigError naming what is wrong', () => {
  const bad: [string[], RegExp][] = [
    [['--memory', 'ram'], /--memory ram: expected ID=SIZE/],
    [['--memory', '=1M'], /expected ID=SIZE/],
    [['--memory', 'ram=1.5G'], /"1.5G" is not a size/],
    [['--log-level', 'loud'], /log level "loud" is not one of/],
    [['--nope'], /nope/],
    [['extra'], /extra/],
  ];
  for (const [argv, message] of bad) {
    assert.throws(
      () => parseAgentConfig(argv, {}),
      (e: unknown) => e instanceof ConfigError && message.test(e.message),
    );
  }
  assert.equal(parseAgentConfig(['--help'], {}), null);
});

test('a malformed device spec is a ConfigError from the device factory', () => {
  assert.throws(
    () => parseAgentConfig(['--device', 'sim:a,iommu=fast'], {}),
    (e: unknown) => e instanceof ConfigError && /iommu=fast: must be platform or onchip/.test(e.message),
  );
});
