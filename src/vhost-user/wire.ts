/**
 * The vhost-user wire format (QEMU docs/interop/vhost-user.rst): a 12-byte header (request, flags,
 * payload size; little-endian u32s), then `size` payload bytes, with fds passed alongside the
 * header as SCM_RIGHTS. Pure encoding and strict decoding only: no sockets, no state.
 *
 * The decoder trusts nothing: an unknown request, a wrong size, the wrong number of fds, a region
 * that wraps or overlaps another, a vring index or config range out of bounds is a {@link WireError}
 * naming the field, and the connection is to be closed.
 */
import { U64_LIMIT } from '../u64.ts';

export const HEADER_SIZE = 12;
/** Flags: bits 0-1 the protocol version (1), bit 2 a reply, bit 3 the front-end wants a reply. */
export const VERSION = 0x1;
const VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;
/** VHOST_MEMORY_BASELINE_NREGIONS: regions in one SET_MEM_TABLE (and fds in any message). */
const MAX_MEM_TABLE_REGIONS = 8;
/** VHOST_USER_MAX_CONFIG_SIZE */
export const MAX_CONFIG_SIZE = 256;
const CONFIG_HEADER_SIZE = 12;
/** The largest payload of any request this decoder knows (GET_CONFIG/SET_CONFIG of 256 bytes). */
export const MAX_PAYLOAD = CONFIG_HEADER_SIZE + MAX_CONFIG_SIZE;
const REGION_SIZE = 32;

/** Front-end requests (vhost-user.rst "Front-end message types"), the ones a blk backend serves. */
export const Request = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
} as const;
type RequestName = keyof typeof Request;
const REQUEST_NAMES = new Map<number, RequestName>(
  Object.entries(Request).map(([name, code]) => [code, name as RequestName]),
);

function requestName(code: number): string {
  return REQUEST_NAMES.get(code) ?? `request ${code}`;
}

/** Protocol feature bits (VHOST_USER_PROTOCOL_F_*). */
export const ProtocolFeature = {
  MQ: 0,
  REPLY_ACK: 3,
  CONFIG: 9,
  CONFIGURE_MEM_SLOTS: 15,
} as const;

export function protocolFeatureMask(...names: (keyof typeof ProtocolFeature)[]): bigint {
  return names.reduce((m, n) => m | (1n << BigInt(ProtocolFeature[n])), 0n);
}

/** VHOST_USER_F_PROTOCOL_FEATURES: a virtio feature bit that only vhost-user uses. */
export const F_PROTOCOL_FEATURES = 1n << 30n;
/** SET_VRING_KICK/CALL/ERR: bits 0-7 the vring index, bit 8 "no fd" (polling mode). */
const VRING_INDEX_MASK = 0xffn;
const VRING_NOFD = 0x100n;
/** SET_VRING_ADDR flags: bit 0 VHOST_VRING_F_LOG. */
const VRING_ADDR_FLAGS = 0x1;

export class WireError extends Error {
  constructor(
    message: string,
    /** The offending field: `header.size`, `regions[1].guestAddr`, `fds`, ... */
    readonly field: string,
  ) {
    super(message);
    this.name = 'WireError';
  }
}

export interface Header {
  request: number;
  flags: number;
  size: number;
}

/** One memory region as the front-end describes it (VhostUserMemoryRegion). */
export interface MemoryRegion {
  /** Guest physical address: the IOVA the device uses. */
  guestAddr: bigint;
  size: bigint;
  /** The front-end's own virtual address of the region: what SET_VRING_ADDR speaks in. */
  userAddr: bigint;
  /** Where the region starts in the fd's file. */
  mmapOffset: bigint;
}

export interface VringAddr {
  index: number;
  /** VHOST_VRING_F_LOG */
  log: boolean;
  /** Front-end virtual addresses. */
  desc: bigint;
  used: bigint;
  avail: bigint;
  /** Guest physical address of the used ring, for dirty logging. */
  logAddr: bigint;
}

