/**
 * What a codec that reads and writes protobuf fields itself with protobufjs' Reader and Writer
 * needs besides them: the wire types it uses, a field's tag, and the checks that make bytes that
 * are no such message fail as protobuf (a RangeError), never as a misread value.
 */
import type protobuf from 'protobufjs';

export const VARINT = 0;
export const LEN = 2;

export const tag = (field: number, wireType: number): number => (field << 3) | wireType;

/** The tag just read names a known field with another wire type: the bytes are no such message. */
export function expectWireType(t: number, wireType: number): void {
  if ((t & 7) !== wireType) throw new RangeError(`field ${t >>> 3} has wire type ${t & 7}, not ${wireType}`);
}

/** The end of the length-delimited field the reader is at (its length read here). */
export function lengthEnd(r: protobuf.Reader): number {
  const end = r.uint32() + r.pos;
  if (end > r.len) throw new RangeError(`a field runs past the end of the message (at ${r.pos})`);
  return end;
}
