import { randomBytes } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';
import type { Dispatcher } from 'undici';
import type { Clock } from '../core/clock.js';
import type { RequestContext } from '../core/context.js';
import { errors, GatewayError } from '../core/errors.js';
import type { WorkerRegistry } from '../core/registry.js';
import type { Worker } from '../core/worker.js';
import type { GatewayMetrics } from '../metrics/gateway-metrics.js';
import { explainWith, type PairExplanation, type RouteExplanation } from '../policies/explain.js';
import type { RequestOutcome, RoutingPolicy, WorkerPair } from '../policies/policy.js';
import { sendError } from '../server/http-util.js';
import type { UpstreamPools } from '../upstream/pools.js';
import { forwardHeaders } from '../upstream/proxy.js';
import type { RequestInsight } from '../observability/insight.js';
import { SpanKind, type Span } from '../observability/tracing.js';
import { explainPairWith, withOutsideExclusions } from '../policies/explain.js';
import type { ResponseTap } from '../upstream/response-tap.js';
import { buildContext, contextFor, type TokenSource, routeModel, tracedTokenize, type RoutedRequest, type Tokenize } from './request.js';

export type PdProtocol = 'sglang' | 'vllm';

export interface PdRouterDeps {
  registry: WorkerRegistry;
  /** Picks the pair (the prefill and decode policies composed when they differ). */
  pairPolicy: RoutingPolicy;
  prefillPolicy: RoutingPolicy;
  decodePolicy: RoutingPolicy;
  pools: UpstreamPools;
  metrics: GatewayMetrics;
  clock: Clock;
  protocol: PdProtocol;
  totalTimeoutMs: number;
  clientAuthEnabled: boolean;
  /** --forward-headers: client headers forwarded besides the default allow-list (lower-case). */
  forwardHeaders?: ReadonlySet<string>;
  tokenize?: Tokenize;
  /** Token ids for policies that need them, off the event loop (replaces `tokenize` when set). */
  tokens?: TokenSource;
  /** --strict-model (see resolveModel). */
  strictModel?: boolean;
  /** Decisions feed, explanations, latency/token metrics, trace spans. */
  insight?: RequestInsight;
}

/**
 * Composes two policies into one pair policy: the prefill policy picks from the prefill pool on
 * the full routing text, the decode policy from the decode pool.
 */
export class SplitPairPolicy implements RoutingPolicy {
  readonly name: string;
  readonly needsTokens: boolean;
  constructor(
    readonly prefill: RoutingPolicy,
    readonly decode: RoutingPolicy,
  ) {
    this.name = `${prefill.name}+${decode.name}`;
    this.needsTokens = !!prefill.needsTokens || !!decode.needsTokens;
  }
  blockHashing(ctx: RequestContext) {
    return this.prefill.blockHashing?.(ctx) ?? this.decode.blockHashing?.(ctx);
  }
  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined {
    return this.prefill.selectWorker(candidates, ctx);
  }
  selectPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): WorkerPair | undefined {
    const p = this.prefill.selectWorker(prefill, ctx);
    if (!p) return undefined;
    const d = this.decode.selectWorker(decode, ctx);
    return d ? { prefill: p, decode: d } : undefined;
  }
  explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
    return explainWith(this.prefill, candidates, ctx);
  }
  explainPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): PairExplanation {
    return { prefill: explainWith(this.prefill, prefill, ctx), decode: explainWith(this.decode, decode, ctx) };
  }
}

const U63 = (1n << 63n) - 1n;

/** A bootstrap room: uniform in [0, 2^63 − 1], exact (a bigint, never a float). */
export function newRoom(): bigint {
  return randomBytes(8).readBigUInt64BE(0) & U63;
}

/** Items in one request (SGLang sends arrays of bootstrap fields, one per item, for batches). */
export function batchSize(body: Record<string, unknown>): number {
  const text = body.text ?? body.prompt;
  if (Array.isArray(text) && text.length > 0 && text.every((t) => typeof t === 'string')) return text.length;
  const ids = body.input_ids;
  if (Array.isArray(ids) && ids.length > 0 && ids.every((t) => Array.isArray(t))) return ids.length;
  return 1;
}

