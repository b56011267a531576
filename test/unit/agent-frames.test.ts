/**
 * The agent protocol's frames (src/agent/frames.ts): the byte layout, any split of a stream of
 * frames decoding to the same frames, and the size limit and garbage refused.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { encodeFrame, type Frame, FrameDecoder, FrameError, FrameKind } from '../../src/agent/frames.ts';

const bytesOf = (frames: readonly Frame[], max?: number) =>
  Buffer.concat(frames.flatMap((f) => encodeFrame(f, max)));

test('a frame is length, call id, kind, method name and payload, little-endian', () => {
  const frame: Frame = {
    id: 0x01020304,
    kind: FrameKind.request,
    method: 'Apply',
    payload: Buffer.from([9, 8, 7]),
  };
  // Written out by hand from the layout in frames.ts, not by the encoder.
  const expected = Buffer.from([
    ...[14, 0, 0, 0], // 4 + 1 + 1 + 5 + 3 bytes follow
    ...[4, 3, 2, 1],
    1, // request
    5,
    ...Buffer.from('Apply'),
    ...[9, 8, 7],
  ]);
  assert.deepEqual(bytesOf([frame]), expected);
  assert.deepEqual(new FrameDecoder().push(expected), [frame]);
});

const frameArb: fc.Arbitrary<Frame> = fc
  .record({
    id: fc.integer({ min: 1, max: 0xffff_ffff }),
    kind: fc.constantFrom(...Object.values(FrameKind)),
    method: fc.stringMatching(/^[A-Za-z]{0,24}$/),
    // Mostly small payloads, some past the size at which the encoder stops copying them.
    payload: fc
      .oneof(
        { weight: 4, arbitrary: fc.uint8Array({ maxLength: 64 }) },
        { weight: 1, arbitrary: fc.uint8Array({ minLength: 16 << 10, maxLength: (16 << 10) + 300 }) },
      )
      .map((u) => Buffer.from(u)),
  })
  .map((f) => ({ ...f }));

test('a stream of frames split anywhere decodes to the same frames, in order', () => {
  fc.assert(
    fc.property(
      fc.array(frameArb, { maxLength: 8 }),
      fc.array(fc.nat(), { maxLength: 12 }),
      (frames, cuts) => {
        const stream = bytesOf(frames);
        const points = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
        const decoder = new FrameDecoder();
        const out: Frame[] = [];
        let from = 0;
        for (const at of [...points, stream.length]) {
          out.push(...decoder.push(stream.subarray(from, at)));
          from = at;
        }
        assert.deepEqual(out, frames);
      },
    ),
    { numRuns: 200 },
  );
});

test('many frames in one chunk, and a frame a byte at a time', () => {
  const frames: Frame[] = Array.from({ length: 50 }, (_, i) => ({
    id: i + 1,
    kind: FrameKind.answer,
    method: '',
    payload: Buffer.alloc(i, i),
  }));
  assert.deepEqual(new FrameDecoder().push(bytesOf(frames)), frames);
  const one = bytesOf([frames[9]!]);
  const decoder = new FrameDecoder();
  const out: Frame[] = [];
  for (let i = 0; i < one.length; i++) out.push(...decoder.push(one.subarray(i, i + 1)));
  assert.deepEqual(out, [frames[9]]);
});

test('a message over the limit is refused by the encoder, and by the decoder from its length alone', () => {
  const big: Frame = { id: 1, kind: FrameKind.answer, method: '', payload: Buffer.alloc(1025) };
  assert.throws(
    () => encodeFrame(big, 1024),
    (e: unknown) =>
      e instanceof FrameError && /1025-byte message is over the 1024-byte limit/.test(e.message),
  );
  assert.equal(encodeFrame({ ...big, payload: Buffer.alloc(1024) }, 1024).length, 1);
  // Only the first bytes of a frame too big to accept: refused before the rest arrives.
  const head = bytesOf([{ ...big, payload: Buffer.alloc(4096) }]).subarray(0, 10);
  assert.throws(
    () => new FrameDecoder(1024).push(head),
    (e: unknown) => e instanceof FrameError && /over the 1024-byte message limit/.test(e.message),
  );
});

test('bytes that are no frames are refused, naming what is wrong', () => {
  const refused = (bytes: number[], why: RegExp) =>
    assert.throws(
      () => new FrameDecoder().push(Buffer.from(bytes)),
      (e: unknown) => e instanceof FrameError && why.test(e.message),
    );
  refused([2, 0, 0, 0, 1, 2], /shorter than its header/);
  refused([6, 0, 0, 0, 1, 0, 0, 0, 9, 0], /unknown frame kind 9/);
  refused([6, 0, 0, 0, 1, 0, 0, 0, 0, 0], /unknown frame kind 0/);
  refused([7, 0, 0, 0, 1, 0, 0, 0, 1, 5, 65], /method name runs past the end/);
  refused([0xff, 0xff, 0xff, 0xff], /over the .*-byte message limit/);
  // HTTP/2's preface (what a gRPC client sends first) is refused at once, not waited upon.
  assert.throws(() => new FrameDecoder().push(Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n')), FrameError);
});
