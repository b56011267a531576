/**
 * The agent's main with the recording device side (test/vhost-user/recording-side.ts) in place of
 * the vring relay, for tests that need an agent in a process of its own (to SIGKILL it).
 *
 *   node --import tsx test/vhost-user/attach-agent.ts [agent options]
 */
import { createLogger, startAgent } from '../../services/agent/main.ts';
import { parseAgentConfig } from '../../services/agent/config.ts';
import { runUntilSignal } from '../../src/sys/run-until-signal.ts';
import { recordingSides } from './recording-side.ts';

const config = parseAgentConfig(process.argv.slice(2), process.env);
if (config === null) throw new Error('no configuration');
const logger = createLogger(config.logLevel);
await runUntilSignal(
  'agent',
  () => startAgent(config, logger, { deviceSide: recordingSides().factory }),
  logger,
);