/**
 * The body for both SGLang workers: the client's fields plus bootstrap_host, bootstrap_port and
 * bootstrap_room (exact 63-bit integers written as JSON numbers), arrays of one per item for
 * batches, and the side's data-parallel rank when pinned.
 */
export function sglangBody(body: Record<string, unknown>, prefill: Worker, rooms: readonly bigint[], dpRank: number | undefined): string {
  const n = rooms.length;
  const host = new URL(prefill.url).hostname;
  const fields: Record<string, unknown> = {
    ...body,
    bootstrap_host: n === 1 ? host : Array(n).fill(host),
    bootstrap_port: n === 1 ? prefill.bootstrapPort : Array(n).fill(prefill.bootstrapPort),
  };
  if (dpRank !== undefined) fields.data_parallel_rank = dpRank;
  delete fields.bootstrap_room;
  const json = JSON.stringify(fields);
  const room = n === 1 ? rooms[0].toString() : `[${rooms.map(String).join(',')}]`;
  return `${json.slice(0, -1)}${json.length > 2 ? ',' : ''}"bootstrap_room":${room}}`;
}

/** vLLM NIXL prefill request: one token, not streamed, asking for a remote decode. */
export function vllmPrefillBody(body: Record<string, unknown>, dpRank: number | undefined): string {
  const b: Record<string, unknown> = {
    ...body,
    max_tokens: 1,
    stream: false,
    kv_transfer_params: { do_remote_decode: true, do_remote_prefill: false, remote_engine_id: null, remote_block_ids: null, remote_host: null, remote_port: null },
  };
  if ('max_completion_tokens' in b) b.max_completion_tokens = 1;
  delete b.stream_options;
  if (dpRank !== undefined) b.data_parallel_rank = dpRank;
  return JSON.stringify(b);
}

/** Maps a prefill worker's failure to the client's status (as the SGLang router does). */
function prefillError(status: number, detail: string): GatewayError {
  const mapped = [400, 404, 500, 502, 503].includes(status) ? status : 500;
  const type = mapped < 500 ? 'invalid_request_error' : 'server_error';
  return new GatewayError(mapped, `Prefill worker answered ${status}: ${detail}`, type, `prefill_${mapped === 400 ? 'bad_request' : mapped === 404 ? 'not_found' : 'failed'}`);
}

class Aborted extends Error {}

interface Usage {
  prompt_tokens?: number;
  completion_tokens?: number;
  total_tokens?: number;
  prompt_tokens_details?: { cached_tokens?: number } | null;
}

/**
 * Prefill/decode disaggregated mode: pick a (prefill, decode) pair, drive the engines' hand-off
 * and return the decode worker's answer, streamed chunk by chunk when asked.
 *
 * - SGLang: the same body, with bootstrap_host/port/room added, goes to both workers at once;
 *   the decode answer is returned. With return_logprob the prefill's
 *   meta_info.input_token_logprobs are put in front of the decode's (every streamed chunk too).
 * - vLLM (NIXL): prefill first (max_tokens 1, not streamed, kv_transfer_params asking for a
 *   remote decode), then the original request with the kv_transfer_params the prefill returned
 *   to the decode worker; usage reports the prompt and cached tokens of the prefill.
 *
 * A prefill failure returns an error mapped from its status and no decode output. Load is held on
 * both workers from selection until the response ends, whatever ends it. PD requests are not
 * retried (a hand-off cannot be replayed onto another pair safely once started).
 */
export class PdRouter {
  /** Each traced request's exchange span: its context is what the workers receive as traceparent. */
  private readonly spans = new WeakMap<RoutedRequest, Span>();
  constructor(private readonly deps: PdRouterDeps) {}

