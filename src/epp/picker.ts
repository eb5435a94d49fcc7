import type { IncomingHttpHeaders } from 'node:http';
import type { RequestContext, RouteName } from '../core/context.js';
import { errors, GatewayError } from '../core/errors.js';
import type { LoadGuard, Worker } from '../core/worker.js';
import { explainWith, withOutsideExclusions, type RouteExplanation } from '../policies/explain.js';
import type { RequestOutcome, RoutingPolicy } from '../policies/policy.js';
import type { ResponseTap } from '../upstream/response-tap.js';
import { contextFor, resolveModel } from '../routers/request.js';
import type { Release } from '../server/admission.js';
import { parseJsonObject } from '../core/request-body.js';
import { GENERATION_ROUTES, type RoutingCore } from '../server/routing-core.js';

/** `ip:port` of a worker, as the gateway addresses it (IPv6 in brackets). */
export function endpointOf(worker: Worker): string {
  return new URL(worker.url).host;
}

/**
 * Whether `endpoint` is allowed by an `ip:port` / bare `ip` list (bare IP = every port of that
 * address, as the GIE lwepp reads the subset hint and the conformance header).
 */
function allowedBy(list: readonly string[], endpoint: string): boolean {
  const u = new URL(`http://${endpoint}`);
  const host = u.hostname;
  for (const raw of list) {
    const e = raw.trim();
    if (e === '') continue;
    if (e === endpoint) return true;
    if (e === host || `[${e}]` === host) return true;
  }
  return false;
}

/** A request as the ext_proc stream delivered it. */
export interface PickInput {
  requestId: string;
  method: string;
  path: string;
  headers: IncomingHttpHeaders;
  /** The whole request body (empty for headers-only requests). */
  body: Buffer;
  /** envoy.lb.subset_hint → x-gateway-destination-endpoint-subset, when the gateway set it. */
  subset: string[] | undefined;
  /** Aborted when the stream goes away while the request waits for an admission slot. */
  signal: AbortSignal;
}

export interface PickerOptions {
  fallbackEndpoints: number;
  conformanceTestHooks: boolean;
  maxPayloadSize: number;
  maxJsonDepth: number;
  /** Longest a pick holds load when the gateway never reports the end of its response. */
  holdTimeoutMs: number;
}

/**
 * Chooses endpoints for ext_proc requests with the routing core's policy, exactly as `serve`
 * chooses workers: same context (routers/request.ts), same candidates (the registry's workers
 * of the model), same policy hooks. Each pick becomes an Assignment that holds the worker's
 * load until the response ends.
 */
export class Picker {
  constructor(
    private readonly core: RoutingCore,
    private readonly opts: PickerOptions,
  ) {}

  get policy(): RoutingPolicy {
    return this.core.policy;
  }

