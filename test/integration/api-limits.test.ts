/**
 * What a slow, idle or greedy client can hold: bytes of requests in flight (REST and gRPC share the
 * bound), connection count, header and idle timeouts. Real servers on loopback, raw sockets.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { DEFAULT_LIMITS } from '../../src/api/parse.ts';
import { until } from './agent-harness.ts';
import { grpcFails, startStack } from './api-harness.ts';

type Stack = Awaited<ReturnType<typeof startStack>>;

const KiB = 1024;
const LIMITS = { ...DEFAULT_LIMITS, bodyLimit: 64 * KiB, maxInflightBytes: 64 * KiB };
const CONNECTIONS = {
  headersTimeoutMs: 500,
  requestTimeoutMs: 60_000,
  idleTimeoutMs: 1000,
  maxConnections: 8,
};
/** Generous for a loaded machine: the timeouts above are checked about every 500 ms. */
const CLOSE_WITHIN_MS = 30_000;

function hostPort(address: string): { host: string; port: number } {
  const url = new URL(address.startsWith('http') ? address : `http://${address}`);
  return { host: url.hostname, port: Number(url.port) };
}

function connect(address: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(hostPort(address), () => resolve(socket));
    socket.once('error', reject);
  });
}

/** Resolves with what the server sent once it closed the connection; fails after `ms`. */
function closedByServer(socket: net.Socket, ms = CLOSE_WITHIN_MS): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = '';
    const timer = setTimeout(() => reject(new Error(`still open after ${ms} ms`)), ms);
    socket.on('data', (chunk: Buffer) => {
      got += chunk.toString();
    });
    socket.on('error', () => undefined);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve(got);
    });
  });
}

/** A batch body of about `bytes` bytes (unmaps of nothing: cheap to apply). */
function batchOf(bytes: number): string {
  const op = { op: 'unmap', iova: '0x7000000000', size: '0x1000' };
  const n = Math.ceil(bytes / JSON.stringify(op).length);
  return JSON.stringify({ ops: Array.from({ length: n }, () => op) });
}

describe('API limits', () => {
  let s: Stack;
  before(async () => {
    s = await startStack('limits', { limits: LIMITS, connections: CONNECTIONS });
  });
  after(async () => {
    await s?.stop();
  });

  /** POST /v1/devices/vdpa0:batch whose body is `held` bytes, `sent` of them sent; the rest never is. */
  async function holdBody(head: string, first: string): Promise<net.Socket> {
    const socket = await connect(s.api.restAddress);
    socket.on('error', () => undefined);
    socket.write(
      `POST /v1/devices/vdpa0:batch HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n${head}\r\n${first}`,
    );
    return socket;
  }

  /** Retries `attempt` until it answers `status` (0: no answer). */
  async function eventually(status: number, attempt: () => Promise<number>): Promise<void> {
    await until(`an answer of ${status}`, async () => (await attempt().catch(() => 0)) === status);
  }

  test('bytes in flight: beyond the bound, 429 / RESOURCE_EXHAUSTED with a retry hint', async () => {
    const small = batchOf(8 * KiB);
    const post = () => s.http('POST', '/v1/devices/vdpa0:batch', small);
    assert.equal((await post()).status, 200);

    // A body announced at 60 KiB holds 60 KiB until it is answered, though it never arrives.
    const slow = await holdBody(`content-length: ${60 * KiB}\r\n`, '{"ops":[');
    await eventually(429, async () => (await post()).status);
    const refused = await post();
    assert.equal(refused.body.error.code, 'RESOURCE_EXHAUSTED');
    assert.match(refused.body.error.message, /bytes of requests are being processed/);
    assert.equal(refused.headers.get('retry-after'), '1');

    // gRPC shares the bound.
    const ops = Array.from({ length: 200 }, () => ({ op: 'unmap', iova: '0x7000000000', size: '0x1000' }));
    const grpc = await grpcFails(s.grpc.mapping('batch', { device: 'vdpa0', ops }));
    assert.equal(grpc.code, GrpcStatus.RESOURCE_EXHAUSTED);
    assert.equal(grpc.metadata.get('retry-after-ms')[0], '1000');
    // A small request still fits beside the held one.
    assert.equal((await s.http('GET', '/v1/devices')).status, 200);

    // Gone, and its bytes are free again.
    slow.destroy();
    await eventually(200, async () => (await post()).status);
    await s.grpc.mapping('batch', { device: 'vdpa0', ops });

    // A chunked body counts as it arrives.
    const chunk = batchOf(60 * KiB).slice(0, 60 * KiB);
    const chunked = await holdBody(
      'transfer-encoding: chunked\r\n',
      `${chunk.length.toString(16)}\r\n${chunk}\r\n`,
    );
    await eventually(429, async () => (await post()).status);
    chunked.destroy();
    await eventually(200, async () => (await post()).status);
  });

  test('a request head that does not arrive in time is cut', async () => {
    const socket = await connect(s.api.restAddress);
    const closed = closedByServer(socket);
    socket.write('GET /v1/devices HTTP/1.1\r\nhost: x\r\n');
    const got = await closed;
    assert.match(got, /^(HTTP\/1\.1 408|)/);
  });

  test('connections beyond the cap are closed at once; the server serves again when they go', async () => {
    const held: net.Socket[] = [];
    let refusedAt = -1;
    try {
      for (let i = 0; i < CONNECTIONS.maxConnections + 2 && refusedAt < 0; i++) {
        const socket = await connect(s.api.restAddress);
        held.push(socket);
        // The server closes a connection over the cap without reading from it.
        const outcome = await Promise.race([
          closedByServer(socket, 60_000).then(() => 'closed' as const),
          // A held connection answers a request; then it is known to count.
          new Promise<'open'>((resolve) => {
            socket.once('data', () => resolve('open'));
            socket.write('GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n');
          }),
        ]);
        if (outcome === 'closed') refusedAt = i;
      }
      assert.ok(refusedAt >= 0 && refusedAt <= CONNECTIONS.maxConnections, `refused at ${refusedAt}`);
    } finally {
      for (const socket of held) socket.destroy();
    }
    await eventually(200, async () => (await s.http('GET', '/healthz')).status);
  });

  test('a gRPC connection that makes no call is closed when idle', async () => {
    const socket = await connect(s.api.grpcAddress);
    await closedByServer(socket);
  });
});
