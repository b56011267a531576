/**
 * The agent SIGKILLed under a running QEMU guest: Debian's QEMU 7.2 (`vhost-user-blk-pci` on a
 * chardev with `reconnect=1`) boots on a device attached through the API server, its guest doing
 * I/O rounds without end; the agent dies in the middle of them. The API server keeps the
 * attachment in its desired state: once it has reconciled the new agent it empties asid 0 (the
 * kernel freed everything the dead owner mapped) and attaches the device again on the same socket.
 * QEMU reconnects on its own and, the device being started, sends its whole table again
 * (vhost_user_blk_connect); it becomes asid 0 again. Without INFLIGHT_SHMFD, QEMU 7.2's
 * vhost_virtqueue_stop finds the backend gone and rewinds the queue's last avail index to the used
 * index (virtio_queue_restore_last_avail_idx), so the new backend is handed again every request
 * the old one had not completed: the guest's I/O in flight completes, it does not fail. Then QEMU
 * quits: nothing of the guest stays mapped, registered or open in either process.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import {
  buildGuest,
  diskBytes,
  type Guest,
  makeDisk,
  PATTERN_BYTES,
  ROUND_OFFSETS,
  VERDICT,
  WRITE_OFFSET,
} from '../vhost-user/guest.ts';
import { Qemu } from '../vhost-user/qemu.ts';
import { TIER_BUDGET_MS } from './agent-harness.ts';
import { tempDir } from './api-harness.ts';
import { createRig, desiredMappings } from './process-harness.ts';

const DEVICE = 'vublk0';

let guest: Guest;
before(async () => {
  guest = await buildGuest();
});
after(() => {
  for (const q of Qemu.live) q.kill();
  guest?.cleanup();
});

/** Polls `check` until it holds or the test's deadline passes. */
async function eventually(deadline: number, what: string, check: () => Promise<boolean>): Promise<void> {
  while (!(await check().catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`not within the test's budget: ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The guest's I/O rounds so far, in order. */
function rounds(qemu: Qemu): { n: number; pass: boolean }[] {
  return [...qemu.console.matchAll(new RegExp(`${VERDICT} ROUND (\\d+) (PASS|FAIL)`, 'g'))].map((m) => ({
    n: Number(m[1]),
    pass: m[2] === 'PASS',
  }));
}

/** The fds of process `pid` that are QEMU's guest RAM (memory-backend-memfd names its memfds so). */
function guestRamFds(pid: number): number {
  const dir = `/proc/${pid}/fd`;
  return fs.readdirSync(dir).filter((fd) => {
    try {
      return /^\/memfd:memory-backend-memfd/.test(fs.readlinkSync(path.join(dir, fd)));
    } catch {
      return false;
    }
  }).length;
}

test('the agent SIGKILLed under a QEMU guest: the attachment is served again, QEMU reconnects, the I/O in flight completes', {
  timeout: TIER_BUDGET_MS,
}, async (t) => {
  const deadline = Date.now() + TIER_BUDGET_MS - 30_000;
  const dir = tempDir('attach-reconnect');
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const disk = makeDisk(guest, dir, 'disk.img');
  const spec = `sim:${DEVICE},iommu=onchip,onchipMap=dma_map,useVa=1,disk=${disk}`;
  const rig = createRig(t, 'attach-reconnect');
  const first = await rig.startAgent([spec]);
  const api = await rig.startApi();
  const agent = rig.agentClient();
  const socketPath = path.join(path.dirname(rig.apiStateDir), 'agent', 'vhost-user', `${DEVICE}.sock`);
  const attached = await api.http('POST', `/v1/devices/${DEVICE}:attach`, { socketPath });
  assert.equal(attached.status, 200, JSON.stringify(attached.body));

  const started = performance.now();
  const qemu = new Qemu({ guest, socketPath, guestWait: 300, rounds: true, reconnect: 1 });
  t.after(async () => {
    qemu.kill();
    await qemu.exited;
  });
  const verdict = await qemu.waitFor(new RegExp(`${VERDICT} (PASS|FAIL)[^\\n]*\\n`));
  const bootToVerdict = (performance.now() - started) / 1000;
  assert.equal(verdict[1], 'PASS', `${verdict[0]}\n${qemu.console.slice(-3000)}`);
  await qemu.waitFor(new RegExp(`${VERDICT} ROUND 2 PASS`));

  /** The VMM's table as the API server holds it (asid 0), the agent's device maps it and the backend has it. */
  const tables = async () => {
    const desired = (await desiredMappings(api, DEVICE)).filter((m) => m.asid === 0);
    const { attachment } = await agent.describeDevice(DEVICE);
    const mapped = (await agent.listMapped(DEVICE)).mappings.filter((m) => m.asid === 0);
    return { desired, mapped, vmm: attachment?.memoryTable ?? [], connected: attachment?.vmmConnected };
  };
  const before = await tables();
  assert.ok(before.desired.length >= 1);
  assert.deepEqual(before.mapped, before.desired);
  assert.deepEqual(before.vmm, before.desired);
  const memoryBefore = (await agent.listMemory()).filter((m) => m.id.startsWith('vhost-user-'));
  assert.equal(memoryBefore.length, 1, 'the guest RAM, registered once');
  const ramFds = guestRamFds(first.pid);
  assert.ok(ramFds > 0, "the agent holds the guest RAM's fd");

  // SIGKILL with the guest's I/O in flight (a round runs all the time).
  const roundsAtKill = rounds(qemu).length;
  await first.kill('SIGKILL');
  const killed = performance.now();
  const second = await rig.startAgent([spec]);

  // The API server reconciles the new agent, empties asid 0, attaches again; QEMU reconnects and
  // sends its table, one region per message (ADD_MEM_REG): wait for all of it, in all three places.
  const wholeTable = (t: readonly unknown[]) => t.length === before.desired.length;
  await eventually(deadline, 'QEMU connected again with its whole table', async () => {
    const now = await tables();
    return now.connected === true && wholeTable(now.desired) && wholeTable(now.mapped) && wholeTable(now.vmm);
  });
  const reconnectSeconds = (performance.now() - killed) / 1000;
  const afterReconnect = await tables();
  assert.deepEqual(afterReconnect.desired, before.desired, 'the same table (the same memfd, the same id)');
  assert.deepEqual(afterReconnect.mapped, before.desired);
  assert.deepEqual(afterReconnect.vmm, before.desired);
  const shown = (await api.http('GET', `/v1/devices/${DEVICE}`)).body.device.attachment;
  assert.deepEqual(
    [shown.socketPath, shown.vmmConnected, shown.memoryTableEntries],
    [socketPath, true, before.desired.length],
  );
  const apiMemory = ((await api.http('GET', '/v1/memory')).body.memory as { id: string }[])
    .map((m) => m.id)
    .filter((id) => id.startsWith('vhost-user-'));
  assert.deepEqual(apiMemory, [memoryBefore[0]!.id], "the API server's memory: the guest RAM only");
  assert.deepEqual(
    (await agent.listMemory()).filter((m) => m.id.startsWith('vhost-user-')).map((m) => m.id),
    [memoryBefore[0]!.id],
  );
  assert.equal(guestRamFds(second.pid), ramFds, 'the new agent holds as many of its fds');

  // The round in flight at the kill, and two whole rounds after the reconnect.
  const inFlight = roundsAtKill + 1;
  await qemu.waitFor(new RegExp(`${VERDICT} ROUND ${inFlight + 2} (PASS|FAIL)`));
  const done = rounds(qemu);
  const fate = done.find((r) => r.n === inFlight);
  assert.ok(fate, `round ${inFlight} ended`);
  assert.ok(
    done.every((r) => r.pass),
    `every round passed, the one in flight at the kill too:\n${qemu.console.slice(-3000)}`,
  );
  const { counters } = await agent.describeDevice(DEVICE);
  console.log(
    `# reconnect: boot to verdict ${bootToVerdict.toFixed(1)} s; SIGKILL during round ${inFlight}; QEMU served again ${reconnectSeconds.toFixed(1)} s later with its ${before.desired.length}-entry table (connections ${shown.connections}); rounds ${done.length} all PASS (${done.length * 2} MiB written and read back); new agent's device: ${JSON.stringify({ batches: counters.batches, messages: counters.messagesWritten })}`,
  );
  // QEMU's own account: GET_VRING_BASE found no backend, so it rewound the queue to the used index.
  const said = qemu.console.split('\n').filter((l) => l.startsWith('qemu-system-x86_64:'));
  assert.ok(
    said.some((l) => /vhost VQ 0 ring restore failed/.test(l)),
    `QEMU rewound the ring: ${JSON.stringify(said)}`,
  );
  console.log(`# QEMU said at the reconnect: ${JSON.stringify(said)}`);

  // QEMU quits: the empty table, the guest RAM released in both processes and its fd closed.
  const lastPass = done.at(-1)!;
  assert.equal(await qemu.quit(), 0);
  const pattern = lastPass.n % 2 === 1 ? guest.writePattern : guest.readPattern;
  assert.ok(
    diskBytes(disk, ROUND_OFFSETS[lastPass.n % 2]!, PATTERN_BYTES).equals(pattern),
    `round ${lastPass.n}'s pattern is on the disk`,
  );
  assert.ok(diskBytes(disk, WRITE_OFFSET, PATTERN_BYTES).equals(guest.writePattern));
  await eventually(deadline, 'the VMM gone everywhere', async () => {
    const now = await tables();
    const memory = (await api.http('GET', '/v1/memory')).body.memory as { id: string }[];
    return (
      now.connected === false &&
      now.desired.length === 0 &&
      now.mapped.length === 0 &&
      memory.every((m) => !m.id.startsWith('vhost-user-')) &&
      (await agent.listMemory()).every((m) => !m.id.startsWith('vhost-user-')) &&
      guestRamFds(second.pid) === 0
    );
  });
  // Still attached, for the next VMM.
  assert.equal(
    (await api.http('GET', `/v1/devices/${DEVICE}`)).body.device.attachment.socketPath,
    socketPath,
  );
});
