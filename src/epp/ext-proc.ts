import { randomUUID } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';
import type * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { errors, GatewayError } from '../core/errors.js';
import type { GatewayMetrics } from '../metrics/gateway-metrics.js';
import type { RequestOutcome } from '../policies/policy.js';
import { fromPbStruct, headerText, toPbStruct, type BodySendMode, type HeaderMap, type ProcessingRequest } from './protos.js';
import type { Assignment, Picker } from './picker.js';

/** Metadata keys and headers of the GIE endpoint-picker protocol (docs/proposals/004). */
export const GIE = {
  subsetNamespace: 'envoy.lb.subset_hint',
  subsetKey: 'x-gateway-destination-endpoint-subset',
  destinationNamespace: 'envoy.lb',
  destinationKey: 'x-gateway-destination-endpoint',
  servedKey: 'x-gateway-destination-endpoint-served',
  conformanceServedHeader: 'x-conformance-test-served-endpoint',
  echoSetHeader: 'X-Echo-Set-Header',
} as const;

/** Envoy's recommended largest streamed body chunk (the reference EPP uses 62000 bytes). */
const BODY_CHUNK = 62_000;

type Call = grpc.ServerDuplexStream<ProcessingRequest, Record<string, unknown>>;

export interface ExtProcDeps {
  picker: Picker;
  metrics: GatewayMetrics;
  log: Logger;
  conformanceTestHooks: boolean;
  maxPayloadSize: number;
  /** Streams open now (for graceful shutdown and tests). */
  streams: Set<Call>;
}

const setHeader = (key: string, value: string) => ({ header: { key, raw_value: Buffer.from(value) }, append_action: 'OVERWRITE_IF_EXISTS_OR_ADD' });

/**
 * One ext_proc stream = one HTTP request through the gateway. Request headers (and body, when
 * the gateway sends it) → pick → the destination header and `envoy.lb` metadata; response
 * headers → the served endpoint; response body → first token; response end → completion.
 *
 * Body modes (from `protocol_config`, which Envoy sends on the first message; absent means
 * FULL_DUPLEX_STREAMED, as GIE gateways configure it):
 * - FULL_DUPLEX_STREAMED: body chunks are buffered until end_of_stream (or the trailers); then
 *   the deferred HeadersResponse carries the decision, and the body goes back to the gateway as
 *   StreamedBodyResponse chunks. Response body chunks are streamed back as they come.
 * - BUFFERED / BUFFERED_PARTIAL / STREAMED: the headers are answered at once; the decision rides
 *   on the (last) BodyResponse, whose header mutation Envoy applies to the held headers.
 * - NONE, or headers with end_of_stream: pick on the headers with no routing text.
 */
export class ExtProcStream {
  private headers: IncomingHttpHeaders = {};
  private method = 'GET';
  private path = '/';
  private requestId = '';
  private subset: string[] | undefined;
  private requestMode: BodySendMode = 'FULL_DUPLEX_STREAMED';
  private responseMode: BodySendMode = 'FULL_DUPLEX_STREAMED';
  private readonly chunks: Buffer[] = [];
  private bodyBytes = 0;
  private decided = false;
  private assignment: Assignment | undefined;
  private immediate = false;
  private closed = false;
  private readonly abort = new AbortController();
  private readonly started = performance.now();
  private readonly queue: ProcessingRequest[] = [];
  private busy = false;
  private first = true;

  constructor(
    private readonly call: Call,
    private readonly deps: ExtProcDeps,
  ) {
    deps.streams.add(call);
    call.on('data', (m: ProcessingRequest) => {
      this.queue.push(m);
      void this.drain();
    });
    // The gateway half-closes when the HTTP request is over; a reset or deadline cancels.
    call.on('end', () => {
      this.close(this.assignment && this.assignment.status > 0 ? 'success' : 'aborted');
      if (!this.busy) this.endCall();
    });
    call.on('cancelled', () => this.close('aborted'));
    call.on('error', () => this.close('aborted'));
    call.on('close', () => this.close('aborted'));
  }