  async handle(r: RoutedRequest): Promise<number> {
    const { registry, pairPolicy, metrics } = this.deps;
    const model = routeModel(registry, r, ['prefill', 'decode'], this.deps.strictModel);
    const insight = this.deps.insight;
    r.arrivedAt ??= performance.now();
    const built = this.deps.tokens
      ? contextFor(r, model, this.deps.clock, this.deps.tokens, !!pairPolicy.needsTokens, r.res, registry, r.trace, pairPolicy.blockHashing?.bind(pairPolicy))
      : buildContext(r, model, this.deps.clock, tracedTokenize(this.deps.tokenize, r.trace), !!pairPolicy.needsTokens, registry);
    const ctx = built instanceof Promise ? await built : built;
    if (r.res.destroyed) {
      metrics.clientAborts.inc({ route: r.route });
      return 0;
    }
    const prefillPool = registry.forModel(model, 'prefill');
    const decodePool = registry.forModel(model, 'decode');
    if (!prefillPool.some((w) => w.isAvailable())) throw errors.unavailable(`No healthy prefill worker for model '${model}'`, 'no_available_prefill_workers');
    if (!decodePool.some((w) => w.isAvailable())) throw errors.unavailable(`No healthy decode worker for model '${model}'`, 'no_available_decode_workers');
    const sampled = insight?.sample() ?? false;
    let explanation: PairExplanation | undefined;
    if (insight?.wantsExplanation(sampled)) {
      const e = explainPairWith(pairPolicy, prefillPool, decodePool, ctx);
      const others = (t: 'prefill' | 'decode') => registry.all().filter((w) => w.type === t && w.modelId !== model);
      explanation = { prefill: withOutsideExclusions(e.prefill, [], others('prefill')), decode: withOutsideExclusions(e.decode, [], others('decode')) };
    }
    const select = r.trace?.child('select', { 'kvgate.policy': pairPolicy.name, 'kvgate.candidates': prefillPool.length + decodePool.length });
    insight?.opts.metrics.takeNote();
    const pair = pairPolicy.selectPair(prefillPool, decodePool, ctx);
    if (!pair) {
      select?.end();
      throw errors.noHealthyWorkers(model);
    }
    const { prefill, decode } = pair;
    const { seq } = insight ? insight.decided({ requestId: r.requestId, route: r.route, ctx, policy: pairPolicy.name, worker: decode, prefill, attempt: 0, explanation, sampled }) : { seq: 0 };
    if (select) {
      select.setAttributes({ 'kvgate.worker': decode.id, 'kvgate.prefill_worker': prefill.id });
      select.end();
    }
    const routeHeader = insight?.routeHeader(explanation, decode, prefill);
    if (routeHeader) r.res.setHeader('x-kvgate-route', routeHeader);
    const tap = insight?.tap(model, decode, r.arrivedAt);
    const exchangeSpan = r.trace?.child(`pd ${r.path}`, { 'kvgate.worker': decode.id, 'kvgate.prefill_worker': prefill.id, 'kvgate.pd_protocol': this.deps.protocol }, undefined, SpanKind.CLIENT);
    if (exchangeSpan) this.spans.set(r, exchangeSpan);
    let finalStatus = 0;
    metrics.decisions.inc({ policy: this.deps.prefillPolicy.name, worker: metrics.w(prefill) });
    metrics.decisions.inc({ policy: this.deps.decodePolicy.name, worker: metrics.w(decode) });
    metrics.pdRequests.inc({ route: r.route, protocol: this.deps.protocol });
    metrics.pdPrefill.inc({ worker: metrics.w(prefill) });
    metrics.pdDecode.inc({ worker: metrics.w(decode) });

    const prefillGuard = prefill.acquire();
    const decodeGuard = decode.acquire();
    const ac = new AbortController();
    const onClose = () => {
      if (!r.res.writableFinished) ac.abort(new Aborted());
    };
    r.res.once('close', onClose);
    const timer = setTimeout(() => ac.abort(errors.gatewayTimeout('Request did not finish within --request-timeout-secs')), this.deps.totalTimeoutMs);
    let outcome: RequestOutcome = 'error';
    try {
      const status =
        this.deps.protocol === 'sglang' ? await this.sglang(r, ctx, prefill, decode, ac.signal, tap) : await this.vllm(r, ctx, prefill, decode, ac.signal, tap);
      outcome = status < 500 ? 'success' : 'error';
      finalStatus = status;
      return status;
    } catch (e) {
      if (ac.signal.reason instanceof Aborted) {
        outcome = 'aborted';
        metrics.clientAborts.inc({ route: r.route });
        return 0;
      }
      const err = e instanceof GatewayError ? e : ac.signal.reason instanceof GatewayError ? ac.signal.reason : errors.badGateway(`PD exchange failed: ${(e as Error).message}`);
      if (ac.signal.reason instanceof GatewayError) outcome = 'timeout';
      metrics.pdErrors.inc({ kind: err.code });
      if (r.res.headersSent) r.res.destroy();
      else sendError(r.res, err, this.responseHeaders(r, prefill, decode));
      finalStatus = err.status;
      return err.status;
    } finally {
      const usage = tap?.usage();
      insight?.finished(seq, ctx, decode, tap, finalStatus, r.arrivedAt, usage);
      if (exchangeSpan) {
        exchangeSpan.setAttribute('http.response.status_code', finalStatus);
        if (usage?.cachedTokens !== undefined) exchangeSpan.setAttribute('kvgate.cached_tokens', usage.cachedTokens);
        exchangeSpan.end();
      }
      clearTimeout(timer);
      r.res.removeListener('close', onClose);
      ac.abort(new Aborted()); // whatever is still open upstream ends with the response
      prefillGuard.release();
      decodeGuard.release();
      metrics.processed.inc({ worker: metrics.w(prefill) });
      metrics.processed.inc({ worker: metrics.w(decode) });
      this.deps.prefillPolicy.onRequestComplete?.(prefill, ctx, outcome);
      this.deps.decodePolicy.onRequestComplete?.(decode, ctx, outcome);
    }
  }

