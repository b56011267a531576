/**
 * Guest step, one per parent kind other than VDUSE (which has agent-process.ts and
 * full-stack.ts): the agent (kernel mode, owning the real /dev/vhost-vdpa-0), started once, and
 * the boot's API server (REST on 127.0.0.1; init.sh started it before the first kind and it
 * reconciles each kind's new agent), used by every check. Over the agent's protocol
 * (src/agent/client.ts) and over REST they map, batch, unmap and set the memory table; after each,
 * what they list must be what the kernel holds as far as it shows from outside the owner: on a
 * PA-mode kind the agent's VmPin is the pages of what it lists, on a VA-mode kind nothing is pinned.
 * On vp_vdpa the partial unmap of a pinned mapping is refused, and so is releasing its memory.
 *
 *   node --import tsx test/kernel/run-vm.ts --kind vp-vdpa test/kernel/guest/services.ts
 */
import fs from 'node:fs';
import path from 'node:path';
import { AgentClient } from '../../../src/agent/client.ts';
import type { Mapping } from '../../../src/iotlb/types.ts';
import {
  agentServing,
  assert,
  bootAgentSocket,
  bootApi,
  kernelAgentArgs,
  untilApiReady,
  devicePath,
  deviceBusy,
  hex,
  invalidateOp as invalidate,
  restCall,
  restExpect,
  runChecks,
  scratchDirs,
  Service,
  stopAgent,
  updateOp as update,
  WAIT_MS,
} from './harness.ts';
import { currentKind, vmPinOf } from './kinds.ts';

const kind = currentKind();
const KiB = 1024n;
const _MiB = 1024n * KiB;
const PAGE = 4096n;
const DEVICE = path.basename(devicePath);
const socket = bootAgentSocket;
const { root, agentState, sharedDir, imagePath } = scratchDirs('services');

let agent: Service | undefined;
let client: AgentClient | undefined;
let agentPid = -1;
/** What the agent and the API server said about the parent (the `facts` check), for `discovery`. */
let discovered: { agent: string; rest: string } | undefined;
let base = '';

const running = () => {
  assert(agent !== undefined && client !== undefined, 'the agent is not running');
  return { agent, client };
};

const http = (method: string, url: string, body?: unknown) => restCall(base, method, url, body);
const expect = (method: string, url: string, status: number, body?: unknown) =>
  restExpect(base, method, url, status, body);

/**
 * What the agent lists, and the kernel's pins agree: in PA mode every listed mapping is pinned
 * page by page (the agent's VmPin is exactly their pages), in VA mode nothing is pinned.
 */
async function pinnedMatches(what: string): Promise<string> {
  const { mappings } = await running().client.listMapped(DEVICE);
  const pinned = vmPinOf(agentPid);
  const expected = kind.pinned ? pagesOf(mappings) * PAGE : 0n;
  const shown = `${mappings.length} mappings listed, agent VmPin ${hex(pinned)}`;
  assert(pinned === expected, `${what}: ${shown}, expected ${hex(expected)} (${kind.what})`);
  return shown;
}

function pagesOf(mappings: readonly Mapping[]): bigint {
  let pages = 0n;
  for (const m of mappings) pages += (m.size + (m.iova % PAGE) + PAGE - 1n) / PAGE;
  return pages;
}

const region = (iova: string, size: string, memory: string, offset: string, perm: string) => ({
  iova,
  size,
  memory,
  offset,
  perm,
});

