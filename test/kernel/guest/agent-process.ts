/**
 * Guest step: the real agent process (services/agent/main.ts) in kernel mode, owning the real
 * /dev/vhost-vdpa-0, driven over its unix socket by the API server's client (src/agent/client.ts).
 * What the agent says is compared with what the device holds (vduse-daemon, ./vduse.ts).
 *
 *   node --import tsx test/kernel/run-vm.ts test/kernel/guest/agent-process.ts
 */
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient } from '../../../src/agent/client.ts';
import {
  agentServing,
  assert,
  devicePath,
  deviceBusy,
  deviceTableIs,
  deviceUpdates,
  expectedEntries,
  hex,
  kernelAgentArgs,
  pushEmptyTable,
  runChecks,
  Service,
  showMap,
  updateOp as update,
  vduse,
  WAIT_MS,
} from './harness.ts';

const KiB = 1024n;
const MiB = 1024n * KiB;
const DEVICE = path.basename(devicePath);

const root = fs.mkdtempSync('/tmp/agent-process-');
const stateDir = path.join(root, 'state');
const sharedDir = path.join(root, 'shared');
const socket = path.join(root, 'agent.sock');
fs.mkdirSync(sharedDir);
const imagePath = path.join(sharedDir, 'guest.img');
const pattern = Buffer.from('written to the file by another process, read by the device');
fs.writeFileSync(imagePath, '');
fs.truncateSync(imagePath, Number(MiB));
{
  const fd = fs.openSync(imagePath, 'r+');
  fs.writeSync(fd, pattern, 0, pattern.length, 0x800);
  fs.closeSync(fd);
}

let agent: Service | undefined;
let client: AgentClient | undefined;
const theAgent = () => {
  assert(agent !== undefined && client !== undefined, 'the agent is not running');
  return { agent, client };
};

async function mappedMatchesDevice(what: string): Promise<string> {
  const { mappings } = await theAgent().client.listMapped(DEVICE);
  return deviceTableIs(expectedEntries(mappings), what);
}