  private async sglang(r: RoutedRequest, ctx: RequestContext, prefill: Worker, decode: Worker, signal: AbortSignal, tap?: ResponseTap): Promise<number> {
    const n = batchSize(r.body);
    const rooms = Array.from({ length: n }, newRoom);
    const send = (w: Worker) =>
      this.deps.pools.get(w.url).request({
        path: r.path,
        method: 'POST',
        headers: this.headers(r, w),
        body: sglangBody(r.body, prefill, rooms, w.dpRank),
        signal,
      });
    // Both at once: the decode worker waits for the KV from the prefill worker's bootstrap server.
    const decodeP = send(decode);
    decodeP.catch(() => undefined);
    let pre: Dispatcher.ResponseData;
    try {
      pre = await send(prefill);
    } catch (e) {
      if (signal.aborted) throw e;
      this.deps.metrics.pdErrors.inc({ kind: 'prefill_unreachable' });
      throw errors.badGateway(`Prefill worker unreachable: ${(e as Error).message}`, 'prefill_unreachable');
    }
    if (pre.statusCode >= 400) throw prefillError(pre.statusCode, (await pre.body.text()).slice(0, 500));
    const wantLogprobs = r.body.return_logprob === true;
    let prefillLogprobs: unknown[] | undefined;
    if (wantLogprobs) prefillLogprobs = inputLogprobs(await pre.body.text());
    else void pre.body.dump().catch(() => undefined);
    this.deps.prefillPolicy.onFirstToken?.(prefill, ctx);
    const dec = await this.decodeResponse(decodeP, signal);
    return this.relay(r, dec, prefill, decode, ctx, prefillLogprobs ? (obj) => prependLogprobs(obj, prefillLogprobs!) : undefined, tap);
  }

