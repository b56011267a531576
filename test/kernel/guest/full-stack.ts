/**
 * Guest step: the whole service on the real kernel. The agent (kernel mode, owning the real
 * /dev/vhost-vdpa-0) and the boot's API server (REST on 127.0.0.1; init.sh started it before the
 * first kind, and it reconciles this step's new agent) run as processes; REST
 * calls with fetch register memory, map, list, set the memory table and unmap, and after each the
 * device's own table (vduse-daemon, ./vduse.ts) must be exactly what the API lists.
 *
 *   node --import tsx test/kernel/run-vm.ts test/kernel/guest/full-stack.ts
 */
import fs from 'node:fs';
import path from 'node:path';
import type { DeviceMapEntry } from './vduse.ts';
import {
  agentServing,
  assert,
  bootAgentSocket,
  bootApi,
  kernelAgentArgs,
  untilApiReady,
  devicePath,
  deviceBusy,
  deviceTableIs,
  deviceUpdates,
  pushEmptyTable,
  restCall,
  restExpect,
  runChecks,
  scratchDirs,
  Service,
  showMap,
  vduse,
} from './harness.ts';

const DEVICE = path.basename(devicePath);
const socket = bootAgentSocket;
const { root, agentState, sharedDir, imagePath } = scratchDirs('full-stack');

let agent: Service | undefined;
let base = '';

const http = (method: string, url: string, body?: unknown) => restCall(base, method, url, body);
const expect = (method: string, url: string, status: number, body?: unknown) =>
  restExpect(base, method, url, status, body);

interface ApiMapping {
  iova: string;
  size: string;
  memory: string;
  offset: string;
  perm: 'ro' | 'wo' | 'rw';
  asid: number;
}

/** GET mappings, and the device's table must be exactly those (file offset = mapping offset). */
async function listedMatchesDevice(what: string): Promise<{ listed: ApiMapping[]; table: string }> {
  const listed = (await expect('GET', `/v1/devices/${DEVICE}/mappings`, 200)).body.mappings as ApiMapping[];
  const expected: DeviceMapEntry[] = listed
    .map((m) => ({
      start: BigInt(m.iova),
      last: BigInt(m.iova) + BigInt(m.size) - 1n,
      perm: m.perm,
      offset: BigInt(m.offset),
    }))
    .sort((a, b) => (a.start < b.start ? -1 : 1));
  return { listed, table: await deviceTableIs(expected, what) };
}

const region = (iova: string, size: string, memory: string, offset: string, perm: string) => ({
  iova,
  size,
  memory,
  offset,
  perm,
});

async function counted<T>(fn: () => Promise<T>): Promise<{ result: T; pushes: number }> {
  const before = await deviceUpdates();
  const result = await fn();
  return { result, pushes: (await deviceUpdates()) - before };
}

