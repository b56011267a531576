/**
 * Every metric of the API server, defined here and nowhere else, on one prom-client registry.
 * The transports observe `requestDuration`; the core (src/service, src/queue) the rest.
 *
 * IOTLB message write time: the agent protocol does not report per-message times, so
 * `iotlbMessageWrite` records each op's share of its apply() round trip (round trip / ops, once
 * per op), an upper bound that includes the socket hop.
 */
import { Counter, collectDefaultMetrics, Gauge, Histogram, type LabelValues, Registry } from 'prom-client';

/** 100 µs .. ~100 s. */
const LATENCY_BUCKETS = [
  0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100,
];
/** 1 µs .. 100 ms: one message write is a syscall. */
const MESSAGE_BUCKETS = [0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.001, 0.01, 0.1];
/** 1 .. 65536, powers of 4. */
const SIZE_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536];

export interface Metrics {
  registry: Registry;
  /** transport (rest|grpc), method (Map, ListDevices, ...), code (OK or a ServiceError code). */
  requestDuration: Histogram<'transport' | 'method' | 'code'>;
  /** From enqueue to the start of the request's group. */
  queueWait: Histogram<'device'>;
  /** Every call to the agent, by RPC method (Apply, ListMapped, ...) and result (ok|error). */
  agentRoundTrip: Histogram<'method' | 'result'>;
  /** Per-op share of the Apply round trip (see the module comment). */
  iotlbMessageWrite: Histogram<'device'>;
  /** Ops per apply() call. */
  batchOps: Histogram<'device'>;
  /** Requests coalesced into one group. */
  groupRequests: Histogram<'device'>;
  queueDepth: Gauge<'device'>;
  /** Desired (acknowledged) mappings per device. */
  mappedBytes: Gauge<'device'>;
  mappedEntries: Gauge<'device'>;
  /** 1 once the device is reconciled and takes writes. */
  deviceReady: Gauge<'device'>;
  /** Desired mappings the device does not hold because their memory cannot be opened, and those memories. */
  degradedMappings: Gauge<'device'>;
  degradedMemories: Gauge<'device'>;
  /** type (update|invalidate), result (ok|device_error|refused), errno ('' when ok). */
  ops: Counter<'type' | 'result' | 'errno'>;
  /** result: ok | failed. */
  reconciliations: Counter<'result'>;
  agentUp: Gauge;
  /** A new agent (another boot id) answered: the one before died, however briefly it was gone. */
  agentRestarts: Counter;
  /** One journal write + fdatasync (a group commit), by result (ok|error). */
  storeWrite: Histogram<'result'>;
}

