/** Whether something serves a unix socket path: used before replacing a socket file. */
import net from 'node:net';

const PROBE_TIMEOUT_MS = 2_000;

export type SocketProbe = 'live' | 'stale' | 'absent';

/** Connects to the path: `live` when something accepts, `stale` when nobody listens. */
export function probeSocket(socketPath: string, timeoutMs = PROBE_TIMEOUT_MS): Promise<SocketProbe> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      resolve('live'); // it exists and did not refuse: someone holds it, if slowly
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      resolve('live');
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (err.code === 'ECONNREFUSED') resolve('stale');
      else if (err.code === 'ENOENT') resolve('absent');
      else reject(err);
    });
  });
}