await runChecks(
  [
    [
      'start',
      async () => {
        assert(!deviceBusy(), `${devicePath} is already held`);
        const args = [...kernelAgentArgs(stateDir, socket, sharedDir), '--memory', 'boot=memfd:1M'];
        // Under TCG on a busy host the client's first call (loading the protocol code, the first connection)
        // took up to 45 s: it starts with the agent (waitForReady until the socket is there), with
        // no deadline tighter than the tier's budget, rather than the production 10 s.
        client = new AgentClient({ socketPath: socket, deadlineMs: WAIT_MS });
        const [started, info] = await Promise.all([
          Service.start('agent', 'agent', args, agentServing),
          client.connect(),
        ]);
        agent = started.service;
        const opened = agent.logs().find((l) => l.msg === 'device opened');
        assert(opened?.kind === 'kernel', `no kernel "device opened" log:\n${agent.tail()}`);
        // The agent owns the node: any other process is refused.
        assert(deviceBusy(), 'the device node can still be opened while the agent runs');
        return `agent pid ${info.pid} serving after ${started.ms} ms (boot ${info.bootId.slice(0, 8)}); log: device opened ${JSON.stringify(opened)}; another process opening ${devicePath} -> EBUSY`;
      },
    ],
    [
      'list-devices',
      async () => {
        const devices = await theAgent().client.listDevices();
        assert(devices.length === 1, `${devices.length} devices`);
        const f = devices[0]!;
        assert(
          f.name === DEVICE && f.kind === 'kernel' && f.node === devicePath,
          `device ${f.name} ${f.kind} ${f.node}`,
        );
        assert(f.deviceId === 2 && f.asNum === 1, `device id ${f.deviceId}, address spaces ${f.asNum}`);
        assert(
          f.negotiatedFeatures === 0xen && f.offeredFeatures === 0xen,
          `features ${hex(f.offeredFeatures)}/${hex(f.negotiatedFeatures)}`,
        );
        assert(f.iovaRange.first === 0n && f.iovaRange.last === (1n << 64n) - 1n, 'IOVA range');
        // VDUSE maps in VA mode: discovery must see it, or RLIMIT_MEMLOCK would refuse large maps.
        assert(!f.pinned, 'the VDUSE device is taken to pin memory');
        return `${f.name}: kind ${f.kind}, node ${f.node}, device id ${f.deviceId}, offered/negotiated ${hex(f.offeredFeatures)}/${hex(f.negotiatedFeatures)}, IOVA ${hex(f.iovaRange.first)}-${hex(f.iovaRange.last)}, address spaces ${f.asNum}, iommu ${f.iommu}, pinned ${f.pinned}`;
      },
    ],
    [
      'register-memory',
      async () => {
        const { client: c } = theAgent();
        const ram = await c.registerMemory({ id: 'ram', size: 2n * MiB, kind: 'memfd' });
        const img = await c.registerMemory({ id: 'img', path: imagePath });
        assert(ram.kind === 'memfd' && ram.size === 2n * MiB, `ram ${JSON.stringify(ram.kind)} ${ram.size}`);
        assert(img.kind === 'file' && img.path === imagePath && !img.created, `img ${img.kind} ${img.path}`);
        const all = (await c.listMemory()).map((m) => `${m.id}:${m.kind}:${hex(m.size)}`);
        assert(all.length === 3, `memory ${all.join(' ')}`);
        return `registered ${all.join(' ')} (boot from --memory)`;
      },
    ],
    [
      'apply',
      async () => {
        const before = await deviceUpdates();
        const { results } = await theAgent().client.apply(DEVICE, [
          update(0x1000_0000n, MiB, 'ram', 0x8_0000n, 'rw'),
          update(0x2000_0000n, 64n * KiB, 'img', 0n, 'rw'),
          update(0x3000_0000n, 4n * KiB, 'boot', 0x1000n, 'ro'),
        ]);
        const pushes = (await deviceUpdates()) - before;
        assert(
          results.every((r) => r.ok),
          `results ${JSON.stringify(results)}`,
        );
        assert(pushes === 1, `the device got ${pushes} table updates for one Apply`);
        return `3 UPDATEs in one Apply -> all ok, ${pushes} device update`;
      },
    ],
    [
      'list-mapped',
      async () => {
        const { mappings } = await theAgent().client.listMapped(DEVICE);
        assert(mappings.length === 3, `${mappings.length} mappings`);
        const table = await mappedMatchesDevice('after Apply');
        return `agent lists ${mappings.length} mappings; the device holds the same ${table}`;
      },
    ],
    [
      'data-path',
      async () => {
        const seen = await vduse.read(0x2000_0800n, pattern.length);
        assert(seen.equals(pattern), `device read ${seen.toString('hex')}`);
        const data = Buffer.from('device DMA into the guest image');
        await vduse.write(0x2000_1000n, data);
        const fd = fs.openSync(imagePath, 'r');
        const back = Buffer.alloc(data.length);
        fs.readSync(fd, back, 0, data.length, 0x1000);
        fs.closeSync(fd);
        assert(back.equals(data), `file holds ${JSON.stringify(back.toString())}`);
        return 'file bytes at 0x800 read by the device at 0x20000800; device write at 0x20001000 is in the file at 0x1000';
      },
    ],
    [
      'overlap',
      async () => {
        const before = await deviceUpdates();
        const { results } = await theAgent().client.apply(DEVICE, [
          update(0x1004_0000n, 4n * KiB, 'img', 0x4000n, 'rw'),
        ]);
        const r = results[0]!;
        assert(!r.ok && r.errno === 'EEXIST' && r.code === 'OVERLAP', `result ${JSON.stringify(r)}`);
        assert(/memory ram at offset 0x80000/.test(r.message), `message: ${r.message}`);
        const pushes = (await deviceUpdates()) - before;
        assert(pushes === 0, `${pushes} device updates`);
        await mappedMatchesDevice('after the refused overlap');
        return `refused over the wire: ${r.errno}/${r.code} "${r.message}"; 0 device updates`;
      },
    ],
    [
      'unmap',
      async () => {
        const before = await deviceUpdates();
        const { results } = await theAgent().client.apply(DEVICE, [
          { type: 'invalidate', asid: 0, iova: 0x1000_0000n, size: MiB },
        ]);
        assert(results[0]?.ok === true, `result ${JSON.stringify(results[0])}`);
        const pushes = (await deviceUpdates()) - before;
        const table = await mappedMatchesDevice('after the unmap');
        assert(!table.includes('0x10000000-'), 'the unmapped range is still on the device');
        return `INVALIDATE -> ${pushes} device update; agent and device hold ${table}`;
      },
    ],
    [
      'sigterm',
      async () => {
        const { agent: a, client: c } = theAgent();
        const { mappings } = await c.listMapped(DEVICE);
        c.close();
        client = undefined;
        const before = await deviceUpdates();
        const exit = await a.stop('SIGTERM');
        agent = undefined;
        assert(
          exit.code === 0 && exit.signal === null,
          `agent exit ${exit.code ?? exit.signal}:\n${a.tail()}`,
        );
        const closed = a.logs().find((l) => l.msg === 'closed device: the kernel dropped its mappings');
        assert(closed?.entries === mappings.length, `close log ${JSON.stringify(closed)}`);
        assert(!fs.existsSync(socket), 'the socket is still there');
        assert(!deviceBusy(), 'the device cannot be opened after the agent exited');
        const pushes = (await deviceUpdates()) - before;
        // VDUSE (6.12) has no .reset_map: the device keeps its last table until a new owner pushes.
        const stale = await vduse.map();
        const last = showMap(expectedEntries(mappings));
        assert(
          showMap(stale) === last,
          `device table after the agent exited: ${showMap(stale)}, expected ${last}`,
        );
        // The dead agent's memory stays reachable by the device: the file, and its memfd.
        const fromFile = await vduse.read(0x2000_0800n, pattern.length);
        assert(
          fromFile.equals(pattern),
          `device read of the file after the agent exited: ${fromFile.toString('hex')}`,
        );
        const fromMemfd = await vduse.read(0x3000_0000n, 8);
        const table = await pushEmptyTable();
        assert(table.length === 0, `device table after a new owner's push: ${showMap(table)}`);
        return `exit 0 in ${exit.ms} ms, logged closing ${closed.entries} entries, socket removed, node free; at the device: +${pushes} updates, still ${showMap(stale)} and readable (file bytes, ${fromMemfd.length} bytes of the dead agent's memfd) until a new owner pushed, then ${showMap(table)}`;
      },
    ],
  ],
  async () => {
    client?.close();
    await agent?.kill();
    const table = await pushEmptyTable();
    fs.rmSync(root, { recursive: true, force: true });
    assert(table.length === 0, `device table: ${showMap(table)}`);
    return `device free, table ${showMap(table)}`;
  },
);
