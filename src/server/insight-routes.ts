import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Clock } from '../core/clock.js';
import type { RouteName } from '../core/context.js';
import { errors } from '../core/errors.js';
import type { WorkerRegistry } from '../core/registry.js';
import type { Worker, WorkerType } from '../core/worker.js';
import type { GatewayMetrics } from '../metrics/gateway-metrics.js';
import type { DecisionFeed } from '../observability/decision-feed.js';
import { explainPairWith, explainWith, withOutsideExclusions } from '../policies/explain.js';
import type { RoutingPolicy } from '../policies/policy.js';
import { buildContext, resolveModel, type Tokenize } from '../routers/request.js';
import { DASHBOARD_HTML } from './dashboard-page.js';
import { parseJsonObject } from '../core/request-body.js';
import { readBody, sendJson } from './http-util.js';
import { GENERATION_ROUTES } from './routing-core.js';

/** Routes of this module (admin-protected by the fronts). */
export const INSIGHT_ROUTES = new Set(['/debug/route', '/dashboard', '/dashboard/state', '/dashboard/events']);

export interface InsightRoutesDeps {
  registry: WorkerRegistry;
  metrics: GatewayMetrics;
  feed: DecisionFeed;
  clock: Clock;
  pdMode: boolean;
  /** The policy of regular mode (prefill pool in PD mode), the decode pool's, and the pair policy. */
  policy: RoutingPolicy;
  decodePolicy: RoutingPolicy;
  pairPolicy: RoutingPolicy;
  tokenize: Tokenize;
  strictModel: boolean;
  maxPayloadSize: number;
  maxJsonDepth: number;
  /** Cached prefix held per worker by the policy's own structures (tree characters, indexed blocks). */
  cacheHeld(): { unit: string; perWorker: Map<string, number> } | undefined;
  /** Replica sync status, when on. */
  replicas?(): Record<string, unknown>;
  replicaId: string;
}

const ROUTE_NAMES: readonly RouteName[] = ['chat', 'completions', 'embeddings', 'generate'];

/**
 * `POST /debug/route` (what the policy would choose for a request body, and why, without
 * sending anything or changing any routing state), and the live dashboard: `GET /dashboard`
 * (one self-contained page), `GET /dashboard/state` (JSON), `GET /dashboard/events` (SSE).
 */
export class InsightRoutes {
  constructor(private readonly deps: InsightRoutesDeps) {}

  /** Answers one of INSIGHT_ROUTES; undefined for any other path. */
  async handle(req: IncomingMessage, res: ServerResponse, path: string, requestId: string): Promise<number | undefined> {
    if (!INSIGHT_ROUTES.has(path)) return undefined;
    const method = req.method ?? 'GET';
    const h = { 'x-request-id': requestId, 'cache-control': 'no-store' };
    const url = new URL(req.url!, 'http://x');
    switch (path) {
      case '/debug/route': {
        if (method !== 'POST') throw errors.methodNotAllowed(method, path);
        const body = parseJsonObject(await readBody(req, this.deps.maxPayloadSize), this.deps.maxJsonDepth);
        sendJson(res, 200, this.explainRequest(req, url, body, requestId), h);
        return 200;
      }
      case '/dashboard': {
        if (method !== 'GET') throw errors.methodNotAllowed(method, path);
        res.writeHead(200, {
          ...h,
          'content-type': 'text/html; charset=utf-8',
          'content-length': Buffer.byteLength(DASHBOARD_HTML),
          // Everything is inline; nothing is fetched from anywhere but this origin.
          'content-security-policy': "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'",
        });
        res.end(DASHBOARD_HTML);
        return 200;
      }
      case '/dashboard/state':
        if (method !== 'GET') throw errors.methodNotAllowed(method, path);
        sendJson(res, 200, this.state(), h);
        return 200;
      case '/dashboard/events':
        if (method !== 'GET') throw errors.methodNotAllowed(method, path);
        this.deps.feed.watch(res, Math.min(200, Math.max(0, Number(url.searchParams.get('backlog') ?? 50) || 0)));
        return 200;
    }
    return undefined;
  }

