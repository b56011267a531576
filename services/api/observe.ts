/** What both transports record about every request they answer. */
import type { Registry } from 'prom-client';

export type Transport = 'rest' | 'grpc';

export interface RequestObservation {
  transport: Transport;
  /** The API method (`Map`, `ListDevices`, ...), the same name over both transports. */
  method: string;
  /** `OK` or the ServiceError code. */
  code: string;
  seconds: number;
}

export type RequestObserver = (o: RequestObservation) => void;

/** What a transport needs besides the core: where to record requests and what /metrics serves. */
export interface Telemetry {
  observe: RequestObserver;
  registry: Registry;
}
