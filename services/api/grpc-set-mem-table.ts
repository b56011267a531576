/**
 * SetMemTable over gRPC carries a whole memory table each way (65,536 regions in; 65,536 ops and
 * as many mappings out), which grpc-js would decode and encode in one synchronous piece each,
 * holding every other device's calls for as long. Its messages pass grpc-js as bytes instead, and
 * are decoded and encoded here in slices with the agent hop's codec (src/agent/sliced-codec.ts):
 * the same bytes as grpc-js's own serializer, the same decoded request.
 */
import { deserializeInSlices, serializeInSlices } from '../../src/agent/sliced-codec.ts';
import { formatMapping, formatOp, formatSetMemTableResult, setMemTableCounts } from '../../src/api/format.ts';
import { ServiceError } from '../../src/core/errors.ts';
import type { SetMemTableResult } from '../../src/core/types.ts';
import { mapInTimeSlices } from '../../src/sys/next-turn.ts';
import { mappingMethod, withBytes } from './grpc-bytes.ts';

const method = mappingMethod('SetMemTable');

/** `definition` with SetMemTable (when it has it) taking and giving bytes. */
export const withBytesSetMemTable = withBytes('SetMemTable');

/** The request as grpc-js would have decoded it; bytes that are no SetMemTableRequest as it refuses them. */
export async function decodeSetMemTableRequest(bytes: Buffer): Promise<object> {
  try {
    return await deserializeInSlices(method.requestDeserialize, bytes, 'regions' as keyof object);
  } catch (e) {
    throw new ServiceError('INTERNAL', `Error deserializing request: ${(e as Error).message}`);
  }
}

/**
 * The answer's bytes, field by field in field-number order as protobufjs writes them (dry_run,
 * ops, invalidated, mapped, unchanged, the counts), each list formatted and encoded a slice at a
 * time; a summary, which lists nothing, in one piece.
 */
export async function encodeSetMemTableAnswer(r: SetMemTableResult, summary = false): Promise<Buffer> {
  const encode = method.responseSerialize as (message: object) => Buffer;
  if (summary) return encode(formatSetMemTableResult(r, true));
  const list = async (field: string, items: Promise<object[]>) =>
    serializeInSlices(encode, { [field]: await items } as Record<string, unknown>, field);
  return Buffer.concat([
    encode({ dryRun: r.dryRun }),
    await list('ops', mapInTimeSlices(r.ops, formatOp)),
    await list('invalidated', mapInTimeSlices(r.invalidated, formatMapping)),
    await list('mapped', mapInTimeSlices(r.mapped, formatMapping)),
    encode({ unchanged: r.unchanged, ...setMemTableCounts(r) }),
  ]);
}