/** A decoded front-end request. Fds are moved into the message; the caller owns (and closes) them. */
export type Message = { needReply: boolean } & (
  | {
      request:
        | 'GET_FEATURES'
        | 'SET_OWNER'
        | 'RESET_OWNER'
        | 'GET_PROTOCOL_FEATURES'
        | 'GET_QUEUE_NUM'
        | 'GET_MAX_MEM_SLOTS';
    }
  | { request: 'SET_FEATURES' | 'SET_PROTOCOL_FEATURES'; value: bigint }
  | { request: 'SET_MEM_TABLE'; regions: MemoryRegion[]; fds: number[] }
  | { request: 'ADD_MEM_REG'; region: MemoryRegion; fd: number }
  | { request: 'REM_MEM_REG'; region: MemoryRegion }
  | {
      request: 'SET_VRING_NUM' | 'SET_VRING_BASE' | 'GET_VRING_BASE' | 'SET_VRING_ENABLE';
      index: number;
      num: number;
    }
  | { request: 'SET_VRING_ADDR'; addr: VringAddr }
  | { request: 'SET_VRING_KICK' | 'SET_VRING_CALL' | 'SET_VRING_ERR'; index: number; fd: number | null }
  | { request: 'GET_CONFIG'; offset: number; size: number; flags: number }
  | { request: 'SET_CONFIG'; offset: number; flags: number; data: Buffer }
);

/** Checks a header before its payload is read: version, flags, a known request, size bounds. */
export function decodeHeader(buf: Buffer): Header {
  if (buf.byteLength !== HEADER_SIZE) {
    throw new WireError(`header is ${buf.byteLength} bytes, not ${HEADER_SIZE}`, 'header');
  }
  const header = { request: buf.readUInt32LE(0), flags: buf.readUInt32LE(4), size: buf.readUInt32LE(8) };
  const what = requestName(header.request);
  if (!REQUEST_NAMES.has(header.request)) {
    throw new WireError(`unknown or unsupported ${what}`, 'header.request');
  }
  if ((header.flags & VERSION_MASK) !== VERSION) {
    throw new WireError(
      `${what}: protocol version ${header.flags & VERSION_MASK}, not ${VERSION}`,
      'header.flags',
    );
  }
  if ((header.flags & ~(VERSION_MASK | FLAG_NEED_REPLY)) !== 0) {
    throw new WireError(`${what}: unexpected flags 0x${header.flags.toString(16)}`, 'header.flags');
  }
  if (header.size > MAX_PAYLOAD) {
    throw new WireError(`${what}: payload of ${header.size} bytes exceeds ${MAX_PAYLOAD}`, 'header.size');
  }
  return header;
}

