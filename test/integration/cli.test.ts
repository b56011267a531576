/**
 * vdpactl as a user runs it (bin/vdpactl.js in a child process) against the real agent and API
 * server: tables and --json, map / list / unmap, memtable --dry-run, memory, watch, the exit code
 * of each kind of failure, and gRPC over mTLS.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import {
  type Metadata,
  Server,
  ServerCredentials,
  type ServerUnaryCall,
  type sendUnaryData,
} from '@grpc/grpc-js';
import type { RunningApiServer } from '../../services/api/main.ts';
import { DeviceServiceClient } from '../../services/api/proto.ts';
import { EXIT } from '../../services/cli/exit-codes.ts';
import { until } from './agent-harness.ts';
import { type Agent, apiConfig, spawnAgent, startReadyApi, startStack, tempDir } from './api-harness.ts';
import { makePki, type Pki } from './certs.ts';
import { type ChildOutput, output } from './process-harness.ts';

type Stack = Awaited<ReturnType<typeof startStack>>;

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CLI = path.join(ROOT, 'bin/vdpactl.js');
const RUN_LIMIT_MS = 30_000;

type Run = ChildOutput;

/** The environment without VDPA_MAPD_* (a developer's settings must not leak into the test). */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return {
    ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('VDPA_MAPD_'))),
    ...extra,
  };
}

