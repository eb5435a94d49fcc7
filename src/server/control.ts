import type { IncomingMessage, ServerResponse } from 'node:http';
import { request } from 'undici';
import type { Logger } from 'pino';
import { errors, GatewayError } from '../core/errors.js';
import type { WorkerRegistry } from '../core/registry.js';
import type { WorkerManager } from '../core/worker-manager.js';
import { normalizeUrl, workerIdOf, type Worker, type WorkerType } from '../core/worker.js';
import type { GatewayMetrics } from '../metrics/gateway-metrics.js';
import { parseJsonObject } from '../core/request-body.js';
import { readBody, sendJson } from './http-util.js';

/** Routes anyone may call (probes and metrics). */
export const PUBLIC_ROUTES = new Set(['/health', '/liveness', '/readiness', '/metrics']);
/** Routes that change or reveal the cluster: --admin-api-key, or loopback only without one. */
export const ADMIN_ROUTES = new Set(['/workers', '/add_worker', '/remove_worker', '/list_workers', '/get_loads', '/flush_cache', '/replicas', '/debug/route', '/dashboard', '/dashboard/state', '/dashboard/events']);

export function isAdminRoute(path: string): boolean {
  return ADMIN_ROUTES.has(path) || path.startsWith('/workers/');
}

/** A worker as the admin API and the configuration register it. */
export interface WorkerRegistration {
  url: string;
  modelId?: string;
  apiKey?: string;
  kvEventsEndpoint?: string;
  kvEventsReplayEndpoint?: string;
  type?: WorkerType;
  bootstrapPort?: number | null;
  /** DP ranks when the worker's /get_server_info does not say (default --dp-size). */
  dpSize?: number;
}

export interface ControlDeps {
  registry: WorkerRegistry;
  workers: WorkerManager;
  metrics: GatewayMetrics;
  log: Logger;
  /** Prefill/decode disaggregated mode (readiness needs both pools; workers are prefill or decode). */
  pdMode: boolean;
  startedAt: number;
  healthCheckTimeoutSecs: number;
  isDraining(): boolean;
  registerWorker(spec: WorkerRegistration): Promise<Worker[]>;
  /** Told of every worker added or removed through the admin API (replica sync shares it). */
  announce?(change: { op: 'add' | 'remove'; url: string; spec?: Record<string, unknown> }): void;
  /** Replica sync, when on: readiness waits for its first sync and shows its status. */
  replicas?(): { ready: boolean; status: Record<string, unknown> };
  /** Further routes (debug, dashboard): answers and returns the status, or undefined for a path it does not serve. */
  extra?(req: IncomingMessage, res: ServerResponse, path: string, requestId: string): Promise<number | undefined>;
}

/**
 * The control plane of an HTTP front: probes, models, metrics and the worker admin API
 * (`/workers`, SGLang-router aliases, `/get_loads`, `/flush_cache`). Authorization is the
 * front's job; this answers the route.
 */
export class ControlRoutes {
  constructor(private readonly deps: ControlDeps) {}

