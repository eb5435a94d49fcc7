import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

/**
 * The vendored Envoy ext_proc and gRPC health protos (proto/README.md), loaded at run time.
 * The folder is found relative to the package root: src/epp and dist/epp are both two levels
 * below it, so the same path works from the sources (tests) and the build.
 */
export const PROTO_DIR = fileURLToPath(new URL('../../proto', import.meta.url));

export const EXT_PROC_SERVICE = 'envoy.service.ext_proc.v3.ExternalProcessor';
export const HEALTH_SERVICE = 'grpc.health.v1.Health';

export interface LoadedProtos {
  extProc: grpc.ServiceClientConstructor;
  health: grpc.ServiceClientConstructor;
}

let cached: LoadedProtos | undefined;

/** Loads the service definitions once (field names as in the .proto, enums as names, bytes as Buffers). */
export function loadProtos(): LoadedProtos {
  if (cached) return cached;
  if (!existsSync(`${PROTO_DIR}/envoy/service/ext_proc/v3/external_processor.proto`)) {
    throw new Error(`kvgate epp: the vendored protos are missing from ${PROTO_DIR} (the proto/ folder must ship beside dist/)`);
  }
  const def = protoLoader.loadSync(['envoy/service/ext_proc/v3/external_processor.proto', 'grpc/health/v1/health.proto'], {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(def) as unknown as Record<string, unknown>;
  const lookup = (name: string) => name.split('.').reduce<unknown>((o, k) => (o as Record<string, unknown>)[k], pkg) as grpc.ServiceClientConstructor;
  cached = { extProc: lookup(EXT_PROC_SERVICE), health: lookup(HEALTH_SERVICE) };
  return cached;
}

// The message shapes kvgate reads and writes (proto field names; only the fields used).

export interface HeaderValue {
  key: string;
  value?: string;
  raw_value?: Buffer;
}
export interface HeaderMap {
  headers?: HeaderValue[];
}
export interface HttpHeaders {
  headers?: HeaderMap;
  end_of_stream?: boolean;
}
export interface HttpBody {
  body?: Buffer;
  end_of_stream?: boolean;
}
/**
 * google.protobuf.Struct as proto-loader decodes it. protobufjs defines the google/protobuf types
 * itself, with camelCase field names (keepCase applies only to the vendored files).
 */
export interface PbStruct {
  fields?: Record<string, PbValue>;
}
export interface PbValue {
  kind?: string;
  nullValue?: string;
  numberValue?: number;
  stringValue?: string;
  boolValue?: boolean;
  structValue?: PbStruct;
  listValue?: { values?: PbValue[] };
}
export type BodySendMode = 'NONE' | 'STREAMED' | 'BUFFERED' | 'BUFFERED_PARTIAL' | 'FULL_DUPLEX_STREAMED' | 'GRPC';
export interface ProcessingRequest {
  request?: string;
  request_headers?: HttpHeaders;
  response_headers?: HttpHeaders;
  request_body?: HttpBody;
  response_body?: HttpBody;
  request_trailers?: { trailers?: HeaderMap };
  response_trailers?: { trailers?: HeaderMap };
  metadata_context?: { filter_metadata?: Record<string, PbStruct> };
  observability_mode?: boolean;
  protocol_config?: { request_body_mode?: BodySendMode; response_body_mode?: BodySendMode; send_body_without_waiting_for_header_response?: boolean };
}

/** A JSON value as a google.protobuf.Value (what dynamic_metadata carries). */
export function toPbValue(v: unknown): PbValue {
  if (v === null || v === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'number') return { numberValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toPbValue) } };
  return { structValue: toPbStruct(v as Record<string, unknown>) };
}

export function toPbStruct(o: Record<string, unknown>): PbStruct {
  const fields: Record<string, PbValue> = {};
  for (const [k, v] of Object.entries(o)) fields[k] = toPbValue(v);
  return { fields };
}

/** A google.protobuf.Value as plain JSON. */
export function fromPbValue(v: PbValue | undefined): unknown {
  if (!v) return undefined;
  if (v.stringValue !== undefined) return v.stringValue;
  if (v.numberValue !== undefined) return v.numberValue;
  if (v.boolValue !== undefined) return v.boolValue;
  if (v.structValue !== undefined) return fromPbStruct(v.structValue);
  if (v.listValue !== undefined) return (v.listValue.values ?? []).map(fromPbValue);
  return null;
}

export function fromPbStruct(s: PbStruct | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(s?.fields ?? {})) out[k] = fromPbValue(v);
  return out;
}

/** A header's value: Envoy sends raw_value (bytes); older versions value. */
export function headerText(h: HeaderValue): string {
  if (h.raw_value && h.raw_value.length > 0) return Buffer.from(h.raw_value).toString('utf8');
  return h.value ?? '';
}