/** Decodes one request. On a WireError the caller still owns `fds` and must close them. */
export function decodeMessage(header: Header, payload: Buffer, fds: readonly number[]): Message {
  const name = REQUEST_NAMES.get(header.request);
  if (name === undefined) throw new WireError(`unknown ${requestName(header.request)}`, 'header.request');
  if (payload.byteLength !== header.size) {
    throw new WireError(
      `${name}: payload is ${payload.byteLength} bytes, header says ${header.size}`,
      'header.size',
    );
  }
  const needReply = (header.flags & FLAG_NEED_REPLY) !== 0;
  const size = (n: number) => {
    if (payload.byteLength !== n) {
      throw new WireError(`${name}: payload must be ${n} bytes, got ${payload.byteLength}`, 'header.size');
    }
  };
  const fdCount = (n: number) => {
    if (fds.length !== n) throw new WireError(`${name}: expects ${n} fds, got ${fds.length}`, 'fds');
  };
  switch (name) {
    case 'GET_FEATURES':
    case 'SET_OWNER':
    case 'RESET_OWNER':
    case 'GET_PROTOCOL_FEATURES':
    case 'GET_QUEUE_NUM':
    case 'GET_MAX_MEM_SLOTS':
      size(0);
      fdCount(0);
      return { request: name, needReply };
    case 'SET_FEATURES':
    case 'SET_PROTOCOL_FEATURES':
      size(8);
      fdCount(0);
      return { request: name, needReply, value: payload.readBigUInt64LE(0) };
    case 'SET_MEM_TABLE': {
      if (payload.byteLength < 8) throw new WireError(`${name}: payload shorter than 8 bytes`, 'header.size');
      const count = payload.readUInt32LE(0);
      if (count > MAX_MEM_TABLE_REGIONS) {
        throw new WireError(`${name}: ${count} regions, at most ${MAX_MEM_TABLE_REGIONS}`, 'nregions');
      }
      size(8 + count * REGION_SIZE);
      fdCount(count);
      const regions = Array.from({ length: count }, (_, i) =>
        decodeRegion(payload, 8 + i * REGION_SIZE, `regions[${i}]`),
      );
      checkNoOverlap(regions);
      return { request: name, needReply, regions, fds: [...fds] };
    }
    case 'ADD_MEM_REG':
    case 'REM_MEM_REG': {
      // VhostUserMemRegMsg: u64 padding, then one region.
      size(8 + REGION_SIZE);
      const region = decodeRegion(payload, 8, 'region');
      if (name === 'ADD_MEM_REG') {
        fdCount(1);
        return { request: name, needReply, region, fd: fds[0]! };
      }
      // QEMU sends REM_MEM_REG with the region's fd on some versions; none is needed.
      if (fds.length > 1) throw new WireError(`${name}: expects at most 1 fd, got ${fds.length}`, 'fds');
      return { request: name, needReply, region };
    }
    case 'SET_VRING_NUM':
    case 'SET_VRING_BASE':
    case 'GET_VRING_BASE':
    case 'SET_VRING_ENABLE':
      size(8);
      fdCount(0);
      return { request: name, needReply, index: payload.readUInt32LE(0), num: payload.readUInt32LE(4) };
    case 'SET_VRING_ADDR': {
      size(40);
      fdCount(0);
      const flags = payload.readUInt32LE(4);
      if ((flags & ~VRING_ADDR_FLAGS) !== 0) {
        throw new WireError(`${name}: unknown flags 0x${flags.toString(16)}`, 'flags');
      }
      return {
        request: name,
        needReply,
        addr: {
          index: payload.readUInt32LE(0),
          log: (flags & VRING_ADDR_FLAGS) !== 0,
          desc: payload.readBigUInt64LE(8),
          used: payload.readBigUInt64LE(16),
          avail: payload.readBigUInt64LE(24),
          logAddr: payload.readBigUInt64LE(32),
        },
      };
    }
    case 'SET_VRING_KICK':
    case 'SET_VRING_CALL':
    case 'SET_VRING_ERR': {
      size(8);
      const value = payload.readBigUInt64LE(0);
      if ((value & ~(VRING_INDEX_MASK | VRING_NOFD)) !== 0n) {
        throw new WireError(`${name}: unknown bits in 0x${value.toString(16)}`, 'payload');
      }
      const noFd = (value & VRING_NOFD) !== 0n;
      fdCount(noFd ? 0 : 1);
      return { request: name, needReply, index: Number(value & VRING_INDEX_MASK), fd: noFd ? null : fds[0]! };
    }
    case 'GET_CONFIG':
    case 'SET_CONFIG': {
      if (payload.byteLength < CONFIG_HEADER_SIZE) {
        throw new WireError(`${name}: payload shorter than ${CONFIG_HEADER_SIZE} bytes`, 'header.size');
      }
      fdCount(0);
      const offset = payload.readUInt32LE(0);
      const length = payload.readUInt32LE(4);
      const flags = payload.readUInt32LE(8);
      size(CONFIG_HEADER_SIZE + length);
      if (offset + length > MAX_CONFIG_SIZE) {
        throw new WireError(
          `${name}: config range [${offset}, +${length}) is past ${MAX_CONFIG_SIZE} bytes`,
          'offset',
        );
      }
      if (name === 'GET_CONFIG') return { request: name, needReply, offset, size: length, flags };
      return {
        request: name,
        needReply,
        offset,
        flags,
        data: Buffer.from(payload.subarray(CONFIG_HEADER_SIZE)),
      };
    }
  }
}

function decodeRegion(buf: Buffer, at: number, field: string): MemoryRegion {
  const region = {
    guestAddr: buf.readBigUInt64LE(at),
    size: buf.readBigUInt64LE(at + 8),
    userAddr: buf.readBigUInt64LE(at + 16),
    mmapOffset: buf.readBigUInt64LE(at + 24),
  };
  if (region.size === 0n) throw new WireError(`${field}: size is 0`, `${field}.size`);
  for (const key of ['guestAddr', 'userAddr', 'mmapOffset'] as const) {
    if (region[key] + region.size > U64_LIMIT) {
      throw new WireError(`${field}: ${key} + size runs past 2^64`, `${field}.${key}`);
    }
  }
  return region;
}