function start(args: readonly string[], env = cleanEnv()): ChildProcess {
  return spawn(process.execPath, [CLI, ...args], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Runs vdpactl to its end (killed after RUN_LIMIT_MS). */
function finish(child: ChildProcess): Promise<Run> {
  return output(child, RUN_LIMIT_MS);
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

describe('vdpactl', () => {
  let s: Stack;
  const running = new Set<ChildProcess>();
  const vdpactl = (...args: string[]) => {
    const child = start(['--server', s.api.grpcAddress, ...args]);
    running.add(child);
    return finish(child).finally(() => running.delete(child));
  };
  const ok = async (...args: string[]) => {
    const run = await vdpactl(...args);
    assert.equal(run.code, EXIT.OK, `vdpactl ${args.join(' ')}: ${run.stderr}`);
    return run.stdout;
  };
  const listed = async () => (await s.grpc.mapping('listMappings', { device: 'vdpa0' })).mappings ?? [];

  before(async () => {
    s = await startStack('cli');
  });
  after(async () => {
    for (const child of running) child.kill('SIGKILL');
    await s?.stop();
  });

  test('devices: table, --json, and NOT_FOUND exits 3', async () => {
    const lines = (await ok('devices')).trim().split('\n');
    assert.match(lines[0]!, /^ID\s+KIND\s+IOMMU\s+READY\s+MAPPED_BYTES/);
    assert.deepEqual(
      lines.slice(1).map((l) => l.split(/\s+/).slice(0, 4)),
      [
        ['vdpa0', 'simulated', 'platform', 'yes'],
        ['vdpa1', 'simulated', 'onchip', 'yes'],
      ],
    );
    const json = JSON.parse(await ok('devices', 'vdpa1', '--json'));
    assert.equal(json.device.iommu, 'onchip');
    assert.match(json.device.iovaRange.last, /^0x[0-9a-f]+$/);

    const missing = await vdpactl('devices', 'nope');
    assert.equal(missing.code, EXIT.NOT_FOUND);
    assert.match(missing.stderr, /NOT_FOUND: .*nope.*\(field device\)/);
    assert.equal(missing.stdout, '');
  });

  test('memory register and list', async () => {
    const registered = await ok('memory', 'register', 'ram0', '--size', '16M');
    assert.match(registered, /^ram0\s+file\s+0x1000000\s+0\s+yes\s+\//m);
    const { memory } = JSON.parse(await ok('memory', 'list', '--json'));
    assert.deepEqual(
      memory.map((m: { id: string; size: string }) => [m.id, m.size]),
      [['ram0', '0x1000000']],
    );
  });

  test('mappings map, list (table and --json), a conflict exits 4, bad values exit 2', async () => {
    const mapped = await ok(
      'mappings',
      'map',
      'vdpa0',
      '--iova',
      '1M',
      '--size',
      '0x200000',
      '--memory',
      'ram0',
    );
    assert.match(mapped, /^0\s+0x100000\s+0x200000\s+ram0\s+0x0\s+rw$/m);
    assert.deepEqual(
      (await listed()).map((m: { iova: string; size: string }) => [m.iova, m.size]),
      [['0x100000', '0x200000']],
    );

    const table = (await ok('mappings', 'list', 'vdpa0')).trim().split('\n');
    assert.deepEqual(table[0]!.split(/\s+/), ['ASID', 'IOVA', 'SIZE', 'MEMORY', 'OFFSET', 'PERM']);
    assert.deepEqual(table[1]!.split(/\s+/), ['0', '0x100000', '0x200000', 'ram0', '0x0', 'rw']);
    const json = JSON.parse(await ok('mappings', 'list', 'vdpa0', '--json'));
    assert.deepEqual(json, { mappings: await listed() });
    assert.equal(typeof json.mappings[0].iova, 'string');
    assert.deepEqual(JSON.parse(await ok('mappings', 'list', 'vdpa1', '--json')), { mappings: [] });

    const conflict = await vdpactl(
      'mappings',
      'map',
      'vdpa0',
      '--iova',
      '2M',
      '--size',
      '4K',
      '--memory',
      'ram0',
    );
    assert.equal(conflict.code, EXIT.CONFLICT, conflict.stderr);
    assert.match(conflict.stderr, /CONFLICT: .*errno EEXIST/);
    const asJson = await vdpactl(
      'mappings',
      'map',
      'vdpa0',
      '--iova',
      '2M',
      '--size',
      '4K',
      '--memory',
      'ram0',
      '--json',
    );
    assert.equal(asJson.code, EXIT.CONFLICT);
    assert.deepEqual(
      (({ status, code, field, errno }) => ({ status, code, field, errno }))(JSON.parse(asJson.stderr).error),
      { status: 'ABORTED', code: 'CONFLICT', field: 'iova', errno: 'EEXIST' },
    );

    const refused = await vdpactl(
      'mappings',
      'map',
      'vdpa0',
      '--iova',
      '8M',
      '--size',
      '4K',
      '--memory',
      'ram0',
      '--perm',
      'x',
    );
    assert.equal(refused.code, EXIT.USAGE, 'INVALID_ARGUMENT from the server');
    assert.match(refused.stderr, /INVALID_ARGUMENT/);
    const typo = await vdpactl(
      'mappings',
      'map',
      'vdpa0',
      '--iova',
      '8Q',
      '--size',
      '4K',
      '--memory',
      'ram0',
    );
    assert.equal(typo.code, EXIT.USAGE, 'a value vdpactl cannot read');
    assert.equal((await listed()).length, 1);
  });

  test('memtable apply --dry-run shows the plan and changes nothing', async () => {
    const file = path.join(s.dir, 'table.json');
    fs.writeFileSync(
      file,
      JSON.stringify({
        regions: [
          { iova: '0x100000', size: '0x100000', memory: 'ram0' },
          { iova: '0x1000000', size: '4194304', memory: 'ram0', offset: '0x800000', perm: 'ro' },
        ],
      }),
    );
    const before = await listed();
    const human = await ok('memtable', 'apply', 'vdpa0', '-f', file, '--dry-run');
    assert.match(human, /^invalidate\s+0\s+0x100000\s+0x200000/m);
    assert.match(human, /^update\s+0\s+0x1000000\s+0x400000\s+ram0\s+0x800000\s+ro$/m);
    assert.match(human, /dry run: 3 ops would be applied/);
    const plan = JSON.parse(await ok('memtable', 'apply', 'vdpa0', '-f', file, '--dry-run', '--json'));
    assert.equal(plan.dryRun, true);
    assert.deepEqual(
      plan.ops.map((o: { type: string; iova: string }) => [o.type, o.iova]),
      [
        ['invalidate', '0x100000'],
        ['update', '0x100000'],
        ['update', '0x1000000'],
      ],
    );
    assert.deepEqual(await listed(), before);

    fs.writeFileSync(file, '{"regions": [{"iova": "0", "size": "4096", "memory": "ram0", "ofset": "1"}]}');
    const typo = await vdpactl('memtable', 'apply', 'vdpa0', '-f', file, '--dry-run');
    assert.equal(typo.code, EXIT.USAGE);
    assert.match(typo.stderr, /unknown key "ofset"/);
  });

  test('memtable apply --summary prints the counts without the ops', async () => {
    const file = path.join(s.dir, 'summary-table.json');
    fs.writeFileSync(file, JSON.stringify({ regions: [{ iova: '0x0', size: '0x2000', memory: 'ram0' }] }));
    const human = await ok('memtable', 'apply', 'vdpa1', '-f', file, '--summary');
    assert.equal(human.trim(), 'applied 1 ops (0 invalidated, 1 mapped, 0 unchanged)');
    const again = JSON.parse(await ok('memtable', 'apply', 'vdpa1', '-f', file, '--summary', '--json'));
    assert.equal(again.unchanged, 1);
    assert.deepEqual(again.ops, []);
    fs.writeFileSync(file, '{"regions": []}');
    const cleared = await ok('memtable', 'apply', 'vdpa1', '-f', file, '--summary');
    assert.equal(cleared.trim(), 'applied 1 ops (1 invalidated, 0 mapped, 0 unchanged)');
  });

  test('watch --count N prints N events and exits 0', async () => {
    const child = start(['--server', s.api.grpcAddress, 'watch', 'vdpa0', '--count', '2', '--json']);
    running.add(child);
    const done = finish(child);
    let exited = false;
    void done.then(() => {
      exited = true;
    });
    // Events are not replayed: change the device until the watcher has seen two (it may subscribe late).
    await until('the watcher to exit after two events', async () => {
      if (exited) return true;
      await s.grpc.mapping('map', { device: 'vdpa0', iova: '0x40000000', size: '0x1000', memory: 'ram0' });
      await s.grpc.mapping('unmap', { device: 'vdpa0', iova: '0x40000000', size: '0x1000' });
      return exited;
    });
    const run = await done;
    running.delete(child);
    assert.equal(run.code, EXIT.OK, run.stderr);
    const events = run.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    assert.equal(events.length, 2);
    for (const e of events) {
      assert.equal(e.device, 'vdpa0');
      assert.equal(e.mapping.iova, '0x40000000');
      assert.ok(['mapped', 'unmapped'].includes(e.kind));
    }
    assert.notEqual(events[0].kind, events[1].kind);
    assert.equal(BigInt(events[1].sequence), BigInt(events[0].sequence) + 1n);
  });

  test('watch streams until Ctrl-C, then exits 0', async () => {
    const child = start(['--server', s.api.grpcAddress, 'watch']);
    running.add(child);
    const done = finish(child);
    let seen = false;
    child.stdout!.once('data', () => {
      seen = true;
    });
    await until('watch to print an event', async () => {
      if (seen) return true;
      await s.grpc.mapping('map', { device: 'vdpa1', iova: '0x50000000', size: '0x1000', memory: 'ram0' });
      await s.grpc.mapping('unmap', { device: 'vdpa1', iova: '0x50000000', size: '0x1000' });
      return seen;
    });
    child.kill('SIGINT');
    const run = await done;
    running.delete(child);
    assert.equal(run.code, EXIT.OK, run.stderr);
    assert.match(run.stdout, /^\d+ vdpa1 (mapped|unmapped) asid=0 iova=0x50000000 size=0x1000 memory=ram0/m);
  });

  test('unmap, then memory release; release while mapped exits 4', async () => {
    const busy = await vdpactl('memory', 'release', 'ram0');
    assert.equal(busy.code, EXIT.CONFLICT, busy.stderr);
    assert.match(busy.stderr, /FAILED_PRECONDITION/);
    const unmapped = await ok('mappings', 'unmap', 'vdpa0', '--iova', '0x100000', '--size', '2M');
    assert.match(unmapped, /^removed 1, remapped 0$/m);
    assert.deepEqual(await listed(), []);
    assert.equal((await ok('memory', 'release', 'ram0')).trim(), 'released ram0');
  });

  test('a server that is not there exits 5; a bad command line exits 2', async () => {
    const port = await freePort();
    const down = await finish(start(['--server', `127.0.0.1:${port}`, '--timeout', '5', 'devices']));
    assert.equal(down.code, EXIT.UNAVAILABLE, down.stderr);
    assert.match(down.stderr, /UNAVAILABLE/);
    const usage = await finish(start(['mappings', 'frobnicate']));
    assert.equal(usage.code, EXIT.USAGE);
    assert.match(usage.stderr, /unknown command/);
  });

  test("says in its own words what went wrong, never Node's or grpc-js' internals", async (t) => {
    const port = await freePort();
    const down = await finish(start(['--server', `127.0.0.1:${port}`, '--timeout', '5', 'devices']));
    assert.equal(
      down.stderr,
      `vdpactl: UNAVAILABLE: nothing listens on 127.0.0.1:${port} (connection refused); is the API server running?\n`,
    );
    // TLS against the plaintext server of this stack.
    const pkiDir = tempDir('cli-tls-plain');
    const pki = makePki(pkiDir);
    t.after(() => fs.rmSync(pkiDir, { recursive: true, force: true }));
    const tls = await vdpactl('--tls-ca', pki.ca, '--timeout', '10', 'devices');
    assert.equal(tls.code, EXIT.UNAVAILABLE);
    assert.match(
      tls.stderr,
      /^vdpactl: UNAVAILABLE: 127\.0\.0\.1:\d+ does not speak TLS \(it answered in plaintext\)/,
    );
    const cases: [string[], string][] = [
      [
        ['mappings', 'map', 'vdpa0', '--iova', '1M', '--size', '2M', '--memroy', 'ram0'],
        'unknown option --memroy (did you mean --memory?)',
      ],
      [['mappings', 'map', 'vdpa0', '--size', '2M', '--memory', 'ram0', '--iova'], '--iova needs a value'],
      [['devices', '--json=yes'], '--json takes no value'],
    ];
    for (const [args, message] of cases) {
      const run = await vdpactl(...args);
      assert.equal(run.code, EXIT.USAGE, args.join(' '));
      assert.equal(run.stderr, `vdpactl: ${message}\nRun vdpactl --help for usage.\n`);
    }
    for (const run of [down, tls])
      assert.doesNotMatch(run.stderr, /Resolution note|ssl3_|Last error|as in '--/);
  });

  test('--help shows every option of every command, --request-id too', async () => {
    const help = await ok('--help');
    for (const command of ['mappings map', 'mappings unmap', 'memtable apply']) {
      assert.match(help, new RegExp(`^  ${command} .*\\[--request-id ID\\]$`, 'm'), command);
    }
  });
});

describe('vdpactl token and server from the environment', () => {
  test('VDPA_MAPD_TOKEN goes out as "authorization: Bearer", to VDPA_MAPD_SERVER', async (t) => {
    const seen: string[] = [];
    const server = new Server();
    server.addService(DeviceServiceClient.service, {
      listDevices: (
        call: ServerUnaryCall<object, object> & { metadata: Metadata },
        cb: sendUnaryData<object>,
      ) => {
        seen.push(String(call.metadata.get('authorization')[0]));
        cb(null, {});
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) =>
        err ? reject(err) : resolve(p),
      ),
    );
    t.after(() => server.forceShutdown());

    const env = cleanEnv({ VDPA_MAPD_SERVER: `127.0.0.1:${port}`, VDPA_MAPD_TOKEN: 'env-token' });
    const run = await finish(start(['devices', '--json'], env));
    assert.equal(run.code, EXIT.OK, run.stderr);
    assert.deepEqual(JSON.parse(run.stdout), { devices: [] });
    assert.equal((await finish(start(['--token', 'flag-token', 'devices'], env))).code, EXIT.OK);
    assert.deepEqual(seen, ['Bearer env-token', 'Bearer flag-token']);
  });
});

describe('vdpactl over mTLS', () => {
  let dir: string;
  let pki: Pki;
  let agent: Agent;
  let api: RunningApiServer;
  const run = (args: readonly string[], env = cleanEnv()) =>
    finish(start(['--server', api.grpcAddress, '--timeout', '10', ...args], env));
  const ids = (stdout: string) => JSON.parse(stdout).devices.map((d: { id: string }) => d.id);

  before(async () => {
    dir = tempDir('cli-tls');
    pki = makePki(dir);
    agent = await spawnAgent(dir);
    api = await startReadyApi(
      apiConfig(dir, agent.socket, {
        grpcTls: { cert: pki.serverCert, key: pki.serverKey, clientCa: pki.ca },
      }),
    );
  });
  after(async () => {
    await api?.stop();
    await agent?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('with the CA and a client certificate it signed: flags, or the environment', async () => {
    const flags = await run([
      '--tls-ca',
      pki.ca,
      '--tls-cert',
      pki.clientCert,
      '--tls-key',
      pki.clientKey,
      'devices',
      '--json',
    ]);
    assert.equal(flags.code, EXIT.OK, flags.stderr);
    assert.deepEqual(ids(flags.stdout), ['vdpa0', 'vdpa1']);
    assert.equal(flags.stderr, '', 'nothing on stderr (no warning either)');

    // The server certificate names 127.0.0.1 (checked above) and localhost.
    const env = cleanEnv({
      VDPA_MAPD_TLS_CA: pki.ca,
      VDPA_MAPD_TLS_CERT: pki.clientCert,
      VDPA_MAPD_TLS_KEY: pki.clientKey,
      VDPA_MAPD_TLS_SERVER_NAME: 'localhost',
    });
    const fromEnv = await run(['devices', '--json'], env);
    assert.equal(fromEnv.code, EXIT.OK, fromEnv.stderr);
    assert.deepEqual(ids(fromEnv.stdout), ['vdpa0', 'vdpa1']);
  });

  test('refused handshakes exit 5 (UNAVAILABLE)', async () => {
    const client = ['--tls-cert', pki.clientCert, '--tls-key', pki.clientKey];
    const cases: [string, string[]][] = [
      ['no client certificate', ['--tls-ca', pki.ca]],
      [
        'a client certificate another CA signed',
        ['--tls-ca', pki.ca, '--tls-cert', pki.rogueCert, '--tls-key', pki.rogueKey],
      ],
      ['plaintext', []],
      ['a server the given CA did not sign', ['--tls-ca', pki.rogueCa, ...client]],
      [
        'a server name the certificate does not carry',
        ['--tls-ca', pki.ca, ...client, '--tls-server-name', 'elsewhere.example'],
      ],
    ];
    const runs = await Promise.all(cases.map(([, args]) => run([...args, 'devices'])));
    assert.match(runs[0]!.stderr, /asks for a client certificate: give --tls-cert and --tls-key/);
    assert.match(runs[2]!.stderr, /dropped the connection before any answer .*give --tls-ca/);
    runs.forEach((r, i) => {
      assert.equal(r.code, EXIT.UNAVAILABLE, `${cases[i]![0]}: ${r.stderr}`);
      assert.match(r.stderr, /^vdpactl: UNAVAILABLE: /, cases[i]![0]);
      assert.doesNotMatch(r.stderr, /Resolution note|Last error|SSL routines|\(\d{4}-\d\d-/, cases[i]![0]);
      assert.equal(r.stdout, '', cases[i]![0]);
    });
  });

  test('a lone --tls-cert, a file it cannot read or use, exits 2 naming the flag', async () => {
    const cases: [RegExp, string[]][] = [
      [/--tls-cert needs --tls-key/, ['--tls-cert', pki.clientCert]],
      [
        /--tls-key .*missing\.key: ENOENT/,
        ['--tls-cert', pki.clientCert, '--tls-key', path.join(dir, 'missing.key')],
      ],
      [/--tls-key .*ca\.crt: /, ['--tls-cert', pki.clientCert, '--tls-key', pki.ca]],
      [
        /--tls-cert .*client\.crt with --tls-key .*rogue\.key: .*mismatch/,
        ['--tls-cert', pki.clientCert, '--tls-key', pki.rogueKey],
      ],
    ];
    const runs = await Promise.all(cases.map(([, args]) => run(['--tls-ca', pki.ca, ...args, 'devices'])));
    runs.forEach((r, i) => {
      assert.equal(r.code, EXIT.USAGE, r.stderr);
      assert.match(r.stderr, cases[i]![0]);
    });
  });
});
