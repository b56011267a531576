/**
 * The vhost-user socket of an attached device: only under the agent's attach directory (after
 * resolving symlinks of its directory), never over something another process serves or that is not
 * a socket, and created 0600, or 0660 owned by a named group (chown'ed before it is opened to the
 * group, so no one else can connect in between).
 */
import fs from 'node:fs';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import { groupId } from '../sys/libc.ts';
import { type ListenerOptions, VhostUserListener } from '../vhost-user/transport.ts';
import { AgentError } from './errors.ts';
import { probeSocket } from './socket-probe.ts';

export interface AttachSocketRequest {
  attachDir: string;
  socketPath: string;
  group?: string | undefined;
}

export interface AttachSocket {
  path: string;
  mode: number;
  group?: string;
  listener: VhostUserListener;
}

const FIELD = 'socketPath';

function refused(message: string): AgentError {
  return new AgentError(status.PERMISSION_DENIED, 'PATH_REFUSED', message, FIELD);
}

function inUse(message: string): AgentError {
  return new AgentError(status.ALREADY_EXISTS, 'PATH_IN_USE', message, FIELD);
}

function isUnder(dir: string, p: string): boolean {
  return p === dir || p.startsWith(`${dir}/`);
}

/** The socket path, checked to lie in the attach directory (or a directory below it). */
function checkPath(attachDir: string, socketPath: string): string {
  if (typeof socketPath !== 'string' || socketPath === '') {
    throw new AgentError(status.INVALID_ARGUMENT, 'BAD_REQUEST', `${FIELD} is required`, FIELD);
  }
  if (!path.isAbsolute(socketPath) || path.resolve(socketPath) !== socketPath) {
    throw new AgentError(
      status.INVALID_ARGUMENT,
      'BAD_REQUEST',
      `${FIELD} ${JSON.stringify(socketPath)} must be an absolute, normalized path`,
      FIELD,
    );
  }
  const root = fs.realpathSync(attachDir);
  let dir: string;
  try {
    dir = fs.realpathSync(path.dirname(socketPath));
  } catch {
    throw refused(`${socketPath} is not in an existing directory under the attach directory ${attachDir}`);
  }
  const real = path.join(dir, path.basename(socketPath));
  if (!isUnder(root, dir) || real === root) {
    throw refused(`${socketPath} is outside the attach directory ${attachDir}`);
  }
  return real;
}

function groupOf(name: string | undefined): number | undefined {
  if (name === undefined) return undefined;
  const gid = groupId(name);
  if (gid === null) {
    throw new AgentError(
      status.INVALID_ARGUMENT,
      'UNKNOWN_GROUP',
      `no group ${JSON.stringify(name)}`,
      'group',
    );
  }
  return gid;
}

/** Refuses a path someone serves or that is not a socket; a stale socket file is replaced. */
async function checkFree(socketPath: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(socketPath);
  } catch {
    return;
  }
  if (!st.isSocket()) throw inUse(`${socketPath} exists and is not a socket; refusing to replace it`);
  if ((await probeSocket(socketPath)) === 'live') {
    throw inUse(`${socketPath} is served by a live process; refusing to replace it`);
  }
}

/** Listens on the socket for an attached device (the listener replaces a stale socket file). */
export async function listenAttachSocket(
  req: AttachSocketRequest,
  handlers: Pick<ListenerOptions, 'onConnection' | 'onError'>,
): Promise<AttachSocket> {
  const socketPath = checkPath(req.attachDir, req.socketPath);
  const gid = groupOf(req.group);
  await checkFree(socketPath);
  // Synchronous from here to the return: no connection is handed on before the caller has the listener.
  let listener: VhostUserListener;
  try {
    listener = new VhostUserListener({ path: socketPath, mode: 0o600, ...handlers });
  } catch (e) {
    if (e instanceof RangeError)
      throw new AgentError(status.INVALID_ARGUMENT, 'BAD_REQUEST', e.message, FIELD);
    throw e;
  }
  if (gid === undefined) return { path: socketPath, mode: 0o600, listener };
  try {
    fs.chownSync(socketPath, -1, gid);
    fs.chmodSync(socketPath, 0o660);
  } catch (e) {
    listener.close();
    throw e;
  }
  return { path: socketPath, mode: 0o660, group: req.group!, listener };
}
