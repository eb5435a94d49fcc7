import type { ServerResponse } from 'node:http';
import type { Clock } from '../core/clock.js';
import type { RequestContext } from '../core/context.js';
import { DroppedError, errors } from '../core/errors.js';
import type { WorkerRegistry } from '../core/registry.js';
import { backoffMs, RETRYABLE_STATUSES, type RetryConfig } from '../core/retry.js';
import type { Rng } from '../core/rng.js';
import type { Worker } from '../core/worker.js';
import type { GatewayMetrics } from '../metrics/gateway-metrics.js';
import type { RoutingPolicy } from '../policies/policy.js';
import { forwardHeaders, proxyRequest, relayHeld, type ProxyResult, type ProxyTimeouts } from '../upstream/proxy.js';
import type { UpstreamPools } from '../upstream/pools.js';
import { sendError } from '../server/http-util.js';
import { explainWith, withOutsideExclusions, type RouteExplanation } from '../policies/explain.js';
import type { RequestInsight } from '../observability/insight.js';
import { SpanKind, SpanStatusCode } from '../observability/tracing.js';
import { buildContext, contextFor, preparedContext, type PreparingSource, type TokenSource, resolveModel, routeModel, tracedTokenize, type RoutedRequest, type Tokenize } from './request.js';

export interface RegularRouterDeps {
  registry: WorkerRegistry;
  policy: RoutingPolicy;
  pools: UpstreamPools;
  metrics: GatewayMetrics;
  clock: Clock;
  rng: Rng;
  timeouts: ProxyTimeouts;
  retry: RetryConfig;
  /** kvgate authenticates its clients itself: their Authorization header is not for workers. */
  clientAuthEnabled: boolean;
  /** Token ids for policies that need them (undefined when no tokenizer applies). */
  /** --forward-headers: client headers forwarded besides the default allow-list (lower-case). */
  forwardHeaders?: ReadonlySet<string>;
  tokenize?: Tokenize;
  /** Token ids for policies that need them, off the event loop (replaces `tokenize` when set). */
  tokens?: TokenSource;
  /** --strict-model: the request's `model` must be served even when only one model is. */
  strictModel?: boolean;
  /** --max-json-depth (bodies parsed off the event loop check it in the thread). */
  maxJsonDepth?: number;
  /** Decisions feed, explanations, latency/token metrics of exchanges, trace spans. */
  insight?: RequestInsight;
  /** Seconds a request waited for an upstream connection (set when --max-connections-per-worker caps the pools). */
  connectionWait?: (seconds: number) => void;
}

const NO_HOLD: ReadonlySet<number> = new Set();

/**
 * Regular mode: request → context → policy → worker → proxy.
 *
 * Load is held by a guard from the moment a worker is chosen until its exchange ends, whatever
 * ends it. A retryable failure (408, 429, 5xx, connection failure, timeout before the first
 * byte) is retried on a freshly chosen worker, the failed ones excluded, as long as nothing has
 * reached the client yet and attempts remain; every outcome feeds that worker's circuit breaker.
 * Resolves with the status sent to the client (0 if the client left first).
 */
export class RegularRouter {
  private readonly connectionWait: ((ms: number) => void) | undefined;

  constructor(private readonly deps: RegularRouterDeps) {
    const observe = deps.connectionWait;
    this.connectionWait = observe ? (ms) => observe(ms / 1000) : undefined;
  }

  resolveModel(body: Record<string, unknown>): string {
    return resolveModel(this.deps.registry, body, ['regular'], this.deps.strictModel);
  }