await runChecks(
  [
    [
      'start',
      async () => {
        assert(!deviceBusy(), `${devicePath} is already held`);
        const [a, boot] = await Promise.all([
          Service.start('agent', 'agent', kernelAgentArgs(agentState, socket, sharedDir), agentServing),
          bootApi(),
        ]);
        agent = a.service;
        base = boot.rest;
        assert(/^http:\/\/127\.0\.0\.1:\d+$/.test(base), `REST address ${base}`);
        const readyMs = await untilApiReady(base);
        return `agent serving after ${a.ms} ms; the boot's API server at ${base} (listening ${boot.ms} ms after this step began) ready ${readyMs} ms later`;
      },
    ],
    [
      'devices',
      async () => {
        const devices = (await expect('GET', '/v1/devices', 200)).body.devices;
        assert(devices.length === 1, `${devices.length} devices`);
        const d = devices[0];
        assert(
          d.id === DEVICE && d.kind === 'kernel' && d.node === devicePath,
          `device ${JSON.stringify(d)}`,
        );
        assert(
          d.deviceId === 2 && d.negotiatedFeatures === '0xe' && d.ready === true,
          `device ${JSON.stringify(d)}`,
        );
        return `GET /v1/devices: ${d.id} kind ${d.kind} node ${d.node} device id ${d.deviceId} negotiated ${d.negotiatedFeatures} IOVA ${d.iovaRange.first}-${d.iovaRange.last} ready ${d.ready}`;
      },
    ],
    [
      'register-memory',
      async () => {
        const ram = (await expect('POST', '/v1/memory', 201, { id: 'ram', size: '0x400000' })).body.memory;
        const img = (await expect('POST', '/v1/memory', 201, { id: 'img', path: imagePath })).body.memory;
        assert(ram.kind === 'file' && ram.path.startsWith(`${agentState}/`), `ram ${JSON.stringify(ram)}`);
        assert(img.path === imagePath && img.created === false, `img ${JSON.stringify(img)}`);
        const refused = await http('POST', '/v1/memory', { id: 'etc', path: '/etc/passwd' });
        assert(refused.status >= 400 && refused.status < 500, `/etc/passwd: ${refused.status}`);
        return `ram created at ${ram.path} (${ram.size}), img opened at ${img.path}; /etc/passwd -> ${refused.status} ${refused.body.error.code}`;
      },
    ],
    [
      'map',
      async () => {
        const body = region('0x10000000', '0x100000', 'ram', '0x100000', 'rw');
        const { pushes } = await counted(() => expect('POST', `/v1/devices/${DEVICE}/mappings`, 201, body));
        const { table } = await listedMatchesDevice('after map');
        // The bytes the device reads are the backing file's, at the mapping's offset.
        const ramPath = path.join(agentState, 'memory', 'ram');
        const pattern = Buffer.from('bytes in the agent-created backing file');
        const fd = fs.openSync(ramPath, 'r+');
        fs.writeSync(fd, pattern, 0, pattern.length, 0x100000 + 0x40);
        fs.closeSync(fd);
        const seen = await vduse.read(0x1000_0040n, pattern.length);
        assert(seen.equals(pattern), `device read ${seen.toString('hex')}`);
        return `POST mappings -> 201, ${pushes} device update; listed = device: ${table}; file bytes read by the device at the IOVA`;
      },
    ],
    [
      'refused-overlap',
      async () => {
        const body = region('0x10080000', '0x1000', 'img', '0x0', 'rw');
        const { result, pushes } = await counted(() => http('POST', `/v1/devices/${DEVICE}/mappings`, body));
        assert(result.status === 409, `overlap: ${result.status} ${JSON.stringify(result.body)}`);
        assert(pushes === 0, `${pushes} device updates`);
        const { table } = await listedMatchesDevice('after the refused overlap');
        return `overlapping map -> ${result.status} ${result.body.error.code}: "${result.body.error.message}"; 0 device updates; device ${table}`;
      },
    ],
    [
      'set-mem-table',
      async () => {
        const regions = [
          region('0x10000000', '0x100000', 'ram', '0x100000', 'rw'), // unchanged
          region('0x30000000', '0x200000', 'ram', '0x200000', 'rw'),
          region('0x40000000', '0x10000', 'img', '0x0', 'ro'),
        ];
        const { result, pushes } = await counted(() =>
          expect('PUT', `/v1/devices/${DEVICE}/memtable`, 200, { regions }),
        );
        const r = result.body;
        const { listed, table } = await listedMatchesDevice('after set-mem-table');
        assert(listed.length === 3, `${listed.length} mappings listed`);
        return `PUT memtable -> ops ${r.ops.length}, mapped ${r.mapped.length}, invalidated ${r.invalidated.length}, unchanged ${r.unchanged}; ${pushes} device update(s); listed = device: ${table}`;
      },
    ],
    [
      'unmap',
      async () => {
        const body = { iova: '0x30000000', size: '0x200000' };
        const { result, pushes } = await counted(() =>
          expect('POST', `/v1/devices/${DEVICE}/mappings:unmap`, 200, body),
        );
        assert(result.body.removed.length === 1, `removed ${JSON.stringify(result.body.removed)}`);
        const { listed, table } = await listedMatchesDevice('after unmap');
        assert(listed.length === 2, `${listed.length} mappings listed`);
        return `POST mappings:unmap -> removed ${result.body.removed.length}, ${pushes} device update; listed = device: ${table}`;
      },
    ],
    [
      'stop',
      async () => {
        // Leave the boot's API server with nothing desired, then stop the agent.
        await expect('POST', `/v1/devices/${DEVICE}/mappings:unmap`, 200, {
          iova: '0x0',
          size: '0xffffffffffffffff',
        });
        for (const id of ['ram', 'img']) await expect('DELETE', `/v1/memory/${id}`, 204);
        const a = agent!;
        const agentExit = await a.stop('SIGTERM');
        agent = undefined;
        assert(agentExit.code === 0, `agent exit ${agentExit.code ?? agentExit.signal}:\n${a.tail()}`);
        assert(!deviceBusy(), 'the device cannot be opened after the agent exited');
        const stale = await vduse.map();
        const table = await pushEmptyTable();
        assert(table.length === 0, `device table after a new owner's push: ${showMap(table)}`);
        return `unmapped everything and released the memory over REST; agent exit 0 in ${agentExit.ms} ms; node free; device kept ${stale.length} entries until a new owner pushed, then ${showMap(table)}`;
      },
    ],
  ],
  async () => {
    // After a failure too: the next step must find the boot's API server with nothing desired.
    if (agent?.running) {
      await http('POST', `/v1/devices/${DEVICE}/mappings:unmap`, { iova: '0x0', size: '0xffffffffffffffff' });
      for (const id of ['ram', 'img']) await http('DELETE', `/v1/memory/${id}`);
    }
    await agent?.kill();
    const table = await pushEmptyTable();
    fs.rmSync(root, { recursive: true, force: true });
    assert(table.length === 0, `device table: ${showMap(table)}`);
    return `device free, table ${showMap(table)}`;
  },
);
