/**
 * What each RPC of vdpa.mapd.v1 does, for both transports: parse (src/api), call the service,
 * format the answer. A message is the request as one plain object by JSON names (gRPC: the decoded
 * message; REST: path, query and body fields together). WatchMappings streams: gRPC's own.
 */
import {
  formatAttachment,
  formatBatchResult,
  formatDevice,
  formatFlushResult,
  formatMapping,
  formatMapResult,
  formatMemory,
  formatSetMemTableResult,
  formatSubmitResult,
  formatUnmapResult,
} from '../../src/api/format.ts';
import {
  type ApiLimits,
  parseAsidFilter,
  parseAttach,
  parseBatch,
  parseBoolParam,
  parseId,
  parseMap,
  parseRegisterMemory,
  parseSetMemTable,
  parseUnmap,
} from '../../src/api/parse.ts';
import type { BatchResult, MapdService, SetMemTableResult } from '../../src/core/types.ts';
import { API_METHODS } from './api-table.ts';

export type Message = Readonly<Record<string, unknown>>;
export type Handler = (message: Message) => Promise<object>;

/** The message without the fields read on their own (the device, dryRun, summary). */
function rest(message: Message, ...read: string[]): Message {
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(message)) {
    if (read.includes(key)) continue;
    // A JSON body's own `__proto__` stays a field (and is refused as unknown), never a prototype.
    if (key === '__proto__') Object.defineProperty(out, key, { value: message[key], enumerable: true });
    else out[key] = message[key];
  }
  return out;
}

function device(message: Message): string {
  return parseId(message.device, 'device');
}

/** How a transport words an answer where it differs (REST streams a large SetMemTable answer). */
export interface AnswerFormats {
  /** `summary`: the counts without the lists (formatSetMemTableResult). */
  setMemTable: (r: SetMemTableResult, summary: boolean) => object | Promise<object>;
  /** Default: formatBatchResult (gRPC writes Batch's answer bytes itself). */
  batch?: (r: BatchResult) => object;
}

export function apiHandlers(
  service: MapdService,
  limits: ApiLimits,
  formats: AnswerFormats = { setMemTable: formatSetMemTableResult },
): Readonly<Record<string, Handler>> {
  const batchAnswer = formats.batch ?? formatBatchResult;
  const handlers: Record<string, Handler> = {
    ListDevices: async () => ({ devices: (await service.listDevices()).map(formatDevice) }),
    GetDevice: async (m) => ({ device: formatDevice(await service.getDevice(device(m))) }),
    AttachDevice: async (m) => ({
      attachment: formatAttachment(await service.attachDevice(parseAttach(device(m), rest(m, 'device')))),
    }),
    DetachDevice: async (m) => {
      await service.detachDevice(device(m));
      return {};
    },
    Map: async (m) => formatMapResult(await service.map(parseMap(device(m), rest(m, 'device')))),
    Unmap: async (m) => formatUnmapResult(await service.unmap(parseUnmap(device(m), rest(m, 'device')))),
    SetMemTable: async (m) => {
      const dryRun = parseBoolParam(m.dryRun, 'dryRun');
      const summary = parseBoolParam(m.summary, 'summary');
      const body = rest(m, 'device', 'dryRun', 'summary');
      const req = await parseSetMemTable(device(m), body, dryRun, limits);
      return formats.setMemTable(await service.setMemTable(req), summary);
    },
    Batch: async (m) => batchAnswer(await service.batch(parseBatch(device(m), rest(m, 'device'), limits))),
    Submit: async (m) =>
      formatSubmitResult(await service.submit(parseBatch(device(m), rest(m, 'device'), limits))),
    Flush: async (m) => formatFlushResult(await service.flush(device(m))),
    ListMappings: async (m) => {
      const mappings = await service.listMappings(device(m), parseAsidFilter(m.asid));
      return { mappings: mappings.map(formatMapping) };
    },
    RegisterMemory: async (m) => ({
      memory: formatMemory(await service.registerMemory(parseRegisterMemory(m))),
    }),
    ListMemory: async () => ({ memory: (await service.listMemory()).map(formatMemory) }),
    UnregisterMemory: async (m) => {
      await service.unregisterMemory(parseId(m.id, 'id'));
      return {};
    },
  };
  const unary = API_METHODS.filter((m) => !m.serverStreaming).map((m) => m.name);
  const missing = unary.filter((name) => handlers[name] === undefined);
  const extra = Object.keys(handlers).filter((name) => !unary.includes(name));
  if (missing.length > 0 || extra.length > 0) {
    throw new Error(
      `handlers and the proto differ: missing ${missing.join(', ')}; unknown ${extra.join(', ')}`,
    );
  }
  return handlers;
}