const checks: [string, () => Promise<string>][] = [
  [
    'start',
    async () => {
      assert(!deviceBusy(), `${devicePath} is already held`);
      // All at once: under TCG each process's first steps (loading code, the first gRPC call) take
      // many seconds; the client waits for the agent's socket (waitForReady) meanwhile.
      client = new AgentClient({ socketPath: socket, deadlineMs: WAIT_MS });
      const t = performance.now();
      const connected = client.connect().then((info) => ({ info, ms: Math.round(performance.now() - t) }));
      const [started, boot, first] = await Promise.all([
        Service.start('agent', 'agent', kernelAgentArgs(agentState, socket, sharedDir), agentServing),
        bootApi(),
        connected,
      ]);
      agent = started.service;
      base = boot.rest;
      agentPid = first.info.pid;
      assert(
        agentPid === started.service.pid,
        `the client reached pid ${agentPid}, not the agent ${started.service.pid}`,
      );
      // The API server reconciles the new agent (its device has this kind's facts now).
      const readyMs = await untilApiReady(base);
      const listed = (await expect('GET', `/v1/devices/${DEVICE}/mappings`, 200)).body.mappings;
      assert(
        listed.length === 0,
        `the API server still holds mappings of an earlier step: ${JSON.stringify(listed)}`,
      );
      assert(deviceBusy(), 'the device node can still be opened while the agent owns it');
      return `agent pid ${agentPid} serving after ${started.ms} ms, its first answer to the client after ${first.ms} ms; the boot's API server at ${base} (listening ${boot.ms} ms after this step began) ready ${readyMs} ms later`;
    },
  ],
  [
    'facts',
    async () => {
      const devices = await running().client.listDevices();
      assert(devices.length === 1, `${devices.length} devices`);
      const f = devices[0]!;
      const seen = `device id ${f.deviceId}, offered ${hex(f.offeredFeatures)}, address spaces ${f.asNum}, IOVA ${hex(f.iovaRange.first)}-${hex(f.iovaRange.last)}`;
      const want = `device id ${kind.deviceId}, offered ${hex(kind.offeredFeatures)}, address spaces ${kind.asNum}, IOVA ${hex(kind.iovaRange.first)}-${hex(kind.iovaRange.last)}`;
      assert(seen === want, `${kind.what}: the agent says ${seen}; the kernel's facts are ${want}`);
      const rest = (await expect('GET', `/v1/devices/${DEVICE}`, 200)).body;
      discovered = {
        agent: `iommu ${f.iommu}, pinned ${f.pinned}`,
        rest: `iommu ${rest.device?.iommu}, pinned ${rest.device?.pinned}`,
      };
      return `${kind.what}: ${seen}`;
    },
  ],
  [
    'register-memory',
    async () => {
      // Through the API server, which keeps them as desired state (the agent learns them from it).
      const ram = (await expect('POST', '/v1/memory', 201, { id: 'ram', size: '0x400000' })).body.memory;
      const img = (await expect('POST', '/v1/memory', 201, { id: 'img', path: imagePath })).body.memory;
      const atAgent = (await running().client.listMemory()).map((m) => m.id).sort();
      assert(atAgent.join(' ') === 'img ram', `the agent has memory ${atAgent.join(' ')}`);
      return `ram ${ram.kind} ${ram.size} at ${ram.path}, img ${img.kind} at ${img.path}; the agent has both`;
    },
  ],
  [
    'agent-batch',
    async () => {
      const { results } = await running().client.apply(DEVICE, [
        update(0x1000_0000n, 256n * KiB, 'ram', 0n, 'rw'),
        update(0x2000_0000n, 64n * KiB, 'img', 0n, 'rw'),
        update(0x3000_0000n, 4n * KiB, 'ram', 0x10_0000n, 'ro'),
      ]);
      assert(
        results.every((r) => r.ok),
        `results ${JSON.stringify(results)}`,
      );
      return `3 UPDATEs in one Apply -> all ok; ${await pinnedMatches('after the Apply')}`;
    },
  ],
  [
    'agent-overlap',
    async () => {
      const { results } = await running().client.apply(DEVICE, [update(0x1000_1000n, PAGE, 'img', 0n, 'rw')]);
      const r = results[0]!;
      assert(!r.ok && r.errno === 'EEXIST' && r.code === 'OVERLAP', `result ${JSON.stringify(r)}`);
      return `refused ${r.errno}/${r.code}; ${await pinnedMatches('after the refused overlap')}`;
    },
  ],
  [
    'agent-unmap',
    async () => {
      // Everything mapped over the agent's protocol, which the API server's desired state never had.
      const { results } = await running().client.apply(DEVICE, [
        invalidate(0x1000_0000n, 256n * KiB),
        invalidate(0x2000_0000n, 64n * KiB),
        invalidate(0x3000_0000n, 4n * KiB),
      ]);
      assert(
        results.every((r) => r.ok),
        `results ${JSON.stringify(results)}`,
      );
      return `3 INVALIDATEs of whole mappings -> ok; ${await pinnedMatches('after the unmaps')}`;
    },
  ],
  [
    'rest-map',
    async () => {
      await expect(
        'POST',
        `/v1/devices/${DEVICE}/mappings`,
        201,
        region('0x40000000', '0x100000', 'ram', '0x100000', 'rw'),
      );
      return `POST mappings -> 201; ${await pinnedMatches('after the REST map')}`;
    },
  ],
  [
    'rest-batch',
    async () => {
      const ops = [
        { op: 'map', iova: '0x50000000', size: '0x10000', memory: 'ram', offset: '0x200000', perm: 'rw' },
        { op: 'map', iova: '0x50010000', size: '0x8000', memory: 'img', offset: '0x10000', perm: 'ro' },
        { op: 'unmap', iova: '0x40000000', size: '0x100000' },
      ];
      const r = (await expect('POST', `/v1/devices/${DEVICE}:batch`, 200, { atomic: true, ops })).body;
      assert(
        r.results.length === 3 && r.results.every((x: { ok: boolean }) => x.ok),
        `batch ${JSON.stringify(r)}`,
      );
      return `atomic batch of 2 maps and 1 unmap -> all ok; ${await pinnedMatches('after the REST batch')}`;
    },
  ],
  [
    'rest-set-mem-table',
    async () => {
      const regions = [
        region('0x40000000', '0x100000', 'ram', '0x100000', 'rw'),
        region('0x60000000', '0x200000', 'ram', '0x200000', 'rw'),
        region('0x70000000', '0x10000', 'img', '0x0', 'ro'),
      ];
      const r = (await expect('PUT', `/v1/devices/${DEVICE}/memtable`, 200, { regions })).body;
      const listed = (await expect('GET', `/v1/devices/${DEVICE}/mappings`, 200)).body.mappings;
      assert(listed.length === 3, `${listed.length} mappings listed: ${JSON.stringify(listed)}`);
      return `PUT memtable -> mapped ${r.mapped.length}, invalidated ${r.invalidated.length}, unchanged ${r.unchanged}; ${await pinnedMatches('after set-mem-table')}`;
    },
  ],
  [
    'rest-unmap',
    async () => {
      const r = (
        await expect('POST', `/v1/devices/${DEVICE}/mappings:unmap`, 200, {
          iova: '0x60000000',
          size: '0x200000',
        })
      ).body;
      assert(r.removed.length === 1, `removed ${JSON.stringify(r.removed)}`);
      return `POST mappings:unmap -> removed 1; ${await pinnedMatches('after the REST unmap')}`;
    },
  ],
];