export function createMetrics(registry = new Registry()): Metrics {
  const registers = [registry];
  collectDefaultMetrics({ register: registry });
  return {
    registry,
    requestDuration: new Histogram({
      name: 'vdpa_mapd_request_duration_seconds',
      help: 'API request duration by transport, method and result code',
      labelNames: ['transport', 'method', 'code'],
      buckets: LATENCY_BUCKETS,
      registers,
    }),
    queueWait: new Histogram({
      name: 'vdpa_mapd_queue_wait_seconds',
      help: 'Time a request waited in its device queue before its group started',
      labelNames: ['device'],
      buckets: LATENCY_BUCKETS,
      registers,
    }),
    agentRoundTrip: new Histogram({
      name: 'vdpa_mapd_agent_roundtrip_seconds',
      help: 'Round trip of calls to the agent by RPC method',
      labelNames: ['method', 'result'],
      buckets: LATENCY_BUCKETS,
      registers,
    }),
    iotlbMessageWrite: new Histogram({
      name: 'vdpa_mapd_iotlb_message_write_seconds',
      help: 'IOTLB message write time, estimated as each op share of the Apply round trip',
      labelNames: ['device'],
      buckets: MESSAGE_BUCKETS,
      registers,
    }),
    batchOps: new Histogram({
      name: 'vdpa_mapd_batch_ops',
      help: 'IOTLB ops per apply call to the agent (one BATCH_BEGIN/END each)',
      labelNames: ['device'],
      buckets: SIZE_BUCKETS,
      registers,
    }),
    groupRequests: new Histogram({
      name: 'vdpa_mapd_group_requests',
      help: 'Requests coalesced into one group commit',
      labelNames: ['device'],
      buckets: SIZE_BUCKETS,
      registers,
    }),
    queueDepth: new Gauge({
      name: 'vdpa_mapd_queue_depth',
      help: 'Requests waiting in the device queue',
      labelNames: ['device'],
      registers,
    }),
    mappedBytes: new Gauge({
      name: 'vdpa_mapd_mapped_bytes',
      help: 'Bytes mapped in the desired state of the device',
      labelNames: ['device'],
      registers,
    }),
    mappedEntries: new Gauge({
      name: 'vdpa_mapd_mapped_entries',
      help: 'IOTLB entries in the desired state of the device',
      labelNames: ['device'],
      registers,
    }),
    deviceReady: new Gauge({
      name: 'vdpa_mapd_device_ready',
      help: '1 when the device is reconciled and accepts writes',
      labelNames: ['device'],
      registers,
    }),
    degradedMappings: new Gauge({
      name: 'vdpa_mapd_degraded_mappings',
      help: 'Desired mappings the device does not hold because the agent cannot open their memory',
      labelNames: ['device'],
      registers,
    }),
    degradedMemories: new Gauge({
      name: 'vdpa_mapd_degraded_memories',
      help: 'Memories the agent cannot open that desired mappings of the device use',
      labelNames: ['device'],
      registers,
    }),
    ops: new Counter({
      name: 'vdpa_mapd_ops_total',
      help: 'IOTLB ops by type and result (refused: by our own checks, before the device)',
      labelNames: ['type', 'result', 'errno'],
      registers,
    }),
    reconciliations: new Counter({
      name: 'vdpa_mapd_reconciliations_total',
      help: 'Device reconciliations by result',
      labelNames: ['result'],
      registers,
    }),
    agentUp: new Gauge({
      name: 'vdpa_mapd_agent_up',
      help: '1 while the agent is connected',
      registers,
    }),
    agentRestarts: new Counter({
      name: 'vdpa_mapd_agent_restarts_total',
      help: 'Times another agent process (a new boot id) answered than the one before',
      registers,
    }),
    storeWrite: new Histogram({
      name: 'vdpa_mapd_store_write_seconds',
      help: 'Durable write (journal append + fdatasync) of one group commit',
      labelNames: ['result'],
      buckets: LATENCY_BUCKETS,
      registers,
    }),
  };
}

/** What prom-client 15 keeps per label set of a histogram (lib/histogram.js). */
interface HistogramEntry {
  labels: LabelValues<string>;
  bucketValues: Record<string, number>;
  sum: number;
  count: number;
}

/**
 * `value` observed `times` times under `labels`: what as many calls of observe() record, for the
 * cost of one (prom-client has no weighted observe). One observe() makes and checks the label
 * set's entry; the other `times - 1` are added to its count, sum and bucket. The layout is
 * prom-client's own, not its API: a test compares the exposition with `times` observe() calls.
 */
export function observeTimes<T extends string>(
  histogram: Histogram<T>,
  labels: LabelValues<T>,
  value: number,
  times: number,
): void {
  if (times <= 0) return;
  histogram.observe(labels, value);
  if (times === 1) return;
  const { hashMap, upperBounds } = histogram as unknown as {
    hashMap: Record<string, HistogramEntry>;
    upperBounds: number[];
  };
  const keys = Object.keys(labels) as T[];
  const entry = Object.values(hashMap).find(
    (e) => Object.keys(e.labels).length === keys.length && keys.every((k) => e.labels[k] === labels[k]),
  );
  if (entry === undefined) throw new Error(`${histogram.constructor.name}: no entry for the labels observed`);
  const more = times - 1;
  entry.count += more;
  entry.sum += value * more;
  const bound = upperBounds.find((b) => value <= b);
  if (bound !== undefined) entry.bucketValues[bound]! += more;
}