  private async vllm(r: RoutedRequest, ctx: RequestContext, prefill: Worker, decode: Worker, signal: AbortSignal, tap?: ResponseTap): Promise<number> {
    let pre: Dispatcher.ResponseData;
    try {
      pre = await this.deps.pools.get(prefill.url).request({
        path: r.path,
        method: 'POST',
        headers: this.headers(r, prefill),
        body: vllmPrefillBody(r.body, prefill.dpRank),
        signal,
      });
    } catch (e) {
      if (signal.aborted) throw e;
      throw errors.badGateway(`Prefill worker unreachable: ${(e as Error).message}`, 'prefill_unreachable');
    }
    const text = await pre.body.text();
    if (pre.statusCode >= 400) throw prefillError(pre.statusCode, text.slice(0, 500));
    let preJson: { kv_transfer_params?: unknown; usage?: Usage };
    try {
      preJson = JSON.parse(text);
    } catch {
      throw errors.badGateway('Prefill worker answered something that is not JSON', 'prefill_bad_response');
    }
    if (!preJson.kv_transfer_params || typeof preJson.kv_transfer_params !== 'object') {
      throw errors.badGateway('Prefill worker returned no kv_transfer_params: is it a vLLM engine with a KV connector (e.g. NixlConnector) in kv_producer role?', 'prefill_no_kv_transfer_params');
    }
    this.deps.prefillPolicy.onFirstToken?.(prefill, ctx);
    const decodeBody: Record<string, unknown> = { ...r.body, kv_transfer_params: preJson.kv_transfer_params };
    if (decode.dpRank !== undefined) decodeBody.data_parallel_rank = decode.dpRank;
    const decP = this.deps.pools.get(decode.url).request({
      path: r.path,
      method: 'POST',
      headers: this.headers(r, decode),
      body: JSON.stringify(decodeBody),
      signal,
    });
    const dec = await this.decodeResponse(decP, signal);
    const preUsage = preJson.usage;
    return this.relay(r, dec, prefill, decode, ctx, preUsage ? (obj) => mergeUsage(obj, preUsage) : undefined, tap);
  }

  private async decodeResponse(p: Promise<Dispatcher.ResponseData>, signal: AbortSignal): Promise<Dispatcher.ResponseData> {
    try {
      return await p;
    } catch (e) {
      if (signal.aborted) throw e;
      throw errors.badGateway(`Decode worker unreachable: ${(e as Error).message}`, 'decode_unreachable');
    }
  }

  /**
   * Streams the decode answer to the client (status and headers kept). With a transform, JSON
   * bodies and every SSE `data:` event are rewritten; otherwise bytes pass unchanged.
   */
  private async relay(
    r: RoutedRequest,
    dec: Dispatcher.ResponseData,
    prefill: Worker,
    decode: Worker,
    ctx: RequestContext,
    transform: ((obj: Record<string, unknown>) => void) | undefined,
    tap?: ResponseTap,
  ): Promise<number> {
    const res = r.res;
    const type = String(dec.headers['content-type'] ?? '');
    tap?.headers(dec.statusCode, type);
    const sse = type.includes('text/event-stream');
    const headers: Record<string, string | string[]> = { ...this.responseHeaders(r, prefill, decode) };
    for (const [k, v] of Object.entries(dec.headers as IncomingHttpHeaders)) {
      if (v === undefined || ['connection', 'keep-alive', 'transfer-encoding', 'content-length'].includes(k)) continue;
      headers[k] = v;
    }
    const ok = dec.statusCode < 400;
    if (transform && ok && !sse && type.includes('json')) {
      const obj = JSON.parse(await dec.body.text()) as Record<string, unknown>;
      transform(obj);
      const text = JSON.stringify(obj);
      res.writeHead(dec.statusCode, { ...headers, 'content-length': Buffer.byteLength(text) });
      tap?.data(Buffer.from(text));
      tap?.end();
      res.end(text);
      this.deps.decodePolicy.onFirstToken?.(decode, ctx);
      return dec.statusCode;
    }
    res.writeHead(dec.statusCode, headers);
    let first = true;
    let pending = '';
    for await (const chunk of dec.body) {
      if (first) {
        first = false;
        this.deps.decodePolicy.onFirstToken?.(decode, ctx);
      }
      let out: string | Buffer = chunk as Buffer;
      if (transform && ok && sse) {
        pending += (chunk as Buffer).toString('utf8');
        const cut = pending.lastIndexOf('\n');
        if (cut < 0) continue;
        out = rewriteEvents(pending.slice(0, cut + 1), transform);
        pending = pending.slice(cut + 1);
      }
      tap?.data(typeof out === 'string' ? Buffer.from(out) : out);
      if (!res.write(out)) await new Promise<void>((resolve) => res.once('drain', resolve));
    }
    if (pending) {
      const rest = rewriteEvents(pending, transform!);
      tap?.data(Buffer.from(rest));
      res.write(rest);
    }
    tap?.end();
    res.end();
    return dec.statusCode;
  }

