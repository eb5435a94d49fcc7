import * as grpc from '@grpc/grpc-js';
import { fromPbStruct, loadProtos, toPbStruct } from '../../src/epp/protos.js';

/* eslint-disable @typescript-eslint/no-explicit-any */

/**
 * Drives one ext_proc stream the way Envoy's ext_proc filter does for a GIE InferencePool
 * backend: request headers (with the subset hint in filter metadata), request body chunks,
 * response headers (with the served endpoint in filter metadata), response body chunks, then a
 * half-close — or a cancel (reset) anywhere in between. Built from the same vendored protos.
 */
export class EnvoyStream {
  readonly call: grpc.ClientDuplexStream<any, any>;
  private readonly got: any[] = [];
  private waiters: Array<() => void> = [];
  ended = false;
  error: grpc.ServiceError | undefined;

  constructor(
    client: grpc.Client,
    readonly mode: { request?: string; response?: string } | null = { request: 'FULL_DUPLEX_STREAMED', response: 'FULL_DUPLEX_STREAMED' },
  ) {
    this.call = (client as any).Process();
    this.call.on('data', (m: any) => {
      this.got.push(m);
      this.wake();
    });
    this.call.on('end', () => {
      this.ended = true;
      this.wake();
    });
    this.call.on('error', (e: grpc.ServiceError) => {
      this.error = e;
      this.ended = true;
      this.wake();
    });
  }

  private first = true;
  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private write(msg: any): void {
    if (this.first && this.mode) {
      msg.protocol_config = { request_body_mode: this.mode.request ?? 'NONE', response_body_mode: this.mode.response ?? 'NONE' };
    }
    this.first = false;
    this.call.write(msg);
  }

  requestHeaders(headers: Record<string, string>, opts: { endOfStream?: boolean; subset?: string[] | string } = {}): void {
    const filter_metadata: Record<string, unknown> = {};
    if (opts.subset !== undefined) filter_metadata['envoy.lb.subset_hint'] = toPbStruct({ 'x-gateway-destination-endpoint-subset': opts.subset });
    this.write({
      request_headers: {
        headers: { headers: Object.entries(headers).map(([key, v]) => ({ key, raw_value: Buffer.from(v) })) },
        end_of_stream: !!opts.endOfStream,
      },
      metadata_context: { filter_metadata },
    });
  }

  requestBody(body: Buffer | string, endOfStream: boolean): void {
    this.write({ request_body: { body: Buffer.from(body), end_of_stream: endOfStream } });
  }

  responseHeaders(status: number, served: string | undefined, endOfStream = false): void {
    const filter_metadata: Record<string, unknown> = {};
    if (served) filter_metadata['envoy.lb'] = toPbStruct({ 'x-gateway-destination-endpoint-served': served });
    this.write({
      response_headers: {
        headers: { headers: [{ key: ':status', raw_value: Buffer.from(String(status)) }, { key: 'content-type', raw_value: Buffer.from('text/event-stream') }] },
        end_of_stream: endOfStream,
      },
      metadata_context: { filter_metadata },
    });
  }

  responseBody(body: Buffer | string, endOfStream: boolean): void {
    this.write({ response_body: { body: Buffer.from(body), end_of_stream: endOfStream } });
  }

  /** Envoy half-closes when the HTTP request is over. */
  end(): void {
    this.call.end();
  }

  /** A reset stream (downstream disconnect, timeout). */
  cancel(): void {
    this.call.cancel();
  }

  /** The next response, in order. */
  async next(timeoutMs = 5000): Promise<any> {
    const end = Date.now() + timeoutMs;
    while (this.got.length === 0) {
      if (this.ended) throw new Error(`stream ended with no more responses${this.error ? `: ${this.error.message}` : ''}`);
      if (Date.now() > end) throw new Error('no ext_proc response in time');
      await new Promise<void>((r) => {
        const t = setTimeout(r, 50);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.got.shift();
  }

  /** Responses already received and not yet read. */
  get pending(): number {
    return this.got.length;
  }

  async waitEnd(timeoutMs = 5000): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (!this.ended) {
      if (Date.now() > end) throw new Error('stream did not end');
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

export function extProcClient(address: string): grpc.Client {
  return new (loadProtos().extProc)(address, grpc.credentials.createInsecure());
}

export function healthClient(address: string): grpc.Client {
  return new (loadProtos().health)(address, grpc.credentials.createInsecure());
}

export function healthCheck(client: grpc.Client, service: string): Promise<{ status?: string; code?: number }> {
  return new Promise((resolve) =>
    (client as any).Check({ service }, (err: grpc.ServiceError | null, res: any) => resolve(err ? { code: err.code } : { status: res.status })),
  );
}

/** The set header of a CommonResponse (raw_value decoded). */
export function setHeaders(common: any): Record<string, string> {
  const out: Record<string, string> = {};
  for (const h of common?.header_mutation?.set_headers ?? []) out[h.header.key] = Buffer.from(h.header.raw_value ?? '').toString() || h.header.value;
  return out;
}

/** dynamic_metadata as plain JSON. */
export function dynamicMetadata(resp: any): Record<string, any> {
  return fromPbStruct(resp.dynamic_metadata);
}
