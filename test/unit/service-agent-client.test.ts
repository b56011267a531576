/**
 * The core over the real thing: the agent served on a unix socket (services/agent/main.ts) and the
 * real AgentClient, built here as the API server's main builds it. The agent is stopped and started
 * again; the core must notice the dropped connection and bring the device back to the desired state
 * on its own.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { AgentClient } from '../../src/agent/client.ts';
import { createMetrics } from '../../src/metrics/metrics.ts';
import { createMapdService } from '../../src/service/index.ts';
import { type RunningAgent, startAgent } from '../../services/agent/main.ts';
import { mapReq, PAGE } from './core-harness.ts';

/** Polls `check` up to `tries` times, 50 ms apart (a bound, not a timing assertion). */
async function eventually(check: () => Promise<boolean>, tries = 200): Promise<boolean> {
  for (let i = 0; i < tries; i++) {
    if (await check()) return true;
    await sleep(50);
  }
  return false;
}

test('an agent restart behind AgentClient is noticed and reconciled without help', async () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-mapd-e2e-'));
  const socketPath = path.join(root, 'agent.sock');
  const agentConfig = {
    socketPath,
    devices: ['sim:vdpa0'],
    allowedRoots: [],
    stateDir: path.join(root, 'agent'),
    memory: [],
    logLevel: 'silent' as const,
  };
  let agent: RunningAgent = await startAgent(agentConfig);
  const client = new AgentClient({ socketPath });
  const service = await createMapdService({
    agent: client,
    stateDir: path.join(root, 'api'),
    metrics: createMetrics(),
    retryInitialMs: 50,
  });
  const probe = new AgentClient({ socketPath });
  try {
    await service.reconcile();
    assert.equal(service.isReady(), true);
    await service.registerMemory({ id: 'm0', size: 16n * PAGE });
    const mapped = await service.map(mapReq(0x10000n, 2n));
    const firstBoot = agent.bootId;

    await agent.stop();
    agent = await startAgent(agentConfig);
    assert.notEqual(agent.bootId, firstBoot);
    const restored = await eventually(async () => {
      if (!service.isReady()) return false;
      const { mappings } = await probe.listMapped('vdpa0');
      return mappings.length === 1;
    });
    assert.ok(restored, 'the device was reconciled after the agent restarted');
    const { mappings, bootId } = await probe.listMapped('vdpa0');
    assert.equal(bootId, agent.bootId);
    assert.deepEqual(mappings, [mapped.mapping]);
  } finally {
    probe.close();
    await service.close();
    client.close();
    await agent.stop();
    fs.rmSync(root, { recursive: true, force: true });
  }
});
