/**
 * JSON Schemas of the API's messages, generated from the proto (services/api/api-table.ts) for
 * fastify's validation and serialization and for the OpenAPI document. The proto gives the shape
 * (fields, lists, nested messages, bool and uint32); what a proto `string` holds on the wire (a
 * u64, an id, one of a few words) is the one rule of {@link FIELD_FORMATS}, the same functions
 * src/api/parse.ts validates with. The schemas check shape; parse.ts keeps the semantics (ranges,
 * which fields go together) behind them.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import protobuf from 'protobufjs';
import { parseId, parseRequestId } from '../../src/api/parse.ts';
import { MAX_REQUEST_ID } from '../../src/core/types.ts';
import { ServiceError } from '../../src/core/errors.ts';
import { invalid, parseU32, parseU64, typeName } from '../../src/core/u64.ts';
import { ID_PATTERN } from '../../src/id.ts';
import { TimeSlices } from '../../src/sys/next-turn.ts';

export type Direction = 'request' | 'response';
type Schema = Record<string, unknown>;

interface WireFormat {
  request: Schema;
  response: Schema;
  /** Throws the semantic validator's error for a value the schema refused (its message). */
  explain?(value: unknown, field: string): void;
}

/**
 * What src/core/u64.ts parses: decimal or 0x hex text (its range checked by parseU64), or a JSON
 * number up to `max` (numbers beyond 2^53-1 are not exact in JSON).
 */
function unsignedText(max: number): Schema {
  return {
    type: ['string', 'integer'],
    pattern: '^(0|[1-9][0-9]*|0[xX][0-9a-fA-F]+)$',
    maxLength: 40,
    minimum: 0,
    maximum: max,
  };
}
const U64: WireFormat = {
  request: {
    ...unsignedText(Number.MAX_SAFE_INTEGER),
    description: 'u64: a decimal or 0x hex string (or a JSON number up to 2^53-1)',
  },
  response: { type: 'string', pattern: '^0x[0-9a-f]+$', description: 'u64 as 0x hex' },
  explain: parseU64,
};
const U32: WireFormat = {
  request: unsignedText(2 ** 32 - 1),
  response: { type: 'integer', minimum: 0, maximum: 2 ** 32 - 1 },
  explain: parseU32,
};
const ID: WireFormat = {
  request: { type: 'string', pattern: ID_PATTERN },
  response: { type: 'string', pattern: ID_PATTERN },
  explain: parseId,
};
const REQUEST_ID: WireFormat = {
  request: {
    type: 'string',
    minLength: 1,
    maxLength: MAX_REQUEST_ID,
    description: 'Idempotency key: a retry with the same key gets the first answer',
  },
  response: { type: 'string' },
  explain: parseRequestId,
};
const decimal = { type: 'string', pattern: '^(0|[1-9][0-9]*)$' };
const DECIMAL: WireFormat = { request: decimal, response: decimal };
/** One of a few words; in requests without `type`, so that any other value gets the enum's message. */
const oneOf = (...words: string[]): WireFormat => ({
  request: { enum: words },
  response: { type: 'string', enum: words },
});

/** What a scalar field holds, by `Message.field` or, for every message, by field name. */
const FIELD_FORMATS: Readonly<Record<string, WireFormat>> = {
  iova: U64,
  size: U64,
  offset: U64,
  first: U64,
  last: U64,
  bytes: U64,
  offeredFeatures: U64,
  negotiatedFeatures: U64,
  mappedBytes: U64,
  protocolFeatures: U64,
  memoryTableBytes: U64,
  'Vring.desc': U64,
  'Vring.avail': U64,
  'Vring.used': U64,
  asid: U32,
  id: ID,
  device: ID,
  memory: ID,
  requestId: REQUEST_ID,
  sequence: DECIMAL,
  fromSequence: DECIMAL,
  perm: oneOf('ro', 'wo', 'rw'),
  'BatchOp.op': oneOf('map', 'unmap'),
  'IotlbOp.type': oneOf('update', 'invalidate'),
  'Device.kind': oneOf('kernel', 'simulated'),
  'Device.iommu': oneOf('platform', 'onchip', 'unknown'),
  'Memory.kind': oneOf('memfd', 'file'),
  'MappingEvent.kind': oneOf('mapped', 'unmapped', 'subscribed'),
  // A simulated device has no node: null in JSON (gRPC: empty).
  'Device.node': { request: { type: 'string' }, response: { type: ['string', 'null'] } },
};

