/**
 * vdpactl without a server: its command line, u64 values, the memtable file, exit codes, tables.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { COMMANDS, DEFAULT_SERVER, parseInvocation } from '../../services/cli/args.ts';
import { EXIT, exitCodeFor } from '../../services/cli/exit-codes.ts';
import { parseMemTableFile } from '../../services/cli/memtable-file.ts';
import { table } from '../../services/cli/render.ts';
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
        regions: [{ iova: 1048576, size: '2M', memory: 'ram0', offset: '0x0', perm: 'ro' }],
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
    ]) {
      assert.throws(() => parseMemTableFile(bad, 't.json'), UsageError, bad);
    }
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
