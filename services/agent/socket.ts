/**
 * The agent's socket path: a private directory (0700), no second agent on a live socket, stale
 * socket files from a dead agent removed, and the socket itself 0600 once bound.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { AgentClient } from '../../src/agent/client.ts';
import { probeSocket } from '../../src/agent/socket-probe.ts';

/** The socket is held by a live process, or the path is something we must not remove. */
export class SocketInUseError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SocketInUseError';
  }
}

const PROBE_TIMEOUT_MS = 2_000;

/** Names whoever holds the socket, for the refusal message. */
async function describeHolder(socketPath: string): Promise<string> {
  const client = new AgentClient({ socketPath, deadlineMs: PROBE_TIMEOUT_MS });
  try {
    const info = await client.getInfo();
    return `another agent (pid ${info.pid}, boot id ${info.bootId}, version ${info.version})`;
  } catch {
    return 'another process';
  } finally {
    client.close();
  }
}

/** Makes the directory (0700), refuses a live socket, removes a stale one. */
export async function prepareSocketPath(socketPath: string, logger: Logger): Promise<void> {
  const dir = path.dirname(socketPath);
  if (fs.existsSync(dir)) {
    const mode = fs.statSync(dir).mode & 0o777;
    if (mode & 0o077) {
      // Not ours to tighten (it may be /tmp or a shared volume); the socket itself stays 0600.
      logger.warn({ dir, mode: mode.toString(8) }, 'socket directory is accessible to other users');
    }
  } else {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  }

  let st: fs.Stats;
  try {
    st = fs.lstatSync(socketPath);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  if (!st.isSocket()) {
    throw new SocketInUseError(`${socketPath} exists and is not a socket; refusing to replace it`);
  }
  const state = await probeSocket(socketPath, PROBE_TIMEOUT_MS);
  if (state === 'live') {
    const holder = await describeHolder(socketPath);
    throw new SocketInUseError(
      `${holder} is serving on ${socketPath}; stop it first or give this agent another --socket`,
    );
  }
  if (state === 'stale') {
    fs.unlinkSync(socketPath);
    logger.info({ socket: socketPath }, 'removed a stale socket left by an agent that is gone');
  }
}

/** Once bound: only the agent's user may connect. */
export function restrictSocket(socketPath: string): void {
  fs.chmodSync(socketPath, 0o600);
}