  async handle(r: RoutedRequest): Promise<number> {
    const { registry, policy, metrics, retry } = this.deps;
    const insight = this.deps.insight;
    r.arrivedAt ??= performance.now();
    let ctx: RequestContext | undefined;
    let model = '';
    const hashing = policy.blockHashing?.bind(policy);
    if (r.unparsed) {
      // A body over --parse-off-loop-bytes: a tokenizer thread parses, validates and tokenizes it.
      const source = this.deps.tokens as PreparingSource;
      const off = await preparedContext(r, ['regular'], { registry, clock: this.deps.clock, source, strict: this.deps.strictModel, maxJsonDepth: this.deps.maxJsonDepth ?? 64, hashing });
      if (off === 'aborted') {
        metrics.clientAborts.inc({ route: r.route });
        return 0;
      }
      if (off !== 'fallback') ({ model, ctx } = off);
    }
    if (ctx === undefined) {
      model = routeModel(this.deps.registry, r, ['regular'], this.deps.strictModel);
      const built = this.deps.tokens
        ? contextFor(r, model, this.deps.clock, this.deps.tokens, !!policy.needsTokens, r.res, this.deps.registry, r.trace, hashing)
        : buildContext(r, model, this.deps.clock, tracedTokenize(this.deps.tokenize, r.trace), !!policy.needsTokens, this.deps.registry);
      ctx = built instanceof Promise ? await built : built;
    }
    if (r.res.destroyed) {
      metrics.clientAborts.inc({ route: r.route });
      return 0;
    }
    const excluded = new Set<Worker>();
    // A LoRA request goes to the workers that list its adapter.
    const lora = ctx.loraName;
    const candidates = () => registry.forModel(model).filter((w) => !excluded.has(w) && (lora === undefined || w.loraAdapters.includes(lora)));
    let last: { worker: Worker; result: ProxyResult & { routeHeader?: string } } | undefined;
    // --request-timeout-secs bounds the whole request, retries and backoff included.
    const deadline = performance.now() + this.deps.timeouts.totalMs;

    for (let attempt = 0; attempt < retry.maxAttempts; attempt++) {
      const cands = candidates();
      const sampled = insight?.sample() ?? false;
      let explanation: RouteExplanation | undefined;
      if (insight?.wantsExplanation(sampled)) {
        const others = registry.all().filter((w) => w.type === 'regular' && w.modelId !== model);
        explanation = withOutsideExclusions(explainWith(policy, cands, ctx), [...excluded], others);
      }
      const select = r.trace?.child('select', { 'kvgate.policy': policy.name, 'kvgate.attempt': attempt, 'kvgate.candidates': cands.length });
      insight?.opts.metrics.takeNote();
      const worker = policy.selectWorker(cands, ctx);
      if (!worker) {
        select?.end();
        break;
      }
      metrics.decisions.inc({ policy: policy.name, worker: metrics.w(worker) });
      const prediction = policy.predictionFor?.(ctx.requestId);
      if (prediction) {
        if (!prediction.feasible && (r.priority ?? 0) < 0) {
          // Sheddable and predicted to miss its objective wherever it goes: refuse it now.
          select?.end();
          policy.onRequestComplete?.(worker, ctx, 'aborted');
          throw new DroppedError(429, `No worker is predicted to meet this request's latency objective (best predicted TTFT ${Math.round(prediction.ttftMs)} ms); sheddable requests are refused instead of served late`, 'predicted-slo-miss');
        }
        if (!r.res.headersSent) r.res.setHeader('x-kvgate-predicted-ttft-ms', prediction.ttftMs.toFixed(1));
      }
      const { seq, note } = insight ? insight.decided({ requestId: r.requestId, route: r.route, ctx, policy: policy.name, worker, attempt, explanation, sampled }) : { seq: 0, note: undefined };
      if (select) {
        select.setAttribute('kvgate.worker', worker.id);
        if (note?.matchedBlocks !== undefined) select.setAttribute('kvgate.matched_blocks', note.matchedBlocks);
        if (note?.requestBlocks !== undefined) select.setAttribute('kvgate.request_blocks', note.requestBlocks);
        if (note?.matched !== undefined) select.setAttribute('kvgate.matched_prefix', note.matched);
        select.end();
      }
      const remainingMs = deadline - performance.now();
      excluded.add(worker);
      // Another attempt is possible only if attempts and time remain and another worker could take it.
      const canRetry = attempt + 1 < retry.maxAttempts && candidates().some((w) => w.isAvailable());
      const routeHeader = insight?.routeHeader(explanation, worker);
      const result = await this.exchange(r, ctx, worker, canRetry, remainingMs, seq, attempt, routeHeader);
      last = { worker, result };
      const retryable = !!result.held || (!!result.error && result.status !== 0 && result.outcome !== 'aborted');
      if (!canRetry || !retryable || r.res.destroyed) break;
      const delay = backoffMs(retry, attempt, this.deps.rng);
      if (performance.now() + delay >= deadline) break;
      if (!candidates().some((w) => w.isAvailable())) break;
      metrics.retries.inc({ route: r.route });
      if (!(await sleepUnlessClosed(delay, r.res))) return 0;
    }

    if (!last) throw errors.noHealthyWorkers(model);
    const { worker, result } = last;
    const failed = !!result.held || !!result.error || RETRYABLE_STATUSES.has(result.status);
    if (failed && excluded.size > 1) metrics.retriesExhausted.inc({ route: r.route });
    const headers: Record<string, string> = { 'x-request-id': r.requestId, 'x-kvgate-worker': worker.id };
    if (result.routeHeader) headers['x-kvgate-route'] = result.routeHeader;
    if (result.held) {
      relayHeld(r.res, result.held, headers);
      return result.held.status;
    }
    if (result.error) {
      sendError(r.res, result.error, headers);
      return result.error.status;
    }
    return result.status;
  }