  private headers(r: RoutedRequest, w: Worker): Record<string, string> {
    const h = forwardHeaders(r.req.headers, r.requestId, this.deps.forwardHeaders);
    h['content-type'] = 'application/json';
    if (w.apiKey) h.authorization = `Bearer ${w.apiKey}`;
    else if (this.deps.clientAuthEnabled) delete h.authorization;
    if (w.dpRank !== undefined) h['x-data-parallel-rank'] = String(w.dpRank);
    const span = this.spans.get(r);
    if (span) r.trace!.inject(span, h);
    return h;
  }

  private responseHeaders(r: RoutedRequest, prefill: Worker, decode: Worker): Record<string, string> {
    return { 'x-request-id': r.requestId, 'x-kvgate-worker': decode.id, 'x-kvgate-prefill-worker': prefill.id };
  }
}

/** Rewrites the `data: {json}` lines of SSE text; other lines (and [DONE]) pass unchanged. */
function rewriteEvents(text: string, transform: (obj: Record<string, unknown>) => void): string {
  return text.replace(/^data: (.+)$/gm, (line, payload: string) => {
    if (payload.trim() === '[DONE]') return line;
    try {
      const obj = JSON.parse(payload) as Record<string, unknown>;
      transform(obj);
      return `data: ${JSON.stringify(obj)}`;
    } catch {
      return line;
    }
  });
}

function inputLogprobs(text: string): unknown[] | undefined {
  // The prefill answer may be one JSON object or SSE events: take the first input_token_logprobs.
  const candidates = text.startsWith('{') ? [text] : [...text.matchAll(/^data: (\{.+)$/gm)].map((m) => m[1]);
  for (const c of candidates) {
    try {
      const v = (JSON.parse(c) as { meta_info?: { input_token_logprobs?: unknown } }).meta_info?.input_token_logprobs;
      if (Array.isArray(v)) return v;
    } catch {
      /* not JSON: skip */
    }
  }
  return undefined;
}

/** SGLang logprob merge: prefill's input_token_logprobs in front of the decode's. */
export function prependLogprobs(obj: Record<string, unknown>, prefill: readonly unknown[]): void {
  const meta = obj.meta_info as { input_token_logprobs?: unknown } | undefined;
  if (!meta || typeof meta !== 'object') return;
  const mine = Array.isArray(meta.input_token_logprobs) ? meta.input_token_logprobs : [];
  meta.input_token_logprobs = [...prefill, ...mine];
}

/** vLLM: the client's usage takes the prompt and cached tokens from the prefill worker. */
export function mergeUsage(obj: Record<string, unknown>, pre: Usage): void {
  const usage = obj.usage as Usage | null | undefined;
  if (!usage || typeof usage !== 'object') return;
  if (typeof pre.prompt_tokens === 'number') usage.prompt_tokens = pre.prompt_tokens;
  const cached = pre.prompt_tokens_details?.cached_tokens;
  usage.prompt_tokens_details = { ...(usage.prompt_tokens_details ?? {}), cached_tokens: typeof cached === 'number' ? cached : 0 };
  if (typeof usage.completion_tokens === 'number' && typeof usage.prompt_tokens === 'number') {
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
  }
}

