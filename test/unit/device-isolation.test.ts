/**
 * One device never stalls another, proved by order of events, never by a clock:
 * - a kernel device's write() runs on its own thread: while one fd's write is blocked in the
 *   kernel (a FIFO nobody reads, so the pipe is full), another fd's writes complete;
 * - a simulated device's long apply gives the event loop back: a request for another device that
 *   arrives as a new event-loop task while the long apply is in progress is done before it ends.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { SimulatedDevice } from '../../src/device/simulated.ts';
import { openVhostVdpaFd } from '../../src/device/vhost-vdpa-fd.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { PAGE, tmpRegistry } from './device-helpers.ts';

const MESSAGE = new Uint8Array(72);

test('a write blocked in the kernel holds only its own device: another fd is written meanwhile', async (t) => {
  const tmp = tmpRegistry();
  t.after(() => tmp.cleanup());
  const fifo = path.join(tmp.stateDir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  // O_RDWR on a FIFO opens without a reader; nobody reads, so write() blocks once the pipe is full.
  const blocked = openVhostVdpaFd(fifo);
  const other = openVhostVdpaFd('/dev/null');
  t.after(() => {
    blocked.close();
    other.close();
  });
  // Far more than a pipe holds (64 KiB by default, and the kernel grows none on its own).
  const total = 20_000;
  let written = 0;
  const filling = (async () => {
    for (let i = 0; i < total; i++) {
      await blocked.write(MESSAGE);
      written++;
    }
  })();

  for (let i = 0; i < 100; i++) await other.write(MESSAGE);
  assert.ok(written < total, `all ${total} messages fit in a pipe nobody reads?`);

  // Reading the FIFO lets the blocked device finish, every message in order.
  const reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  t.after(() => fs.closeSync(reader));
  const buffer = Buffer.alloc(1 << 16);
  let read = 0;
  let done = false;
  void filling.then(() => {
    done = true;
  });
  for (let turn = 0; turn < 1_000_000 && read < total * 72; turn++) {
    try {
      read += fs.readSync(reader, buffer);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
      await new Promise((r) => setImmediate(r));
    }
  }
  await filling;
  assert.ok(done);
  assert.equal(written, total);
  assert.equal(read, total * 72);
});

test('a long simulated apply yields: a request for another device arriving meanwhile is done first', async (t) => {
  const tmp = tmpRegistry();
  const devices: SimulatedDevice[] = [];
  t.after(async () => {
    for (const d of devices) await d.close();
    tmp.cleanup();
  });
  const entries = 20_000;
  tmp.registry.create({ id: 'ram0', size: BigInt(entries + 1) * PAGE });
  let busyMessages = 0;
  let atOtherDone: number | undefined;
  let other: SimulatedDevice | undefined;
  let busyDone: Promise<void> | undefined;
  const otherDone = new Promise<void>((resolve, reject) => {
    const busy = new SimulatedDevice(
      {
        name: 'vdpa0',
        // Observes the busy device's progress: on its 100th message, a request for the other
        // device is queued as a new task (as an RPC arrives), not run inside this apply.
        failOn: () => {
          if (++busyMessages === 100) {
            setImmediate(() => {
              other!
                .apply([
                  { type: 'update', asid: 0, iova: 0n, size: PAGE, memory: 'ram0', offset: 0n, perm: 'rw' },
                ])
                .then((results) => {
                  assert.deepEqual(results, [{ ok: true }]);
                  atOtherDone = busyMessages;
                  resolve();
                }, reject);
            });
          }
          return false;
        },
      },
      tmp.registry,
    );
    devices.push(busy);
    other = new SimulatedDevice({ name: 'vdpa1', iommu: 'onchip' }, tmp.registry);
    devices.push(other);
    const ops: IotlbOp[] = Array.from({ length: entries }, (_, k) => ({
      type: 'update',
      asid: 0,
      iova: BigInt(2 * k) * PAGE,
      size: PAGE,
      memory: 'ram0',
      offset: BigInt(k) * PAGE,
      perm: 'rw',
    }));
    busyDone = busy.apply(ops).then((results) => {
      assert.equal(results.length, entries);
      assert.ok(results.every((r) => r.ok));
      assert.equal(busy.mappings().length, entries);
    });
  });
  await otherDone;
  await busyDone;
  assert.ok(atOtherDone !== undefined && atOtherDone < entries, `done after ${atOtherDone} of ${entries}`);
  assert.equal(other!.mappings().length, 1);
});
