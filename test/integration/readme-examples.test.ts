/**
 * Every example in README.md runs as written, in order, on a fresh `npm start`, and answers as
 * documented; so do the lines `npm start` itself prints. The only rewrite is host:port (the system
 * runs on free ports): each curl, grpcurl and vdpactl line of the README's `sh` blocks is run by bash
 * with the README's own variable line.
 *
 * - curl is the real one; a shim beside it reports each answer's HTTP status on stderr. A curl answers
 *   2xx unless its line ends in a `# NNN` comment, which is then the status it must answer.
 * - grpcurl is test/grpcurl.ts (see there: no registry here serves grpcurl), which reads flags as
 *   grpcurl does; it must exit 0. A line documented as a stream (`runs until Ctrl-C`) must print the
 *   change the test makes while it runs.
 * - vdpactl is bin/vdpactl.js, as `npm link` would put it on PATH, pointed at the server with
 *   VDPA_MAPD_SERVER; it must exit 0.
 *
 * The walk-through is run twice: whole, and its curl lines alone, so that a reader who follows only
 * curl is not tripped by state the grpcurl lines would have left (each grpcurl line is written to
 * work alone as well, without a run of its own here: the suite's time is better spent elsewhere).
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { TIER_BUDGET_MS, until } from './agent-harness.ts';
import { grpcurlCommand } from './grpcurl-tool.ts';
import { npmStart } from './npm-start.ts';
import { type ChildOutput, output } from './process-harness.ts';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const README_REST = 'http://127.0.0.1:8080';
const README_GRPC = '127.0.0.1:50051';
const LINE_TIMEOUT_MS = 60_000;

type Tool = 'curl' | 'grpcurl' | 'vdpactl';

interface Example {
  /** The logical line: continuation lines and multi-line quotes joined as bash reads them. */
  text: string;
  tools: Tool[];
  /** From a trailing `# NNN` comment. */
  expectStatus?: number;
  stream: boolean;
}

/** True while `text` has an unclosed quote or ends with a backslash: bash reads on. */
function continues(text: string): boolean {
  let quote: string | undefined;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quote) {
      if (c === quote) quote = undefined;
      else if (c === '\\' && quote === '"') i++;
    } else if (c === "'" || c === '"') quote = c;
    else if (c === '\\') i++;
    else if (c === '#' && (i === 0 || /\s/.test(text[i - 1]!))) return false;
  }
  return quote !== undefined || text.endsWith('\\');
}

/** The variable line and the examples of every ```sh block that runs curl, grpcurl or vdpactl. */
function readmeExamples(readme: string): { prelude: string; examples: Example[] } {
  const blocks = [...readme.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].map((m) => m[1]!);
  let prelude = '';
  const examples: Example[] = [];
  for (const block of blocks) {
    const lines: string[] = [];
    for (const line of block.split('\n')) {
      const last = lines.length - 1;
      if (last >= 0 && continues(lines[last]!)) lines[last] += `\n${line}`;
      else lines.push(line);
    }
    for (const text of lines) {
      if (/^[A-Z]+=/.test(text)) {
        prelude = text;
        continue;
      }
      const tools = [...text.matchAll(/(?:^|[|;]\s*)(curl|grpcurl|vdpactl)\s/g)].map((m) => m[1] as Tool);
      if (tools.length === 0) continue;
      const status = /#\s*(\d{3})\b[^'"]*$/.exec(text);
      examples.push({
        text,
        tools: [...new Set(tools)],
        ...(status ? { expectStatus: Number(status[1]) } : {}),
        stream: /runs until Ctrl-C|WatchMappings/.test(text),
      });
    }
  }
  return { prelude, examples };
}

interface System {
  rest: string;
  grpc: string;
  /** What `npm start` printed after it was ready. */
  hint: string;
  stop(): Promise<void>;
}

/** `npm start` on free ports, with its state in `dir`; stopped (Ctrl-C) after the test. */
async function startSystem(t: TestContext, dir: string): Promise<System> {
  const started = await npmStart(dir);
  const { child } = started;
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGINT');
    const kill = setTimeout(() => child.kill('SIGKILL'), 20_000);
    await started.exited;
    clearTimeout(kill);
  };
  t.after(stop);
  return { rest: started.rest, grpc: started.grpc, hint: started.hint, stop };
}

/** A PATH directory with curl (status to stderr), grpcurl (test/grpcurl.ts) and vdpactl. */
async function toolDir(dir: string): Promise<string> {
  const bin = path.join(dir, 'bin');
  fs.mkdirSync(bin);
  const curl = ['/usr/bin/curl', '/bin/curl'].find((p) => fs.existsSync(p));
  assert.ok(curl, 'curl is installed');
  fs.writeFileSync(
    path.join(bin, 'curl'),
    `#!/bin/sh\nexec ${curl} --write-out '%{stderr}HTTP %{http_code}\\n' "$@"\n`,
    { mode: 0o755 },
  );
  fs.writeFileSync(
    path.join(bin, 'grpcurl'),
    `#!/bin/sh\nexec ${(await grpcurlCommand()).map((a) => `'${a}'`).join(' ')} "$@"\n`,
    { mode: 0o755 },
  );
  fs.symlinkSync(path.join(ROOT, 'bin/vdpactl.js'), path.join(bin, 'vdpactl'));
  return bin;
}

type Ran = ChildOutput;