  /** Health, models, metrics and admin routes. Returns the status sent. */
  async handle(req: IncomingMessage, res: ServerResponse, path: string, requestId: string): Promise<number> {
    const method = req.method ?? 'GET';
    const extra = await this.deps.extra?.(req, res, path, requestId);
    if (extra !== undefined) return extra;
    const h = { 'x-request-id': requestId };
    const url = new URL(req.url!, 'http://x');
    const send = (status: number, body: unknown) => {
      sendJson(res, status, body, h);
      return status;
    };
    const expect = (m: string) => {
      if (method !== m) throw errors.methodNotAllowed(method, path);
    };

    switch (path) {
      case '/health':
      case '/liveness':
        expect('GET');
        return send(200, { status: 'ok' });
      case '/readiness': {
        expect('GET');
        if (this.deps.isDraining()) return send(503, { status: 'not_ready', reason: 'shutting down' });
        const replicas = this.deps.replicas?.();
        if (replicas && !replicas.ready) {
          return send(503, { status: 'not_ready', reason: 'replica sync: waiting for the shared routing state from peers', replica_sync: replicas.status });
        }
        const sync = replicas ? { replica_sync: replicas.status } : {};
        const all = this.deps.registry.all();
        if (this.deps.pdMode) {
          const healthyOf = (t: WorkerType) => all.filter((w) => w.type === t && w.isAvailable()).length;
          const [p, d] = [healthyOf('prefill'), healthyOf('decode')];
          if (p === 0 || d === 0) {
            const reason = p === 0 && d === 0 ? 'no healthy prefill or decode worker' : p === 0 ? 'no healthy prefill worker' : 'no healthy decode worker';
            return send(503, { status: 'not_ready', reason, healthy_prefill_workers: p, healthy_decode_workers: d, total_workers: all.length, ...sync });
          }
          return send(200, { status: 'ready', healthy_prefill_workers: p, healthy_decode_workers: d, total_workers: all.length, ...sync });
        }
        const healthy = all.filter((w) => w.isAvailable()).length;
        if (healthy === 0) {
          const reason = all.length === 0 ? 'no workers are registered' : `none of the ${all.length} workers is healthy`;
          return send(503, { status: 'not_ready', reason, healthy_workers: 0, total_workers: all.length, ...sync });
        }
        return send(200, { status: 'ready', healthy_workers: healthy, total_workers: all.length, ...sync });
      }
      case '/v1/models': {
        expect('GET');
        const created = Math.floor(this.deps.startedAt / 1000);
        const data = this.deps.registry.healthyModels().map((id) => ({ id, object: 'model', created, owned_by: 'kvgate' }));
        return send(200, { object: 'list', data });
      }
      case '/metrics': {
        expect('GET');
        const text = await this.deps.metrics.registry.metrics();
        res.writeHead(200, { ...h, 'content-type': this.deps.metrics.registry.contentType });
        res.end(text);
        return 200;
      }
      case '/workers':
        if (method === 'GET') return send(200, this.workersBody());
        if (method === 'POST') {
          const body = parseJsonObject(await readBody(req, 1 << 20));
          return send(...(await this.addWorker(body)));
        }
        throw errors.methodNotAllowed(method, path);
      case '/add_worker': {
        expect('POST');
        const u = url.searchParams.get('url');
        if (!u) throw errors.badRequest("query parameter 'url' is required", 'missing_field', 'url');
        // The older SGLang-router alias answers 200.
        const [, body] = await this.addWorker({ url: u });
        return send(200, body);
      }
      case '/remove_worker': {
        expect('POST');
        const u = url.searchParams.get('url');
        if (!u) throw errors.badRequest("query parameter 'url' is required", 'missing_field', 'url');
        return send(...this.removeWorker(u));
      }
      case '/list_workers':
        expect('GET');
        return send(200, { urls: [...new Set(this.deps.registry.all().map((w) => w.url))] });
      case '/get_loads':
        expect('GET');
        return send(200, await this.getLoads());
      case '/flush_cache':
        expect('POST');
        return send(200, await this.flushCache());
      case '/replicas': {
        expect('GET');
        const replicas = this.deps.replicas?.();
        return send(200, replicas ? replicas.status : { state: 'off' });
      }
    }
    if (path.startsWith('/v1/models/')) {
      expect('GET');
      // OpenAI: GET /v1/models/{model}; ids may contain '/', sent raw or percent-encoded.
      const id = decodeURIComponent(path.slice('/v1/models/'.length));
      if (!this.deps.registry.healthyModels().includes(id)) {
        throw new GatewayError(404, `The model '${id}' does not exist`, 'invalid_request_error', 'model_not_found', 'model');
      }
      return send(200, { id, object: 'model', created: Math.floor(this.deps.startedAt / 1000), owned_by: 'kvgate' });
    }
    if (path.startsWith('/workers/')) {
      // {worker_id} (stable, URL-safe), or the older forms: a worker id (url or url@rank), URL-encoded.
      const id = decodeURIComponent(path.slice('/workers/'.length));
      const worker =
        this.deps.registry.all().find((w) => workerIdOf(w.url) === id) ?? this.deps.registry.get(id) ?? this.deps.registry.byUrl(safeNormalize(id) ?? '')[0];
      if (!worker) throw errors.notFound(`No worker with id '${id}'`, 'worker_not_found');
      if (method === 'GET') return send(200, worker.toJSON());
      if (method === 'DELETE') {
        const [, removed] = this.removeWorker(worker.url);
        return send(202, { ...(removed as object), status: 'accepted', worker_id: workerIdOf(worker.url), url: worker.url, message: 'worker removed' });
      }
      throw errors.methodNotAllowed(method, path);
    }
    throw errors.notFound(`No route for ${method} ${path}`, 'route_not_found');
  }

  private workersBody() {
    const workers = this.deps.registry.all().map((w) => w.toJSON());
    const count = (t: WorkerType) => workers.filter((w) => w.type === t).length;
    return { workers, total: workers.length, stats: { regular_count: count('regular'), prefill_count: count('prefill'), decode_count: count('decode') } };
  }

