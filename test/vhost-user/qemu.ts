/**
 * Debian's qemu-system-x86_64 as the vhost-user front-end of the tests: TCG, guest RAM in a shared
 * memfd (the backend maps it from the fds QEMU sends), `vhost-user-blk-pci` on the backend's
 * socket, qboot as firmware (SeaBIOS would drive the disk itself before the kernel), and a QMP
 * socket for memory hotplug. The console is collected line by line.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import type { Guest } from './guest.ts';

/** One entry of QMP query-acpi-ospm-status: the guest's last _OST for a hotplugged device. */
interface OspmStatus {
  device: string;
  slot: string;
  'slot-type': string;
  source: number;
  status: number;
}

export interface QemuOptions {
  guest: Guest;
  socketPath: string;
  /** Guest seconds /init waits for its I/O before giving up. */
  guestWait: number;
  /** Keep the guest running after its verdict (for hotplug); stop it with quit(). */
  hold?: boolean;
  /** Memory hotplug: DIMM slots (and maxmem 1G). */
  slots?: number;
  /** Write and read back patterns without end after the verdict (guest.ts, `vu.rounds`). */
  rounds?: boolean;
  /** Seconds between QEMU's attempts to connect the chardev again after the backend went away. */
  reconnect?: number;
}

export class Qemu {
  /** Every QEMU still running, so a test that timed out can still have it killed. */
  static readonly live = new Set<Qemu>();
  readonly child: ChildProcess;
  readonly qmpPath: string;
  console = '';
  readonly exited: Promise<number | null>;
  private readonly waiters: { re: RegExp; resolve: (m: RegExpMatchArray) => void }[] = [];

  constructor(opts: QemuOptions) {
    this.qmpPath = path.join(opts.guest.dir, 'qmp.sock');
    const mem = opts.slots === undefined ? '256M' : `256M,slots=${opts.slots},maxmem=1G`;
    const args = [
      ...['-machine', 'q35,accel=tcg', '-cpu', 'max', '-smp', '1', '-m', mem],
      ...['-object', 'memory-backend-memfd,id=mem,size=256M,share=on', '-numa', 'node,memdev=mem'],
      ...[
        '-chardev',
        `socket,id=c0,path=${opts.socketPath}${opts.reconnect ? `,reconnect=${opts.reconnect}` : ''}`,
      ],
      ...['-device', 'vhost-user-blk-pci,chardev=c0,num-queues=1'],
      ...['-bios', '/usr/share/qemu/qboot.rom', '-nographic', '-no-reboot', '-nic', 'none'],
      ...['-qmp', `unix:${this.qmpPath},server=on,wait=off`],
      ...['-kernel', opts.guest.vmlinuz, '-initrd', opts.guest.initramfs],
      ...[
        '-append',
        `console=ttyS0 panic=-1 quiet memhp_default_state=offline vu.wait=${opts.guestWait}${opts.hold ? ' vu.hold' : ''}${opts.rounds ? ' vu.rounds' : ''}`,
      ],
    ];
    this.child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const onData = (d: string) => {
      this.console += d.replaceAll('\r', '');
      for (const w of [...this.waiters]) {
        const m = this.console.match(w.re);
        if (m) {
          this.waiters.splice(this.waiters.indexOf(w), 1);
          w.resolve(m);
        }
      }
    };
    this.child.stdout?.setEncoding('utf8').on('data', onData);
    this.child.stderr?.setEncoding('utf8').on('data', onData);
    Qemu.live.add(this);
    this.exited = new Promise((resolve) =>
      this.child.on('close', (code) => {
        Qemu.live.delete(this);
        resolve(code);
      }),
    );
  }

  /** Resolves when the console matches `re` (no time limit: the test's own budget bounds it). */
  waitFor(re: RegExp): Promise<RegExpMatchArray> {
    const m = this.console.match(re);
    if (m) return Promise.resolve(m);
    return new Promise((resolve, reject) => {
      this.waiters.push({ re, resolve });
      this.exited.then(() => {
        const late = this.console.match(re);
        if (late) resolve(late);
        else reject(new Error(`QEMU exited before ${re} appeared; console:\n${this.console.slice(-3000)}`));
      });
    });
  }

  /** Resolves once `cond` holds (polled): bounded by QEMU's life and the test's budget, no limit of its own. */
  async until(cond: () => boolean, what: string): Promise<void> {
    while (!cond()) {
      if (this.child.exitCode !== null) throw new Error(`QEMU exited while waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Runs QMP commands in order over one connection; returns their answers. */
  async qmp(commands: { execute: string; arguments?: object }[]): Promise<unknown[]> {
    const sock = net.connect(this.qmpPath);
    const lines: string[] = [];
    let buf = '';
    let wake: (() => void) | null = null;
    sock.setEncoding('utf8').on('data', (d: string) => {
      buf += d;
      for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
        lines.push(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
      wake?.();
    });
    const closed = new Promise<void>((resolve) => sock.on('close', () => resolve()));
    const next = async (): Promise<Record<string, unknown>> => {
      for (;;) {
        const line = lines.shift();
        if (line !== undefined) {
          const msg = JSON.parse(line) as Record<string, unknown>;
          if ('event' in msg) continue;
          return msg;
        }
        await Promise.race([new Promise<void>((r) => (wake = r)), closed]);
        if (sock.destroyed && lines.length === 0) throw new Error('QMP connection closed');
      }
    };
    try {
      await next(); // greeting
      sock.write(`${JSON.stringify({ execute: 'qmp_capabilities' })}\n`);
      await next();
      const answers: unknown[] = [];
      for (const c of commands) {
        sock.write(`${JSON.stringify(c)}\n`);
        const a = await next();
        if ('error' in a) throw new Error(`QMP ${c.execute}: ${JSON.stringify(a.error)}`);
        answers.push(a.return);
      }
      return answers;
    } finally {
      sock.destroy();
    }
  }

  /** Hotplugs a DIMM `id` of `size` bytes, backed by a shared memfd (object `<id>-mem`). */
  async plugDimm(id: string, size: bigint): Promise<void> {
    const memdev = `${id}-mem`;
    await this.qmp([
      {
        execute: 'object-add',
        arguments: { 'qom-type': 'memory-backend-memfd', id: memdev, size: Number(size), share: true },
      },
      { execute: 'device_add', arguments: { driver: 'pc-dimm', id, memdev } },
    ]);
  }

  /**
   * Asks the guest to give DIMM `id` back (ACPI eject); QEMU removes it once the guest has. The
   * request goes once the guest has handled the DIMM's arrival (its _OST for the device check,
   * source 1, is in QEMU's OSPM status): an eject request sent while the guest still handles the
   * arrival can go unanswered.
   */
  async unplugDimm(id: string): Promise<void> {
    for (;;) {
      if (this.child.exitCode !== null)
        throw new Error(`QEMU exited while waiting for the guest to take ${id}`);
      const [status] = (await this.qmp([{ execute: 'query-acpi-ospm-status' }])) as OspmStatus[][];
      if (status!.some((s) => s.device === id && s.source === 1 && s.status === 0)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    await this.qmp([{ execute: 'device_del', arguments: { id } }]);
  }

  /** QMP quit: QEMU tells the backend (vrings stopped, socket closed) and exits. */
  async quit(): Promise<number | null> {
    // The answer may be lost when QEMU closes the socket first; its exit is what counts.
    await this.qmp([{ execute: 'quit' }]).catch(() => {});
    return this.exited;
  }

  kill(): void {
    if (this.child.exitCode === null) this.child.kill('SIGKILL');
  }
}