  /** Messages are handled one at a time, in order (a pick may wait for an admission slot). */
  private async drain(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.queue.length > 0 && !this.call.destroyed) {
        const m = this.queue.shift()!;
        try {
          await this.handle(m);
        } catch (e) {
          this.deps.log.error({ err: e, requestId: this.requestId }, 'ext_proc: unexpected error');
          this.sendImmediate(errors.internal((e as Error)?.message ?? String(e)));
        }
      }
    } finally {
      this.busy = false;
    }
    if (this.closed) this.endCall();
  }

  private async handle(m: ProcessingRequest): Promise<void> {
    if (this.first) {
      this.first = false;
      if (m.protocol_config) {
        this.requestMode = m.protocol_config.request_body_mode ?? 'NONE';
        this.responseMode = m.protocol_config.response_body_mode ?? 'NONE';
      }
    }
    if (this.immediate) return; // the gateway ends the request after an ImmediateResponse
    const observe = !!m.observability_mode;
    if (m.request_headers) return this.onRequestHeaders(m, observe);
    if (m.request_body) return this.onRequestBody(m, observe);
    if (m.request_trailers) return this.onRequestTrailers(observe);
    if (m.response_headers) return this.onResponseHeaders(m, observe);
    if (m.response_body) return this.onResponseBody(m, observe);
    if (m.response_trailers) {
      this.finishResponse('success');
      if (!observe) this.send({ response_trailers: {} });
    }
  }

  private async onRequestHeaders(m: ProcessingRequest, observe: boolean): Promise<void> {
    const h = m.request_headers!;
    this.headers = toHeaders(h.headers);
    this.method = String(this.headers[':method'] ?? 'GET').toUpperCase();
    const fullPath = String(this.headers[':path'] ?? '/');
    const q = fullPath.indexOf('?');
    this.path = q < 0 ? fullPath : fullPath.slice(0, q);
    const given = this.headers['x-request-id'];
    this.requestId = typeof given === 'string' && given.length > 0 && given.length <= 256 ? given : randomUUID();
    this.subset = subsetOf(m);
    if (h.end_of_stream || this.requestMode === 'NONE') {
      const decision = await this.decide();
      if (decision && !observe) this.send({ request_headers: { response: decision.common }, dynamic_metadata: decision.metadata });
      return;
    }
    if (this.requestMode !== 'FULL_DUPLEX_STREAMED' && !observe) this.send({ request_headers: { response: {} } });
  }

  private async onRequestBody(m: ProcessingRequest, observe: boolean): Promise<void> {
    const b = m.request_body!;
    const chunk = b.body ? Buffer.from(b.body) : Buffer.alloc(0);
    this.bodyBytes += chunk.length;
    if (this.decided) {
      // Only in modes where the body keeps flowing after the decision.
      if (!observe) this.sendRequestBody(chunk, !!b.end_of_stream);
      return;
    }
    if (this.bodyBytes > this.deps.maxPayloadSize) {
      this.sendImmediate(errors.payloadTooLarge(this.deps.maxPayloadSize));
      return;
    }
    this.chunks.push(chunk);
    const buffered = this.requestMode === 'BUFFERED' || this.requestMode === 'BUFFERED_PARTIAL';
    if (!b.end_of_stream && !buffered) {
      if (this.requestMode === 'STREAMED' && !observe) this.send({ request_body: { response: {} } });
      return;
    }
    const decision = await this.decide();
    if (!decision || observe) return;
    if (this.requestMode === 'FULL_DUPLEX_STREAMED') {
      this.send({ request_headers: { response: decision.common }, dynamic_metadata: decision.metadata });
      this.sendRequestBody(Buffer.concat(this.chunks), !!b.end_of_stream);
    } else {
      this.send({ request_body: { response: decision.common }, dynamic_metadata: decision.metadata });
    }
    this.chunks.length = 0;
  }

  private async onRequestTrailers(observe: boolean): Promise<void> {
    // FULL_DUPLEX_STREAMED without end_of_stream on a body chunk: the trailers end the body.
    if (!this.decided) {
      const decision = await this.decide();
      if (!decision) return;
      if (!observe && this.requestMode === 'FULL_DUPLEX_STREAMED') {
        this.send({ request_headers: { response: decision.common }, dynamic_metadata: decision.metadata });
        this.sendRequestBody(Buffer.concat(this.chunks), false);
      }
      this.chunks.length = 0;
    }
    if (!observe) this.send({ request_trailers: {} });
  }

  private onResponseHeaders(m: ProcessingRequest, observe: boolean): void {
    const h = m.response_headers!;
    const headers = toHeaders(h.headers);
    const served = servedEndpointOf(m);
    const a = this.assignment;
    if (a) {
      a.servedBy(served);
      const ct = headers['content-type'];
      a.responseHeaders(Number(headers[':status']) || 0, Array.isArray(ct) ? ct[0] : ct);
    }
    if (!observe) {
      const set = this.deps.conformanceTestHooks
        ? [setHeader(GIE.conformanceServedHeader, served ?? 'fail: missing destination endpoint served metadata')]
        : [];
      this.send({ response_headers: { response: set.length > 0 ? { header_mutation: { set_headers: set } } : {} } });
    }
    if (h.end_of_stream) this.finishResponse('success');
  }

  private onResponseBody(m: ProcessingRequest, observe: boolean): void {
    const b = m.response_body!;
    const chunk = b.body ? Buffer.from(b.body) : Buffer.alloc(0);
    this.assignment?.responseData(chunk);
    if (!observe) {
      if (this.responseMode === 'FULL_DUPLEX_STREAMED') {
        this.send({ response_body: { response: { body_mutation: { streamed_response: { body: chunk, end_of_stream: !!b.end_of_stream } } } } });
      } else this.send({ response_body: { response: {} } });
    }
    if (b.end_of_stream) this.finishResponse('success');
  }

  /** Picks; on failure sends the ImmediateResponse and returns undefined. */
  private async decide(): Promise<{ common: Record<string, unknown>; metadata: object } | undefined> {
    this.decided = true;
    let a: Assignment;
    try {
      a = await this.deps.picker.pick({
        requestId: this.requestId,
        method: this.method,
        path: this.path,
        headers: this.headers,
        body: Buffer.concat(this.chunks),
        subset: this.subset,
        signal: this.abort.signal,
      });
    } catch (e) {
      const err = e instanceof GatewayError ? e : errors.internal((e as Error)?.message ?? String(e));
      if (!(e instanceof GatewayError)) this.deps.log.error({ err: e, requestId: this.requestId }, 'ext_proc: pick failed');
      this.sendImmediate(err);
      return undefined;
    }
    if (this.closed) {
      // The stream went away while the pick waited for an admission slot.
      a.finish('aborted');
      return undefined;
    }
    this.assignment = a;
    const value = a.destination;
    const set = [setHeader(GIE.destinationKey, value)];
    if (a.worker.dpRank !== undefined) set.push(setHeader('x-data-parallel-rank', String(a.worker.dpRank)));
    if (this.deps.conformanceTestHooks) set.push(setHeader(GIE.echoSetHeader, `${GIE.conformanceServedHeader}:${a.endpoints[0]}`));
    this.deps.log.debug({ requestId: this.requestId, worker: a.worker.id, destination: value }, 'ext_proc: picked');
    return {
      common: { clear_route_cache: true, header_mutation: { set_headers: set } },
      metadata: toPbStruct({ [GIE.destinationNamespace]: { [GIE.destinationKey]: value } }),
    };
  }

  private sendRequestBody(body: Buffer, endOfStream: boolean): void {
    if (body.length === 0) {
      this.send({ request_body: { response: { body_mutation: { streamed_response: { body, end_of_stream: endOfStream } } } } });
      return;
    }
    for (let i = 0; i < body.length; i += BODY_CHUNK) {
      const part = body.subarray(i, i + BODY_CHUNK);
      const last = i + BODY_CHUNK >= body.length;
      this.send({ request_body: { response: { body_mutation: { streamed_response: { body: part, end_of_stream: endOfStream && last } } } } });
    }
  }

  private sendImmediate(err: GatewayError): void {
    if (this.immediate) return;
    this.immediate = true;
    this.deps.metrics.requests.inc({ route: 'epp', status: String(err.status), model: '' });
    if (err.status === 429 || err.status === 408) this.deps.log.debug({ requestId: this.requestId, status: err.status }, 'ext_proc: shed');
    const body = Buffer.from(JSON.stringify(err.toBody()));
    this.send({
      immediate_response: {
        status: { code: err.status },
        headers: { set_headers: [setHeader('content-type', 'application/json'), setHeader('x-request-id', this.requestId || randomUUID())] },
        body,
        details: `kvgate_${err.code}`,
      },
    });
  }

  private send(msg: Record<string, unknown>): void {
    if (this.call.destroyed || this.call.writableEnded) return;
    try {
      this.call.write(msg);
    } catch (e) {
      this.deps.log.warn({ err: e, requestId: this.requestId }, 'ext_proc: write failed');
    }
  }

  private finishResponse(outcome: RequestOutcome): void {
    const a = this.assignment;
    if (!a || a.isFinished) return;
    a.finish(outcome);
    this.deps.metrics.requests.inc({ route: 'epp', status: String(a.status), model: a.ctx.model });
    this.deps.metrics.duration.observe({ route: 'epp' }, (performance.now() - this.started) / 1000);
  }

  /** The stream is over (half-close, reset, error): whatever was picked is released now. */
  private close(outcome: RequestOutcome): void {
    if (this.closed) return;
    this.closed = true;
    this.abort.abort();
    this.deps.streams.delete(this.call);
    const a = this.assignment;
    if (a && !a.isFinished && outcome === 'aborted') this.deps.metrics.clientAborts.inc({ route: 'epp' });
    this.finishResponse(outcome);
  }

  private endCall(): void {
    if (!this.call.destroyed && !this.call.writableEnded) this.call.end();
  }
}

