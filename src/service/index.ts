/** The application core's entry point for the transports. */
export type { AgentPort, AgentPortEvents } from './agent-port.ts';
export { ServiceError } from './errors.ts';
export type { ServiceErrorCode, ServiceErrorInfo } from './errors.ts';
export type { CoreLogger } from './logger.ts';
export { createMapdService } from './mapd.ts';
export type { MapdCore, MapdServiceOptions } from './mapd.ts';
export type * from './types.ts';