function bash(
  script: string,
  env: NodeJS.ProcessEnv,
  stream?: (child: ChildProcess) => Promise<void>,
): Promise<Ran> {
  const child = spawn('bash', ['-c', script], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const done = output(child, LINE_TIMEOUT_MS);
  if (stream) void stream(child);
  return done;
}

function rewrite(text: string, system: System): string {
  return text.replaceAll(README_REST, system.rest).replaceAll(README_GRPC, system.grpc);
}

/** Runs one example and asserts it answered as documented. */
async function runExample(
  example: Example,
  prelude: string,
  system: System,
  env: NodeJS.ProcessEnv,
): Promise<Ran> {
  const script = `${rewrite(prelude, system)}\n${rewrite(example.text, system)}`;
  let watched = '';
  const ran = await bash(
    script,
    env,
    example.stream
      ? async (child) => {
          child.stdout!.on('data', (d: Buffer) => {
            watched += d.toString();
          });
          // The stream is open once the server counts the watcher; then make a change it must print.
          const change = (body: object, verb: string) =>
            fetch(`${system.rest}/v1/devices/vdpa1${verb}`, {
              method: 'POST',
              headers: { 'content-type': 'application/json' },
              body: JSON.stringify(body),
            });
          // Changes until the stream shows one (it may not be subscribed yet when the first is made).
          const range = { iova: '0x7f000000', size: '0x1000' };
          await until('the watch to show a change', async () => {
            if (watched.includes('0x7f000000')) return true;
            await change({ ...range, memory: 'ram0' }, '/mappings');
            await change(range, '/mappings:unmap');
            await new Promise((r) => setTimeout(r, 250));
            return watched.includes('0x7f000000');
          });
          child.kill('SIGINT');
        }
      : undefined,
  );
  const where = `${example.text}\n--- stdout\n${ran.stdout}\n--- stderr\n${ran.stderr}`;
  if (example.stream) {
    assert.match(ran.stdout, /"iova": "0x7f000000"/, `the stream printed the change: ${where}`);
    return ran;
  }
  assert.equal(ran.code, 0, `exit code: ${where}`);
  if (example.tools.includes('curl')) {
    const statuses = [...ran.stderr.matchAll(/^HTTP (\d{3})$/gm)].map((m) => Number(m[1]));
    assert.ok(statuses.length > 0, `curl answered: ${where}`);
    for (const status of statuses) {
      if (example.expectStatus !== undefined) assert.equal(status, example.expectStatus, where);
      else assert.ok(status >= 200 && status < 300, `2xx: ${where}`);
    }
  }
  return ran;
}

/** What some examples promise beyond their status. */
function checkPromises(example: Example, ran: Ran): void {
  const where = example.text;
  if (/describe vdpa\.mapd\.v1\.MapRequest/.test(example.text))
    assert.match(ran.stdout, /string request_id = 8;/, where);
  if (/grpcurl -plaintext \$G list/.test(example.text)) {
    for (const s of ['DeviceService', 'MappingService', 'MemoryService'])
      assert.match(ran.stdout, new RegExp(s), where);
  }
  if (example.expectStatus === 409)
    assert.match(ran.stdout, /"code":"(CONFLICT|FAILED_PRECONDITION)"/, where);
  if (/X POST \$B\/v1\/devices\/vdpa0\/mappings -H/.test(example.text) && /vm1-boot-1/.test(example.text)) {
    const answer = JSON.parse(ran.stdout);
    assert.equal(answer.mapping.iova, '0x100000');
    assert.equal(answer.ops[0].type, 'update');
  }
  if (/:flush/.test(example.text) || /\/Flush/.test(example.text)) {
    assert.doesNotMatch(ran.stdout, /CONFLICT|"error"/, `flush found every submitted op applied: ${where}`);
  }
}

async function walkThrough(t: TestContext, only?: Tool): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-readme-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const system = await startSystem(t, path.join(dir, 'state'));
  const env = {
    ...process.env,
    PATH: `${await toolDir(dir)}:${process.env.PATH}`,
    VDPA_MAPD_SERVER: system.grpc,
  };
  const { prelude, examples } = readmeExamples(fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8'));
  assert.match(prelude, /^B=/, 'the README defines B, J and G before its examples');
  const chosen = examples.filter((e) => only === undefined || e.tools.every((tool) => tool === only));
  assert.ok(chosen.length >= (only === undefined ? 25 : 10), `found ${chosen.length} examples`);
  for (const example of chosen) checkPromises(example, await runExample(example, prelude, system, env));
}

test('README: every example, in order, on a fresh npm start', { timeout: TIER_BUDGET_MS }, async (t) => {
  await walkThrough(t);
});

test('README: the curl lines alone (they need none of the grpcurl lines between them)', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  await walkThrough(t, 'curl');
});

test('npm start: every command its hint prints works as printed', { timeout: TIER_BUDGET_MS }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-hint-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const system = await startSystem(t, path.join(dir, 'state'));
  const env = { ...process.env, PATH: `${await toolDir(dir)}:${process.env.PATH}` };
  const { examples } = readmeExamples(`\`\`\`sh\n${system.hint.replace(/^ {2}/gm, '')}\`\`\`\n`);
  assert.ok(
    examples.some((e) => e.tools.includes('grpcurl')) && examples.some((e) => e.tools.includes('curl')),
  );
  for (const example of examples) await runExample(example, '', system, env);
});
