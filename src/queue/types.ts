/** What goes through a device queue. */
import type { ServiceError } from '../core/errors.ts';
import type {
  BatchOp,
  BatchResult,
  FlushResult,
  MapResult,
  MapSpec,
  SetMemTableResult,
  UnmapResult,
  UnmapSpec,
} from '../core/types.ts';
import type { Region } from '../iotlb/types.ts';

export type WriteRequest =
  | { kind: 'map'; spec: MapSpec }
  | { kind: 'unmap'; spec: UnmapSpec }
  | { kind: 'setMemTable'; asid: number; regions: Region[] }
  | { kind: 'batch'; ops: BatchOp[]; atomic: boolean };

export type WriteAnswer = MapResult | UnmapResult | SetMemTableResult | BatchResult;

export type Outcome = { ok: true; answer: WriteAnswer } | { ok: false; error: ServiceError };

export interface WriteEntry {
  kind: 'write';
  sequence: bigint;
  request: WriteRequest;
  /** sync: a caller awaits the outcome; submit: durably queued, failures reported by flush. */
  mode: 'sync' | 'submit';
  /** Idempotency key and request digest, when the caller gave a requestId. */
  requestId?: string;
  digest?: string;
  /** Submit only: resolves once the submit is journaled, false if that failed (it is then dropped). */
  durable?: Promise<boolean>;
  /** process.hrtime.bigint() when queued. */
  enqueuedAt: bigint;
  /** Receives the outcome once it is durable (sync), or is a no-op (submit). */
  settle: (outcome: Outcome) => void;
}

export interface FlushEntry {
  kind: 'flush';
  /** Every sequence up to this one was handed out before the flush. */
  through: bigint;
  resolve: (result: FlushResult) => void;
  reject: (err: ServiceError) => void;
}

export type QueueEntry = WriteEntry | FlushEntry;