  private async addWorker(body: Record<string, unknown>): Promise<[number, unknown]> {
    if (typeof body.url !== 'string') throw errors.badRequest("'url' must be a string", 'invalid_type', 'url');
    if (body.api_key !== undefined && typeof body.api_key !== 'string') throw errors.badRequest("'api_key' must be a string", 'invalid_type', 'api_key');
    if (body.model_id !== undefined && (typeof body.model_id !== 'string' || body.model_id === '')) {
      throw errors.badRequest("'model_id' must be a non-empty string", 'invalid_type', 'model_id');
    }
    let url: string;
    try {
      url = normalizeUrl(body.url);
    } catch (e) {
      throw errors.badRequest((e as Error).message, 'invalid_value', 'url');
    }
    if (this.deps.registry.byUrl(url).length > 0) {
      throw new GatewayError(409, `Worker '${url}' is already registered`, 'invalid_request_error', 'worker_exists');
    }
    for (const f of ['kv_events_endpoint', 'kv_events_replay_endpoint'] as const) {
      if (body[f] !== undefined && (typeof body[f] !== 'string' || !/^(tcp|ipc|inproc):\/\/.+/.test(body[f] as string))) {
        throw errors.badRequest(`'${f}' must be a ZMQ endpoint (tcp://host:port)`, 'invalid_value', f);
      }
    }
    const type = body.worker_type ?? 'regular';
    if (type !== 'regular' && type !== 'prefill' && type !== 'decode') throw errors.badRequest("'worker_type' must be regular, prefill or decode", 'invalid_value', 'worker_type');
    if ((type === 'regular') === !!this.deps.pdMode) {
      throw errors.badRequest(this.deps.pdMode ? "in PD mode 'worker_type' must be prefill or decode" : "'worker_type' prefill/decode needs --pd-disaggregation", 'invalid_value', 'worker_type');
    }
    const bp = body.bootstrap_port;
    if (bp !== undefined && bp !== null && !(Number.isInteger(bp) && (bp as number) >= 1 && (bp as number) <= 65535)) {
      throw errors.badRequest("'bootstrap_port' must be a port number or null", 'invalid_value', 'bootstrap_port');
    }
    const workers = await this.deps.registerWorker({
      url,
      type,
      bootstrapPort: (bp as number | null | undefined) ?? null,
      modelId: body.model_id as string | undefined,
      apiKey: body.api_key as string | undefined,
      kvEventsEndpoint: body.kv_events_endpoint as string | undefined,
      kvEventsReplayEndpoint: body.kv_events_replay_endpoint as string | undefined,
    });
    this.deps.log.info({ workers: workers.map((w) => w.id), healthy: workers[0].healthy }, 'worker added');
    this.deps.announce?.({ op: 'add', url, spec: { ...body, url } });
    const id = workerIdOf(url);
    // The SGLang router's shape (202 accepted, worker_id, url, location), with kvgate's state of
    // the worker after its first health check.
    return [202, { status: 'accepted', worker_id: id, url, location: `/workers/${id}`, worker: workers[0].toJSON(), workers: workers.map((w) => w.toJSON()) }];
  }

  private removeWorker(rawUrl: string): [number, unknown] {
    const url = safeNormalize(rawUrl);
    const removed = url ? this.deps.workers.remove(url) : [];
    if (removed.length === 0) throw errors.notFound(`No worker with URL '${rawUrl}'`, 'worker_not_found');
    this.deps.log.info({ url }, 'worker removed');
    this.deps.announce?.({ op: 'remove', url: url! });
    return [200, { status: 'removed', removed: removed.map((w) => w.id) }];
  }

  private async fanOut<T>(method: 'GET' | 'POST', path: string, read: (status: number, body: string) => T) {
    const urls = [...new Set(this.deps.registry.all().map((w) => w.url))];
    return Promise.all(
      urls.map(async (url) => {
        try {
          const res = await request(url + path, { method, dispatcher: this.deps.workers.dispatcher, headers: this.deps.workers.authHeaders(url), signal: AbortSignal.timeout(this.deps.healthCheckTimeoutSecs * 1000) });
          const text = await res.body.text();
          return { url, ok: res.statusCode >= 200 && res.statusCode < 300, status: res.statusCode, value: read(res.statusCode, text) };
        } catch (e) {
          return { url, ok: false, status: 0, error: (e as Error).message, value: undefined as T | undefined };
        }
      }),
    );
  }

  private async flushCache() {
    const results = await this.fanOut('POST', '/flush_cache', (_s, body) => body.slice(0, 500));
    const ok = results.filter((r) => r.ok).length;
    return {
      successful: ok,
      failed: results.length - ok,
      total_workers: results.length,
      results: results.map((r) => ({ url: r.url, ok: r.ok, status: r.status, ...(r.ok ? {} : { error: r.error ?? r.value }) })),
      message: results.length === 0 ? 'no workers registered' : `flushed ${ok} of ${results.length} workers`,
    };
  }

  private async getLoads() {
    const results = await this.fanOut('GET', '/get_load', (_s, body) => {
      const parsed = JSON.parse(body) as unknown;
      const ranks = Array.isArray(parsed) ? parsed : [parsed];
      return ranks.reduce((sum: number, r) => sum + (Number((r as { num_tokens?: unknown })?.num_tokens) || 0), 0);
    });
    const byUrl = new Map(results.map((r) => [r.url, r]));
    const loads = this.deps.registry.all().map((w) => {
      const r = byUrl.get(w.url);
      return { worker: w.id, worker_type: w.type, load: r?.ok ? r.value : -1, in_flight: w.load };
    });
    const ok = results.filter((r) => r.ok).length;
    return { loads, total_workers: results.length, successful: ok, failed: results.length - ok };
  }
}

function safeNormalize(u: string): string | undefined {
  try {
    return normalizeUrl(u);
  } catch {
    return undefined;
  }
}
