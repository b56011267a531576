/**
 * JSON Schemas of the REST API, for the OpenAPI document only: requests are validated by src/api
 * (shared with gRPC), not by these.
 */
import { ID_PATTERN } from '../../src/id.ts';

const u64 = {
  type: 'string',
  pattern: '^(0|[1-9][0-9]*|0[xX][0-9a-fA-F]+)$',
  description: 'u64: decimal or 0x hex; answered as 0x hex',
} as const;
const id = { type: 'string', pattern: ID_PATTERN } as const;
const perm = { type: 'string', enum: ['ro', 'wo', 'rw'], default: 'rw' } as const;
const asid = { type: 'integer', minimum: 0, maximum: 4294967295, default: 0 } as const;
const requestId = {
  type: 'string',
  minLength: 1,
  maxLength: 128,
  description: 'Idempotency key: a retry with the same key gets the first answer',
} as const;
const sequence = { type: 'string', description: 'decimal' } as const;

const region = {
  type: 'object',
  required: ['iova', 'size', 'memory'],
  additionalProperties: false,
  properties: { iova: u64, size: u64, memory: id, offset: u64, perm },
} as const;

const mapping = {
  type: 'object',
  properties: { iova: u64, size: u64, memory: id, offset: u64, perm, asid },
} as const;

const listedMapping = {
  type: 'object',
  properties: {
    ...mapping.properties,
    missing: { type: 'boolean', description: 'Desired, but not on the device: its memory cannot be opened' },
  },
} as const;

const iotlbOp = {
  type: 'object',
  description: 'One IOTLB message: update (all fields) or invalidate (asid, iova, size)',
  properties: { type: { type: 'string', enum: ['update', 'invalidate'] }, ...mapping.properties },
} as const;

const errorInfo = {
  type: 'object',
  required: ['code', 'message'],
  properties: {
    code: { type: 'string' },
    message: { type: 'string' },
    field: { type: 'string', description: 'The request field at fault, e.g. regions[3].size' },
    errno: { type: 'string', description: "The kernel's errno name" },
  },
} as const;

const errorBody = { type: 'object', properties: { error: errorInfo } } as const;

const device = {
  type: 'object',
  properties: {
    id,
    name: { type: 'string' },
    kind: { type: 'string', enum: ['kernel', 'simulated'] },
    node: { type: ['string', 'null'] },
    deviceId: { type: 'integer' },
    offeredFeatures: u64,
    negotiatedFeatures: u64,
    iovaRange: { type: 'object', properties: { first: u64, last: u64 } },
    asNum: { type: 'integer' },
    groupNum: { type: 'integer' },
    vqCount: { type: 'integer' },
    configSize: { type: 'integer' },
    status: { type: 'integer' },
    iommu: { type: 'string', enum: ['platform', 'onchip', 'unknown'] },
    pinned: { type: 'boolean' },
    ready: { type: 'boolean' },
    mappedBytes: u64,
    mappedEntries: { type: 'integer' },
    degraded: {
      type: 'array',
      description: 'Memories the agent cannot open: their mappings are not on the device',
      items: {
        type: 'object',
        properties: {
          memory: id,
          mappings: { type: 'integer' },
          bytes: u64,
          reason: { type: 'string' },
          remedy: { type: 'string' },
        },
      },
    },
    queueDepth: { type: 'integer' },
    counters: {
      type: 'object',
      properties: Object.fromEntries(
        [
          'messagesWritten',
          'batches',
          'dmaMapCalls',
          'dmaUnmapCalls',
          'setMapPushes',
          'setMapEntriesPushed',
        ].map((k) => [k, { type: 'integer' }]),
      ),
    },
  },
} as const;

const memory = {
  type: 'object',
  properties: {
    id,
    path: { type: 'string' },
    kind: { type: 'string', enum: ['memfd', 'file'] },
    created: { type: 'boolean' },
    size: u64,
    mappedEntries: { type: 'integer' },
  },
} as const;

const batchOp = {
  type: 'object',
  required: ['op', 'iova', 'size'],
  description: 'map: iova, size, memory, offset, perm, asid; unmap: iova, size, asid, exact',
  properties: {
    op: { type: 'string', enum: ['map', 'unmap'] },
    ...region.properties,
    asid,
    exact: { type: 'boolean' },
  },
} as const;

const batchBody = {
  type: 'object',
  required: ['ops'],
  additionalProperties: false,
  properties: { ops: { type: 'array', items: batchOp }, atomic: { type: 'boolean' }, requestId },
} as const;

const mappingList = { type: 'array', items: mapping } as const;
const opList = { type: 'array', items: iotlbOp } as const;

const object = (properties: Record<string, unknown>) => ({ type: 'object', properties }) as const;

const deviceParams = object({ device: id });
const memoryParams = object({ id });

/** What each error status means; every one answers `{"error": {...}}`. */
const ERRORS = {
  400: 'Invalid argument: error.field names the field at fault; nothing changed',
  401: 'Missing or wrong bearer token (when the server is started with one)',
  403: 'Permission denied (a memory path outside the allowed roots)',
  404: 'No such device or memory',
  409: 'Conflicts with the current state (overlap, a split refused by exact, memory still mapped, quota exceeded); nothing changed',
  429: 'Too many requests queued for the device: retry after Retry-After',
  502: "The device refused: error.errno is the kernel's errno",
  503: 'The agent is unavailable: nothing was done; retry after Retry-After',
} as const;
type ErrorStatus = keyof typeof ERRORS;

const READ_ERRORS: readonly ErrorStatus[] = [400, 401, 404];
const WRITE_ERRORS: readonly ErrorStatus[] = [400, 401, 404, 409, 429, 502, 503];

