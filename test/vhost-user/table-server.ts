/**
 * The API server's side of attach, for tests: a WatchAttachments subscriber that puts each memory
 * table on the device and answers, and the vhost-user negotiation a VMM starts with.
 */
import assert from 'node:assert/strict';
import type { AgentClient } from '../../src/agent/client.ts';
import type { AgentError } from '../../src/agent/errors.ts';
import type { AttachmentEvent } from '../../src/agent/wire.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { F_PROTOCOL_FEATURES, protocolFeatureMask, Request, u64Payload } from '../../src/vhost-user/wire.ts';
import type { FrontEnd } from './front-end.ts';
import { BLK_FEATURES } from './recording-side.ts';

export const PROTOCOL = protocolFeatureMask('REPLY_ACK', 'CONFIG', 'MQ');

/**
 * Stands in for the API server: subscribes to WatchAttachments and, unless told to hold, puts every
 * memory table on the device (a minimal diff against what asid 0 maps) and answers with the outcome.
 */
export class TableServer {
  readonly events: AttachmentEvent[] = [];
  hold = false;
  private waiters: { match: (e: AttachmentEvent) => boolean; resolve: (e: AttachmentEvent) => void }[] = [];
  private readonly watch: { cancel(): void };
  private readonly ended: Promise<AgentError | undefined>;
  private readonly watching: Promise<AttachmentEvent>;

  private constructor(private readonly client: AgentClient) {
    let end!: (e: AgentError | undefined) => void;
    this.ended = new Promise((resolve) => {
      end = resolve;
    });
    this.watching = new Promise((resolve) =>
      this.waiters.push({ match: (e) => e.type === 'watching', resolve }),
    );
    this.watch = client.watchAttachments((e) => this.event(e), end);
  }

  /** Subscribed: the agent has said `watching`. */
  static async start(client: AgentClient): Promise<TableServer> {
    const server = new TableServer(client);
    await server.watching;
    return server;
  }

  next(type: AttachmentEvent['type'], device: string): Promise<AttachmentEvent> {
    const match = (e: AttachmentEvent) => e.type === type && 'device' in e && e.device === device;
    const seen = this.events.findIndex(match);
    if (seen >= 0) return Promise.resolve(this.events.splice(seen, 1)[0]!);
    return new Promise((resolve) => this.waiters.push({ match, resolve }));
  }

  /** Makes asid 0 of the device hold exactly the table's entries; returns the answer it sends. */
  async apply(e: Extract<AttachmentEvent, { type: 'memoryTable' }>): Promise<void> {
    const key = (m: { iova: bigint; size: bigint; memory: string; offset: bigint }) =>
      `${m.iova}+${m.size}@${m.memory}:${m.offset}`;
    const live = (await this.client.listMapped(e.device)).mappings.filter((m) => m.asid === 0);
    const wanted = new Set(e.entries.map(key));
    const have = new Set(live.map(key));
    const ops: IotlbOp[] = [
      ...live
        .filter((m) => !wanted.has(key(m)))
        .map((m) => ({ type: 'invalidate' as const, asid: 0, iova: m.iova, size: m.size })),
      ...e.entries.filter((m) => !have.has(key(m))).map((m) => ({ type: 'update' as const, ...m })),
    ];
    const { results } = await this.client.apply(e.device, ops);
    const failed = results.find((r) => !r.ok);
    await this.client.answerMemoryTable(
      failed && !failed.ok
        ? { requestId: e.requestId, ok: false, code: failed.errno, message: failed.message }
        : { requestId: e.requestId, ok: true },
    );
  }

  async close(): Promise<void> {
    this.watch.cancel();
    await this.ended;
  }

  private event(e: AttachmentEvent): void {
    if (e.type === 'memoryTable' && !this.hold) {
      void this.apply(e);
      return;
    }
    const i = this.waiters.findIndex((w) => w.match(e));
    if (i >= 0) this.waiters.splice(i, 1)[0]!.resolve(e);
    else this.events.push(e);
  }
}

export async function negotiate(fe: FrontEnd): Promise<void> {
  fe.send(Request.GET_FEATURES, Buffer.alloc(0));
  assert.equal(await fe.u64(Request.GET_FEATURES), BLK_FEATURES | F_PROTOCOL_FEATURES);
  fe.send(Request.GET_PROTOCOL_FEATURES, Buffer.alloc(0));
  await fe.u64(Request.GET_PROTOCOL_FEATURES);
  fe.send(Request.SET_PROTOCOL_FEATURES, u64Payload(PROTOCOL), [], true);
  assert.equal(await fe.u64(Request.SET_PROTOCOL_FEATURES), 0n);
  fe.send(Request.SET_FEATURES, u64Payload(BLK_FEATURES | F_PROTOCOL_FEATURES), [], true);
  assert.equal(await fe.u64(Request.SET_FEATURES), 0n);
  fe.send(Request.SET_OWNER, Buffer.alloc(0), [], true);
  assert.equal(await fe.u64(Request.SET_OWNER), 0n);
}
