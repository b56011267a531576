/**
 * What a decoded record or snapshot must look like (fields, types, ranges of every bigint). A frame
 * whose CRC matches but whose content fails these checks was not written by this code: it is
 * damage, like a frame whose CRC does not match.
 */
import { z } from 'zod';
import { PERMS } from '../iotlb/types.ts';
import type { ServiceErrorCode } from '../core/errors.ts';
import type { Change, StateSnapshot } from './desired.ts';
import { U32_MAX, U64_MAX } from '../u64.ts';

const u64 = z.bigint().min(0n).max(U64_MAX);
const nonZeroU64 = z.bigint().min(1n).max(U64_MAX);
/** Sequence numbers are handed out from 1. */
const sequence = nonZeroU64;
const u32 = z.number().int().min(0).max(U32_MAX);
const name = z.string().min(1);

const errorInfo = z.strictObject({
  // The codes are the error catalog's (core/errors.ts); their spelling is what is checked here.
  code: z.custom<ServiceErrorCode>(
    (v) => typeof v === 'string' && /^[A-Z][A-Z_]*$/.test(v),
    'expected an error code',
  ),
  message: z.string(),
  field: z.string().optional(),
  errno: z.string().optional(),
});

const mapping = z.strictObject({
  asid: u32,
  iova: u64,
  size: nonZeroU64,
  memory: name,
  offset: u64,
  perm: z.enum(PERMS as readonly ['ro', 'wo', 'rw']),
});

const memoryRecord = z.strictObject({
  id: name,
  path: z.string(),
  kind: z.enum(['memfd', 'file']),
  created: z.boolean(),
  size: u64,
  registeredAt: z.string(),
});

const batchOp = z.discriminatedUnion('op', [
  mapping.extend({ op: z.literal('map') }),
  z.strictObject({ op: z.literal('unmap'), asid: u32, iova: u64, size: u64, exact: z.boolean().optional() }),
]);

const pendingSubmit = z.strictObject({ sequence, ops: z.array(batchOp), atomic: z.boolean() });
const submitFailure = z.strictObject({ sequence, error: errorInfo });
const idempotencyRecord = z.strictObject({
  requestId: name,
  digest: name,
  // The stored answer (service/idempotency.ts): the result as given, or the error's info.
  answer: z.union([z.strictObject({ ok: z.unknown().optional() }), z.strictObject({ error: errorInfo })]),
});

const attachmentRecord = z.strictObject({
  device: name,
  socketPath: name,
  group: name.optional(),
});

const change: z.ZodType<Change> = z.discriminatedUnion('t', [
  z.strictObject({ t: z.literal('memory.put'), memory: memoryRecord }),
  z.strictObject({ t: z.literal('memory.delete'), id: name }),
  z.strictObject({ t: z.literal('mapping.put'), device: name, mapping }),
  z.strictObject({ t: z.literal('mapping.delete'), device: name, asid: u32, iova: u64 }),
  z.strictObject({ t: z.literal('sequence'), device: name, next: sequence }),
  z.strictObject({ t: z.literal('pending.put'), device: name, submit: pendingSubmit }),
  z.strictObject({ t: z.literal('pending.delete'), device: name, sequence }),
  z.strictObject({ t: z.literal('failure.add'), device: name, failure: submitFailure }),
  z.strictObject({ t: z.literal('failures.clear'), device: name, through: u64 }),
  z.strictObject({ t: z.literal('idempotency.put'), device: name, record: idempotencyRecord }),
  z.strictObject({ t: z.literal('attachment.put'), attachment: attachmentRecord }),
  z.strictObject({ t: z.literal('attachment.delete'), device: name }),
]);

export const changesSchema = z.array(change).min(1);

export const stateSchema: z.ZodType<StateSnapshot> = z.strictObject({
  memory: z.array(memoryRecord),
  devices: z.array(
    z.strictObject({
      name,
      nextSequence: sequence,
      mappings: z.array(mapping),
      pending: z.array(pendingSubmit),
      failures: z.array(submitFailure),
      idempotency: z.array(idempotencyRecord),
    }),
  ),
  // Snapshots written before attachments were kept have none.
  attachments: z.array(attachmentRecord).optional(),
});

/**
 * The format every file of the state directory is written in. Version 2 journals may hold a
 * record in parts (journalPartSchema); version 1 files are read and rewritten in version 2 on
 * open (an older vdpa-mapd refuses version 2 as a format rather than misreading its parts as
 * damage). Other versions are refused.
 */
export const FORMAT_VERSION = 2;
export const READ_VERSIONS: readonly number[] = [1, 2];
const readVersion = z
  .number()
  .refine((v) => READ_VERSIONS.includes(v), { message: `a version of ${READ_VERSIONS.join(', ')}` });
export const JOURNAL_MAGIC = 'vdpa-mapd journal';
export const SNAPSHOT_MAGIC = 'vdpa-mapd snapshot';

const generation = z.number().int().min(0);

/** The first frame of journal.<gen>: the first record after it has sequence number `after + 1`. */
export const journalHeaderSchema = z.strictObject({
  magic: z.literal(JOURNAL_MAGIC),
  version: readVersion,
  gen: generation,
  after: u64,
});
export type JournalHeader = z.infer<typeof journalHeaderSchema>;

/** Every later frame: one group commit, numbered. */
export const journalRecordSchema = z.strictObject({ seq: sequence, changes: changesSchema });

/**
 * Or one part of a record too large for one frame: parts 1..`parts` of record `seq`, each holding
 * the next of its changes. Other records may come between them (journal.ts); the record counts
 * only once its last part is there.
 */
export const journalPartSchema = z
  .strictObject({
    seq: sequence,
    part: z.number().int().min(1),
    parts: z.number().int().min(2),
    changes: changesSchema,
  })
  .refine((p) => p.part <= p.parts, { message: 'part past the number of parts', path: ['part'] });
export type JournalPart = z.infer<typeof journalPartSchema>;

/** The one frame of `snapshot`: the state through record `seq`, the start of journal.<gen>. */
export const snapshotSchema = z.strictObject({
  magic: z.literal(SNAPSHOT_MAGIC),
  version: readVersion,
  gen: generation,
  seq: u64,
  state: stateSchema,
});

/** The files of before format versions existed: snapshot `{ gen, state }`, records bare `Change[]`. */
export const legacySnapshotSchema = z.strictObject({ gen: generation, state: stateSchema });

/** The version a decoded header claims, when it is one of ours (magic present). */
export function claimedVersion(value: unknown, magic: string): unknown {
  if (typeof value !== 'object' || value === null || (value as { magic?: unknown }).magic !== magic) {
    return undefined;
  }
  return (value as { version?: unknown }).version ?? null;
}

/** Why `value` fails `schema` ("changes.0.mapping.size: ..."), or undefined when it passes. */
export function schemaProblem(schema: z.ZodType, value: unknown): string | undefined {
  const result = schema.safeParse(value);
  if (result.success) return undefined;
  const issue = result.error.issues[0]!;
  return `${issue.path.join('.') || '(record)'}: ${issue.message}`;
}
