/** `npm start` (scripts/start.ts) as a test runs it: on free ports, its state in a given directory. */
import { type ChildProcess, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const START_TIMEOUT_MS = 90_000;

export interface NpmStart {
  child: ChildProcess;
  exited: Promise<number | null>;
  rest: string;
  grpc: string;
  /** What it printed once ready, from "vdpa-mapd is running" to "Ctrl-C stops ...". */
  hint: string;
}

/** Spawns `npm start`'s script on free loopback ports with its state in `dir`, output piped. */
export function spawnNpmStart(dir: string, args: readonly string[] = []): ChildProcess {
  return spawn(
    process.execPath,
    [
      '--import',
      'tsx',
      'scripts/start.ts',
      '--dir',
      dir,
      '--rest-listen',
      '127.0.0.1:0',
      '--grpc-listen',
      '127.0.0.1:0',
      ...args,
    ],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  );
}

/** Resolves once the system is ready and the hint printed; rejects if start exits first. */
export async function npmStart(dir: string): Promise<NpmStart> {
  const child = spawnNpmStart(dir);
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  const hint = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('npm start printed no hint in time')), START_TIMEOUT_MS);
    let text: string | undefined;
    createInterface({ input: child.stdout! }).on('line', (line) => {
      if (line.startsWith('vdpa-mapd is running')) text = '';
      if (text === undefined) return;
      text += `${line}\n`;
      if (line.startsWith('Ctrl-C')) {
        clearTimeout(timer);
        resolve(text);
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`npm start exited with ${code}: ${stderr}`));
    });
  });
  const m = /REST (http:\/\/[0-9.]+:\d+), gRPC ([0-9.]+:\d+)/.exec(hint);
  if (!m) throw new Error(`npm start printed no addresses: ${hint}`);
  return { child, exited, rest: m[1]!, grpc: m[2]!, hint };
}
