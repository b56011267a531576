/**
 * The agent hop's transport over a real unix socket: AgentClient (src/agent/frame-client.ts) and
 * the agent's frame server (services/agent/frame-server.ts) with handlers this test controls, or
 * a raw frame peer where the test must misbehave on purpose (answer late, send garbage).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { status } from '@grpc/grpc-js';
import { pino } from 'pino';
import type { Attachments } from '../../src/agent/attach.ts';
import { AgentClient } from '../../src/agent/client.ts';
import { AgentError } from '../../src/agent/errors.ts';
import { encodeFrame, type Frame, FrameDecoder, FrameKind } from '../../src/agent/frames.ts';
import { agentService, MAX_MESSAGE_BYTES } from '../../src/agent/proto.ts';
import type { ListMappedAnswer } from '../../src/agent/mapping-codec.ts';
import type { AttachmentEvent } from '../../src/agent/wire.ts';
import { type FrameServer, serveFrames } from '../../services/agent/frame-server.ts';
import type { AgentHandlers } from '../../services/agent/server.ts';
import { until } from './tier.ts';

function socketIn(t: TestContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdpa-frames-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, 'agent.sock');
}

/** A pino logger whose records the test reads. */
function recordingLogger() {
  const records: Record<string, unknown>[] = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => records.push(JSON.parse(line)) });
  return { logger, records };
}

const INFO = { bootId: 'boot-1', version: '0', pid: 1 };

/** Serves `handlers` (only those a test calls) on `socket`; stopped after the test. */
async function serve(
  t: TestContext,
  socket: string,
  handlers: Partial<AgentHandlers>,
  attachments?: Attachments,
): Promise<{ server: FrameServer; records: Record<string, unknown>[] }> {
  const { logger, records } = recordingLogger();
  const all = { GetInfo: async () => INFO, ...handlers } as AgentHandlers;
  const server = await serveFrames(socket, all, logger, attachments);
  t.after(() => server.close(0));
  return { server, records };
}

function client(t: TestContext, socketPath: string, deadlineMs?: number): AgentClient {
  const c = new AgentClient({
    socketPath,
    reconnect: { initialDelayMs: 20, maxDelayMs: 100 },
    ...(deadlineMs ? { deadlineMs } : {}),
  });
  t.after(() => c.close());
  return c;
}

async function refusedWith(promise: Promise<unknown>, code: status): Promise<AgentError> {
  const err = await promise.then(
    () => assert.fail(`expected ${status[code]}`),
    (e: unknown) => e,
  );
  assert.ok(err instanceof AgentError, String(err));
  assert.equal(err.status, code, err.message);
  return err;
}

/** A promise and its resolve, for handlers the test releases. */
function gate<T = void>() {
  let open!: (v: T) => void;
  const opened = new Promise<T>((resolve) => {
    open = resolve;
  });
  return { open, opened };
}

test('many calls in flight on one connection are answered in whatever order they finish', async (t) => {
  const socket = socketIn(t);
  const gates = new Map(['d0', 'd1', 'd2', 'd3'].map((d) => [d, gate()]));
  await serve(t, socket, {
    async ListMapped(req): Promise<ListMappedAnswer> {
      await gates.get(req.device)!.opened;
      return { mappings: [], bootId: `answer for ${req.device}` };
    },
  });
  const c = client(t, socket);
  await c.connect();
  const calls = [...gates.keys()].map((d) => c.listMapped(d));
  for (const d of ['d2', 'd0', 'd3', 'd1']) gates.get(d)!.open();
  const answers = await Promise.all(calls);
  assert.deepEqual(
    answers.map((a) => a.bootId),
    ['d0', 'd1', 'd2', 'd3'].map((d) => `answer for ${d}`),
  );
});

test('an error keeps its status, code, field and errno', async (t) => {
  const socket = socketIn(t);
  await serve(t, socket, {
    async ReleaseMemory(req) {
      throw new AgentError(status.FAILED_PRECONDITION, 'IN_USE', `memory ${req.id} is mapped`, 'id', 'EBUSY');
    },
  });
  const c = client(t, socket);
  const err = await refusedWith(c.releaseMemory('m0'), status.FAILED_PRECONDITION);
  assert.deepEqual(
    [err.code, err.statusName, err.message, err.field, err.errno],
    ['IN_USE', 'FAILED_PRECONDITION', 'memory m0 is mapped', 'id', 'EBUSY'],
  );
});

/**
 * A peer that speaks frames by hand: answers GetInfo at once, and ListMemory only once the client
 * has given up on it (its cancel), as an agent too slow to drop it would.
 */
