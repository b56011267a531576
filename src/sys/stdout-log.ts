/**
 * The log destination of both processes: stdout, written synchronously, so a record is out
 * before the process goes on (and before it exits). If whoever reads stdout goes away (EPIPE),
 * the process stops logging and keeps working: pino's default asynchronous destination instead
 * retried the buffered records forever while flushing at exit, so SIGTERM never ended the process.
 */
import pino, { type DestinationStream } from 'pino';

export function stdoutLog(): DestinationStream {
  const dest = pino.destination({ dest: 1, sync: true });
  dest.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    dest.write = () => true;
    dest.flushSync = () => {};
  });
  return dest;
}