  /** Picks or throws a GatewayError (its status is the ImmediateResponse's). */
  async pick(input: PickInput): Promise<Assignment> {
    const { core } = this;
    if (input.body.length > this.opts.maxPayloadSize) throw errors.payloadTooLarge(this.opts.maxPayloadSize);
    const route = input.method === 'POST' ? GENERATION_ROUTES[input.path] : undefined;
    let ctx: RequestContext;
    try {
      const built = this.context(input, route);
      ctx = built instanceof Promise ? await built : built;
    } catch (e) {
      // An empty pool (nothing discovered yet, every pod down) is 503 for any model, as the
      // protocol asks: the gateway may retry elsewhere, where a 404 would be final.
      if (e instanceof GatewayError && e.code === 'model_not_found' && !core.registry.all().some((w) => w.isAvailable())) throw errors.noHealthyWorkers(undefined);
      throw e;
    }
    const model = ctx.model;
    let candidates = model === '' ? core.registry.all().filter((w) => w.type === 'regular') : core.registry.forModel(model);

    if (input.subset !== undefined) {
      const subset = input.subset;
      candidates = candidates.filter((w) => allowedBy(subset, endpointOf(w)));
      if (!candidates.some((w) => w.isAvailable())) {
        throw errors.unavailable(
          subset.length === 0 ? 'The gateway sent an empty endpoint subset' : `No healthy endpoint of the subset hint (${subset.join(', ')}) can serve this request`,
          'no_endpoint_in_subset',
        );
      }
    }
    if (this.opts.conformanceTestHooks) {
      // GIE conformance: restrict to the listed IPs; none matching → all candidates.
      const sel = headerValue(input.headers, 'test-epp-endpoint-selection');
      if (sel) {
        const list = sel.split(',');
        const narrowed = candidates.filter((w) => allowedBy(list, endpointOf(w)));
        if (narrowed.length > 0) candidates = narrowed;
      }
    }

    const arrivedAt = performance.now();
    const release = await this.admit(input.signal);
    try {
      const policy = core.policy;
      const insight = core.insight;
      const sampled = insight.sample();
      let explanation: RouteExplanation | undefined;
      if (insight.wantsExplanation(sampled)) {
        const others = model === '' ? [] : core.registry.all().filter((w) => w.type === 'regular' && w.modelId !== model);
        explanation = withOutsideExclusions(explainWith(policy, candidates, ctx), [], others);
      }
      core.metrics.takeNote();
      const worker = policy.selectWorker(candidates, ctx);
      if (!worker) throw errors.noHealthyWorkers(model || undefined);
      core.metrics.decisions.inc({ policy: policy.name, worker: core.metrics.w(worker) });
      const { seq } = insight.decided({ requestId: input.requestId, route: route ?? 'other', ctx, policy: policy.name, worker, attempt: 0, explanation, sampled });
      const primary = endpointOf(worker);
      // Fallbacks: the other available candidates, least loaded first. They are not run through
      // the policy (that would record affinity for workers that may never serve the request).
      const seen = new Set([primary]);
      const fallbacks: string[] = [];
      const rest = candidates.filter((w) => w !== worker && w.isAvailable()).sort((a, b) => a.load - b.load || a.processed - b.processed);
      for (const w of rest) {
        if (fallbacks.length >= this.opts.fallbackEndpoints) break;
        const e = endpointOf(w);
        if (seen.has(e)) continue;
        seen.add(e);
        fallbacks.push(e);
      }
      const a = new Assignment(core, ctx, worker, [primary, ...fallbacks], candidates, release, this.opts.holdTimeoutMs);
      a.track(seq, arrivedAt, insight.routeHeader(explanation, worker));
      return a;
    } catch (e) {
      release();
      throw e;
    }
  }

  /** The routing context, built as the HTTP front builds it. */
  private context(input: PickInput, route: RouteName | undefined): RequestContext | Promise<RequestContext> {
    const { core } = this;
    const c = core.config;
    if (route && input.body.length > 0) {
      const body = parseJsonObject(input.body, this.opts.maxJsonDepth);
      const model = resolveModel(core.registry, body, ['regular']);
      // Token ids off the event loop (tokenizer threads, --max-routing-ms), as the HTTP front.
      const source = { route, requestId: input.requestId, body, rawBody: input.body, req: { headers: input.headers } };
      return contextFor(source, model, core.clock, core.requestTokens, !!core.policy.needsTokens, input.signal, core.registry, undefined, core.policy.blockHashing?.bind(core.policy));
    }
    // Headers-only requests and other paths: no routing text. The model is the body's `model`
    // when it names a served one, else the only model served, else any worker may serve.
    let model = '';
    let named: unknown;
    if (input.body.length > 0) {
      try {
        named = (JSON.parse(input.body.toString('utf8')) as Record<string, unknown> | null)?.model;
      } catch {
        named = undefined;
      }
    }
    const models = core.registry.models();
    if (typeof named === 'string' && models.includes(named)) model = named;
    else if (named === undefined && c.modelId !== undefined && models.includes(c.modelId)) model = c.modelId;
    else if (models.length === 1 && core.registry.all().every((w) => w.modelId !== undefined)) model = models[0];
    return {
      requestId: input.requestId,
      route: route ?? 'completions',
      model,
      routingText: '',
      headers: input.headers,
      stream: false,
      arrivalMs: core.clock.now(),
    };
  }

  private async admit(signal: AbortSignal): Promise<Release> {
    const { admission, metrics } = this.core;
    if (!admission.enabled) return () => undefined;
    const t0 = performance.now();
    try {
      const release = await admission.acquire(signal);
      metrics.queueWait.observe((performance.now() - t0) / 1000);
      return release;
    } catch (e) {
      const err = e as GatewayError;
      if (err.status === 429) metrics.admissionRejected.inc({ reason: 'queue_full' });
      else if (err.status === 408) metrics.admissionRejected.inc({ reason: 'queue_timeout' });
      throw err;
    }
  }
}

/**
 * One picked request, from the decision to the end of its response: holds the in-flight load
 * of the worker that serves it (moved to the endpoint the gateway reports as served, when the
 * gateway fell back), tells the policy of its first token and completion, and releases load and
 * admission slot exactly once, whatever ends it (response end, stream reset, hold timeout).
 */