function rawPeer(t: TestContext, socket: string) {
  const peer = { received: [] as Frame[], lateAnswers: 0 };
  const server = net.createServer((conn) => {
    const decoder = new FrameDecoder();
    const answer = (id: number, method: string, m: object) => {
      const payload = agentService[method]!.responseSerialize(m);
      for (const part of encodeFrame({ id, kind: FrameKind.answer, method: '', payload })) conn.write(part);
    };
    conn.on('data', (chunk: Buffer) => {
      for (const f of decoder.push(chunk)) {
        peer.received.push(f);
        if (f.kind === FrameKind.cancel) {
          answer(f.id, 'ListMemory', { memory: [] });
          peer.lateAnswers++;
        } else if (f.method === 'GetInfo') {
          answer(f.id, 'GetInfo', { ...INFO, bootId: `answer to call ${f.id}` });
        }
      }
    });
  });
  t.after(() => server.close());
  return new Promise<typeof peer>((resolve) => server.listen(socket, () => resolve(peer)));
}

test('past its deadline a call fails with DEADLINE_EXCEEDED, the agent is told, and the late answer is dropped', async (t) => {
  const socket = socketIn(t);
  const peer = await rawPeer(t, socket);
  const c = client(t, socket);
  await c.connect();
  const err = await refusedWith(c.listMemory({ deadlineMs: 50 }), status.DEADLINE_EXCEEDED);
  assert.equal(err.code, 'DEADLINE_EXCEEDED');
  // The late answer comes (the peer ignores the cancel); the next call gets its own answer, not it.
  await until('the late answer', () => peer.lateAnswers > 0);
  const info = await c.getInfo();
  const call = peer.received.find((f) => f.method === 'ListMemory')!;
  const next = peer.received.filter((f) => f.method === 'GetInfo').at(-1)!;
  assert.equal(info.bootId, `answer to call ${next.id}`);
  assert.notEqual(next.id, call.id);
  assert.ok(
    peer.received.some((f) => f.kind === FrameKind.cancel && f.id === call.id),
    'a cancel frame was sent for the call past its deadline',
  );
  assert.equal(c.connected, true);
});

test('the agent drops the answer of a cancelled call and keeps serving the connection', async (t) => {
  const socket = socketIn(t);
  const slow = gate();
  let answered = 0;
  await serve(t, socket, {
    async ListMemory() {
      await slow.opened;
      answered++;
      return { memory: [] };
    },
  });
  const c = client(t, socket);
  await c.connect();
  await refusedWith(c.listMemory({ deadlineMs: 50 }), status.DEADLINE_EXCEEDED);
  slow.open();
  await until('the handler ran', () => answered === 1);
  assert.equal((await c.getInfo()).bootId, INFO.bootId);
});

test('a lost connection is told once, calls then fail fast with UNAVAILABLE, and connect() waits for the agent', async (t) => {
  const socket = socketIn(t);
  const first = await serve(t, socket, {});
  const c = client(t, socket);
  await c.connect();
  const notices: AgentError[] = [];
  c.on('disconnected', (e) => notices.push(e));
  await first.server.close(0);
  await until('the disconnect notice', () => notices.length > 0);
  assert.equal(notices.length, 1);
  assert.equal(notices[0]!.status, status.UNAVAILABLE);
  assert.equal(c.connected, false);
  await refusedWith(c.getInfo(), status.UNAVAILABLE);
  await refusedWith(c.getInfo(), status.UNAVAILABLE);
  // Nobody serves: connect() fails at its deadline.
  await refusedWith(c.connect({ deadlineMs: 150 }), status.DEADLINE_EXCEEDED);
  assert.equal(notices.length, 1, 'said once');

  // connect() keeps trying with the backoff and finds an agent that starts while it waits.
  const connecting = c.connect({ deadlineMs: 60_000 });
  await sleep(200);
  await serve(t, socket, { GetInfo: async () => ({ ...INFO, bootId: 'boot-2' }) });
  assert.equal((await connecting).bootId, 'boot-2');
  assert.equal(c.connected, true);
});

test('a waiting connect() reaches an agent that binds the socket at once, not at its next backoff step', async (t) => {
  const socket = socketIn(t);
  // A backoff longer than the whole test tier: only the watch on the socket's name can wake it.
  const hour = 3_600_000;
  const c = new AgentClient({ socketPath: socket, reconnect: { initialDelayMs: hour, maxDelayMs: hour } });
  t.after(() => c.close());
  const connecting = c.connect({ deadlineMs: 2 * hour });
  await sleep(200); // the first attempt has failed: nobody serves yet
  await serve(t, socket, { GetInfo: async () => ({ ...INFO, bootId: 'boot-2' }) });
  assert.equal((await connecting).bootId, 'boot-2');
  assert.equal(c.connected, true);
});

