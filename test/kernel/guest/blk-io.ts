/**
 * Guest step of the blk kinds (test/kernel/blk-plan.ts): guest-style block I/O through our
 * mappings, to a virtio-blk device nobody here wrote, on the real kernel.
 *   - vduse-blk: qemu-storage-daemon's VDUSE export (QEMU's libvduse), VA mode;
 *   - vp-vdpa-blk: QEMU's virtio-blk-pci under vp_vdpa behind intel-iommu, PA mode (pinned).
 * The agent (services/agent/main.ts, kernel mode) owns /dev/vhost-vdpa-0; the boot's API server
 * attaches it over REST (POST :attach), so the agent serves it over vhost-user and relays the
 * vrings to it, and the VMM's memory table goes through the API server to the device's queue. The
 * test front-end (test/frontend/blk-frontend.ts, proven against qemu-storage-daemon's vhost-user
 * export) plays the VMM: it writes the plan's patterns and reads them back. The host checks the
 * disk image after the VM exits. On vp-vdpa-blk the guest's log must show no DMAR fault, and a
 * buffer in memory the VMM unplugged (so the agent unmapped it) must fault (judged by dmesg and
 * data: QEMU still answers such a request OK). Then the agent is SIGKILLed with a write in flight,
 * and a new agent, reconciled by the API server, which attaches it again, serves the device.
 *
 *   node --import tsx test/kernel/run-vm.ts --kind vduse-blk,vp-vdpa-blk test/kernel/guest/blk-io.ts
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient } from '../../../src/agent/client.ts';
import { backendFeatureNames } from '../../../src/uapi/index.ts';
import { VhostUserBlkFrontend } from '../../frontend/blk-frontend.ts';
import {
  BLK_BEFORE_KILL,
  BLK_IMAGE_BYTES,
  BLK_IN_FLIGHT,
  BLK_KINDS,
  BLK_WRITES,
  type BlkKind,
  blkPattern,
  SECTOR_BYTES,
} from '../blk-plan.ts';
import {
  agentServing,
  assert,
  bootAgentSocket,
  bootApi,
  deviceBusy,
  devicePath,
  hex,
  kernelAgentArgs,
  restCall,
  restExpect,
  runChecks,
  scratchDirs,
  Service,
  stopAgent,
  untilApiReady,
  WAIT_MS,
} from './harness.ts';
import { vmPinOf } from './kinds.ts';

const kind = process.env.VDPA_MAPD_KIND as BlkKind;
if (!BLK_KINDS.includes(kind))
  throw new Error(`VDPA_MAPD_KIND=${kind}: not a blk kind (${BLK_KINDS.join(' ')})`);
/** PA mode: the platform IOMMU translates, the kernel pins what we map. */
const pa = kind === 'vp-vdpa-blk';
const MiB = 1n << 20n;
/**
 * The front-end's guest memory: one memfd region at guest physical 1 MiB (where a PC's RAM above
 * the legacy hole starts; QEMU's virtio takes a ring at address 0 for one not set up), mapped at
 * IOVA = guest physical.
 */
const MEMORY_BASE = MiB;
const MEMORY = 4n * MiB;
const QUEUE_SIZE = 64;
/** What the agent pins for the VMM's memory (PA mode) once its table is applied. */
const PINNED = pa ? MEMORY : 0n;
const DEVICE = path.basename(devicePath);
const { root, agentState, sharedDir } = scratchDirs('blk-io');
const attachDir = path.join(root, 'vhost-user');
const vmmSocket = path.join(attachDir, `${DEVICE}.sock`);

/**
 * The DMAR fault reports in the guest's kernel log (`DMAR: [DMA Read NO_PASID] ... fault addr X`)
 * since this step began (an earlier kind's deliberate fault is not this step's).
 */
