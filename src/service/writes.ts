/**
 * The write path: every change request of the API goes through the idempotency keys into its
 * device's queue. Synchronous writes (map, unmap, set-mem-table, batch) wait for their outcome;
 * submit answers once the request is journaled and queued, and flush waits for what was submitted.
 * The memories a queued request maps are pinned until it is done (memory.ts), so an unregister
 * never races it.
 */
import type {
  BatchRequest,
  BatchResult,
  FlushResult,
  MapRequest,
  MapResult,
  SetMemTableResult,
  SubmitResult,
  UnmapRequest,
  UnmapResult,
} from '../core/types.ts';
import { ServiceError } from '../core/errors.ts';
import type { Region } from '../iotlb/types.ts';
import type { Outcome, WriteAnswer, WriteEntry, WriteRequest } from '../queue/types.ts';
import type { Change } from '../state/desired.ts';
import type { StateStore } from '../state/store.ts';
import type { DeviceRegistry, Slot } from './devices.ts';
import { type Idempotency, recordOf } from './idempotency.ts';
import type { MemoryCatalog } from './memory.ts';
import { batchOpsOf, mapSpecOf, memoriesOf, unmapSpecOf } from './requests.ts';

export class WritePath {
  private writing = 0;

  constructor(
    private readonly devices: DeviceRegistry,
    private readonly store: StateStore,
    private readonly memory: MemoryCatalog,
    private readonly idempotency: Idempotency,
    private readonly flushTimeoutMs: number,
    /** Whether an attached VMM's memory table owns asid 0 of the device (attachments.ts). */
    private readonly vmmOwnsAsid0: (device: string) => boolean = () => false,
  ) {}

  /** Writes taken and not answered yet, every device together. */
  get inProgress(): number {
    return this.writing;
  }

  /** Puts the submits journaled before a restart back into their queues, in sequence order. */
  restoreJournaled(): void {
    for (const [name, d] of this.store.state.devices) {
      const pending = [...d.pending.values()].sort((a, b) => (a.sequence < b.sequence ? -1 : 1));
      this.devices
        .slotOf(name)
        .queue.restore(
          pending.map((p) => this.submitEntry({ kind: 'batch', ops: p.ops, atomic: p.atomic }, p.sequence)),
        );
    }
  }

  map(req: MapRequest): Promise<MapResult> {
    return this.write(req.device, req.requestId, 'Map', {
      kind: 'map',
      spec: mapSpecOf(req),
    }) as Promise<MapResult>;
  }

  unmap(req: UnmapRequest): Promise<UnmapResult> {
    return this.write(req.device, req.requestId, 'Unmap', {
      kind: 'unmap',
      spec: unmapSpecOf(req),
    }) as Promise<UnmapResult>;
  }

  /** `regions` already checked (requests.ts). */
  setMemTable(
    device: string,
    requestId: string | undefined,
    asid: number,
    regions: Region[],
  ): Promise<SetMemTableResult> {
    const request: WriteRequest = { kind: 'setMemTable', asid, regions };
    return this.write(device, requestId, 'SetMemTable', request) as Promise<SetMemTableResult>;
  }

  batch(req: BatchRequest): Promise<BatchResult> {
    const request: WriteRequest = { kind: 'batch', ops: batchOpsOf(req.ops), atomic: req.atomic === true };
    return this.write(req.device, req.requestId, 'Batch', request) as Promise<BatchResult>;
  }

  submit(req: BatchRequest): Promise<SubmitResult> {
    const request = { kind: 'batch' as const, ops: batchOpsOf(req.ops), atomic: req.atomic === true };
    const slot = this.devices.existing(req.device);
    return this.counted(() =>
      this.idempotency.run(req.device, req.requestId, 'Submit', request, async (digest) => {
        this.refuseVmmOwned(slot.name, request);
        slot.queue.checkAccepts('submit');
        const sequence = slot.queue.allocateSequence();
        const changes: Change[] = [
          {
            t: 'pending.put',
            device: slot.name,
            submit: { sequence, ops: request.ops, atomic: request.atomic },
          },
        ];
        if (req.requestId !== undefined && digest !== undefined) {
          const answer: SubmitResult = { sequence };
          const record = recordOf(req.requestId, digest, { ok: true, answer });
          changes.push({ t: 'idempotency.put', device: slot.name, record });
        }
        // Queued at once (its place in the order is now), run only once journaled.
        const journaled = this.store.commit(changes);
        const entry = this.submitEntry(request, sequence);
        entry.durable = journaled.then(
          () => true,
          () => false,
        );
        slot.queue.enqueue(entry);
        await journaled;
        return { sequence };
      }),
    );
  }