test('a stream delivers its events in order, and cancel ends it at the agent too', async (t) => {
  const socket = socketIn(t);
  let emit: ((e: AttachmentEvent) => void) | undefined;
  let end: (() => void) | undefined;
  let watching = 0;
  const attachments = {
    watch(w: { event(e: AttachmentEvent): void; end(): void }) {
      watching++;
      emit = w.event;
      end = w.end;
      w.event({ type: 'watching', attached: ['vdpa0'] });
      return () => {
        watching--;
        return true;
      };
    },
  } as unknown as Attachments;
  await serve(t, socket, {}, attachments);
  const c = client(t, socket);
  await c.connect();

  const events: AttachmentEvent[] = [];
  const ended: (AgentError | undefined)[] = [];
  const watch = c.watchAttachments(
    (e) => events.push(e),
    (e) => ended.push(e),
  );
  await until('the first event', () => events.length > 0);
  emit!({ type: 'connected', device: 'vdpa0' });
  emit!({ type: 'disconnected', device: 'vdpa0', reason: 'EOF' });
  await until('three events', () => events.length >= 3);
  assert.deepEqual(
    events.map((e) => e.type),
    ['watching', 'connected', 'disconnected'],
  );
  watch.cancel();
  await until('the agent to drop the cancelled watch', () => watching === 0);
  await sleep(20);
  assert.deepEqual(ended, [undefined], 'ended once, without an error');

  // A stream the agent ends: ended once, without an error; one cut by the connection: UNAVAILABLE.
  const second: (AgentError | undefined)[] = [];
  c.watchAttachments(
    () => {},
    (e) => second.push(e),
  );
  await until('the second watch', () => watching > 0);
  end!();
  await until('the end of the second watch', () => second.length > 0);
  assert.deepEqual(second, [undefined]);
});

test('a stream cut with the connection ends with UNAVAILABLE', async (t) => {
  const socket = socketIn(t);
  const attachments = {
    watch: (w: { event(e: AttachmentEvent): void }) => {
      w.event({ type: 'watching', attached: [] });
      return () => true;
    },
  } as unknown as Attachments;
  const { server } = await serve(t, socket, {}, attachments);
  const c = client(t, socket);
  await c.connect();
  const ended: (AgentError | undefined)[] = [];
  let seen = 0;
  c.watchAttachments(
    () => seen++,
    (e) => ended.push(e),
  );
  await until('the first event', () => seen > 0);
  // The agent stopping ends its streams first (an `end` each), then the connection.
  await server.close(0);
  await until('the end of the watch', () => ended.length > 0);
  assert.deepEqual(ended, [undefined]);

  const peer = net.createServer((conn) => setTimeout(() => conn.destroy(), 50));
  await new Promise<void>((resolve) => peer.listen(socket, () => resolve()));
  t.after(() => peer.close());
  const cut: (AgentError | undefined)[] = [];
  c.watchAttachments(
    () => {},
    (e) => cut.push(e),
  );
  await until('the end of the cut watch', () => cut.length > 0);
  assert.equal(cut[0]?.status, status.UNAVAILABLE);
});

test('bytes that are no frames close that connection, with the reason logged; the agent serves on', async (t) => {
  const socket = socketIn(t);
  const { records } = await serve(t, socket, {});
  const raw = net.connect(socket);
  const closed = new Promise<void>((resolve) => raw.on('close', () => resolve()));
  raw.on('error', () => {});
  raw.write('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
  await closed;
  assert.ok(
    records.some(
      (r) =>
        r.msg === 'closed a connection that sent bytes that are no agent frames' &&
        typeof r.reason === 'string',
    ),
    JSON.stringify(records),
  );
  assert.equal((await client(t, socket).getInfo()).bootId, INFO.bootId);
});

test('a request over the message limit is refused before it is sent; the connection stays', async (t) => {
  const socket = socketIn(t);
  let writes = 0;
  await serve(t, socket, {
    async DmaWrite() {
      writes++;
      return {};
    },
  });
  const c = client(t, socket);
  await c.connect();
  const err = await refusedWith(
    c.dmaWrite('vdpa0', 0, 0n, Buffer.alloc(MAX_MESSAGE_BYTES)),
    status.RESOURCE_EXHAUSTED,
  );
  assert.match(err.message, /over the 67108864-byte limit/);
  assert.equal(writes, 0);
  assert.equal(c.connected, true);
  await c.dmaWrite('vdpa0', 0, 0n, Buffer.alloc(16));
  assert.equal(writes, 1);
});

test('an unknown method is refused with UNIMPLEMENTED', async (t) => {
  const socket = socketIn(t);
  await serve(t, socket, {});
  const c = client(t, socket);
  const err = await refusedWith(
    new Promise((resolve, reject) => {
      c.watchAttachments(
        () => {},
        (e) => (e ? reject(e) : resolve(undefined)),
      );
    }),
    status.UNIMPLEMENTED,
  );
  assert.match(err.message, /no vhost-user sockets/);
});
