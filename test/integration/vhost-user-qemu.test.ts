/**
 * Debian's QEMU boots a guest whose disk is served by our vhost-user backend and vdpa relay: the
 * guest RAM's memfd arrives as fds, its regions become IOTLB entries of a simulated vhost-vdpa blk
 * device (IOVA = guest physical), the relay hands the vrings and eventfds to that device through
 * its vring ioctls, and the device's own data path (vdpa_sim_blk-like) does every descriptor and
 * data access by DMA through that IOTLB. The guest reads what the host wrote, writes a pattern with O_DIRECT and reads it
 * back; the host finds the pattern in the disk file. Memory hotplug maps exactly the new DIMM, and
 * device_del of it invalidates exactly that DIMM.
 * A mapping off by one page must make the guest fail and leave the disk without the pattern.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import {
  buildGuest,
  DISK_BYTES,
  diskBytes,
  makeDisk,
  type Guest,
  PATTERN_BYTES,
  READ_OFFSET,
  VERDICT,
  WRITE_OFFSET,
} from '../vhost-user/guest.ts';
import { DeviceStatus } from '../../src/uapi/constants.ts';
import { Qemu } from '../vhost-user/qemu.ts';
import { RelayBlkBackend } from '../vhost-user/relay-blk.ts';

const MiB = 1n << 20n;
/** Guest seconds /init waits for its I/O: never reached when the device works. */
const GUEST_WAIT_OK = 300;
const GUEST_WAIT_BROKEN = 10;

let guest: Guest;
let work: string;

