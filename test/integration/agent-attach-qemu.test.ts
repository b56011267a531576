/**
 * Debian's QEMU boots a guest on a device attached through the API server (POST :attach): the guest
 * RAM's memfd reaches the agent, its table goes to the API server, which applies it as asid 0
 * through the device's queue and answers; only then does QEMU get its reply. The virtio-blk model
 * does every access by DMA through the simulated device's IOTLB, so the guest reads back what it
 * wrote only if those mappings are right. Memory hotplug maps exactly the DIMM, device_del invalidates
 * exactly it. QEMU quitting sends the empty table; its memory is released.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { AgentClient } from '../../src/agent/client.ts';
import type { DeviceSideFactory } from '../../src/agent/attach.ts';
import { deviceSideFor } from '../../src/agent/attach-device-side.ts';
import type { SimulatedDevice } from '../../src/device/simulated.ts';
import { type RunningAgent, startAgent } from '../../services/agent/main.ts';
import {
  buildGuest,
  diskBytes,
  makeDisk,
  type Guest,
  PATTERN_BYTES,
  READ_OFFSET,
  VERDICT,
  WRITE_OFFSET,
} from '../vhost-user/guest.ts';
import { Qemu } from '../vhost-user/qemu.ts';
import { apiConfig, grpcClients, rest, startReadyApi } from './api-harness.ts';
import { until, TIER_BUDGET_MS } from './agent-harness.ts';

const MiB = 1n << 20n;

let guest: Guest;
let work: string;

before(async () => {
  guest = await buildGuest();
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-attach-qemu-'));
});
after(() => {
  for (const q of Qemu.live) q.kill();
  guest?.cleanup();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

test('a QEMU guest does I/O through an attached device whose memory the API server mapped', {
  timeout: TIER_BUDGET_MS,
}, async () => {
  const disk = makeDisk(guest, work, 'disk.img');
  // The agent's own relay over its simulated blk device, whose data path DMAs through that IOTLB;
  // the device is kept to read its counters.
  let served: SimulatedDevice | undefined;
  const deviceSide: DeviceSideFactory = (device, memory) => {
    served = device as SimulatedDevice;
    return deviceSideFor(device, memory);
  };
  const attachDir = path.join(work, 'vhost-user');
  const socket = path.join(work, 'agent.sock');
  const agent: RunningAgent = await startAgent(
    {
      socketPath: socket,
      devices: [`sim:vublk0,iommu=onchip,onchipMap=dma_map,useVa=1,disk=${disk}`],
      allowedRoots: [],
      stateDir: path.join(work, 'state'),
      attachDir,
      memory: [],
      logLevel: 'silent',
    },
    undefined,
    { deviceSide },
  );
  const client = new AgentClient({ socketPath: socket });
  let qemu: Qemu | undefined;
  const api = await startReadyApi(apiConfig(work, socket));
  const http = rest(api.restAddress);
  try {
    await client.connect();
    const socketPath = path.join(attachDir, 'vublk0.sock');
    const attached = await http('POST', '/v1/devices/vublk0:attach', { socketPath });
    assert.equal(attached.status, 200, JSON.stringify(attached.body));
    const started = performance.now();
    qemu = new Qemu({ guest, socketPath, guestWait: 300, hold: true, slots: 2 });
    const verdict = await qemu.waitFor(new RegExp(`${VERDICT} (PASS|FAIL)[^\\n]*\\n`));
    const seconds = (performance.now() - started) / 1000;
    assert.equal(verdict[1], 'PASS', `${verdict[0]}\n${qemu.console.slice(-3000)}`);
    assert.ok(
      diskBytes(disk, WRITE_OFFSET, PATTERN_BYTES).equals(guest.writePattern),
      'written pattern on disk',
    );
    assert.ok(diskBytes(disk, READ_OFFSET, PATTERN_BYTES).equals(guest.readPattern));
    const blk = served?.simulator.vrings.blk;
    assert.ok(blk, 'the relay served the simulated blk device');
    assert.equal(blk.counters.dmaFaults, 0);
    console.log(
      `# attached: boot to verdict ${seconds.toFixed(1)} s; ${blk.counters.requests} requests, read ${blk.counters.bytesRead} B, wrote ${blk.counters.bytesWritten} B`,
    );

    // The attachment, and asid 0 holding exactly the VMM's table, in the API server and on the device.
    const { attachment } = await client.describeDevice('vublk0');
    assert.ok(attachment?.vmmConnected);
    assert.ok(attachment.vrings[0]?.running);
    const { mappings } = await client.listMapped('vublk0');
    assert.deepEqual(mappings, attachment.memoryTable);
    const desired = (await http('GET', '/v1/devices/vublk0/mappings')).body.mappings as {
      iova: string;
      size: string;
      memory: string;
    }[];
    assert.deepEqual(
      desired.map((m) => [BigInt(m.iova), BigInt(m.size), m.memory]),
      mappings.map((m) => [m.iova, m.size, m.memory]),
    );
    const shown = (await http('GET', '/v1/devices/vublk0')).body.device.attachment;
    assert.deepEqual([shown.vmmConnected, shown.memoryTableEntries], [true, mappings.length]);
    const bootBytes = mappings.reduce((n, m) => n + m.size, 0n);
    assert.ok(bootBytes > 255n * MiB && bootBytes <= 256n * MiB, `boot RAM mapped: ${bootBytes}`);
    assert.ok(mappings.every((m) => m.iova === m.offset && m.memory === mappings[0]!.memory));

    // Memory hotplug through the API server's queue, seen on WatchMappings and the device counters:
    // device_add maps exactly the DIMM, device_del invalidates exactly it.
    const events: { kind: string; iova: bigint; size: bigint }[] = [];
    const grpc = grpcClients(api.grpcAddress);
    const stream = grpc.watch({ device: 'vublk0' });
    stream.on('error', () => undefined);
    await new Promise<void>((resolve) =>
      stream.on('data', (e: { kind: string; mapping?: { iova: string; size: string } }) => {
        if (e.kind === 'subscribed') resolve();
        else if (e.mapping)
          events.push({ kind: e.kind, iova: BigInt(e.mapping.iova), size: BigInt(e.mapping.size) });
      }),
    );
    const sent = async (since: { messagesWritten: number; batches: number }) => {
      const now = (await client.describeDevice('vublk0')).counters;
      return { messages: now.messagesWritten - since.messagesWritten, batches: now.batches - since.batches };
    };
    try {
      const beforeAdd = (await client.describeDevice('vublk0')).counters;
      await qemu.plugDimm('dimm1', 128n * MiB);
      await qemu.until(() => events.length > 0, 'the DIMM on the watch');
      const [dimm] = events;
      assert.deepEqual(
        events.map((e) => [e.kind, e.size]),
        [['mapped', 128n * MiB]],
      );
      assert.ok(dimm!.iova >= 4096n * MiB, `the DIMM sits above 4 GiB: 0x${dimm!.iova.toString(16)}`);
      const addSent = await sent(beforeAdd);
      // BATCH_BEGIN, one UPDATE, BATCH_END.
      assert.deepEqual(addSent, { messages: 3, batches: 1 });
      events.length = 0;
      const beforeDel = (await client.describeDevice('vublk0')).counters;
      // The guest never onlined the DIMM (memhp_default_state=offline): it can always eject it.
      await qemu.unplugDimm('dimm1');
      await qemu.until(() => events.length > 0, 'the DIMM unmapped on the watch');
      assert.deepEqual(events, [{ kind: 'unmapped', iova: dimm!.iova, size: 128n * MiB }]);
      const delSent = await sent(beforeDel);
      assert.deepEqual(delSent, { messages: 3, batches: 1 }, 'BATCH_BEGIN, one INVALIDATE, BATCH_END');
      assert.deepEqual((await client.listMapped('vublk0')).mappings, mappings, 'the boot RAM is untouched');
      console.log(
        `# attached: hotplug add sent ${JSON.stringify(addSent)} (UPDATE 0x${dimm!.iova.toString(16)}+128 MiB), device_del sent ${JSON.stringify(delSent)} (INVALIDATE of it)`,
      );
    } finally {
      stream.cancel();
      grpc.close();
    }

    assert.equal(await qemu.quit(), 0);
    await until(
      'the empty table applied',
      async () => (await client.listMapped('vublk0')).mappings.length === 0,
    );
    // The API server learns of the new table from the agent's attachment watch, a moment later.
    await until(
      'the API server holds the empty table',
      async () => (await http('GET', '/v1/devices/vublk0/mappings')).body.mappings.length === 0,
    );
    await until("the guest's memory released", async () =>
      (await client.listMemory()).every((m) => !m.id.startsWith('vhost-user-')),
    );
    await until("the API server forgot the guest's memory", async () =>
      ((await http('GET', '/v1/memory')).body.memory as { id: string }[]).every(
        (m) => !m.id.startsWith('vhost-user-'),
      ),
    );
  } finally {
    qemu?.kill();
    await qemu?.exited;
    await http('POST', '/v1/devices/vublk0:detach').catch(() => undefined);
    await api.stop();
    client.close();
    await agent.stop();
  }
});