function formatOf(type: protobuf.Type, field: protobuf.Field): WireFormat | undefined {
  return FIELD_FORMATS[`${type.name}.${field.name}`] ?? FIELD_FORMATS[field.name];
}

function scalar(field: protobuf.Field, direction: Direction): Schema {
  switch (field.type) {
    case 'bool':
      return { type: 'boolean' };
    case 'uint32':
      return { type: 'integer', minimum: 0, maximum: 2 ** 32 - 1 };
    // Counters: JSON numbers in REST answers (gRPC: decimal strings).
    case 'uint64':
      return direction === 'response' ? { type: 'integer', minimum: 0 } : { type: ['string', 'integer'] };
    case 'string':
      return { type: 'string' };
    default:
      throw new Error(`${field.fullName}: no JSON Schema for proto type ${field.type}`);
  }
}

function fieldSchema(type: protobuf.Type, field: protobuf.Field, direction: Direction): Schema {
  const format = formatOf(type, field);
  const one =
    field.resolvedType instanceof protobuf.Type
      ? messageSchema(field.resolvedType, direction)
      : format !== undefined
        ? format[direction]
        : scalar(field, direction);
  const words = [field.comment, one.description].filter((w) => typeof w === 'string' && w !== '');
  const described = words.length > 0 ? { ...one, description: words.join(' ') } : one;
  return field.repeated ? { type: 'array', items: described } : described;
}

/** A message as a JSON object of its fields by JSON name; `only`: just these fields. */
export function messageSchema(type: protobuf.Type, direction: Direction, only?: readonly string[]): Schema {
  const fields = type.fieldsArray.filter((f) => only === undefined || only.includes(f.name));
  return {
    type: 'object',
    additionalProperties: false,
    properties: Object.fromEntries(fields.map((f) => [f.name, fieldSchema(type, f, direction)])),
  };
}

interface SchemaError {
  keyword: string;
  instancePath: string;
  params: Record<string, unknown>;
  message?: string;
  data?: unknown;
}

/** `/regions/3/size` as parse.ts names it: `regions[3].size`. */
function fieldPath(pointer: string): string {
  return pointer
    .split('/')
    .slice(1)
    .map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'))
    .reduce((path, s) => (/^[0-9]+$/.test(s) ? `${path}[${s}]` : path === '' ? s : `${path}.${s}`), '');
}

const ARTICLE: Readonly<Record<string, string>> = {
  array: 'an array',
  object: 'an object',
  integer: 'an integer',
};

/**
 * The first error of a schema (ajv's, verbose: it carries the value) as the INVALID_ARGUMENT
 * parse.ts would give, naming the field: `part` is `body`, `querystring` or `params`.
 */
export function schemaError(error: SchemaError, part: string): ServiceError {
  const path = fieldPath(error.instancePath);
  const field = path === '' && part === 'body' ? 'body' : path;
  switch (error.keyword) {
    case 'additionalProperties': {
      const name = String(error.params.additionalProperty);
      const where = path === '' ? name : `${path}.${name}`;
      return invalid(where, part === 'querystring' ? 'unknown query parameter' : 'unknown field');
    }
    case 'enum':
      return invalid(field, `must be one of ${(error.params.allowedValues as unknown[]).join(', ')}`);
  }
  const leaf =
    field
      .replace(/\[[0-9]+\]$/, '')
      .split('.')
      .pop() ?? '';
  const explain = FIELD_FORMATS[leaf]?.explain;
  if (explain !== undefined) {
    try {
      explain(error.data, field);
    } catch (e) {
      if (e instanceof ServiceError) return e;
      throw e;
    }
  }
  if (error.keyword === 'type' && part === 'querystring' && error.params.type === 'boolean') {
    return invalid(field, 'must be true or false');
  }
  if (error.keyword === 'type') {
    const types = [error.params.type].flat().map((t) => ARTICLE[String(t)] ?? `a ${String(t)}`);
    return invalid(field, `must be ${types.join(' or ')}, got ${typeName(error.data)}`);
  }
  return invalid(field, error.message ?? 'is not valid');
}

