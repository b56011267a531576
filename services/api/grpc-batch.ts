/**
 * Batch over gRPC carries one entry per op each way, and grpc-js' proto-loader coding makes three
 * objects of every entry (a protobufjs message, its plain copy, the copy without '' that src/api
 * reads) and three of every answer entry. Its messages pass grpc-js as bytes instead, read and
 * written here with protobufjs' Reader and Writer:
 *
 * - the request straight into the plain message src/api/parse.ts reads (the fields present, in
 *   field order, '' absent: what proto-loader's decode + grpc.ts's `body` make of the same bytes),
 *   so every check and field-named error stays parse.ts's;
 * - the answer straight from the BatchResult, byte for byte what proto-loader writes of
 *   format.ts's formatBatchResult.
 */
import protobuf from 'protobufjs';
import { ServiceError } from '../../src/core/errors.ts';
import type { BatchResult } from '../../src/core/types.ts';
import type { IotlbOp } from '../../src/iotlb/types.ts';
import { expectWireType, LEN, lengthEnd, tag, VARINT } from '../../src/sys/protobuf-fields.ts';
import { formatU64 as hex } from '../../src/u64.ts';
import { withBytes } from './grpc-bytes.ts';

/** `definition` with Batch (when it has it) taking and giving bytes. */
export const withBytesBatch = withBytes('Batch');

// The field numbers below are mapd.proto's BatchRequest, BatchOp, BatchResponse, BatchOpResult,
// ErrorInfo and IotlbOp (a test checks them against proto-loader's coding).

/** BatchOp's fields by number, as proto-loader names them (lowerCamelCase); 0 is no field. */
const OP_FIELDS = ['', 'op', 'iova', 'size', 'memory', 'offset', 'perm', 'asid', 'exact'] as const;
const OP_STRINGS = 6;

type Message = Record<string, unknown>;

/** One op's values by field number, reused from op to op. */
const values: unknown[] = new Array(OP_FIELDS.length);

function readOp(r: protobuf.Reader, end: number): Message {
  values.fill(undefined);
  while (r.pos < end) {
    const t = r.uint32();
    const n = t >>> 3;
    if (n >= 1 && n <= OP_STRINGS) {
      expectWireType(t, LEN);
      values[n] = r.string();
    } else if (n === 7) {
      expectWireType(t, VARINT);
      values[n] = r.uint32();
    } else if (n === 8) {
      expectWireType(t, VARINT);
      values[n] = r.bool();
    } else r.skipType(t & 7);
  }
  const op: Message = {};
  for (let n = 1; n < OP_FIELDS.length; n++) {
    const value = values[n];
    if (value !== undefined && value !== '') op[OP_FIELDS[n]!] = value;
  }
  return op;
}

/** The request as src/api reads it; bytes that are no BatchRequest are refused as grpc-js refuses them. */
export function decodeBatchRequest(bytes: Buffer): Message {
  try {
    const r = protobuf.Reader.create(bytes);
    let device: string | undefined;
    let atomic: boolean | undefined;
    let requestId: string | undefined;
    const ops: Message[] = [];
    while (r.pos < r.len) {
      const t = r.uint32();
      switch (t >>> 3) {
        case 1:
          expectWireType(t, LEN);
          device = r.string();
          break;
        case 2:
          expectWireType(t, LEN);
          ops.push(readOp(r, lengthEnd(r)));
          break;
        case 3:
          expectWireType(t, VARINT);
          atomic = r.bool();
          break;
        case 4:
          expectWireType(t, LEN);
          requestId = r.string();
          break;
        default:
          r.skipType(t & 7);
      }
    }
    return {
      ...(device ? { device } : {}),
      ops,
      ...(atomic === undefined ? {} : { atomic }),
      ...(requestId ? { requestId } : {}),
    };
  } catch (e) {
    throw new ServiceError('INTERNAL', `Error deserializing request: ${(e as Error).message}`);
  }
}

function writeOp(w: protobuf.Writer, op: IotlbOp): void {
  w.uint32(tag(3, LEN)).fork();
  w.uint32(tag(1, LEN)).string(op.type);
  w.uint32(tag(2, VARINT)).uint32(op.asid);
  w.uint32(tag(3, LEN)).string(hex(op.iova));
  w.uint32(tag(4, LEN)).string(hex(op.size));
  if (op.type === 'update') {
    w.uint32(tag(5, LEN)).string(op.memory);
    w.uint32(tag(6, LEN)).string(hex(op.offset));
    w.uint32(tag(7, LEN)).string(op.perm);
  }
  w.ldelim();
}

/** The answer's bytes: BatchResponse of formatBatchResult(r), as proto-loader encodes it. */
export function encodeBatchAnswer(r: BatchResult): Buffer {
  const w = protobuf.Writer.create();
  w.uint32(tag(1, VARINT)).bool(r.atomic);
  w.uint32(tag(2, VARINT)).bool(r.committed);
  for (const result of r.results) {
    w.uint32(tag(3, LEN)).fork();
    w.uint32(tag(1, VARINT)).bool(result.ok);
    const error = result.error;
    if (error !== undefined) {
      w.uint32(tag(2, LEN)).fork();
      w.uint32(tag(1, LEN)).string(error.code);
      w.uint32(tag(2, LEN)).string(error.message);
      if (error.field !== undefined) w.uint32(tag(3, LEN)).string(error.field);
      if (error.errno !== undefined) w.uint32(tag(4, LEN)).string(error.errno);
      w.ldelim();
    }
    for (const op of result.ops) writeOp(w, op);
    w.ldelim();
  }
  return w.finish() as Buffer;
}