/** The OpenAPI responses of an operation: its answer, then each error it may give. */
function responses(status: number, description: string, schema: object, errors: readonly ErrorStatus[]) {
  return {
    [status]: { description, ...schema },
    ...Object.fromEntries(errors.map((code) => [code, { ...errorBody, description: ERRORS[code] }])),
  };
}

/** One operation's documentation: summary, tag and responses (REST adds `default`: any other error). */
function operation(tag: string, summary: string, description?: string) {
  return { tags: [tag], summary, ...(description === undefined ? {} : { description }) };
}

export const SCHEMAS = {
  listDevices: {
    ...operation('devices', 'List devices', 'Facts, readiness and counters of every device the agent opened'),
    response: responses(200, 'Every device', object({ devices: { type: 'array', items: device } }), [401]),
  },
  getDevice: {
    ...operation('devices', 'Get one device'),
    params: deviceParams,
    response: responses(200, 'The device', object({ device }), READ_ERRORS),
  },
  map: {
    ...operation(
      'mappings',
      'Map a range of memory at an IOVA',
      'Applied, journaled and answered once the device has it; a retry with the same requestId gets the first answer',
    ),
    params: deviceParams,
    body: {
      type: 'object',
      required: ['iova', 'size', 'memory'],
      additionalProperties: false,
      properties: { ...region.properties, asid, requestId },
    },
    response: responses(
      201,
      'Mapped: the mapping and the IOTLB messages sent',
      object({ mapping, ops: opList }),
      WRITE_ERRORS,
    ),
  },
  listMappings: {
    ...operation('mappings', 'List mappings in IOVA order'),
    params: deviceParams,
    querystring: object({ asid }),
    response: responses(
      200,
      'The mappings (missing: desired, but its memory is unavailable)',
      object({ mappings: { type: 'array', items: listedMapping } }),
      READ_ERRORS,
    ),
  },
  unmap: {
    ...operation(
      'mappings',
      'Unmap a range',
      'A mapping only partly covered is invalidated whole and its remainder re-mapped in the same batch, unless exact',
    ),
    params: deviceParams,
    body: {
      type: 'object',
      required: ['iova', 'size'],
      additionalProperties: false,
      properties: {
        iova: u64,
        size: u64,
        asid,
        exact: {
          type: 'boolean',
          description:
            'Refuse instead of splitting a partly covered mapping (409), or when none is there (404)',
        },
        requestId,
      },
    },
    response: responses(
      200,
      'Unmapped: how many mappings the range matched, what was removed, what was re-mapped, the messages sent',
      object({
        matched: { type: 'integer', description: 'Mappings the range touched; 0: nothing was there' },
        removed: mappingList,
        remapped: mappingList,
        ops: opList,
      }),
      WRITE_ERRORS,
    ),
  },
  setMemTable: {
    ...operation(
      'mappings',
      'Set the whole table of an address space',
      'The service applies the smallest safe diff; dryRun returns the plan and changes nothing',
    ),
    params: deviceParams,
    querystring: object({ dryRun: { type: 'boolean', description: 'Return the plan, change nothing' } }),
    body: {
      type: 'object',
      required: ['regions'],
      additionalProperties: false,
      properties: { asid, regions: { type: 'array', items: region }, requestId },
    },
    response: responses(
      200,
      'The plan, applied unless dryRun',
      object({
        dryRun: { type: 'boolean' },
        ops: opList,
        invalidated: mappingList,
        mapped: mappingList,
        unchanged: { type: 'integer' },
      }),
      WRITE_ERRORS,
    ),
  },
  batch: {
    ...operation(
      'mappings',
      'Apply an ordered batch of maps and unmaps',
      'One result per op; atomic: all or nothing',
    ),
    params: deviceParams,
    body: batchBody,
    response: responses(
      200,
      "Each op's result",
      object({
        atomic: { type: 'boolean' },
        committed: { type: 'boolean' },
        results: {
          type: 'array',
          items: object({ ok: { type: 'boolean' }, error: errorInfo, ops: opList }),
        },
      }),
      WRITE_ERRORS,
    ),
  },
  submit: {
    ...operation(
      'mappings',
      'Queue a batch without waiting for it',
      'Answers once the ops are durably queued; flush waits for them',
    ),
    params: deviceParams,
    body: batchBody,
    response: responses(202, 'Queued: its sequence number', object({ sequence }), WRITE_ERRORS),
  },
  flush: {
    ...operation('mappings', 'Wait for every submitted batch', 'Reports the submitted batches that failed'),
    params: deviceParams,
    response: responses(
      200,
      'Everything submitted so far has been applied or has failed',
      object({
        sequence,
        failures: { type: 'array', items: object({ sequence, error: errorInfo }) },
      }),
      [400, 401, 404, 503],
    ),
  },
  listMemory: {
    ...operation('memory', 'List backing memory'),
    response: responses(
      200,
      'Every registered memory',
      object({ memory: { type: 'array', items: memory } }),
      [401],
    ),
  },
  registerMemory: {
    ...operation(
      'memory',
      'Register backing memory',
      "Create a sparse file in the agent's state directory (size), or open a file under an allowed root (path)",
    ),
    body: {
      type: 'object',
      required: ['id'],
      additionalProperties: false,
      description: 'Exactly one of path (open a file under the allowed roots) or size (create)',
      properties: { id, path: { type: 'string' }, size: u64 },
    },
    response: responses(201, 'Registered', object({ memory }), [400, 401, 403, 404, 409, 503]),
  },
  unregisterMemory: {
    ...operation('memory', 'Release backing memory', 'Refused (409) while any device maps it'),
    params: memoryParams,
    response: responses(204, 'Released', { type: 'null' }, [400, 401, 404, 409, 503]),
  },
  error: { ...errorBody, description: 'Any other error, e.g. 500 INTERNAL' },
} as const;