export class Assignment {
  private guard: LoadGuard;
  private served: Worker;
  private firstTokenSeen = false;
  private finished = false;
  private readonly timer: NodeJS.Timeout | undefined;
  /** HTTP status of the response, once the response headers arrived. */
  status = 0;
  /** The decision's feed sequence number, the request's arrival, the x-kvgate-route summary (--explain-decisions). */
  private seq = 0;
  private arrivedAt = performance.now();
  routeHeader: string | undefined;
  /** Watches the response the gateway reports (first content, inter-token gaps, usage). */
  private tap: ResponseTap | undefined;

  constructor(
    private readonly core: RoutingCore,
    readonly ctx: RequestContext,
    readonly worker: Worker,
    /** Primary first, then fallbacks. */
    readonly endpoints: readonly string[],
    private readonly candidates: readonly Worker[],
    private readonly releaseAdmission: Release,
    holdTimeoutMs: number,
  ) {
    this.served = worker;
    this.guard = worker.acquire();
    if (holdTimeoutMs > 0) {
      this.timer = setTimeout(() => this.finish('timeout'), holdTimeoutMs);
      this.timer.unref();
    }
  }

  get servedWorker(): Worker {
    return this.served;
  }

  /** Ties the assignment to its decision record and starts watching the response. */
  track(seq: number, arrivedAt: number, routeHeader: string | undefined): void {
    this.seq = seq;
    this.arrivedAt = arrivedAt;
    this.routeHeader = routeHeader;
    this.tap = this.core.insight.tap(this.ctx.model, this.served, arrivedAt);
  }

  /** The response headers passed the gateway. */
  responseHeaders(status: number, contentType: string | undefined): void {
    this.status = status;
    this.tap?.headers(status, contentType);
  }

  /** A response body chunk passed the gateway. */
  responseData(chunk: Buffer): void {
    if (chunk.length > 0) this.firstToken();
    this.tap?.data(chunk);
  }

  get isFinished(): boolean {
    return this.finished;
  }

  /** The header / metadata value: `ip:port[,ip:port...]`. */
  get destination(): string {
    return this.endpoints.join(',');
  }

  /**
   * The gateway reports the endpoint that served the request. When it is not the primary (the
   * gateway fell back down the list), the load, the first token and the completion move to it,
   * and the policy records the request on it (selecting it as the only candidate).
   */
  servedBy(endpoint: string | undefined): void {
    if (this.finished || !endpoint || endpoint === endpointOf(this.served)) return;
    const to = this.candidates.find((w) => endpointOf(w) === endpoint) ?? this.core.registry.all().find((w) => w.type === 'regular' && endpointOf(w) === endpoint);
    if (!to) return;
    const policy = this.core.policy;
    this.guard.release();
    this.core.metrics.processed.inc({ worker: this.core.metrics.w(this.served) });
    policy.onRequestComplete?.(this.served, this.ctx, 'error');
    this.served = to;
    this.guard = to.acquire();
    if (this.tap) this.tap = this.core.insight.tap(this.ctx.model, to, this.arrivedAt);
    if (to.isAvailable()) policy.selectWorker([to], this.ctx);
  }

  /** The first response body chunk passed the gateway. */
  firstToken(): void {
    if (this.finished || this.firstTokenSeen) return;
    this.firstTokenSeen = true;
    this.core.policy.onFirstToken?.(this.served, this.ctx);
  }

  /** Ends the request (idempotent): releases load and admission slot, tells the policy and the breaker. */
  finish(outcome: RequestOutcome): void {
    if (this.finished) return;
    this.finished = true;
    if (this.timer) clearTimeout(this.timer);
    this.guard.release();
    this.releaseAdmission();
    this.core.metrics.processed.inc({ worker: this.core.metrics.w(this.served) });
    this.core.policy.onRequestComplete?.(this.served, this.ctx, outcome);
    // Passive health, as serve does: a 5xx from the worker counts against its breaker.
    if (this.status >= 500) this.served.breaker?.recordFailure();
    else if (this.status > 0 && outcome === 'success') this.served.breaker?.recordSuccess();
    if (this.tap) {
      if (outcome === 'success') this.tap.end();
      this.core.insight.finished(this.seq, this.ctx, this.served, this.tap, outcome === 'success' ? this.status : this.status || 0, this.arrivedAt);
    }
  }
}

function headerValue(headers: IncomingHttpHeaders, name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v.join(',') : v;
}
