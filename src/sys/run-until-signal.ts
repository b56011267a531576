/**
 * The life of a service process: start it, and on the first SIGTERM or SIGINT stop it and exit 0
 * (1 if stopping failed). Signals are taken from the very start: one that arrives while the
 * service starts stops it as soon as it is up, instead of killing it half started.
 */
import type { Logger } from 'pino';

export interface Stoppable {
  stop(): Promise<void>;
}

export async function runUntilSignal(
  name: string,
  start: () => Promise<Stoppable>,
  logger: Logger,
): Promise<void> {
  let running: Stoppable | undefined;
  let pending: NodeJS.Signals | undefined;
  const stop = (service: Stoppable, signal: NodeJS.Signals) => {
    logger.info({ signal }, 'signal received');
    service.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        logger.fatal({ err }, `${name} failed to stop cleanly`);
        process.exit(1);
      },
    );
  };
  const onSignal = (signal: NodeJS.Signals) => {
    if (running) stop(running, signal);
    else pending = signal;
  };
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);
  try {
    running = await start();
  } catch (err) {
    process.stderr.write(`${name}: cannot start: ${(err as Error).message}\n`);
    logger.fatal({ err }, `${name} failed to start`);
    process.exit(1);
  }
  if (pending) stop(running, pending);
}
