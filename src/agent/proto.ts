/**
 * The agent protocol's messages, loaded once from proto/vdpa/agent/v1/agent.proto with protobufjs:
 * for every method of `vdpa.agent.v1.Agent`, its request and answer as bytes and back (the wire
 * shapes of wire.ts), and the error of a failed call. frames.ts carries them on the socket.
 */
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';
import type { WireCallError } from './errors.ts';
import { WIRE_OBJECT_OPTIONS } from './wire.ts';

export const AGENT_PROTO_PATH = fileURLToPath(
  new URL('../../proto/vdpa/agent/v1/agent.proto', import.meta.url),
);

/** One message type's coding: `serialize` takes a wire object, `deserialize` gives one. */
export interface MessageCoding<T = unknown> {
  serialize(message: T): Buffer;
  deserialize(bytes: Buffer): T;
}

export interface AgentMethod<Req extends object = object, Res extends object = object> {
  name: string;
  /** An answer is a stream of events (WatchAttachments), not one message. */
  responseStream: boolean;
  requestSerialize(message: Req): Buffer;
  requestDeserialize(bytes: Buffer): Req;
  responseSerialize(message: Res): Buffer;
  responseDeserialize(bytes: Buffer): Res;
}

const root = protobuf.loadSync(AGENT_PROTO_PATH);
root.resolveAll();

function coding<T>(type: protobuf.Type): MessageCoding<T> {
  return {
    serialize: (message) => type.encode(type.fromObject(message as object)).finish() as Buffer,
    deserialize: (bytes) => type.toObject(type.decode(bytes), WIRE_OBJECT_OPTIONS) as T,
  };
}

/** Method table of `vdpa.agent.v1.Agent`, by method name. */
export const agentService: Readonly<Record<string, AgentMethod>> = Object.fromEntries(
  root.lookupService('vdpa.agent.v1.Agent').methodsArray.map((m) => {
    const request = coding<object>(m.resolvedRequestType!);
    const response = coding<object>(m.resolvedResponseType!);
    const method: AgentMethod = {
      name: m.name,
      responseStream: m.responseStream === true,
      requestSerialize: request.serialize,
      requestDeserialize: request.deserialize,
      responseSerialize: response.serialize,
      responseDeserialize: response.deserialize,
    };
    return [m.name, method];
  }),
);

/** The CallError of an error frame. */
export const callErrorCoding = coding<WireCallError>(root.lookupType('vdpa.agent.v1.CallError'));

/** Largest message either end accepts: ListMapped of a big table runs to tens of MiB. */
export const MAX_MESSAGE_BYTES = 64 << 20;
