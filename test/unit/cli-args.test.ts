/**
 * vdpactl without a server: its command line (TLS settings among it), u64 values, the memtable file,
 * exit codes, tables.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { COMMANDS, DEFAULT_SERVER, parseInvocation, USAGE } from '../../services/cli/args.ts';
import { EXIT, exitCodeFor } from '../../services/cli/exit-codes.ts';
import { parseMemTableFile } from '../../services/cli/memtable-file.ts';
import { table } from '../../services/cli/render.ts';
import { channelSecurity } from '../../services/cli/tls.ts';
import { u32Arg, u64Arg, UsageError } from '../../services/cli/values.ts';

const parse = (line: string, env: NodeJS.ProcessEnv = {}) => parseInvocation(line.split(' '), env);

describe('vdpactl command line', () => {
  test('finds the command, its arguments and options; globals anywhere', () => {
    const inv = parse('mappings map vdpa0 --iova 1M --size 0x1000 --memory ram0 --json --server h:1')!;
    assert.equal(inv.command.name, 'mappings map');
    assert.deepEqual(inv.args, { DEVICE: 'vdpa0' });
    assert.deepEqual(inv.options, { iova: '1M', size: '0x1000', memory: 'ram0' });
    assert.equal(inv.server, 'h:1');
    assert.equal(inv.json, true);
    assert.equal(parse('devices')!.args.DEVICE, undefined);
    assert.equal(parse('devices vdpa1')!.args.DEVICE, 'vdpa1');
    assert.equal(parse('watch --count 3')!.options.count, '3');
  });

  test('server and token: flag, then environment, then default', () => {
    const env = { VDPA_MAPD_SERVER: 'env:2', VDPA_MAPD_TOKEN: 's3cret' };
    assert.equal(parse('devices', env)!.server, 'env:2');
    assert.equal(parse('devices', env)!.token, 's3cret');
    assert.equal(parse('--server flag:3 --token t devices', env)!.server, 'flag:3');
    assert.equal(parse('--server flag:3 --token t devices', env)!.token, 't');
    assert.equal(parse('devices')!.server, DEFAULT_SERVER);
    assert.equal(parse('devices')!.token, undefined);
    assert.equal(parse('devices')!.timeoutMs, 30_000);
    assert.equal(parse('devices --timeout 1.5')!.timeoutMs, 1500);
  });

  test('--help anywhere', () => {
    assert.equal(parse('--help'), null);
    assert.equal(parse('mappings map -h'), null);
  });

  test('usage errors', () => {
    for (const line of [
      '',
      'nope',
      'mappings',
      'mappings list',
      'mappings list a b',
      'memory list --iova 1',
      'mappings map vdpa0 --iova 1 --size 1',
      'devices --bogus',
      'devices --timeout 0',
    ]) {
      assert.throws(() => parse(line), UsageError, line);
    }
  });

  test('every command is reachable by its own words', () => {
    for (const c of COMMANDS) {
      const args = c.args.filter((a) => !a.endsWith('?')).map(() => 'x');
      const required = (c.required ?? []).flatMap((o) => [`--${o}`, '1']);
      assert.equal(parseInvocation([...c.name.split(' '), ...args, ...required], {})!.command, c);
    }
  });
});

describe('vdpactl TLS settings', () => {
  const env = {
    VDPA_MAPD_TLS_CA: 'env-ca.pem',
    VDPA_MAPD_TLS_CERT: 'env-cert.pem',
    VDPA_MAPD_TLS_KEY: 'env-key.pem',
    VDPA_MAPD_TLS_SERVER_NAME: 'env.example',
  };

  test('none given: plaintext; any one turns TLS on; flag, then environment', () => {
    assert.equal(parse('devices')!.tls, undefined);
    assert.equal(parse('devices', { VDPA_MAPD_TLS_CA: '' })!.tls, undefined);
    assert.deepEqual(parse('--tls-ca ca.pem devices')!.tls, { ca: 'ca.pem' });
    assert.deepEqual(parse('devices --tls-server-name api.example')!.tls, { serverName: 'api.example' });
    assert.deepEqual(parse('--tls-cert c.pem --tls-key k.pem devices')!.tls, { cert: 'c.pem', key: 'k.pem' });
    assert.deepEqual(parse('devices', env)!.tls, {
      ca: 'env-ca.pem',
      cert: 'env-cert.pem',
      key: 'env-key.pem',
      serverName: 'env.example',
    });
    assert.deepEqual(parse('--tls-ca ca.pem --tls-key k.pem --tls-server-name n devices', env)!.tls, {
      ca: 'ca.pem',
      cert: 'env-cert.pem',
      key: 'k.pem',
      serverName: 'n',
    });
  });

  test('a client certificate without its key, or a key without its certificate, is a usage error', () => {
    assert.throws(() => parse('--tls-cert c.pem devices'), /--tls-cert needs --tls-key/);
    assert.throws(() => parse('--tls-ca ca.pem --tls-key k.pem devices'), /--tls-key needs --tls-cert/);
    assert.throws(() => parse('devices', { VDPA_MAPD_TLS_KEY: 'k.pem' }), UsageError);
    assert.throws(() => parse('--tls-ca', {}), UsageError, 'a flag without its value');
  });

  test('the help lists every TLS flag and its environment variable', () => {
    for (const word of [
      '--tls-ca',
      '--tls-cert',
      '--tls-key',
      '--tls-server-name',
      'VDPA_MAPD_TLS_SERVER_NAME',
    ])
      assert.ok(USAGE.includes(word), word);
  });

  test('credentials: plaintext without settings; a missing or non-PEM file names its flag', (t) => {
    assert.equal(channelSecurity(undefined).credentials._isSecure(), false);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-cli-tls-'));
    t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
    const missing = path.join(dir, 'missing.pem');
    const junk = path.join(dir, 'junk.pem');
    fs.writeFileSync(junk, 'not a certificate\n');
    for (const [tls, flag] of [
      [{ ca: missing }, /^--tls-ca .*missing\.pem: ENOENT/],
      [{ ca: junk }, /^--tls-ca .*junk\.pem: /],
      [{ ca: dir }, /^--tls-ca .*: EISDIR/],
      [{ cert: missing, key: junk }, /^--tls-cert .*missing\.pem: ENOENT/],
      [{ cert: junk, key: junk }, /^--tls-cert .*junk\.pem: /],
    ] as const) {
      assert.throws(
        () => channelSecurity(tls),
        (e) => e instanceof UsageError && flag.test(e.message),
      );
    }
  });
});

describe('vdpactl values', () => {
  test('u64: decimal, hex and K/M/G/T become 0x hex', () => {
    assert.equal(u64Arg('1048576', 'x'), '0x100000');
    assert.equal(u64Arg('0x100000', 'x'), '0x100000');
    assert.equal(u64Arg('1M', 'x'), '0x100000');
    assert.equal(u64Arg('2g', 'x'), '0x80000000');
    assert.equal(u64Arg('18446744073709551615', 'x'), '0xffffffffffffffff');
    for (const bad of ['', '-1', '1.5', '0x', '1P', '18446744073709551616', '16777216T'])
      assert.throws(() => u64Arg(bad, 'x'), UsageError, bad);
  });

  test('u32', () => {
    assert.equal(u32Arg('4294967295', 'x'), 4294967295);
    assert.throws(() => u32Arg('4294967296', 'x'), UsageError);
    assert.throws(() => u32Arg('-1', 'x'), UsageError);
  });

  test('memtable file: the REST body, u64 fields normalized, unknown keys refused', () => {
    const table = parseMemTableFile(
      JSON.stringify({
        asid: 1,
        regions: [{ iova: 1048576, size: '2097152', memory: 'ram0', offset: '0x0', perm: 'ro' }],
      }),
      't.json',
    );
    assert.deepEqual(table, {
      asid: 1,
      regions: [{ iova: '0x100000', size: '0x200000', memory: 'ram0', offset: '0x0', perm: 'ro' }],
    });
    assert.deepEqual(parseMemTableFile('{"regions": []}', 't.json'), { regions: [] });
    for (const bad of [
      'not json',
      '[]',
      '{}',
      '{"regions": [], "device": "x"}',
      '{"regions": [{"iova": "0", "size": "1", "memory": "m", "ofset": "1"}]}',
      '{"regions": [{"iova": "0", "size": 1.5, "memory": "m"}]}',
      '{"regions": [{"iova": "0", "size": "1"}]}',
      // REST refuses suffixes in a body; so does the file (the command line takes them).
      '{"regions": [{"iova": "0", "size": "2M", "memory": "m"}]}',
    ]) {
      assert.throws(() => parseMemTableFile(bad, 't.json'), UsageError, bad);
    }
    assert.throws(
      () => parseMemTableFile('{"regions": [{"iova": "0", "size": "2M", "memory": "m"}]}', 't.json'),
      /t\.json: regions\[0\]\.size: /,
    );
  });
});

describe('vdpactl exit codes', () => {
  test('follow the gRPC status', () => {
    assert.equal(exitCodeFor(status.NOT_FOUND), EXIT.NOT_FOUND);
    assert.equal(exitCodeFor(status.INVALID_ARGUMENT), EXIT.USAGE);
    for (const s of [status.ALREADY_EXISTS, status.ABORTED, status.FAILED_PRECONDITION])
      assert.equal(exitCodeFor(s), EXIT.CONFLICT);
    for (const s of [status.UNAVAILABLE, status.DEADLINE_EXCEEDED, status.RESOURCE_EXHAUSTED])
      assert.equal(exitCodeFor(s), EXIT.UNAVAILABLE);
    for (const s of [status.UNAUTHENTICATED, status.PERMISSION_DENIED])
      assert.equal(exitCodeFor(s), EXIT.DENIED);
    assert.equal(exitCodeFor(status.INTERNAL), EXIT.OTHER);
    assert.equal(exitCodeFor(status.UNKNOWN), EXIT.OTHER);
  });

  test('an exceeded quota is a conflict, not back-pressure', () => {
    assert.equal(exitCodeFor(status.RESOURCE_EXHAUSTED, 'QUOTA_EXCEEDED'), EXIT.CONFLICT);
    assert.equal(exitCodeFor(status.RESOURCE_EXHAUSTED, 'RESOURCE_EXHAUSTED'), EXIT.UNAVAILABLE);
  });
});

describe('vdpactl tables', () => {
  test('columns aligned to the widest cell, no trailing blanks', () => {
    assert.equal(
      table(
        ['ID', 'SIZE', 'PATH'],
        [
          ['ram0', '0x4000000', '-'],
          ['a', '0x1', '/x'],
        ],
      ),
      ['ID    SIZE       PATH', 'ram0  0x4000000  -', 'a     0x1        /x'].join('\n'),
    );
  });
});