  /**
   * The explanation of a request body: the route comes from `?route=` (chat, completions,
   * embeddings, generate, or an API path such as /v1/chat/completions), else from the body's
   * shape (messages → chat, prompt → completions, input → embeddings, text / input_ids →
   * generate). `?exclude=id,id` leaves workers out as a retry would. The request's headers count
   * as a real request's do (session affinity, routing key).
   */
  explainRequest(req: IncomingMessage, url: URL, body: Record<string, unknown>, requestId: string): Record<string, unknown> {
    const d = this.deps;
    const route = routeOf(url.searchParams.get('route'), body);
    const types: WorkerType[] = d.pdMode ? ['prefill', 'decode'] : ['regular'];
    const model = resolveModel(d.registry, body, types, d.strictModel);
    const ctx = buildContext({ route, requestId, body, req }, model, d.clock, d.tokenize, !!d.pairPolicy.needsTokens || !!d.policy.needsTokens || !!d.decodePolicy.needsTokens);
    const excludeIds = new Set((url.searchParams.get('exclude') ?? '').split(',').map((s) => s.trim()).filter((s) => s.length > 0));
    const unknown = [...excludeIds].filter((id) => !d.registry.get(id));
    if (unknown.length > 0) throw errors.badRequest(`?exclude names unknown workers: ${unknown.join(', ')}`, 'invalid_value', 'exclude');
    const tokens = ctx.tokenIds ? ctx.tokenIds.length : null;
    const base = { request_id: requestId, route, model, mode: d.pdMode ? 'pd' : 'regular', routing_chars: ctx.routingText.length, prompt_tokens: tokens };
    const split = (t: WorkerType) => {
      const pool = d.registry.forModel(model, t);
      return {
        candidates: pool.filter((w) => !excludeIds.has(w.id)),
        excluded: pool.filter((w) => excludeIds.has(w.id)),
        others: d.registry.all().filter((w) => w.type === t && w.modelId !== model),
      };
    };
    if (!d.pdMode) {
      const s = split('regular');
      const e = withOutsideExclusions(explainWith(d.policy, s.candidates, ctx), s.excluded, s.others);
      return { ...base, policy: d.policy.name, chosen: e.chosen ?? null, explanation: e };
    }
    const p = split('prefill');
    const dd = split('decode');
    const e = explainPairWith(d.pairPolicy, p.candidates, dd.candidates, ctx);
    const prefill = withOutsideExclusions(e.prefill, p.excluded, p.others);
    const decode = withOutsideExclusions(e.decode, dd.excluded, dd.others);
    return { ...base, policy: d.pairPolicy.name, chosen: { prefill: prefill.chosen ?? null, decode: decode.chosen ?? null }, explanation: { prefill, decode } };
  }

  /** What the dashboard shows: workers, series, prefix groups. */
  state(): Record<string, unknown> {
    const d = this.deps;
    const held = d.cacheHeld();
    const totals = d.metrics.totals;
    const now = d.clock.now();
    const workers = d.registry.all().map((w: Worker) => {
      const t = totals.get(w.id);
      const e = w.engineLoad;
      return {
        id: w.id,
        url: w.url,
        model: w.modelId ?? null,
        type: w.type,
        healthy: w.healthy,
        available: w.isAvailable(),
        breaker: w.breaker?.state ?? null,
        load: w.load,
        local_load: w.localLoad,
        peer_load: w.peerLoad,
        processed: w.processed,
        engine: e ? { running: e.running, waiting: e.waiting, kv_usage: e.kvUsage, age_s: Math.max(0, (now - e.updatedAtMs) / 1000) } : null,
        requests: t?.requests ?? 0,
        prompt_tokens: t?.promptTokens ?? 0,
        cached_tokens: t?.cachedTokens ?? 0,
        completion_tokens: t?.completionTokens ?? 0,
        hit_rate: t && t.promptTokens > 0 ? t.cachedTokens / t.promptTokens : null,
        cache_held: held ? (held.perWorker.get(w.id) ?? 0) : null,
      };
    });
    return {
      now: Date.now(),
      replica_id: d.replicaId,
      mode: d.pdMode ? 'pd' : 'regular',
      policy: d.pairPolicy.name,
      cache_held_unit: held?.unit ?? null,
      workers,
      series: d.feed.seriesView(60),
      prefix_groups: d.feed.groupsView(12),
      replicas: d.replicas?.() ?? null,
    };
  }
}

function routeOf(given: string | null, body: Record<string, unknown>): RouteName {
  if (given !== null && given !== '') {
    if ((ROUTE_NAMES as readonly string[]).includes(given)) return given as RouteName;
    const byPath = GENERATION_ROUTES[given];
    if (byPath) return byPath;
    throw errors.badRequest(`?route must be one of ${ROUTE_NAMES.join(', ')} or an API path (${Object.keys(GENERATION_ROUTES).join(', ')})`, 'invalid_value', 'route');
  }
  if (body.messages !== undefined) return 'chat';
  if (body.prompt !== undefined) return 'completions';
  if (body.input !== undefined) return 'embeddings';
  if (body.text !== undefined || body.input_ids !== undefined) return 'generate';
  throw errors.badRequest('Cannot tell the route from the body (messages, prompt, input, text or input_ids): pass ?route=', 'missing_field', 'route');
}