  /** One attempt on one worker: guard, proxy, breaker, metrics. */
  private async exchange(
    r: RoutedRequest,
    ctx: RequestContext,
    worker: Worker,
    canRetry: boolean,
    remainingMs: number,
    seq: number,
    attempt: number,
    routeHeader: string | undefined,
  ): Promise<ProxyResult & { routeHeader?: string }> {
    const { policy, pools, metrics, insight } = this.deps;
    const guard = worker.acquire();
    let result: ProxyResult | undefined;
    const headers = this.upstreamHeaders(r, worker);
    const startedAt = performance.now();
    const span = r.trace?.child(`upstream ${r.path}`, { 'kvgate.worker': worker.id, 'kvgate.attempt': attempt, 'server.address': worker.url }, undefined, SpanKind.CLIENT);
    // The worker continues kvgate's trace (not the client's span, which is this span's ancestor).
    if (span) r.trace!.inject(span, headers);
    const tap = insight?.tap(ctx.model, worker, r.arrivedAt!, span ? { rt: r.trace!, attempt: span, startedAt } : undefined);
    const extra: Record<string, string> = { 'x-request-id': r.requestId, 'x-kvgate-worker': worker.id };
    if (routeHeader) extra['x-kvgate-route'] = routeHeader;
    try {
      result = await proxyRequest({
        pool: pools.get(worker.url),
        path: r.path,
        headers,
        body: bodyFor(r, worker),
        res: r.res,
        extraResponseHeaders: extra,
        timeouts: { ...this.deps.timeouts, totalMs: Math.max(1, Math.min(this.deps.timeouts.totalMs, remainingMs)) },
        holdStatuses: canRetry ? RETRYABLE_STATUSES : NO_HOLD,
        onFirstByte: policy.onFirstToken ? () => policy.onFirstToken!(worker, ctx) : undefined,
        tap,
        onConnection: this.connectionWait,
      });
    } finally {
      guard.release();
      metrics.processed.inc({ worker: metrics.w(worker) });
      policy.onRequestComplete?.(worker, ctx, result?.outcome ?? 'error');
      const status = result ? (result.held?.status ?? (result.error ? result.error.status : result.status)) : 0;
      const usage = tap?.usage();
      if (usage) r.usage = usage;
      if (insight) insight.finished(seq, ctx, worker, tap, status, r.arrivedAt!, usage);
      if (span) {
        span.setAttribute('http.response.status_code', status);
        if (result?.failure) span.setAttribute('kvgate.failure', result.failure);
        if (usage?.cachedTokens !== undefined) span.setAttribute('kvgate.cached_tokens', usage.cachedTokens);
        if (usage?.promptTokens !== undefined) span.setAttribute('kvgate.prompt_tokens', usage.promptTokens);
        if (usage?.completionTokens !== undefined) span.setAttribute('kvgate.completion_tokens', usage.completionTokens);
        if (status >= 500 || status === 0) span.setStatus({ code: SpanStatusCode.ERROR });
        span.end();
        r.trace!.span.setAttribute('kvgate.worker', worker.id);
        if (usage?.cachedTokens !== undefined) r.trace!.span.setAttribute('kvgate.cached_tokens', usage.cachedTokens);
      }
    }
    if (result.outcome === 'aborted') metrics.clientAborts.inc({ route: r.route });
    recordOutcome(worker, result, metrics);
    return routeHeader ? { ...result, routeHeader } : result;
  }

  private upstreamHeaders(r: RoutedRequest, worker: Worker): Record<string, string> {
    const h = forwardHeaders(r.req.headers, r.requestId, this.deps.forwardHeaders);
    if (worker.apiKey) h.authorization = `Bearer ${worker.apiKey}`;
    else if (this.deps.clientAuthEnabled) delete h.authorization;
    if (worker.dpRank !== undefined) h['x-data-parallel-rank'] = String(worker.dpRank);
    return h;
  }
}

/**
 * The body sent to a worker: the client's bytes unchanged, except that a data-parallel rank
 * chosen by kvgate is pinned with `data_parallel_rank` (vLLM and SGLang read it; the
 * X-data-parallel-rank header says the same).
 */
function bodyFor(r: RoutedRequest, worker: Worker): Buffer {
  if (worker.dpRank === undefined) return r.rawBody;
  return Buffer.from(JSON.stringify({ ...r.body, data_parallel_rank: worker.dpRank }));
}

/** Passive health: the exchange's outcome feeds the worker's circuit breaker and the metrics. */
function recordOutcome(worker: Worker, result: ProxyResult, metrics: GatewayMetrics): void {
  if (result.failure) metrics.upstreamErrors.inc({ worker: metrics.w(worker), kind: result.failure });
  if (result.outcome === 'aborted') return; // the client left: says nothing about the worker (counted by the caller)
  const status = result.held?.status ?? result.status;
  const failed = !!result.failure || status >= 500 || status === 0;
  if (failed) worker.breaker?.recordFailure();
  else worker.breaker?.recordSuccess();
}

function sleepUnlessClosed(ms: number, res: ServerResponse): Promise<boolean> {
  if (res.destroyed) return Promise.resolve(false);
  return new Promise((resolve) => {
    const done = (ok: boolean) => {
      clearTimeout(t);
      res.removeListener('close', onClose);
      resolve(ok);
    };
    const onClose = () => done(false);
    const t = setTimeout(() => done(true), ms);
    res.once('close', onClose);
  });
}
