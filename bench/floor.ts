/**
 * The pieces of the floor of one durable Map, each measured on its own: one durable append of a
 * journal record's size (the same disk, fs/promises calls as src/state/journal.ts makes), and
 * one raw round trip on a unix socket to another process (an echo server, no protocol at all).
 * And the floor of one vhost message: one raw write of its 72 bytes.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { median, rate } from './harness.ts';

/** The syscall floor of one vhost message, as the rows beside it name it. */
export const RAW_WRITE = 'writeSync 72 B to /dev/null';

/** Messages/s of `count` raw writes of one 72-byte struct vhost_msg_v2 to /dev/null (best of `rounds`). */
export function rawWriteRate(count: number, rounds?: number): number {
  const fd = fs.openSync('/dev/null', 'w');
  const message = Buffer.alloc(72);
  try {
    return rate(count, () => fs.writeSync(fd, message), rounds);
  } finally {
    fs.closeSync(fd);
  }
}

/** Bytes of every journal generation (journal.<gen>, src/state/journal.ts) in a state directory. */
export function journalBytes(stateDir: string): number {
  return fs
    .readdirSync(stateDir)
    .filter((name) => /^journal\.\d+$/.test(name))
    .reduce((n, name) => n + fs.statSync(path.join(stateDir, name)).size, 0);
}

/** A new file opened for durable writes (O_DSYNC), as src/state/journal.ts opens its journal. */
const DSYNC_FLAGS =
  fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC | fs.constants.O_DSYNC;

/** The floor's durable append for a handler: `recordBytes` bytes per call, O_DSYNC, on the calling thread. */
export function durableAppender(dir: string): { append: (recordBytes: number) => void; close: () => void } {
  const fd = fs.openSync(path.join(dir, 'appender.journal'), DSYNC_FLAGS, 0o600);
  let position = 0;
  let record = Buffer.alloc(0);
  return {
    append: (recordBytes) => {
      const bytes = Math.max(1, Math.round(recordBytes));
      if (record.length !== bytes) record = Buffer.alloc(bytes, 0x5a);
      position += fs.writeSync(fd, record, 0, record.length, position);
    },
    close: () => fs.closeSync(fd),
  };
}

/**
 * `count` sequential durable appends of `bytes` bytes; per-append ms. The cheapest durable append
 * of that size on this disk: appends are made every way a journal can make them, one after the
 * other in turn (so all see the same load), and the samples of the way with the lower median are
 * returned: write then fdatasync, or one write to a file opened O_DSYNC (what src/state/journal.ts
 * does), which returns once the data and the file's new size are on disk, made on the thread pool
 * or on the calling thread (what the journal does for a small record while the server is quiet).
 */
export async function appendSyncSamples(dir: string, bytes: number, count: number): Promise<number[]> {
  const record = Buffer.alloc(Math.max(1, Math.round(bytes)), 0x5a);
  const dsync = (name: string) => fsp.open(path.join(dir, name), DSYNC_FLAGS, 0o600);
  const ways = [
    { file: await fsp.open(path.join(dir, 'floor.journal'), 'w', 0o600), sync: true, onCaller: false },
    { file: await dsync('floor-dsync.journal'), sync: false, onCaller: false },
    { file: await dsync('floor-dsync-caller.journal'), sync: false, onCaller: true },
  ].map((way) => ({ ...way, position: 0, samples: [] as number[] }));
  try {
    for (let i = 0; i < count; i++) {
      for (const way of ways) {
        const t = performance.now();
        if (way.onCaller) fs.writeSync(way.file.fd, record, 0, record.length, way.position);
        else await way.file.write(record, 0, record.length, way.position);
        if (way.sync) await way.file.datasync();
        way.samples.push(performance.now() - t);
        way.position += record.length;
      }
    }
  } finally {
    for (const way of ways) await way.file.close();
  }
  return ways.map((way) => way.samples).sort((a, b) => median(a) - median(b))[0]!;
}

const ECHO = `
const net = require('node:net');
net.createServer((s) => s.on('data', (d) => s.write(d))).listen(process.argv[1], () => process.stdout.write('ready\\n'));
`;

export interface EchoPeer {
  /** `count` sequential round trips of `bytes` bytes; per-trip ms. */
  samples(bytes: number, count: number): Promise<number[]>;
  stop(): Promise<void>;
}

/** An echo server in a child process on a unix socket in `dir`, and one connection to it. */
export async function startEchoPeer(dir: string): Promise<EchoPeer> {
  const socketPath = path.join(dir, 'echo.sock');
  const child: ChildProcess = spawn(process.execPath, ['-e', ECHO, socketPath], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('echo peer did not start in 30 s')), 30_000);
    child.stdout!.once('data', () => {
      clearTimeout(timer);
      resolve();
    });
    void exited.then(() => reject(new Error('echo peer exited')));
  });
  const socket = await new Promise<net.Socket>((resolve, reject) => {
    const s = net.connect(socketPath, () => resolve(s));
    s.once('error', reject);
  });
  socket.setNoDelay(true);
  return {
    async samples(bytes, count) {
      const payload = Buffer.alloc(bytes, 0x33);
      const out: number[] = [];
      for (let i = 0; i < count; i++) {
        const t = performance.now();
        await new Promise<void>((resolve) => {
          let got = 0;
          const onData = (d: Buffer) => {
            got += d.length;
            if (got < bytes) return;
            socket.off('data', onData);
            resolve();
          };
          socket.on('data', onData);
          socket.write(payload);
        });
        out.push(performance.now() - t);
      }
      return out;
    },
    async stop() {
      socket.destroy();
      child.kill('SIGTERM');
      await exited;
    },
  };
}