function dmarFaults(): string[] {
  return dmarLines().slice(faultsBefore);
}
function dmarLines(): string[] {
  const log = execFileSync('dmesg', { encoding: 'utf8' });
  return log.split('\n').filter((l) => /DMAR: \[(DMA|INTR)/.test(l) || /DMAR:.*fault addr/.test(l));
}
const faultsBefore = dmarLines().length;

/**
 * While a check waits long, what the device's side shows (reported, never a limit: only the tier's
 * budget bounds the wait): the end of the agent's log, of the guest's kernel log and of
 * qemu-storage-daemon's output (init.sh writes it to /tmp/qsd.log).
 */
function reportStall(since: number): void {
  const tail = (text: string, n: number) => text.trimEnd().split('\n').slice(-n).join('\n    ');
  const owner = agent ? `agent pid ${agent.pid}${agent.running ? '' : ' (exited)'}` : 'no agent';
  const qsd = fs.existsSync('/tmp/qsd.log') ? fs.readFileSync('/tmp/qsd.log', 'utf8') : '';
  // The ring of QUEUE_SIZE entries at the memory base (test/frontend/split-ring.ts): avail at
  // 16 bytes per entry, used on the next page.
  const idx = (at: bigint) => fe?.memory.read(MEMORY_BASE + at + 2n, 2).readUInt16LE(0) ?? '-';
  const ring = `avail.idx ${idx(BigInt(16 * QUEUE_SIZE))}, used.idx ${idx(0x1000n)}`;
  console.log(
    `GUEST-WAIT: ${Math.round((performance.now() - since) / 1000)} s into the step; ${owner}; ${requests} requests done; ${ring}\n` +
      `    agent: ${agent?.tail(6).trim() ?? '-'}\n    dmesg: ${tail(execFileSync('dmesg', { encoding: 'utf8' }), 12)}\n    qemu-storage-daemon: ${tail(qsd, 8) || '(nothing)'}`,
  );
}
const stepStarted = performance.now();
setInterval(() => reportStall(stepStarted), 45_000).unref();

let agent: Service | undefined;
let client: AgentClient | undefined;
let base = '';
let fe: VhostUserBlkFrontend | undefined;
let requests = 0;
let verified = 0;
const front = () => {
  assert(fe !== undefined, 'no front-end');
  return fe;
};
const running = () => {
  assert(agent !== undefined && client !== undefined, 'the agent is not running');
  return { agent, client };
};
const expect = (method: string, url: string, status: number, body?: unknown) =>
  restExpect(base, method, url, status, body);

/** What the agent pins for the device (VmPin of its process). */
const agentPin = () => vmPinOf(running().agent.pid);

/**
 * Starts the agent (kernel mode, the boot's agent socket, attachments under attachDir) and an
 * AgentClient to it, waits for the boot's API server to have reconciled it; returns the detail.
 */
async function startAgent(): Promise<string> {
  assert(!deviceBusy(), `${devicePath} is held by someone`);
  const args = [...kernelAgentArgs(agentState, bootAgentSocket, sharedDir), '--attach-dir', attachDir];
  const [started, boot] = await Promise.all([Service.start('agent', 'agent', args, agentServing), bootApi()]);
  agent = started.service;
  base = boot.rest;
  // Only once the agent serves: a client that tried before backs off (gRPC's reconnect backoff
  // grows towards two minutes) and would wait long after the agent is up.
  client = new AgentClient({ socketPath: bootAgentSocket, deadlineMs: WAIT_MS });
  const info = await client.connect();
  assert(info.pid === agent.pid, `the client reached pid ${info.pid}, not the agent ${agent.pid}`);
  const readyMs = await untilApiReady(base);
  return `agent pid ${agent.pid} serving after ${started.ms} ms; the boot's API server ready ${readyMs} ms later`;
}

/** Waits (within the tier's budget) until `what` holds; returns the ms it took. */
async function until(what: string, holds: () => Promise<boolean>): Promise<number> {
  const t0 = performance.now();
  while (!(await holds())) {
    assert(performance.now() - t0 < WAIT_MS, `${what}: not within the tier's budget`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return Math.round(performance.now() - t0);
}

/** The agent's mappings of the device (what it wrote to the kernel), as `iova+size`. */
async function agentMapped(): Promise<string[]> {
  const { mappings } = await running().client.listMapped(DEVICE);
  return mappings.map((m) => `${hex(m.iova)}+${hex(m.size)}`);
}

/** The API server's desired mappings of the device. */
async function desiredCount(): Promise<number> {
  return (await expect('GET', `/v1/devices/${DEVICE}/mappings`, 200)).body.mappings.length;
}

/**
 * POST :attach through the boot's API server, once it follows the current agent (a refusal while
 * it has not reconnected yet is UNAVAILABLE: tried again within the tier's budget).
 */
async function attach(): Promise<string> {
  const t0 = performance.now();
  for (;;) {
    const r = await restCall(base, 'POST', `/v1/devices/${DEVICE}:attach`, { socketPath: vmmSocket });
    if (r.status === 200) {
      assert(r.body.attachment?.socketPath === vmmSocket, `attached at ${JSON.stringify(r.body)}`);
      return `POST :attach -> 200 after ${Math.round(performance.now() - t0)} ms, the agent serves ${vmmSocket}`;
    }
    assert(
      r.status === 503 && performance.now() - t0 < WAIT_MS,
      `POST :attach: ${r.status} ${JSON.stringify(r.body)}`,
    );
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

/** The front-end every check here uses: the tier's bounds, the memory at MEMORY_BASE. */
function connect(): Promise<VhostUserBlkFrontend> {
  return VhostUserBlkFrontend.connect(vmmSocket, {
    memoryBase: MEMORY_BASE,
    memoryBytes: MEMORY,
    queueSize: QUEUE_SIZE,
    requestWaitMs: WAIT_MS,
    replyWaitMs: WAIT_MS,
  });
}

/** Mlocked and Unevictable of /proc/meminfo (kB). */
function lockedMemory(): string {
  const text = fs.readFileSync('/proc/meminfo', 'utf8');
  return ['Mlocked', 'Unevictable']
    .map((k) => `${k} ${new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(text)?.[1]} kB`)
    .join(', ');
}

/** Reads `w` back (through another buffer than the one written from) and compares. */
async function readsBack(w: (typeof BLK_WRITES)[number], what: string): Promise<void> {
  const back = await front().read(w.sector, w.bytes, { guestAddr: front().dataArea + 0x20000n });
  requests++;
  const want = blkPattern(kind, w);
  if (!back.equals(want)) {
    let at = 0;
    while (back[at] === want[at]) at++;
    throw new Error(`${what}: sector ${w.sector}, byte ${at} is ${hex(back[at]!)}, wrote ${hex(want[at]!)}`);
  }
  verified += w.bytes;
}

/** The front-end's memory is the device's one mapping, at IOVA = guest physical; the agent pins it. */
async function vmmMemoryMapped(what: string): Promise<string> {
  const mapped = await agentMapped();
  assert(
    mapped.join(' ') === `${hex(MEMORY_BASE)}+${hex(MEMORY)}`,
    `${what}: the agent maps ${mapped.join(' ')}`,
  );
  const pin = agentPin();
  assert(pin === PINNED, `${what}: the agent's VmPin is ${pin} bytes`);
  return `the agent maps ${mapped[0]}, VmPin ${pin / 1024n} kB`;
}

const checks: [string, () => Promise<string>][] = [
  ['agent', startAgent],
  [
    'facts',
    async () => {
      const [f] = await running().client.listDevices();
      assert(f !== undefined && f.deviceId === 2, `device id ${f?.deviceId} (virtio-blk is 2)`);
      const desired = await desiredCount();
      assert(desired === 0, `the API server still holds ${desired} mappings of an earlier step`);
      assert(agentPin() === 0n, `the agent pins ${agentPin()} bytes before any attach`);
      return `${kind}: device id ${f.deviceId}, vqs ${f.vqCount}, config ${f.configSize} B, backend features ${hex(f.negotiatedFeatures)} ${backendFeatureNames(f.negotiatedFeatures).join('|')}, IOVA ${hex(f.iovaRange.first)}-${hex(f.iovaRange.last)}, iommu ${f.iommu}, pinned ${f.pinned}`;
    },
  ],
  ['attach', attach],
  [
    'connect',
    async () => {
      fe = await connect();
      const n = fe.negotiated;
      const capacity = BigInt(BLK_IMAGE_BYTES / SECTOR_BYTES);
      assert(n.capacity === capacity, `capacity ${n.capacity} sectors, the image has ${capacity}`);
      const shown = (await expect('GET', `/v1/devices/${DEVICE}`, 200)).body.device.attachment;
      assert(
        shown?.vmmConnected === true && shown.memoryTableEntries === 1,
        `the API server shows ${JSON.stringify(shown)}`,
      );
      return `features offered ${hex(n.offeredFeatures)}, acked ${hex(n.features)}; capacity ${n.capacity} sectors; guest memory [${hex(MEMORY_BASE)}, ${hex(MEMORY_BASE + MEMORY)}): ${await vmmMemoryMapped('after connecting')}`;
    },
  ],
  [
    'write-read',
    async () => {
      const t0 = performance.now();
      for (const w of BLK_WRITES) {
        await front().write(w.sector, blkPattern(kind, w));
        requests++;
      }
      await front().flush();
      requests++;
      const tw = performance.now();
      for (const w of BLK_WRITES) await readsBack(w, 'read back');
      const ms = (t: number) => Math.round(t);
      return `${BLK_WRITES.length} writes (${BLK_WRITES.reduce((n, w) => n + w.bytes, 0)} bytes) + flush in ${ms(tw - t0)} ms, read back intact: ${verified} bytes verified in ${ms(performance.now() - tw)} ms`;
    },
  ],
  [
    'no-dmar-fault',
    async () => {
      const faults = dmarFaults();
      assert(faults.length === 0, `DMAR faults in the guest's log:\n${faults.join('\n')}`);
      return pa
        ? 'no DMAR fault in the guest log after the I/O'
        : 'no DMAR fault in the guest log (VA mode: no platform IOMMU on the path)';
    },
  ],
];

// vp_vdpa behind intel-iommu: memory the VMM unplugged is unmapped at the IOMMU. On VDUSE a
// request the device cannot translate is dropped (no used entry; kernel-dma.md): not run there.
if (pa) {
  checks.push([
    'unmapped-faults',
    async () => {
      // Hotplug (the agent maps it through the API server), then unplug (the agent unmaps it);
      // the front-end keeps the memory, so a buffer there shows whether the device wrote into it.
      const region = await front().addMemory(64n * 1024n);
      const plugged = await agentMapped();
      assert(plugged.length === 2, `after ADD_MEM_REG the agent maps ${plugged.join(' ')}`);
      await front().unplugMemory(region);
      const mapped = await vmmMemoryMapped('after REM_MEM_REG');
      const w = BLK_WRITES[0]!;
      const status = await front()
        .read(w.sector, w.bytes, { guestAddr: region.guestAddr })
        .then(
          (b) =>
            b.equals(blkPattern(kind, w))
              ? 'the data arrived'
              : `OK, buffer ${b.subarray(0, 4).toString('hex')}..`,
          (e: Error) => e.message,
        );
      requests++;
      assert(status !== 'the data arrived', 'the device wrote into memory the agent had unmapped');
      const faults = dmarFaults();
      const addrs = faults
        .map((l) => /fault addr (?:0x)?([0-9a-f]+)/.exec(l)?.[1])
        .map((a) => (a ? BigInt(`0x${a}`) : -1n));
      assert(
        faults.length > 0,
        `no DMAR fault for the unmapped IOVA ${hex(region.guestAddr)} (request: ${status})`,
      );
      const outside = addrs.filter((a) => a < region.guestAddr || a >= region.guestAddr + region.size);
      assert(outside.length === 0, `DMAR faults outside the unmapped region:\n${faults.join('\n')}`);
      // The device goes on: the next request, into mapped memory, works.
      const back = await front().read(w.sector, w.bytes);
      requests++;
      assert(back.equals(blkPattern(kind, w)), 'the request after the fault read wrong data');
      return `ADD_MEM_REG of [${hex(region.guestAddr)}, +64K) mapped, REM_MEM_REG unmapped it (${mapped}); READ into it: ${status}; ${faults.length} DMAR fault(s), all in it: ${faults[0]!.trim()}; the next request works`;
    },
  ]);
}

checks.push(
  [
    'stop-ring',
    async () => {
      const ringBase = await front().close();
      fe = undefined;
      // VDUSE asks its daemon (VDUSE_GET_VQ_STATE); vp_vdpa cannot tell (vp_vdpa_get_vq_state:
      // EOPNOTSUPP), so the relay answers with the used index, as QEMU does (kernel-notes B3).
      assert(ringBase === requests, `GET_VRING_BASE ${ringBase}, ${requests} requests made`);
      const fallback = running().agent.lines.filter((l) => l.includes('answered with the used index'));
      assert(fallback.length === (pa ? 1 : 0), `the agent logged ${fallback.length} used-index answers`);
      // The VMM left: its empty table is applied through the API server, and nothing stays pinned.
      const ms = await until('the empty table applied', async () => (await agentMapped()).length === 0);
      assert(agentPin() === 0n, `the agent's VmPin is ${agentPin()} bytes with nothing mapped`);
      assert(deviceBusy(), 'the agent no longer holds the device');
      return `the front-end stopped the ring at avail index ${ringBase} (= ${requests} requests)${pa ? ', answered from the used index (the device: EOPNOTSUPP)' : ', from the device'}; its memory unmapped ${ms} ms after it left, VmPin 0`;
    },
  ],
  [
    'sigkill-in-flight',
    async () => {
      const locked = lockedMemory();
      fe = await connect();
      await front().write(BLK_BEFORE_KILL.sector, blkPattern(kind, BLK_BEFORE_KILL));
      requests++;
      const pinnedBefore = agentPin();
      assert(pinnedBefore === PINNED, `the agent pins ${pinnedBefore} bytes`);
      // Published and kicked at once; the agent dies while the device serves it (or just after).
      let settled = Number.POSITIVE_INFINITY;
      const inFlight = front()
        .write(BLK_IN_FLIGHT.sector, blkPattern(kind, BLK_IN_FLIGHT))
        .then(
          () => 'completed',
          (e: Error) => `failed: ${e.message}`,
        )
        .finally(() => {
          settled = performance.now();
        });
      // VDUSE: the owner's death resets the device (vhost_vdpa_release), and qemu-storage-daemon
      // 7.2 aborts on a reset with a request in use (libvduse vduse_queue_disable: assertion
      // `vq->inuse == 0`), after which the dead owner's exit waits for the daemon's answer for
      // ever (msg_timeout 0) and the node stays held (docs/kernel-notes.md B6). So on VDUSE the
      // agent is killed only once the write is done; on vp_vdpa while it is in flight.
      if (!pa) await inFlight;
      await new Promise((r) => setImmediate(r));
      const { agent: a, client: c } = running();
      c.close();
      client = undefined;
      const killed = await a.stop('SIGKILL');
      const dead = performance.now();
      agent = undefined;
      const result = await inFlight;
      const outcome = `${result} ${settled < dead ? 'before the agent was seen dead' : `${Math.round(settled - dead)} ms after the agent had died`}`;
      const next = await front()
        .read(0n, 4096)
        .then(
          () => 'served',
          (e: Error) => e.message,
        );
      assert(next !== 'served', 'a request was served after the agent died');
      await front().close();
      fe = undefined;
      // The kernel released the dead owner's fd (vhost_vdpa_release: reset, unmap, unpin).
      assert(!deviceBusy(), 'the node is still held after the agent died');
      const lockedAfter = lockedMemory();
      assert(lockedAfter === locked, `locked memory ${locked} before, ${lockedAfter} after`);
      const daemon = fs.existsSync('/tmp/qsd.log') ? fs.readFileSync('/tmp/qsd.log', 'utf8').trim() : '';
      const said = kind === 'vduse-blk' ? `; qemu-storage-daemon said: ${daemon || 'nothing'}` : '';
      return `agent pid ${a.pid} killed (${killed.signal}), it pinned ${pinnedBefore / 1024n} kB; the ${BLK_IN_FLIGHT.bytes}-byte write ${pa ? 'published and kicked before the SIGKILL' : 'done before the SIGKILL (B6)'}: ${outcome}; the next request: ${next}; node free; ${lockedAfter} (unchanged)${said}`;
    },
  ],
  [
    'new-agent-serves',
    async () => {
      const started = await startAgent();
      // The new agent does not serve the lost attachment: the API server empties its table and,
      // since the attachment is in its desired state, has the new agent serve the same socket.
      const dropped = await until(
        "the lost attachment's table emptied",
        async () => (await desiredCount()) === 0,
      );
      const restored = await until(
        'the attachment restored at the new agent',
        async () =>
          (await expect('GET', `/v1/devices/${DEVICE}`, 200)).body.device.attachment?.socketPath ===
          vmmSocket,
      );
      const attached = `the API server attached it again after ${restored} ms`;
      fe = await connect();
      const mapped = await vmmMemoryMapped('the new agent');
      await readsBack(BLK_BEFORE_KILL, 'the write before the kill');
      await front().write(BLK_IN_FLIGHT.sector, blkPattern(kind, BLK_IN_FLIGHT));
      requests++;
      await readsBack(BLK_IN_FLIGHT, 'the in-flight write, written again');
      await front().close();
      fe = undefined;
      return `${started}; the lost table emptied after ${dropped} ms; ${attached}; ${mapped}; the write from before the kill read back, the in-flight one written again and read back`;
    },
  ],
  [
    'detach',
    async () => {
      await expect('POST', `/v1/devices/${DEVICE}:detach`, 200);
      await until('the empty table applied', async () => (await agentMapped()).length === 0);
      await until("the VMM's memory forgotten", async () =>
        ((await expect('GET', '/v1/memory', 200)).body.memory as { id: string }[]).every(
          (m) => !m.id.startsWith('vhost-user-'),
        ),
      );
      const { agent: a, client: c } = running();
      agent = undefined;
      client = undefined;
      const ms = await stopAgent(a, c);
      return `POST :detach -> 200, nothing mapped, the VMM's memory forgotten; agent exit 0 in ${ms} ms; node free`;
    },
  ],
);

await runChecks(checks, async () => {
  await fe?.close();
  // After a failure too: the next kind's step must find the boot's API server with nothing attached.
  if (agent?.running) await restCall(base, 'POST', `/v1/devices/${DEVICE}:detach`);
  client?.close();
  await agent?.kill();
  fs.rmSync(root, { recursive: true, force: true });
  return `${kind}: ${verified} bytes verified through the agent`;
});
