/**
 * Keeps deploy/ and the Dockerfile true to the code: every flag they pass exists in the real option
 * tables, ports and socket paths agree, the alert rules and the scrape config pass promtool (and the
 * rules' unit tests in deploy/prometheus/rules-test.yml), every
 * metric the dashboard and the alerts use is served by a real API server, and the image recipe
 * builds: its build steps run on exactly the files it copies, and the result runs on production
 * dependencies alone.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml, parseAllDocuments, stringify as stringifyYaml } from 'yaml';
import { USAGE as AGENT_USAGE } from '../../services/agent/config.ts';
import { OPTIONS as API_OPTIONS } from '../../services/api/config.ts';
import { DeviceServiceClient, MappingServiceClient, MemoryServiceClient } from '../../services/api/proto.ts';
import { startStack, stopChild } from './api-harness.ts';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const K8S = path.join(ROOT, 'deploy/kubernetes');
const SYSTEMD = path.join(ROOT, 'deploy/systemd');

// biome-ignore lint/suspicious/noExplicitAny: manifests are read field by field
type Doc = any;

const read = (rel: string) => fs.readFileSync(path.join(ROOT, rel), 'utf8');
const yamlFile = (rel: string): Doc => parseYaml(read(rel));

/** Flags as the code defines them, read now (the tables change as options are added). */
const API_FLAGS = new Set([...Object.values(API_OPTIONS).map((o) => o.flag), 'help']);
const AGENT_FLAGS = new Set([...AGENT_USAGE.matchAll(/--([a-z][a-z0-9-]*)/g)].map((m) => m[1]!));
const KNOWN_ENV = new Set([
  ...Object.values(API_OPTIONS).map((o) => o.env),
  ...[...AGENT_USAGE.matchAll(/\b(VDPA_MAPD_[A-Z_]+)/g)].map((m) => m[1]!),
]);

/** `--flag value` / `--flag=value` pairs of an argv; a flag without a value maps to ''. */
function flagsOf(argv: readonly string[]): Map<string, string> {
  const flags = new Map<string, string>();
  argv.forEach((arg, i) => {
    const m = /^--([a-z][a-z0-9-]*)(?:=(.*))?$/.exec(arg);
    if (!m) return;
    const next = argv[i + 1];
    flags.set(m[1]!, m[2] ?? (next !== undefined && !next.startsWith('--') ? next : ''));
  });
  return flags;
}

function assertFlagsExist(argv: readonly string[], known: ReadonlySet<string>, where: string): void {
  for (const flag of flagsOf(argv).keys()) assert.ok(known.has(flag), `${where}: --${flag} is not an option`);
}

const portOf = (listen: string) => Number(/:(\d+)$/.exec(listen)?.[1]);

/** The entry script of a command (`node services/api/main.js ...`), as its TypeScript source. */
function sourceOf(argv: readonly string[]): string {
  const script = argv.map((a) => /(?:^|\/)(services\/.+)\.js$/.exec(a)?.[1]).find((s) => s !== undefined);
  assert.ok(script, `no services/*.js script in ${argv.join(' ')}`);
  const source = `${script}.ts`;
  assert.ok(fs.existsSync(path.join(ROOT, source)), `${source} does not exist`);
  return source;
}

