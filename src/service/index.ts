/** The application core's entry point for the mains (services/); its vocabulary is src/core. */
export { createMapdService } from './mapd.ts';
export type { MapdCore, MapdServiceOptions } from './mapd.ts';
