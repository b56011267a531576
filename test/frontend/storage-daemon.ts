/**
 * Debian's qemu-storage-daemon (package qemu-system-common) exporting a raw image as a
 * vhost-user-blk back-end on a unix socket: QEMU's own libvhost-user-based device, the reference a
 * test front-end is proven against. Its output is collected for failure messages.
 *
 * It serves one front-end at a time: a second connection is accepted by the kernel (backlog) but
 * not answered until the first one has closed.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';

export const STORAGE_DAEMON = '/usr/bin/qemu-storage-daemon';

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class StorageDaemon {
  private readonly child: ChildProcess;
  private output = '';
  readonly exited: Promise<number | null>;

  private constructor(
    readonly socketPath: string,
    image: string,
  ) {
    fs.rmSync(socketPath, { force: true });
    this.child = spawn(
      STORAGE_DAEMON,
      [
        ...['--blockdev', `driver=file,node-name=d0,filename=${image}`],
        ...[
          '--export',
          `type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=${socketPath},writable=on`,
        ],
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const collect = (d: string) => {
      this.output = (this.output + d).slice(-8000);
    };
    this.child.stdout?.setEncoding('utf8').on('data', collect);
    this.child.stderr?.setEncoding('utf8').on('data', collect);
    this.exited = new Promise((resolve) => this.child.on('close', (code) => resolve(code)));
  }

  /** Starts the daemon on `image` and waits (bounded) until its socket exists. */
  static async start(image: string, socketPath: string, waitMs: number): Promise<StorageDaemon> {
    const daemon = new StorageDaemon(socketPath, image);
    const deadline = Date.now() + waitMs;
    while (!fs.existsSync(socketPath)) {
      if (daemon.child.exitCode !== null || daemon.child.signalCode !== null || Date.now() > deadline) {
        await daemon.stop(waitMs);
        throw new Error(`qemu-storage-daemon did not create ${socketPath}; its output:\n${daemon.log}`);
      }
      await delay(20);
    }
    return daemon;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Its stdout and stderr so far (the last 8000 characters). */
  get log(): string {
    return this.output;
  }

  /** Resolves once its output matches `re`; bounded by `waitMs` and by its life. */
  async waitForOutput(re: RegExp, waitMs: number): Promise<void> {
    const deadline = Date.now() + waitMs;
    while (!re.test(this.output)) {
      if (!this.running || Date.now() > deadline) {
        throw new Error(`qemu-storage-daemon never wrote ${re}; its output:\n${this.output}`);
      }
      await delay(20);
    }
  }

  /** SIGSTOP: the daemon keeps its connections but serves nothing (a device that went silent). */
  freeze(): void {
    if (this.running) this.child.kill('SIGSTOP');
  }

  /** SIGCONT after {@link freeze}. */
  thaw(): void {
    if (this.running) this.child.kill('SIGCONT');
  }

  /** SIGTERM (it flushes and exits), SIGKILL if it has not exited within `waitMs`; the exit code. */
  async stop(waitMs: number): Promise<number | null> {
    this.thaw(); // a stopped process would not act on SIGTERM
    if (this.running) this.child.kill('SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<'late'>((resolve) => {
      timer = setTimeout(() => resolve('late'), waitMs);
    });
    const first = await Promise.race([this.exited, late]);
    clearTimeout(timer);
    if (first !== 'late') return first;
    this.child.kill('SIGKILL');
    return this.exited;
  }
}