/** Two regions may share neither guest physical nor front-end virtual addresses. */
function checkNoOverlap(regions: readonly MemoryRegion[]): void {
  for (const key of ['guestAddr', 'userAddr'] as const) {
    const sorted = regions.map((r, i) => ({ r, i })).sort((a, b) => (a.r[key] < b.r[key] ? -1 : 1));
    for (let k = 1; k < sorted.length; k++) {
      const prev = sorted[k - 1]!;
      const cur = sorted[k]!;
      if (prev.r[key] + prev.r.size > cur.r[key]) {
        throw new WireError(
          `regions[${prev.i}] and regions[${cur.i}] overlap in ${key}`,
          `regions[${cur.i}].${key}`,
        );
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// encoding (replies from the backend; requests for front-ends and tests)

export function encodeHeader(request: number, flags: number, size: number): Buffer {
  const buf = Buffer.alloc(HEADER_SIZE);
  buf.writeUInt32LE(request, 0);
  buf.writeUInt32LE(flags, 4);
  buf.writeUInt32LE(size, 8);
  return buf;
}

/** A reply: header (version 1, REPLY) and payload in one buffer. */
export function encodeReply(request: number, payload: Buffer): Buffer {
  return Buffer.concat([encodeHeader(request, VERSION | FLAG_REPLY, payload.byteLength), payload]);
}

export function u64Payload(value: bigint): Buffer {
  const buf = Buffer.alloc(8);
  buf.writeBigUInt64LE(value);
  return buf;
}

export function vringStatePayload(index: number, num: number): Buffer {
  const buf = Buffer.alloc(8);
  buf.writeUInt32LE(index, 0);
  buf.writeUInt32LE(num, 4);
  return buf;
}

export function configPayload(offset: number, flags: number, data: Buffer): Buffer {
  const head = Buffer.alloc(CONFIG_HEADER_SIZE);
  head.writeUInt32LE(offset, 0);
  head.writeUInt32LE(data.byteLength, 4);
  head.writeUInt32LE(flags, 8);
  return Buffer.concat([head, data]);
}

function regionPayload(region: MemoryRegion, into = Buffer.alloc(REGION_SIZE), at = 0): Buffer {
  into.writeBigUInt64LE(region.guestAddr, at);
  into.writeBigUInt64LE(region.size, at + 8);
  into.writeBigUInt64LE(region.userAddr, at + 16);
  into.writeBigUInt64LE(region.mmapOffset, at + 24);
  return into;
}

export function memTablePayload(regions: readonly MemoryRegion[]): Buffer {
  const buf = Buffer.alloc(8 + regions.length * REGION_SIZE);
  buf.writeUInt32LE(regions.length, 0);
  regions.forEach((r, i) => {
    regionPayload(r, buf, 8 + i * REGION_SIZE);
  });
  return buf;
}

export function memRegPayload(region: MemoryRegion): Buffer {
  return Buffer.concat([Buffer.alloc(8), regionPayload(region)]);
}

export function vringAddrPayload(addr: VringAddr): Buffer {
  const buf = Buffer.alloc(40);
  buf.writeUInt32LE(addr.index, 0);
  buf.writeUInt32LE(addr.log ? VRING_ADDR_FLAGS : 0, 4);
  buf.writeBigUInt64LE(addr.desc, 8);
  buf.writeBigUInt64LE(addr.used, 16);
  buf.writeBigUInt64LE(addr.avail, 24);
  buf.writeBigUInt64LE(addr.logAddr, 32);
  return buf;
}

/** SET_VRING_KICK/CALL/ERR payload: the index, with the "no fd" bit when `hasFd` is false. */
export function vringFdPayload(index: number, hasFd: boolean): Buffer {
  return u64Payload(BigInt(index) | (hasFd ? 0n : VRING_NOFD));
}

/** A request frame as a front-end sends it. */
export function encodeRequest(request: number, payload: Buffer, needReply = false): Buffer {
  return Buffer.concat([
    encodeHeader(request, VERSION | (needReply ? FLAG_NEED_REPLY : 0), payload.byteLength),
    payload,
  ]);
}

/** Decodes a reply frame (front-end side, tests): header checks, then the raw payload. */
export function decodeReply(frame: Buffer, request: number): Buffer {
  if (frame.byteLength < HEADER_SIZE) throw new WireError('reply shorter than a header', 'header');
  const flags = frame.readUInt32LE(4);
  if (frame.readUInt32LE(0) !== request || flags !== (VERSION | FLAG_REPLY)) {
    throw new WireError(`not a reply to ${requestName(request)}`, 'header');
  }
  const size = frame.readUInt32LE(8);
  if (frame.byteLength !== HEADER_SIZE + size) throw new WireError('reply size mismatch', 'header.size');
  return frame.subarray(HEADER_SIZE);
}