  flush(device: string): Promise<FlushResult> {
    return this.devices.existing(device).queue.flush(this.flushTimeoutMs);
  }

  private write(
    device: string,
    requestId: string | undefined,
    method: string,
    request: WriteRequest,
  ): Promise<WriteAnswer> {
    const slot = this.devices.existing(device);
    return this.counted(() =>
      this.idempotency.run(device, requestId, method, request, (digest) => {
        this.refuseVmmOwned(device, request);
        return this.enqueueSync(slot, request, requestId, digest);
      }),
    );
  }

  private async counted<T>(write: () => Promise<T>): Promise<T> {
    this.writing++;
    try {
      return await write();
    } finally {
      this.writing--;
    }
  }

  /**
   * An attached VMM's memory table as the whole of asid 0 (attachments.ts): ordered, journaled and
   * diffed like any set-mem-table, with no idempotency key, and past the asid-0 refusal.
   */
  vmmMemoryTable(device: string, regions: Region[]): Promise<SetMemTableResult> {
    const request: WriteRequest = { kind: 'setMemTable', asid: 0, regions };
    return this.counted(() =>
      this.enqueueSync(this.devices.existing(device), request),
    ) as Promise<SetMemTableResult>;
  }

  /** The VMM owns asid 0 of an attached device: the orchestrator's writes there are refused. */
  private refuseVmmOwned(device: string, request: WriteRequest): void {
    if (!this.vmmOwnsAsid0(device)) return;
    const field = asid0FieldOf(request);
    if (field === undefined) return;
    throw new ServiceError(
      'FAILED_PRECONDITION',
      `device ${device} is attached to a VMM over vhost-user, whose memory table owns address space 0: ` +
        'use another asid, or detach the device first',
      { field },
    );
  }

  private enqueueSync(
    slot: Slot,
    request: WriteRequest,
    requestId?: string,
    digest?: string,
  ): Promise<WriteAnswer> {
    slot.queue.checkAccepts('sync');
    const unpin = this.memory.pin(memoriesOf(request));
    return new Promise<WriteAnswer>((resolve, reject) => {
      slot.queue.enqueue({
        kind: 'write',
        sequence: slot.queue.allocateSequence(),
        request,
        mode: 'sync',
        ...(requestId !== undefined && digest !== undefined ? { requestId, digest } : {}),
        enqueuedAt: process.hrtime.bigint(),
        settle: (outcome: Outcome) => {
          unpin();
          if (outcome.ok) resolve(outcome.answer);
          else reject(outcome.error);
        },
      });
    });
  }

  private submitEntry(request: WriteRequest, sequence: bigint): WriteEntry {
    const unpin = this.memory.pin(memoriesOf(request));
    return {
      kind: 'write',
      sequence,
      request,
      mode: 'submit',
      enqueuedAt: process.hrtime.bigint(),
      settle: unpin,
    };
  }
}

/** The request field that touches address space 0, if any. */
function asid0FieldOf(request: WriteRequest): string | undefined {
  switch (request.kind) {
    case 'map':
      return request.spec.asid === 0 ? 'asid' : undefined;
    case 'unmap':
      return request.spec.asid === 0 ? 'asid' : undefined;
    case 'setMemTable':
      return request.asid === 0 ? 'asid' : undefined;
    case 'batch': {
      const i = request.ops.findIndex((op) => op.asid === 0);
      return i < 0 ? undefined : `ops[${i}].asid`;
    }
  }
}