function knownFlagsFor(argv: readonly string[]): ReadonlySet<string> {
  const source = sourceOf(argv);
  if (source === 'services/api/main.ts') return API_FLAGS;
  if (source === 'services/agent/main.ts') return AGENT_FLAGS;
  assert.fail(`unexpected entry point ${source}`);
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

interface Instruction {
  stage: string;
  op: string;
  args: string;
}

/** Instructions with continuation lines joined, each tagged with its stage (`FROM ... AS name`). */
function dockerfile(): Instruction[] {
  const text = read('Dockerfile').replace(/\\\n/g, ' ');
  const out: Instruction[] = [];
  let stage = '';
  for (const line of text.split('\n')) {
    const m = /^([A-Z]+)\s+(.*)$/.exec(line.trim());
    if (!m) continue;
    const [, op, args] = m as unknown as [string, string, string];
    if (op === 'FROM') stage = /\sAS\s+(\S+)/i.exec(args)?.[1] ?? 'final';
    out.push({ stage, op, args: args.trim() });
  }
  return out;
}

/** The JSON (exec) form of CMD / HEALTHCHECK CMD. */
function execForm(args: string): string[] {
  return JSON.parse(args.replace(/^.*?CMD\s+/, ''));
}

/** Build-context paths a COPY names (`COPY a b ./`), unless it copies from another stage. */
function copySources(i: Instruction): string[] {
  if (i.op !== 'COPY' || i.args.startsWith('--from=')) return [];
  return i.args.split(/\s+/).slice(0, -1);
}

function ignoredByDockerignore(rel: string): boolean {
  // Our .dockerignore is an allowlist: `*` then one `!path` per copied path.
  const allowed = read('.dockerignore')
    .split('\n')
    .filter((l) => l.startsWith('!'))
    .map((l) => l.slice(1).replace(/\/$/, ''));
  return !allowed.includes(rel.replace(/\/$/, ''));
}

describe('Dockerfile', () => {
  const instructions = dockerfile();
  const final = instructions.filter((i) => i.stage === 'final');

  test('copies only paths that exist and the build context keeps', () => {
    const sources = instructions.flatMap(copySources);
    assert.ok(sources.length > 0);
    for (const rel of sources) {
      assert.ok(fs.existsSync(path.join(ROOT, rel)), `COPY ${rel}: no such path`);
      assert.ok(!ignoredByDockerignore(rel), `COPY ${rel}: excluded by .dockerignore`);
    }
  });

  test('runs the API server as a non-root user on the ports it exposes, with real flags', () => {
    const user = final.find((i) => i.op === 'USER');
    assert.ok(user && !/^(0|root)(:|$)/.test(user.args), `final stage USER: ${user?.args}`);
    const cmd = execForm(final.find((i) => i.op === 'CMD')!.args);
    assert.equal(sourceOf(cmd), 'services/api/main.ts');
    assertFlagsExist(cmd, API_FLAGS, 'Dockerfile CMD');
    const flags = flagsOf(cmd);
    const exposed = final
      .find((i) => i.op === 'EXPOSE')!
      .args.split(/\s+/)
      .map(Number)
      .sort();
    const listened = [portOf(flags.get('rest-listen')!), portOf(flags.get('grpc-listen')!)].sort();
    assert.deepEqual(exposed, listened);
    assert.deepEqual(
      listened,
      [portOf(API_OPTIONS.restListen.default), portOf(API_OPTIONS.grpcListen.default)].sort(),
    );
    assert.match(
      flags.get('rest-listen')!,
      /^0\.0\.0\.0:/,
      'the API server must listen beyond the container',
    );
    const health = final.find((i) => i.op === 'HEALTHCHECK')!;
    assert.ok(
      execForm(health.args)
        .join(' ')
        .includes(`:${portOf(flags.get('rest-listen')!)}/healthz`),
    );
  });

  test('documents what the agent needs: devices, hugepages, memlock', () => {
    const text = read('Dockerfile');
    for (const need of ['/dev/vhost-vdpa-', '/dev/hugepages', 'memlock', 'IPC_LOCK']) {
      assert.ok(text.includes(need), `Dockerfile comments do not mention ${need}`);
    }
  });

  describe('the recipe, run outside Docker', () => {
    let dir: string;
    let app: string;
    const procs: ChildProcess[] = [];

    before(() => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-image-'));
      const src = path.join(dir, 'src');
      app = path.join(dir, 'app');
      fs.mkdirSync(src);
      fs.mkdirSync(app);
      // Build stage: the files it copies, its RUN steps (npm ci: the checkout's node_modules).
      const build = instructions.filter((i) => i.stage === 'build');
      for (const i of build) {
        for (const rel of copySources(i))
          fs.cpSync(path.join(ROOT, rel), path.join(src, rel), { recursive: true });
        if (i.op !== 'RUN') continue;
        if (i.args.startsWith('npm ci'))
          fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(src, 'node_modules'));
        else execFileSync('sh', ['-c', i.args], { cwd: src, stdio: 'pipe' });
      }
      // Final stage: what it copies from the build stage, and production dependencies only.
      const workdir = build.find((i) => i.op === 'WORKDIR')!.args;
      const fromBuild = final.find((i) => i.op === 'COPY' && i.args.startsWith('--from=build'))!;
      const built = fromBuild.args.split(/\s+/)[1]!;
      assert.ok(built.startsWith(`${workdir}/`), `${built} is not under the build stage's ${workdir}`);
      fs.cpSync(path.join(src, path.relative(workdir, built)), app, { recursive: true });
      linkProductionDependencies(path.join(app, 'node_modules'));
    });
    after(async () => {
      await Promise.all(procs.map(stopChild));
      fs.rmSync(dir, { recursive: true, force: true });
    });

    test('the compiled entry points start (proto and package.json found) with production dependencies', () => {
      for (const script of ['services/api/main.js', 'services/agent/main.js', 'bin/vdpactl.js']) {
        const run = spawnSync(process.execPath, [script, '--help'], { cwd: app, encoding: 'utf8' });
        assert.equal(run.status, 0, `${script} --help: ${run.stderr}`);
        assert.match(run.stdout, /^usage: /);
      }
      for (const code of ['bin', 'services', 'src']) {
        const files = fs.readdirSync(path.join(app, code), { recursive: true }).map(String);
        assert.ok(!files.some((f) => f.endsWith('.ts')), `TypeScript left in ${code}/`);
      }
      const link = final.find((i) => i.op === 'RUN' && i.args.includes('vdpactl'))!;
      const target = /\/app\/(\S+)/.exec(link.args)![1]!;
      assert.ok(fs.statSync(path.join(app, target)).mode & 0o111, `${target} is not executable`);
    });

    test('the compiled agent and API server serve; vdpactl and the HEALTHCHECK command reach them', async () => {
      const socket = path.join(dir, 'agent.sock');
      const agent = spawnLogged(
        app,
        [
          'services/agent/main.js',
          '--device',
          'sim:vdpa0',
          '--socket',
          socket,
          '--state-dir',
          path.join(dir, 'agent-state'),
        ],
        'agent serving',
        procs,
      );
      await agent.line;
      const api = spawnLogged(
        app,
        [
          'services/api/main.js',
          '--rest-listen',
          '127.0.0.1:0',
          '--grpc-listen',
          '127.0.0.1:0',
          '--agent-socket',
          socket,
          '--state-dir',
          path.join(dir, 'api-state'),
        ],
        'api server listening',
        procs,
      );
      const listening = JSON.parse(await api.line);
      const devices = spawnSync(
        process.execPath,
        ['bin/vdpactl.js', '--server', listening.grpc, 'devices', '--json'],
        {
          cwd: app,
          encoding: 'utf8',
        },
      );
      assert.equal(devices.status, 0, devices.stderr);
      assert.deepEqual(
        JSON.parse(devices.stdout).devices.map((d: { id: string }) => d.id),
        ['vdpa0'],
      );

      const health = execForm(final.find((i) => i.op === 'HEALTHCHECK')!.args);
      const probe = (port: number) =>
        spawnSync(
          health[0] === 'node' ? process.execPath : health[0]!,
          health.slice(1).map((a) => a.replace(':8080/', `:${port}/`)),
          {
            encoding: 'utf8',
          },
        ).status;
      assert.equal(probe(portOf(listening.rest)), 0, 'HEALTHCHECK fails against a healthy server');
      await stopChild(api.child);
      assert.equal(probe(portOf(listening.rest)), 1, 'HEALTHCHECK passes with the server gone');
    });
  });
});