before(async () => {
  guest = await buildGuest();
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-vu-test-'));
});
after(() => {
  for (const q of Qemu.live) q.kill();
  guest?.cleanup();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

const logger = {
  info: () => {},
  warn: (obj: object, msg: string) => console.log(`# ${msg} ${JSON.stringify(obj)}`),
};

describe('a QEMU guest does I/O through the vhost-user relay to a simulated vhost-vdpa blk device', () => {
  for (const memSlots of [false, true]) {
    const how = memSlots ? 'ADD_MEM_REG (CONFIGURE_MEM_SLOTS)' : 'SET_MEM_TABLE';
    test(`memory by ${how}: the guest reads back what it wrote, the disk holds it, hotplug maps only the DIMM, device_del unmaps only it`, {
      timeout: TIER_BUDGET_MS,
    }, async () => {
      const disk = makeDisk(guest, work, `disk-${memSlots}.img`);
      const socketPath = path.join(work, `vu-${memSlots}.sock`);
      const fdsBefore = openFds();
      const sim = new RelayBlkBackend({ socketPath, diskPath: disk, backend: { memSlots }, logger });
      assert.equal(fs.statSync(socketPath).mode & 0o777, 0o600);
      const started = performance.now();
      const qemu = new Qemu({ guest, socketPath, guestWait: GUEST_WAIT_OK, hold: true, slots: 2 });
      try {
        const verdict = await qemu.waitFor(new RegExp(`${VERDICT} (PASS|FAIL)[^\\n]*\\n`));
        const bootToVerdict = (performance.now() - started) / 1000;
        const uptime = (await qemu.waitFor(new RegExp(`${VERDICT} UPTIME ([\\d.]+)`)))[1];
        assert.equal(verdict[1], 'PASS', `${verdict[0]}\n${qemu.console.slice(-3000)}`);
        assert.match(
          qemu.console,
          new RegExp(`${VERDICT} DEVICE ${DISK_BYTES / 512} sectors serial=vdpa-mapd-vublk0`),
        );
        console.log(`# ${how}: boot to verdict ${bootToVerdict.toFixed(1)} s (guest uptime ${uptime} s)`);
        // The relay started the device: features negotiated, DRIVER_OK.
        assert.equal(sim.device.simulator.deviceStatus & DeviceStatus.DRIVER_OK, DeviceStatus.DRIVER_OK);

        // The bytes are on the host's disk file, and the host's pattern is untouched.
        assert.ok(
          diskBytes(disk, WRITE_OFFSET, PATTERN_BYTES).equals(guest.writePattern),
          'written pattern on disk',
        );
        assert.ok(diskBytes(disk, READ_OFFSET, PATTERN_BYTES).equals(guest.readPattern));
        const backend = sim.backends[0]!;
        assert.equal(sim.backends.length, 1);
        assert.equal(sim.blk.counters.dmaFaults, 0);
        assert.equal(sim.blk.counters.dropped, 0);
        assert.ok(sim.blk.counters.bytesWritten >= PATTERN_BYTES);
        assert.ok(sim.blk.counters.bytesRead >= 2 * PATTERN_BYTES);
        assert.equal(backend.stats.messages[memSlots ? 'ADD_MEM_REG' : 'SET_MEM_TABLE'] !== undefined, true);
        assert.equal(backend.stats.messages[memSlots ? 'SET_MEM_TABLE' : 'ADD_MEM_REG'], undefined);
        // The boot RAM: the memfd's regions (QEMU leaves out the legacy VGA hole), each at
        // IOVA = guest physical = its offset in the one file, registered once.
        const boot = sim.mappings();
        assert.ok(boot.length >= 1);
        assert.ok(boot.every((m) => m.iova === m.offset && m.memory === boot[0]!.memory && m.perm === 'rw'));
        const bootBytes = boot.reduce((n, m) => n + m.size, 0n);
        assert.ok(bootBytes > 255n * MiB && bootBytes <= 256n * MiB, `boot RAM mapped: ${bootBytes}`);
        assert.equal(sim.registry.list().length, 1);
        assert.ok(
          sim.ops.every((op) => op.type === 'update'),
          'nothing was ever invalidated',
        );
        console.log(
          `# ${how}: ${sim.blk.counters.requests} requests, read ${sim.blk.counters.bytesRead} B, wrote ${sim.blk.counters.bytesWritten} B`,
        );

        // Hotplug: QEMU sends the whole table again (new fd numbers) or one ADD_MEM_REG; the
        // device must get exactly one UPDATE, for the DIMM, and no INVALIDATE.
        const opsBefore = sim.ops.length;
        const dmaMapBefore = sim.device.counters().dmaMapCalls;
        const dmaUnmapBefore = sim.device.counters().dmaUnmapCalls;
        await qemu.plugDimm('dimm1', 128n * MiB);
        await qemu.until(() => sim.mappings().length === boot.length + 1, 'the DIMM to be mapped');
        const hotplugOps = sim.ops.slice(opsBefore);
        assert.equal(
          hotplugOps.length,
          1,
          JSON.stringify(hotplugOps, (_, v) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v)),
        );
        const [dimm] = hotplugOps;
        assert.ok(dimm?.type === 'update');
        assert.equal(dimm.size, 128n * MiB);
        assert.ok(dimm.iova >= 4096n * MiB, `the DIMM sits above 4 GiB: ${dimm.iova.toString(16)}`);
        assert.equal(dimm.offset, 0n);
        assert.notEqual(dimm.memory, boot[0]!.memory, 'a new file, registered once');
        assert.deepEqual(
          sim.mappings().filter((m) => m.iova !== dimm.iova),
          boot,
          'the boot RAM is untouched',
        );
        assert.equal(sim.device.counters().dmaMapCalls - dmaMapBefore, 1);
        assert.equal(sim.device.counters().dmaUnmapCalls - dmaUnmapBefore, 0);
        assert.equal(sim.registry.list().length, 2);
        console.log(
          `# ${how}: hotplug sent ${hotplugOps.length} op (UPDATE iova 0x${dimm.iova.toString(16)} size 0x${dimm.size.toString(16)})`,
        );

        // device_del: the guest ejects the DIMM (ACPI; it never onlined it, so it always can) and
        // QEMU sends the table without it, or one REM_MEM_REG: exactly that region is invalidated.
        const opsBeforeDel = sim.ops.length;
        const delCounters = sim.device.counters();
        await qemu.unplugDimm('dimm1');
        await qemu.until(() => sim.mappings().length === boot.length, 'the DIMM to be unmapped');
        const delOps = sim.ops.slice(opsBeforeDel);
        assert.deepEqual(
          delOps.map((op) => [op.type, op.iova, op.size]),
          [['invalidate', dimm.iova, dimm.size]],
          'device_del invalidates the DIMM only',
        );
        assert.deepEqual(sim.mappings(), boot, 'the boot RAM is untouched');
        assert.equal(sim.device.counters().dmaUnmapCalls - delCounters.dmaUnmapCalls, 1);
        assert.equal(sim.device.counters().dmaMapCalls - delCounters.dmaMapCalls, 0);
        assert.equal(sim.registry.list().length, 1, "the DIMM's memory is released");
        assert.equal(backend.stats.messages[memSlots ? 'REM_MEM_REG' : 'SET_MEM_TABLE'] !== undefined, true);
        console.log(
          `# ${how}: device_del sent ${delOps.length} op (INVALIDATE iova 0x${dimm.iova.toString(16)} size 0x${dimm.size.toString(16)})`,
        );

        assert.equal(await qemu.quit(), 0);
        await backend.done;
        assert.equal(backend.error, undefined, `closed cleanly: ${backend.error?.message}`);
        // The front-end is gone: nothing stays mapped or registered, no fd leaks.
        assert.deepEqual(sim.mappings(), []);
        assert.deepEqual(sim.registry.list(), []);
        assert.deepEqual(sim.listenerErrors, []);
        assert.equal(sim.device.simulator.deviceStatus, 0, 'the relay reset the device');
      } finally {
        qemu.kill();
        await qemu.exited;
        await sim.close();
      }
      assert.equal(openFds(), fdsBefore, 'every fd received was closed');
      assert.equal(fs.existsSync(socketPath), false);
    });
  }

  test('a mapping one page off corrupts the I/O: the guest fails and the disk lacks the pattern', {
    timeout: TIER_BUDGET_MS,
  }, async () => {
    const disk = makeDisk(guest, work, 'disk-skewed.img');
    const socketPath = path.join(work, 'vu-skewed.sock');
    const sim = new RelayBlkBackend({ socketPath, diskPath: disk, iovaSkew: 0x1000n });
    const qemu = new Qemu({ guest, socketPath, guestWait: GUEST_WAIT_BROKEN });
    try {
      const verdict = await qemu.waitFor(new RegExp(`${VERDICT} (PASS|FAIL)[^\\n]*\\n`));
      assert.equal(verdict[1], 'FAIL', verdict[0]);
      // The guest cannot power off itself: its shutdown waits for the disk probe that never ends.
      await qemu.quit();
      assert.equal(diskBytes(disk, WRITE_OFFSET, PATTERN_BYTES).equals(guest.writePattern), false);
      const c = sim.blk.counters;
      console.log(
        `# skewed: ${verdict[0]}; requests ${c.requests}, dma faults ${c.dmaFaults}, dropped ${c.dropped}, errors ${c.errors}`,
      );
    } finally {
      qemu.kill();
      await qemu.exited;
      await sim.close();
    }
  });
});
