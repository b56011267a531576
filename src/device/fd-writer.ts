/**
 * One thread per kernel device that makes its `write()` calls, so that a write the kernel takes a
 * long time over (a PA-mode parent pins every page of an UPDATE in vhost_vdpa_pa_map; an on-chip
 * parent rebuilds its table in set_map on BATCH_END) blocks only that device, never the agent's
 * event loop and so never another device.
 *
 * A dedicated worker rather than koffi's `.async()` or `fs.write`: both run on libuv's pool of 4
 * threads, shared with every fs, dns and crypto call of the process, so four devices pinning
 * gigabytes would stall everything else that uses the pool. The thread shares the process's file
 * table and mm, so it writes on the owner's fd as the owner (vhost_dev_check_owner compares mm).
 *
 * Hand-off through shared memory: the caller puts one message in the slot and wakes the thread,
 * then spins briefly (a cheap write is back in a few microseconds, sooner than an event-loop hop)
 * and otherwise waits asynchronously. One message at a time, so writes stay in call order.
 */
import { Worker } from 'node:worker_threads';

/** Control words (Int32): state, message length, result (bytes written, or -1), errno length. */
const STATE = 0;
const LENGTH = 1;
const RESULT = 2;
const ERRNO_LENGTH = 3;
const CONTROL_BYTES = 16;
const MESSAGE_BYTES = 256;
const ERRNO_BYTES = 32;

const IDLE = 0;
const REQUEST = 1;
const STOP = 2;

/** Atomics.waitAsync (V8; Node 16 and later), which the ES2022 lib this project compiles against lacks. */
const waitAsync = (
  Atomics as unknown as {
    waitAsync(a: Int32Array, index: number, value: number): { async: boolean; value: unknown };
  }
).waitAsync;

/** How long the caller spins for a quick answer before it yields to the event loop. */
const SPIN_NS = 20_000n;

/** The thread: wait for a request, write(), publish the result, wake the caller. CommonJS, no imports of ours. */
const THREAD_SOURCE = `
const { workerData } = require('node:worker_threads');
const fs = require('node:fs');
const { fd, shared } = workerData;
const control = new Int32Array(shared, 0, ${CONTROL_BYTES / 4});
const message = new Uint8Array(shared, ${CONTROL_BYTES}, ${MESSAGE_BYTES});
const errno = new Uint8Array(shared, ${CONTROL_BYTES + MESSAGE_BYTES}, ${ERRNO_BYTES});
for (;;) {
  // A wake-up is not a request: the caller's notify can land after this thread already served
  // that request and went back to waiting (the caller was descheduled between its store and its
  // notify). Writing then would send the last message twice, or one the caller is still filling.
  while (Atomics.load(control, ${STATE}) === ${IDLE}) Atomics.wait(control, ${STATE}, ${IDLE});
  if (Atomics.load(control, ${STATE}) === ${STOP}) break;
  try {
    control[${RESULT}] = fs.writeSync(fd, message, 0, control[${LENGTH}]);
    control[${ERRNO_LENGTH}] = 0;
  } catch (e) {
    const name = Buffer.from(String((e && e.code) || 'EIO')).subarray(0, ${ERRNO_BYTES});
    errno.set(name);
    control[${RESULT}] = -1;
    control[${ERRNO_LENGTH}] = name.length;
  }
  Atomics.store(control, ${STATE}, ${IDLE});
  Atomics.notify(control, ${STATE});
}
`;

/** A write() the kernel refused: `code` is the errno name (as Node's fs names it). */
export class FdWriteError extends Error {
  constructor(readonly code: string) {
    super(code);
    this.name = 'FdWriteError';
  }
}

export class FdWriter {
  private readonly shared = new SharedArrayBuffer(CONTROL_BYTES + MESSAGE_BYTES + ERRNO_BYTES);
  private readonly control = new Int32Array(this.shared, 0, CONTROL_BYTES / 4);
  private readonly message = new Uint8Array(this.shared, CONTROL_BYTES, MESSAGE_BYTES);
  private readonly errno = new Uint8Array(this.shared, CONTROL_BYTES + MESSAGE_BYTES, ERRNO_BYTES);
  private readonly thread: Worker;
  private tail: Promise<unknown> = Promise.resolve();
  private stopped = false;

  constructor(fd: number) {
    // Plain CommonJS: none of the process's --import hooks (tsx) are loaded into the thread.
    this.thread = new Worker(THREAD_SOURCE, {
      eval: true,
      execArgv: [],
      workerData: { fd, shared: this.shared },
    });
    // An idle writer must not keep the agent alive.
    this.thread.unref();
    // A thread that dies fails the write it had (if any) and every later one, rather than hanging.
    const died = () => {
      this.stopped = true;
      this.errno.set(Buffer.from('EIO'));
      this.control[ERRNO_LENGTH] = 3;
      this.control[RESULT] = -1;
      Atomics.store(this.control, STATE, IDLE);
      Atomics.notify(this.control, STATE);
    };
    this.thread.on('error', died);
    this.thread.on('exit', died);
  }

  /** Writes `bytes` (at most 256) with one write(); resolves with the count the kernel returned. */
  write(bytes: Uint8Array): Promise<number> {
    if (bytes.byteLength > MESSAGE_BYTES) throw new RangeError(`a message of ${bytes.byteLength} bytes`);
    const run = this.tail.then(() => this.writeNow(bytes));
    this.tail = run.catch(() => undefined);
    return run;
  }

  /**
   * Ends the thread; later writes fail with EBADF. Call it with no write in flight (the device
   * serializes close after its writes), then close the fd.
   */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    Atomics.store(this.control, STATE, STOP);
    Atomics.notify(this.control, STATE);
    void this.thread.terminate();
  }

  private async writeNow(bytes: Uint8Array): Promise<number> {
    if (this.stopped) throw new FdWriteError('EBADF');
    const c = this.control;
    this.message.set(bytes);
    c[LENGTH] = bytes.byteLength;
    Atomics.store(c, STATE, REQUEST);
    Atomics.notify(c, STATE);
    const until = process.hrtime.bigint() + SPIN_NS;
    while (Atomics.load(c, STATE) === REQUEST && process.hrtime.bigint() < until) {
      // spin: most writes are back within it
    }
    if (Atomics.load(c, STATE) === REQUEST) {
      // A pending waitAsync does not keep the event loop alive; the thread does, while it writes.
      this.thread.ref();
      try {
        while (Atomics.load(c, STATE) === REQUEST) {
          const wait = waitAsync(c, STATE, REQUEST);
          if (wait.async) await wait.value;
        }
      } finally {
        this.thread.unref();
      }
    }
    const result = c[RESULT]!;
    if (result >= 0) return result;
    throw new FdWriteError(Buffer.from(this.errno.subarray(0, c[ERRNO_LENGTH]!)).toString());
  }
}