/**
 * node_modules with only the production dependency tree (`npm ls --omit=dev`), linked from the
 * checkout: our compiled code resolves from here, so importing a dev dependency fails.
 */
function linkProductionDependencies(target: string): void {
  const top = path.join(ROOT, 'node_modules');
  const run = spawnSync('npm', ['ls', '--omit=dev', '--all', '--parseable'], { cwd: ROOT, encoding: 'utf8' });
  const packages = run.stdout
    .split('\n')
    .filter((p) => p.startsWith(`${top}/`))
    .map((p) => path.relative(top, p))
    .filter((rel) => !rel.includes('node_modules'));
  assert.ok(packages.includes('@grpc/grpc-js'), `npm ls found no production tree: ${run.stderr}`);
  assert.ok(!packages.includes('tsx') && !packages.includes('typescript'));
  for (const rel of new Set(packages)) {
    fs.mkdirSync(path.dirname(path.join(target, rel)), { recursive: true });
    fs.symlinkSync(path.join(top, rel), path.join(target, rel));
  }
}

/** Spawns `node args...` in `cwd`; `line` resolves with the first stdout line containing `marker`. */
function spawnLogged(cwd: string, args: string[], marker: string, procs: ChildProcess[]) {
  const child = spawn(process.execPath, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  procs.push(child);
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const line = new Promise<string>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`${args[0]}: no "${marker}" in time: ${stderr}`)),
      30_000,
    );
    createInterface({ input: child.stdout! }).on('line', (l) => {
      if (!l.includes(`"${marker}"`)) return;
      clearTimeout(timer);
      resolve(l);
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${args[0]} exited with ${code}: ${stderr}`));
    });
  });
  return { child, line };
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

function kustomization() {
  const k = yamlFile('deploy/kubernetes/kustomization.yaml');
  const docs: Doc[] = (k.resources as string[]).flatMap((r) => {
    const parsed = parseAllDocuments(fs.readFileSync(path.join(K8S, r), 'utf8'));
    for (const d of parsed) assert.deepEqual(d.errors, [], `${r}: ${d.errors.join('; ')}`);
    return parsed.map((d) => d.toJS());
  });
  const byKind = (kind: string): Doc => {
    const found = docs.filter((d) => d.kind === kind);
    assert.equal(found.length, 1, `expected one ${kind}`);
    return found[0];
  };
  return { k, docs, byKind };
}

const commandLine = (c: Doc): string[] => [...(c.command ?? []), ...(c.args ?? [])];

describe('Kubernetes manifests', () => {
  const { k, byKind } = kustomization();
  const ds = byKind('DaemonSet');
  const pod = ds.spec.template.spec;
  const container = (source: string): Doc => {
    const found = pod.containers.find((c: Doc) => sourceOf(commandLine(c)) === source);
    assert.ok(found, `no container runs ${source}`);
    return found;
  };
  const api = container('services/api/main.ts');
  const agent = container('services/agent/main.ts');
  const apiFlags = flagsOf(commandLine(api));
  const agentFlags = flagsOf(commandLine(agent));

  test('every file parses; the dashboard ConfigMap comes from the JSON file', () => {
    const files = k.configMapGenerator.flatMap((g: Doc) => g.files as string[]);
    assert.ok(files.length > 0);
    for (const entry of files) {
      const file = entry.replace(/^[^=]+=/, '');
      assert.doesNotThrow(() => JSON.parse(fs.readFileSync(path.join(K8S, file), 'utf8')), file);
    }
    assert.equal(pod.containers.length, 2);
  });

  test('every container flag exists in the option tables of the code', () => {
    for (const c of pod.containers) assertFlagsExist(commandLine(c), knownFlagsFor(commandLine(c)), c.name);
  });

  test('ports: listen flags, container ports, probes, Service and ServiceMonitor agree', () => {
    const rest = portOf(apiFlags.get('rest-listen')!);
    const grpc = portOf(apiFlags.get('grpc-listen')!);
    assert.match(apiFlags.get('rest-listen')!, /^0\.0\.0\.0:/);
    assert.match(apiFlags.get('grpc-listen')!, /^0\.0\.0\.0:/);
    assert.deepEqual(
      [rest, grpc],
      [portOf(API_OPTIONS.restListen.default), portOf(API_OPTIONS.grpcListen.default)],
    );
    const named = Object.fromEntries(api.ports.map((p: Doc) => [p.name, p.containerPort]));
    assert.deepEqual(named, { http: rest, grpc });
    assert.deepEqual(
      [api.livenessProbe.httpGet, api.readinessProbe.httpGet],
      [
        { path: '/healthz', port: 'http' },
        { path: '/readyz', port: 'http' },
      ],
    );

    const service = byKind('Service');
    const servicePorts = Object.fromEntries(service.spec.ports.map((p: Doc) => [p.targetPort, p.port]));
    assert.deepEqual(servicePorts, { http: rest, grpc });
    for (const [key, value] of Object.entries(service.spec.selector)) {
      assert.equal(ds.spec.template.metadata.labels[key], value, `Service selector ${key}`);
    }
    const monitor = byKind('ServiceMonitor');
    for (const [key, value] of Object.entries(monitor.spec.selector.matchLabels)) {
      assert.equal(service.metadata.labels[key], value, `ServiceMonitor selector ${key}`);
    }
    assert.deepEqual(
      monitor.spec.endpoints.map((e: Doc) => [e.port, e.path]),
      [['http', '/metrics']],
    );
  });

  test('the agent socket is one path, in one shared emptyDir', () => {
    const socket = agentFlags.get('socket')!;
    assert.ok(socket, 'the agent has no --socket');
    assert.equal(apiFlags.get('agent-socket'), socket);
    const volumeOf = (c: Doc) => c.volumeMounts.find((m: Doc) => socket.startsWith(`${m.mountPath}/`))?.name;
    const name = volumeOf(agent);
    assert.ok(name, 'the socket is in no volume of the agent');
    assert.equal(volumeOf(api), name);
    assert.ok(pod.volumes.find((v: Doc) => v.name === name).emptyDir !== undefined);
  });

  test("the API server's state survives the pod; it runs non-root on a read-only root", () => {
    const stateDir = apiFlags.get('state-dir')!;
    const mount = api.volumeMounts.find((m: Doc) => m.mountPath === stateDir);
    assert.ok(mount, `--state-dir ${stateDir} is not a volume`);
    assert.ok(
      pod.volumes.find((v: Doc) => v.name === mount.name).hostPath,
      'the state volume is not on the host',
    );
    const user = { ...pod.securityContext, ...api.securityContext };
    assert.equal(user.runAsNonRoot, true);
    assert.notEqual(user.runAsUser, 0);
    assert.equal(api.securityContext.readOnlyRootFilesystem, true);
    assert.equal(api.securityContext.privileged ?? false, false);
    // Same uid as the agent: its socket is 0600.
    assert.equal({ ...pod.securityContext, ...agent.securityContext }.runAsUser, user.runAsUser);
  });

  test('secure by default: beyond loopback, every call needs the token of a Secret the pod requires', () => {
    const exposed = ['rest-listen', 'grpc-listen'].filter((f) => !/^127\./.test(apiFlags.get(f) ?? '127.'));
    if (exposed.length === 0) return;
    const file = apiFlags.get('auth-token-file');
    assert.ok(file, `${exposed.join(', ')} beyond loopback without --auth-token-file`);
    assert.ok(!apiFlags.has('insecure-listen-without-auth'));
    const mount = api.volumeMounts.find((m: Doc) => file.startsWith(`${m.mountPath}/`));
    assert.ok(mount?.readOnly, `${file} is on no read-only volume`);
    const secret = pod.volumes.find((v: Doc) => v.name === mount.name).secret;
    assert.ok(secret, `${file} is not from a Secret`);
    assert.equal(secret.optional, false, 'the pod must not start without the token');
    const key = path.relative(mount.mountPath, file);
    assert.ok(
      secret.items.some((i: Doc) => i.path === key),
      `the Secret volume has no ${key}`,
    );
    // The probes must not need it (kubelets send no token).
    assert.notEqual(apiFlags.get('auth-probes'), 'token');
  });

  test('kube-prometheus-stack finds the ServiceMonitor and PrometheusRule (its release label)', () => {
    for (const kind of ['ServiceMonitor', 'PrometheusRule']) {
      assert.equal(byKind(kind).metadata.labels.release, 'kube-prometheus-stack', kind);
    }
  });

  test('/dev/hugepages is optional on the host', () => {
    const m = agent.volumeMounts.find((v: Doc) => v.mountPath === '/dev/hugepages');
    assert.equal(pod.volumes.find((v: Doc) => v.name === m.name).hostPath.type, 'DirectoryOrCreate');
  });

  test('the agent sees the host /dev and /dev/hugepages', () => {
    const hostPathAt = (mountPath: string) => {
      const m = agent.volumeMounts.find((v: Doc) => v.mountPath === mountPath);
      return m && pod.volumes.find((v: Doc) => v.name === m.name).hostPath?.path;
    };
    assert.equal(hostPathAt('/dev'), '/dev');
    assert.equal(hostPathAt('/dev/hugepages'), '/dev/hugepages');
  });
});

// ---------------------------------------------------------------------------------------------
// systemd

function unit(name: string): Map<string, string[]> {
  const keys = new Map<string, string[]>();
  for (const line of fs.readFileSync(path.join(SYSTEMD, name), 'utf8').split('\n')) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (m) keys.set(m[1]!, [...(keys.get(m[1]!) ?? []), m[2]!]);
  }
  return keys;
}

describe('systemd units', () => {
  const agent = unit('vdpa-mapd-agent.service');
  const api = unit('vdpa-mapd-api.service');
  const execStart = (u: Map<string, string[]>) => u.get('ExecStart')![0]!.split(/\s+/);

  test('ExecStart flags exist in the option tables of the code', () => {
    assertFlagsExist(execStart(agent), knownFlagsFor(execStart(agent)), 'agent ExecStart');
    assertFlagsExist(execStart(api), knownFlagsFor(execStart(api)), 'api ExecStart');
    assert.equal(sourceOf(execStart(agent)), 'services/agent/main.ts');
    assert.equal(sourceOf(execStart(api)), 'services/api/main.ts');
  });

  test('one socket path, in the agent runtime directory; the API server needs the agent', () => {
    const socket = flagsOf(execStart(agent)).get('socket')!;
    assert.equal(flagsOf(execStart(api)).get('agent-socket'), socket);
    assert.equal(path.dirname(socket), `/run/${agent.get('RuntimeDirectory')![0]}`);
    assert.equal(agent.get('RuntimeDirectoryMode')![0], '0700');
    for (const [u, flag] of [
      [agent, 'state-dir'],
      [api, 'state-dir'],
    ] as const) {
      assert.equal(flagsOf(execStart(u)).get(flag), `/var/lib/${u.get('StateDirectory')![0]}`);
    }
    assert.ok(api.get('Requires')!.join(' ').includes('vdpa-mapd-agent.service'));
    assert.ok(api.get('After')!.join(' ').includes('vdpa-mapd-agent.service'));
  });

  test('both run as an unprivileged user; the agent gets memlock and the device group', () => {
    for (const u of [agent, api]) {
      assert.ok(u.get('User') && u.get('User')![0] !== 'root');
      assert.deepEqual(u.get('CapabilityBoundingSet'), ['']);
    }
    assert.equal(agent.get('User')![0], api.get('User')![0], 'the socket is 0600: one user');
    assert.equal(agent.get('LimitMEMLOCK')![0], 'infinity');
    const group = agent.get('SupplementaryGroups')![0]!;
    assert.ok(read('deploy/systemd/70-vdpa-mapd.rules').includes(`GROUP="${group}"`));
    assert.equal(api.get('SupplementaryGroups'), undefined);
  });

  test('the env file sets only variables the code reads', () => {
    const file = read('deploy/systemd/vdpa-mapd.env');
    const names = [...file.matchAll(/^#?([A-Z_]+)=/gm)].map((m) => m[1]!);
    assert.ok(names.length > 0);
    for (const name of names) assert.ok(KNOWN_ENV.has(name), `${name} is read by neither process`);
    const rest = /^VDPA_MAPD_REST_LISTEN=(.*)$/m.exec(file)![1]!;
    const scrape = yamlFile('deploy/prometheus/prometheus.yml').scrape_configs[0].static_configs[0]
      .targets[0];
    assert.equal(portOf(scrape), portOf(rest), 'the scrape config and the env file disagree on the port');
  });
});

// ---------------------------------------------------------------------------------------------
// Prometheus, Grafana

/** promtool from Debian's prometheus package; installed when missing and we are root. */
function promtool(): string {
  const which = () => spawnSync('sh', ['-c', 'command -v promtool'], { encoding: 'utf8' }).stdout.trim();
  if (which()) return which();
  assert.equal(
    process.getuid?.(),
    0,
    'promtool is missing: install Debian\'s "prometheus" package (apt-get install prometheus)',
  );
  for (const args of [['update'], ['install', '-y', '--no-install-recommends', 'prometheus']]) {
    const run = spawnSync('apt-get', args, {
      encoding: 'utf8',
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
    });
    assert.equal(run.status, 0, `apt-get ${args.join(' ')}: ${run.stderr}`);
  }
  assert.ok(which(), 'promtool still missing after installing prometheus');
  return which();
}

const PROMQL_WORDS = new Set([
  'by',
  'without',
  'on',
  'ignoring',
  'group_left',
  'group_right',
  'bool',
  'and',
  'or',
  'unless',
  'offset',
  'inf',
  'nan',
]);

/** Metric names in a PromQL expression: identifiers left once strings, label matchers, groupings, ranges, functions and Grafana variables are gone. */
function metricNames(expr: string): string[] {
  const bare = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')
    .replace(/\$\{[^}]*\}|\$\w+/g, ' ')
    .replace(/\{[^}]*\}/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  return [...bare.matchAll(/\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()/g)]
    .map((m) => m[1]!)
    .filter((name) => !PROMQL_WORDS.has(name.toLowerCase()) && !/^\d/.test(name));
}

function alertExprs(): string[] {
  const rule = kustomization().byKind('PrometheusRule');
  return rule.spec.groups.flatMap((g: Doc) => g.rules.map((r: Doc) => String(r.expr)));
}

function dashboardExprs(): string[] {
  const dash = JSON.parse(read('deploy/kubernetes/grafana/vdpa-mapd.json'));
  const panels = dash.panels.flatMap((p: Doc) => p.targets.map((t: Doc) => String(t.expr)));
  const variables = dash.templating.list
    .filter((v: Doc) => v.type === 'query')
    .map((v: Doc) => /label_values\((.*),\s*\w+\)/.exec(v.definition)![1]!);
  return [...panels, ...variables];
}

describe('Prometheus and Grafana', () => {
  let dir: string;
  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-promtool-'));
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  test('promtool accepts the PrometheusRule groups and the scrape config', () => {
    const tool = promtool();
    const rules = path.join(dir, 'rules.yml');
    fs.writeFileSync(rules, stringifyYaml(kustomization().byKind('PrometheusRule').spec));
    for (const args of [
      ['check', 'rules', rules],
      ['check', 'config', path.join(ROOT, 'deploy/prometheus/prometheus.yml')],
    ]) {
      const run = spawnSync(tool, args, { encoding: 'utf8' });
      assert.equal(run.status, 0, `promtool ${args.join(' ')}:\n${run.stdout}${run.stderr}`);
    }
  });

  test('promtool test rules: every alert fires when it should and stays silent when it should not', () => {
    const tool = promtool();
    fs.writeFileSync(
      path.join(dir, 'rules.yml'),
      stringifyYaml(kustomization().byKind('PrometheusRule').spec),
    );
    fs.copyFileSync(path.join(ROOT, 'deploy/prometheus/rules-test.yml'), path.join(dir, 'rules-test.yml'));
    const run = spawnSync(tool, ['test', 'rules', path.join(dir, 'rules-test.yml')], {
      encoding: 'utf8',
      cwd: dir,
    });
    assert.equal(run.status, 0, `promtool test rules:\n${run.stdout}${run.stderr}`);

    const cases = yamlFile('deploy/prometheus/rules-test.yml').tests.flatMap((t: Doc) => t.alert_rule_test);
    const alerts = kustomization()
      .byKind('PrometheusRule')
      .spec.groups.flatMap((g: Doc) => g.rules.map((r: Doc) => String(r.alert)));
    for (const alert of alerts) {
      const mine = cases.filter((c: Doc) => c.alertname === alert);
      assert.ok(
        mine.some((c: Doc) => c.exp_alerts?.length > 0),
        `no test where ${alert} fires`,
      );
      assert.ok(
        mine.some((c: Doc) => (c.exp_alerts ?? []).length === 0),
        `no test where ${alert} stays silent`,
      );
    }
  });

  test('the metric name extraction sees through PromQL', () => {
    assert.deepEqual(
      metricNames(
        'sum by (le) (rate(a_bucket{node=~"$node", x="y{z}"}[$__rate_interval])) / on(node) b > 0.5 and up{job="j"} offset 5m',
      ),
      ['a_bucket', 'b', 'up'],
    );
  });

  test('every metric the dashboard and the alerts use is on /metrics of a running API server', async (t) => {
    const s = await startStack('deploy-metrics');
    t.after(() => s.stop());
    // Series for the labelled histograms and counters: a map, a refused map, an unmap, a list.
    assert.equal((await s.http('POST', '/v1/memory', { id: 'ram0', size: '0x400000' })).status, 201);
    const map = { iova: '0x100000', size: '0x1000', memory: 'ram0' };
    assert.equal((await s.http('POST', '/v1/devices/vdpa0/mappings', map)).status, 201);
    assert.equal((await s.http('POST', '/v1/devices/vdpa0/mappings', map)).status, 409);
    assert.equal(
      (await s.http('POST', '/v1/devices/vdpa0/mappings:unmap', { iova: '0x100000', size: '0x1000' })).status,
      200,
    );
    await s.grpc.mapping('listMappings', { device: 'vdpa0' });
    for (const url of ['/healthz', '/readyz', '/docs/json', '/no/such/route']) await s.http('GET', url);
    await s.http('GET', '/metrics');
    const text = (await s.http('GET', '/metrics')).body as string;
    // The error-rate alert counts API operations only: every other method label is one it leaves out.
    const operations = new Set(
      [DeviceServiceClient, MappingServiceClient, MemoryServiceClient].flatMap((c) =>
        Object.values(c.service).map((m) => m.path.slice(m.path.lastIndexOf('/') + 1)),
      ),
    );
    const left = /method!~"([^"]+)"/.exec(alertExprs().find((e) => e.includes('request_duration'))!)![1]!;
    const methods = new Set(
      [...text.matchAll(/^vdpa_mapd_request_duration_seconds_count\{[^}]*method="(\w+)"/gm)].map(
        (m) => m[1]!,
      ),
    );
    for (const name of ['Healthz', 'Readyz', 'Metrics', 'OpenAPI', 'Unknown', 'Map'])
      assert.ok(methods.has(name), name);
    for (const method of methods) {
      assert.ok(
        operations.has(method) !== new RegExp(`^(?:${left})$`).test(method),
        `${method}: counted by the error rate exactly when it is an API operation`,
      );
    }
    const served = new Set(
      text
        .split('\n')
        .filter((l) => l !== '' && !l.startsWith('#'))
        .map((l) => /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(l)![0]),
    );
    // `up` is written by Prometheus for every target, not by the server.
    const scraped = new Set(['up']);
    const used = new Set([...alertExprs(), ...dashboardExprs()].flatMap(metricNames));
    assert.ok(used.size >= 10, `only ${[...used].join(', ')}`);
    for (const name of used) {
      assert.ok(served.has(name) || scraped.has(name), `${name} is used but not on /metrics`);
    }
    // The dashboard shows each of these, per device where the metric has one.
    for (const name of [
      'vdpa_mapd_request_duration_seconds_bucket',
      'vdpa_mapd_batch_ops_bucket',
      'vdpa_mapd_mapped_bytes',
    ]) {
      assert.ok(
        dashboardExprs().some((e) => metricNames(e).includes(name)),
        `the dashboard lacks ${name}`,
      );
    }
  });
});