// vp_vdpa (PA mode, platform IOMMU): the kernel keeps one entry per physically contiguous run, so
// INVALIDATE of 4 KiB inside a 64 KiB UPDATE would drop that run only and leave the rest pinned and
// mapped (docs/kernel-notes.md). The agent refuses it, keeps listing the mapping, and refuses to
// release the memory the kernel still pins.
if (kind.name === 'vp-vdpa') {
  checks.push([
    'partial-unmap',
    async () => {
      const c = running().client;
      await expect('POST', '/v1/memory', 201, { id: 'small', size: '0x10000' });
      const before = vmPinOf(agentPid);
      await expect(
        'POST',
        `/v1/devices/${DEVICE}/mappings`,
        201,
        region('0x7f00000000', '0x10000', 'small', '0x0', 'rw'),
      );
      assert(
        vmPinOf(agentPid) - before === 64n * KiB,
        `VmPin +${hex(vmPinOf(agentPid) - before)} after 64 KiB`,
      );
      // Over the agent's protocol: refused, the kernel would drop that one run only.
      const partial = await c.apply(DEVICE, [invalidate(0x7f_0000_4000n, PAGE)]);
      const r = partial.results[0]!;
      assert(!r.ok && r.code === 'PARTIAL_UNMAP', `INVALIDATE 4 KiB inside: ${JSON.stringify(r)}`);
      const pinnedAfter = vmPinOf(agentPid) - before;
      assert(pinnedAfter === 64n * KiB, `VmPin +${hex(pinnedAfter)} after the refused partial INVALIDATE`);
      // Over REST the service never sends a partial INVALIDATE: it invalidates the whole mapping
      // and maps the two remainders again, so the kernel then pins exactly those 60 KiB.
      const split = (
        await expect('POST', `/v1/devices/${DEVICE}/mappings:unmap`, 200, {
          iova: '0x7f00004000',
          size: '0x1000',
        })
      ).body;
      const parts = (await c.listMapped(DEVICE)).mappings
        .filter((m) => m.memory === 'small')
        .map((m) => `${hex(m.iova)}+${hex(m.size)}@${hex(m.offset)}`)
        .sort();
      const want = ['0x7f00000000+0x4000@0x0', '0x7f00005000+0xb000@0x5000'];
      assert(parts.join(' ') === want.join(' '), `after the REST unmap the agent lists ${parts.join(' ')}`);
      assert(
        vmPinOf(agentPid) - before === 60n * KiB,
        `VmPin +${hex(vmPinOf(agentPid) - before)} after the split`,
      );
      const release = await http('DELETE', '/v1/memory/small');
      assert(
        release.status === 409,
        `DELETE /v1/memory/small while pinned: ${release.status} ${JSON.stringify(release.body)}`,
      );
      const unmapAll = await expect('POST', `/v1/devices/${DEVICE}/mappings:unmap`, 200, {
        iova: '0x7f00000000',
        size: '0x10000',
      });
      assert(unmapAll.body.removed.length === 2, `removed ${JSON.stringify(unmapAll.body.removed)}`);
      assert(
        vmPinOf(agentPid) === before,
        `VmPin ${hex(vmPinOf(agentPid))} after the whole unmap, was ${hex(before)}`,
      );
      await expect('DELETE', '/v1/memory/small', 204);
      return `UPDATE 64 KiB: VmPin +0x10000; agent INVALIDATE 4 KiB inside -> ${r.code}, VmPin still +0x10000; REST unmap of it -> removed ${split.removed.length}, remapped ${split.remapped.length} (${parts.join(' ')}), VmPin +0xf000; release -> ${release.status} ${release.body.error.code}; unmap of the rest -> VmPin back, release -> 204`;
    },
  ]);
}

