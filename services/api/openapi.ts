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

export const SCHEMAS = {
  listDevices: { response: { 200: object({ devices: { type: 'array', items: device } }) } },
  getDevice: { params: deviceParams, response: { 200: object({ device }) } },
  map: {
    params: deviceParams,
    body: {
      type: 'object',
      required: ['iova', 'size', 'memory'],
      additionalProperties: false,
      properties: { ...region.properties, asid, requestId },
    },
    response: { 201: object({ mapping, ops: opList }) },
  },
  listMappings: {
    params: deviceParams,
    querystring: object({ asid }),
    response: { 200: object({ mappings: { type: 'array', items: listedMapping } }) },
  },
  unmap: {
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
    response: {
      200: object({
        matched: { type: 'integer', description: 'Mappings the range touched; 0: nothing was there' },
        removed: mappingList,
        remapped: mappingList,
        ops: opList,
      }),
    },
  },
  setMemTable: {
    params: deviceParams,
    querystring: object({ dryRun: { type: 'boolean', description: 'Return the plan, change nothing' } }),
    body: {
      type: 'object',
      required: ['regions'],
      additionalProperties: false,
      properties: { asid, regions: { type: 'array', items: region }, requestId },
    },
    response: {
      200: object({
        dryRun: { type: 'boolean' },
        ops: opList,
        invalidated: mappingList,
        mapped: mappingList,
        unchanged: { type: 'integer' },
      }),
    },
  },
  batch: {
    params: deviceParams,
    body: batchBody,
    response: {
      200: object({
        atomic: { type: 'boolean' },
        committed: { type: 'boolean' },
        results: {
          type: 'array',
          items: object({ ok: { type: 'boolean' }, error: errorInfo, ops: opList }),
        },
      }),
    },
  },
  submit: { params: deviceParams, body: batchBody, response: { 202: object({ sequence }) } },
  flush: {
    params: deviceParams,
    response: {
      200: object({
        sequence,
        failures: { type: 'array', items: object({ sequence, error: errorInfo }) },
      }),
    },
  },
  listMemory: { response: { 200: object({ memory: { type: 'array', items: memory } }) } },
  registerMemory: {
    body: {
      type: 'object',
      required: ['id'],
      additionalProperties: false,
      description: 'Exactly one of path (open a file under the allowed roots) or size (create)',
      properties: { id, path: { type: 'string' }, size: u64 },
    },
    response: { 201: object({ memory }) },
  },
  unregisterMemory: { params: memoryParams, response: { 204: { type: 'null' } } },
  error: errorBody,
} as const;
