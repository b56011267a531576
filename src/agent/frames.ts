/**
 * The frames of the agent protocol on its unix socket. Each frame is
 *
 *   u32 LE  length of what follows
 *   u32 LE  call id (chosen by the client; every frame of a call carries it)
 *   u8      kind (FrameKind)
 *   u8      length of the method name, then the name (ASCII; requests only, 0 otherwise)
 *   ...     the payload: one protobuf message of proto.ts (none for `end` and `cancel`)
 *
 * A call is one `request`, answered by one `answer` or one `error` (a CallError), or for a
 * streaming method by any number of `event`s, then `end` or `error`. The client may send `cancel`
 * for a call it no longer waits for. Answers come in any order; the id matches them to the call.
 */
import type { Socket } from 'node:net';
import { MAX_MESSAGE_BYTES } from './proto.ts';

export const FrameKind = {
  request: 1,
  answer: 2,
  error: 3,
  event: 4,
  end: 5,
  cancel: 6,
} as const;
export type FrameKind = (typeof FrameKind)[keyof typeof FrameKind];

export interface Frame {
  id: number;
  kind: FrameKind;
  /** The method called: set on requests, '' otherwise. */
  method: string;
  payload: Buffer;
}

/** Bytes on the socket that are no frame, or a frame over the size limit: the connection is unusable. */
export class FrameError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FrameError';
  }
}

/** The length prefix. */
const PREFIX = 4;
/** id, kind, method name length. */
const FIXED = 6;
const MAX_METHOD = 255;
/** Payloads up to this size are copied behind their header (one write); larger ones are written apart. */
const COPY_BELOW = 16 << 10;

function isKind(k: number): k is FrameKind {
  return k >= FrameKind.request && k <= FrameKind.cancel;
}

/**
 * The bytes of `frame`, ready to write in order: one buffer for a small payload, the header and
 * the payload itself (not copied) for a large one. Throws FrameError for a payload over `maxPayload`.
 */
export function encodeFrame(frame: Frame, maxPayload = MAX_MESSAGE_BYTES): Buffer[] {
  const { id, kind, method, payload } = frame;
  if (payload.length > maxPayload) {
    throw new FrameError(`a ${payload.length}-byte message is over the ${maxPayload}-byte limit`);
  }
  if (method.length > MAX_METHOD) throw new FrameError(`method name ${method} is too long`);
  const head = PREFIX + FIXED + method.length;
  const copied = payload.length < COPY_BELOW;
  const out = Buffer.allocUnsafe(copied ? head + payload.length : head);
  out.writeUInt32LE(FIXED + method.length + payload.length, 0);
  out.writeUInt32LE(id, 4);
  out[8] = kind;
  out[9] = method.length;
  out.write(method, PREFIX + FIXED, 'latin1');
  if (!copied) return [out, payload];
  payload.copy(out, head);
  return [out];
}

/**
 * Turns the chunks of a byte stream back into frames, whatever their split: a frame may arrive in
 * many chunks, a chunk may hold many frames. A frame within one chunk is a view of it; one spread
 * over several is copied once.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Bytes of the frame being received, prefix included; -1 before its prefix is in. */
  private need = -1;

  constructor(private readonly maxPayload = MAX_MESSAGE_BYTES) {}

  /** The frames that `chunk` completes, in order. Throws FrameError on bytes that are no frame. */
  push(chunk: Buffer): Frame[] {
    const frames: Frame[] = [];
    if (chunk.length === 0) return frames;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    for (;;) {
      if (this.need < 0) {
        if (this.buffered < PREFIX) break;
        const length = this.peekLength();
        if (length < FIXED) throw new FrameError(`a frame of ${length} bytes is shorter than its header`);
        if (length > FIXED + MAX_METHOD + this.maxPayload) {
          throw new FrameError(`a ${length}-byte frame is over the ${this.maxPayload}-byte message limit`);
        }
        this.need = PREFIX + length;
      }
      if (this.buffered < this.need) break;
      const bytes = this.take(this.need);
      this.need = -1;
      frames.push(parseFrame(bytes, this.maxPayload));
    }
    return frames;
  }

  private peekLength(): number {
    const first = this.chunks[0]!;
    if (first.length >= PREFIX) return first.readUInt32LE(0);
    const bytes = Buffer.concat(this.chunks, PREFIX);
    return bytes.readUInt32LE(0);
  }

  /** The next `n` bytes (n <= buffered). */
  private take(n: number): Buffer {
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
    } else {
      out = Buffer.concat(this.chunks, n);
    }
    let left = n;
    while (left > 0) {
      const c = this.chunks[0]!;
      if (c.length <= left) {
        left -= c.length;
        this.chunks.shift();
      } else {
        this.chunks[0] = c.subarray(left);
        left = 0;
      }
    }
    this.buffered -= n;
    return out;
  }
}

function parseFrame(bytes: Buffer, maxPayload: number): Frame {
  const kind = bytes[8]!;
  if (!isKind(kind)) throw new FrameError(`unknown frame kind ${kind}`);
  const methodEnd = PREFIX + FIXED + bytes[9]!;
  if (methodEnd > bytes.length) throw new FrameError('a method name runs past the end of its frame');
  const payload = bytes.subarray(methodEnd);
  if (payload.length > maxPayload) {
    throw new FrameError(`a ${payload.length}-byte message is over the ${maxPayload}-byte limit`);
  }
  return {
    id: bytes.readUInt32LE(4),
    kind,
    method: bytes.toString('latin1', PREFIX + FIXED, methodEnd),
    payload,
  };
}

/**
 * Writes frames to a socket. The frames written in one turn of the event loop leave in one
 * writev: the socket is corked at the first and uncorked once the turn's work is done.
 * (A unix socket has no Nagle delay to turn off: setNoDelay applies to TCP only.)
 */
export class FrameWriter {
  private corked = false;

  constructor(private readonly socket: Socket) {}

  /** Throws FrameError, writing nothing, for a payload over the size limit. */
  write(frame: Frame): void {
    const parts = encodeFrame(frame);
    if (this.socket.destroyed) return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    for (const part of parts) this.socket.write(part);
  }
}

/**
 * Hands every frame arriving on `socket` to `onFrame`. Bytes that are no frame end the
 * connection: `refused` is told why, and the socket is destroyed.
 */
export function readFrames(
  socket: Socket,
  onFrame: (frame: Frame) => void,
  refused: (reason: string) => void,
): void {
  const decoder = new FrameDecoder();
  socket.on('data', (chunk: Buffer) => {
    let frames: Frame[];
    try {
      frames = decoder.push(chunk);
    } catch (e) {
      if (!(e instanceof FrameError)) throw e;
      refused(e.message);
      socket.destroy();
      return;
    }
    for (const frame of frames) {
      if (socket.destroyed) return;
      onFrame(frame);
    }
  });
}