checks.push([
  'stop',
  async () => {
    // Leave the boot's API server with nothing desired: unmap everything, release the memory.
    const unmapped = (
      await expect('POST', `/v1/devices/${DEVICE}/mappings:unmap`, 200, {
        iova: '0x0',
        size: '0xffffffffffffffff',
      })
    ).body;
    const pinned = vmPinOf(agentPid);
    assert(pinned === 0n, `VmPin ${hex(pinned)} after everything was unmapped`);
    for (const id of ['ram', 'img']) await expect('DELETE', `/v1/memory/${id}`, 204);
    const { agent: a, client: c } = running();
    agent = undefined;
    client = undefined;
    const ms = await stopAgent(a, c);
    return `unmapped ${unmapped.removed.length} (VmPin 0), memory released; agent exit 0 in ${ms} ms; node free`;
  },
]);

// Last, so that its verdict does not hold up the rest: what discovery told about the parent.
checks.push([
  'discovery',
  async () => {
    assert(discovered !== undefined, 'the facts check did not run');
    const want = `iommu ${kind.iommu}, pinned ${kind.pinned}`;
    assert(discovered.agent === want, `${kind.what}: the agent says ${discovered.agent}, expected ${want}`);
    assert(discovered.rest === want, `${kind.what}: REST says ${discovered.rest}, expected ${want}`);
    return `${kind.what}: ${want} (agent and REST)`;
  },
]);

await runChecks(checks, async () => {
  // After a failure too: the next kind's step must find the boot's API server with nothing desired.
  if (agent?.running) {
    await http('POST', `/v1/devices/${DEVICE}/mappings:unmap`, { iova: '0x0', size: '0xffffffffffffffff' });
    for (const id of ['ram', 'img', 'small']) await http('DELETE', `/v1/memory/${id}`);
  }
  client?.close();
  await agent?.kill();
  fs.rmSync(root, { recursive: true, force: true });
  return 'agent stopped';
});