function toHeaders(map: HeaderMap | undefined): IncomingHttpHeaders {
  const out: Record<string, string> = {};
  for (const h of map?.headers ?? []) {
    const k = h.key.toLowerCase();
    const v = headerText(h);
    out[k] = out[k] === undefined ? v : `${out[k]}, ${v}`;
  }
  return out;
}

/** envoy.lb.subset_hint → x-gateway-destination-endpoint-subset: a list or a comma string. */
function subsetOf(m: ProcessingRequest): string[] | undefined {
  const ns = m.metadata_context?.filter_metadata?.[GIE.subsetNamespace];
  if (!ns) return undefined;
  const v = fromPbStruct(ns)[GIE.subsetKey];
  if (v === undefined) return undefined;
  const items = Array.isArray(v) ? v : [v];
  return items
    .filter((x): x is string => typeof x === 'string')
    .flatMap((x) => x.split(','))
    .map((x) => x.trim())
    .filter((x) => x.length > 0);
}

function servedEndpointOf(m: ProcessingRequest): string | undefined {
  const ns = m.metadata_context?.filter_metadata?.[GIE.destinationNamespace];
  if (!ns) return undefined;
  const v = fromPbStruct(ns)[GIE.servedKey];
  return typeof v === 'string' && v.length > 0 ? v.split(',')[0].trim() : undefined;
}
