import type { IncomingHttpHeaders } from 'node:http';
import { ROOT_CONTEXT, SpanKind, SpanStatusCode, trace, type Attributes, type Context, type Span, type Tracer } from '@opentelemetry/api';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BasicTracerProvider, BatchSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION } from '@opentelemetry/semantic-conventions';

export interface TracingOptions {
  /** OTLP/HTTP traces endpoint, e.g. http://otel-collector:4318/v1/traces. */
  endpoint: string;
  serviceName?: string;
  /** Extra resource attributes (replica id). */
  attributes?: Attributes;
  /** Export batch delay (ms; the SDK's default is 5000). */
  flushMs?: number;
}

const propagator = new W3CTraceContextPropagator();
const headerGetter = {
  get(carrier: IncomingHttpHeaders, key: string) {
    return carrier[key];
  },
  keys(carrier: IncomingHttpHeaders) {
    return Object.keys(carrier);
  },
};
const headerSetter = {
  set(carrier: Record<string, string>, key: string, value: string) {
    carrier[key] = value;
  },
};

/**
 * OpenTelemetry tracing of routed requests (off unless --otlp-traces-endpoint or
 * OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set). A provider of its own (never registered as the
 * global one, so several gateways can live in one process), batching spans to an OTLP/HTTP
 * exporter (JSON encoding). Context is passed explicitly, request by request: no async hooks.
 */
export class Tracing {
  private readonly provider: BasicTracerProvider;
  private readonly tracer: Tracer;

  constructor(opts: TracingOptions) {
    this.provider = new BasicTracerProvider({
      resource: resourceFromAttributes({ [ATTR_SERVICE_NAME]: opts.serviceName ?? 'kvgate', [ATTR_SERVICE_VERSION]: '0.1.0', ...opts.attributes }),
      spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter({ url: opts.endpoint }), { scheduledDelayMillis: opts.flushMs ?? 1000 })],
    });
    this.tracer = this.provider.getTracer('kvgate');
  }

  /** The span of one request (kind SERVER), child of the client's traceparent when it sent one. */
  startRequest(name: string, headers: IncomingHttpHeaders, attributes: Attributes): RequestTrace {
    const parent = propagator.extract(ROOT_CONTEXT, headers, headerGetter);
    const span = this.tracer.startSpan(name, { kind: SpanKind.SERVER, attributes }, parent);
    return new RequestTrace(this.tracer, span, trace.setSpan(parent, span));
  }

  /** Exports what is buffered. */
  flush(): Promise<void> {
    return this.provider.forceFlush();
  }

  async shutdown(): Promise<void> {
    await this.provider.shutdown();
  }
}

/** The spans of one request: children are started under the request span (or a given parent). */
export class RequestTrace {
  constructor(
    private readonly tracer: Tracer,
    readonly span: Span,
    readonly context: Context,
  ) {}

  /** A child span (kind INTERNAL, or CLIENT for upstream attempts). */
  child(name: string, attributes?: Attributes, parent?: Span, kind: SpanKind = SpanKind.INTERNAL, startTime?: number): Span {
    const ctx = parent ? trace.setSpan(this.context, parent) : this.context;
    return this.tracer.startSpan(name, { kind, attributes, startTime }, ctx);
  }

  /** Writes `span`'s W3C traceparent (and tracestate) into upstream request headers, replacing the client's. */
  inject(span: Span, headers: Record<string, string>): void {
    delete headers.traceparent;
    delete headers.tracestate;
    propagator.inject(trace.setSpan(ROOT_CONTEXT, span), headers, headerSetter);
  }

  /** Ends the request span with its HTTP status. */
  end(status: number, attributes?: Attributes): void {
    if (attributes) this.span.setAttributes(attributes);
    this.span.setAttribute('http.response.status_code', status);
    if (status >= 500 || status === 0) this.span.setStatus({ code: SpanStatusCode.ERROR });
    this.span.end();
  }
}

export { SpanKind, SpanStatusCode };
export type { Span };