const REQUEST_AJV = { verbose: true, allowUnionTypes: true };
const exact = new Ajv({ ...REQUEST_AJV, coerceTypes: false });
const coercing = new Ajv({ ...REQUEST_AJV, coerceTypes: true });

/**
 * The validator of one part of a request, first error only: a body as sent ("true" is no boolean),
 * query and path values, always text, coerced to what the schema says (`?dryRun=true`).
 * src/api/parse.ts then checks what a schema cannot (ranges, which fields go together).
 */
export function compileRequestSchema(schema: object, part: string): ValidateFunction {
  if (part !== 'body') return coercing.compile(schema);
  return inSlices(exact.compile(schema));
}

/**
 * Elements of a body's list checked per call of the validator: about 0.1 ms of ajv's work (65,536
 * regions take some 100 ms), so a slice of SLICE_MS holds a few.
 */
const LIST_CHUNK = 64;

/**
 * `validate`, checking a body with a long list (a table of 65,536 regions: some 100 ms in one
 * piece) chunk by chunk, the body with one chunk of the list at a time, giving the event loop
 * back between chunks; fastify awaits the promise. The first error is the one the whole body's
 * validation gives: every chunk meets the fields before the list first and those after it last,
 * so the first error inside the list, in any chunk, comes before anything after the list, and
 * an error before the list is the first of every chunk.
 */
function inSlices(validate: ValidateFunction): ValidateFunction {
  const sliced = ((data: unknown) => {
    const key = longList(data);
    if (key === undefined) {
      const ok = validate(data);
      sliced.errors = validate.errors;
      return ok;
    }
    return validateChunks(validate, data as Record<string, unknown[]>, key).then((error) => {
      sliced.errors = error === undefined ? null : [error];
      return error === undefined;
    });
  }) as ValidateFunction;
  return sliced;
}

/** The body's own field holding the longest list, if it is longer than a chunk. */
function longList(data: unknown): string | undefined {
  if (typeof data !== 'object' || data === null || Array.isArray(data)) return undefined;
  let found: string | undefined;
  let longest = LIST_CHUNK;
  for (const [key, value] of Object.entries(data)) {
    if (Array.isArray(value) && value.length > longest) {
      found = key;
      longest = value.length;
    }
  }
  return found;
}

async function validateChunks(
  validate: ValidateFunction,
  data: Record<string, unknown[]>,
  key: string,
): Promise<ErrorObject | undefined> {
  const list = data[key]!;
  const inList = `/${key.replace(/~/g, '~0').replace(/\//g, '~1')}/`;
  const slices = new TimeSlices(1);
  let outside: ErrorObject | undefined;
  for (let at = 0; at < list.length; at += LIST_CHUNK) {
    if (slices.due()) await slices.next();
    if (validate({ ...data, [key]: list.slice(at, at + LIST_CHUNK) })) continue;
    const error = validate.errors![0]!;
    if (!error.instancePath.startsWith(inList)) {
      // An error on the body itself carries the body (verbose): the whole one, not this chunk's.
      outside ??= error.instancePath === '' ? { ...error, data } : error;
      continue;
    }
    // The element's index in the whole list.
    const rest = error.instancePath.slice(inList.length);
    const slash = rest.indexOf('/');
    const index = Number(slash < 0 ? rest : rest.slice(0, slash)) + at;
    return { ...error, instancePath: `${inList}${index}${slash < 0 ? '' : rest.slice(slash)}` };
  }
  return outside;
}
