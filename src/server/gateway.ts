import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { request } from 'undici';
import pino, { type Logger } from 'pino';
import type { ServeConfig } from '../config/serve-config.js';
import { systemClock, type Clock } from '../core/clock.js';
import type { RouteName } from '../core/context.js';
import { errors, GatewayError } from '../core/errors.js';
import { WorkerRegistry } from '../core/registry.js';
import { randomRng, type Rng } from '../core/rng.js';
import { WorkerManager } from '../core/worker-manager.js';
import { normalizeUrl } from '../core/worker.js';
import { GatewayMetrics } from '../metrics/gateway-metrics.js';
import { CacheAwarePolicy } from '../policies/cache-aware.js';
import { createPolicy } from '../policies/factory.js';
import type { RoutingPolicy, Scheduler } from '../policies/policy.js';
import { PdRouter, SplitPairPolicy } from '../routers/pd.js';
import { RegularRouter } from '../routers/regular.js';
import { UpstreamPools } from '../upstream/pools.js';
import { defaultRetryConfig, type RetryConfig } from '../core/retry.js';
import { KvEventHub } from '../events/hub.js';
import { EngineMetricsScraper } from '../metrics/engine-scraper.js';
import { endpointForRank } from '../sim/kv-publisher.js';
import { loadTokenizer, TokenizerRegistry } from '../tokenize/registry.js';
import type { Worker, WorkerType } from '../core/worker.js';
import { Admission, KeyRateLimiter } from './admission.js';
import { isLoopback, KeySet, readKeyFile } from './auth.js';
import { parseJsonObject, readBody, sendError, sendJson } from './http-util.js';

const GENERATION_ROUTES: Record<string, RouteName> = {
  '/v1/chat/completions': 'chat',
  '/v1/completions': 'completions',
  '/v1/embeddings': 'embeddings',
  '/generate': 'generate',
};

/** Routes anyone may call (probes and metrics). */
const PUBLIC_ROUTES = new Set(['/health', '/liveness', '/readiness', '/metrics']);
/** Routes that change or reveal the cluster: --admin-api-key, or loopback only without one. */
const ADMIN_ROUTES = new Set(['/workers', '/add_worker', '/remove_worker', '/list_workers', '/get_loads', '/flush_cache']);

/** Real-time periodic work that never keeps the process alive. */
export const timerScheduler: Scheduler = (everyMs, fn) => {
  const t = setInterval(fn, everyMs);
  t.unref();
  return () => clearInterval(t);
};

export function createLogger(config: Pick<ServeConfig, 'logLevel' | 'logFormat'>): Logger {
  if (config.logFormat === 'pretty') {
    return pino({ level: config.logLevel, transport: { target: 'pino-pretty', options: { colorize: true } } });
  }
  return pino({ level: config.logLevel });
}

export interface GatewayOptions {
  clock?: Clock;
  rng?: Rng;
  logger?: Logger;
}

/**
 * The composition root of `kvgate serve`: one registry, one policy, the worker manager
 * (health, model discovery), upstream pools, metrics and the HTTP front.
 */
export class Gateway {
  readonly registry = new WorkerRegistry();
  readonly policy: RoutingPolicy;
  readonly metrics: GatewayMetrics;
  readonly workers: WorkerManager;
  readonly log: Logger;
  /** Each generation request is logged at debug level (one line when its response ends). */
  private readonly logRequests: boolean;
  readonly admission: Admission;
  readonly kvEvents: KvEventHub;
  readonly tokenizers = new TokenizerRegistry();
  private readonly scraper: EngineMetricsScraper | undefined;
  private readonly pools: UpstreamPools;
  private readonly router: RegularRouter;
  /** Set in prefill/decode disaggregated mode. */
  private readonly pd: PdRouter | undefined;
  /** Policies for the prefill and decode pools (PD mode; both are `policy` unless set apart). */
  private readonly prefillPolicy: RoutingPolicy;
  private readonly decodePolicy: RoutingPolicy;
  private readonly apiKeys: KeySet;
  private readonly adminKeys: KeySet;
  private readonly keyLimiter: KeyRateLimiter | undefined;
  private server: Server | undefined;
  private readonly startedAt = Date.now();
  /** Responses not yet finished (for graceful shutdown). */
  private readonly inFlight = new Set<ServerResponse>();
  private draining = false;

  constructor(
    readonly config: ServeConfig,
    opts: GatewayOptions = {},
  ) {
    this.log = opts.logger ?? createLogger(config);
    this.logRequests = this.log.isLevelEnabled('debug');
    const clock = opts.clock ?? systemClock;
    const rng = opts.rng ?? randomRng();
    this.pools = new UpstreamPools(config.connectTimeoutSecs * 1000);
    this.admission = new Admission({
      maxConcurrent: config.maxConcurrentRequests,
      queueSize: config.queueSize,
      queueTimeoutMs: config.queueTimeoutSecs * 1000,
    });
    this.apiKeys = new KeySet([...config.apiKey, ...(config.apiKeyFile ? readKeyFile(config.apiKeyFile) : [])]);
    this.adminKeys = new KeySet(config.adminApiKey ? [config.adminApiKey] : []);
    this.keyLimiter = config.apiKeyRateLimitRps > 0 ? new KeyRateLimiter(config.apiKeyRateLimitRps) : undefined;
    this.kvEvents = new KvEventHub({
      clock,
      logger: this.log,
      mediums: config.kvEventsMediums,
      bind: config.kvEventsBind,
      maxBlocks: config.kvIndexMaxBlocks,
      resolveSource: (topic, dpRank) => this.resolveEventSource(topic, dpRank),
    });
    this.metrics = new GatewayMetrics(this.registry, () => (this.policy instanceof CacheAwarePolicy ? this.policy.treeChars() : new Map()), this.kvEvents);
    const makePolicy = (name: string) => createPolicy(
      name,
      { clock, rng, schedule: timerScheduler, observer: this.metrics.policyObserver() },
      {
        cacheAware: {
          cacheThreshold: config.cacheThreshold,
          balanceAbsThreshold: config.balanceAbsThreshold,
          balanceRelThreshold: config.balanceRelThreshold,
          evictionIntervalSecs: config.evictionIntervalSecs,
          maxTreeSize: config.maxTreeSize,
        },
        kvIndex: this.kvEvents,
        kvAware: {
          overlapWeight: config.kvOverlapWeight,
          activeWeight: config.kvActiveWeight,
          historyWeight: config.kvHistoryWeight,
          temperature: config.routerTemperature,
          staleAfterMs: config.kvEventsStaleSecs * 1000,
          maxTreeSize: config.maxTreeSize,
          evictionIntervalSecs: config.evictionIntervalSecs,
        },
        prefixLoad: { windowSecs: config.windowSecs },
        engineLoad: { staleAfterMs: config.engineMetricsStaleSecs * 1000 },
      },
    );
    // PD mode: one instance per pool (each falls back to --policy), so no state (round-robin
    // counters, prefix trees) is shared between the prefill and the decode pool.
    this.policy = makePolicy(config.pdDisaggregation ? (config.prefillPolicy ?? config.policy) : config.policy);
    this.prefillPolicy = this.policy;
    this.decodePolicy = config.pdDisaggregation ? makePolicy(config.decodePolicy ?? config.policy) : this.policy;
    if (config.engineMetricsIntervalSecs > 0) {
      this.scraper = new EngineMetricsScraper(this.registry, { intervalMs: config.engineMetricsIntervalSecs * 1000, clock }, this.log);
    }
    this.registry.on('removed', (w) => {
      for (const p of new Set([this.policy, this.prefillPolicy, this.decodePolicy])) p.onWorkerRemoved?.(w);
      void this.kvEvents.removeSource(w.id);
      this.metrics.forgetWorker(w.id);
      if (this.registry.byUrl(w.url).length === 0) void this.pools.drop(w.url);
    });
    this.registry.on('modelChanged', (w, before) => {
      if (before !== undefined) this.policy.onWorkerRemoved?.(w);
    });
    this.workers = new WorkerManager(
      this.registry,
      {
        health: {
          intervalSecs: config.healthCheckIntervalSecs,
          timeoutSecs: config.healthCheckTimeoutSecs,
          failureThreshold: config.healthFailureThreshold,
          successThreshold: config.healthSuccessThreshold,
          endpoint: config.healthCheckEndpoint,
          startupTimeoutSecs: config.workerStartupTimeoutSecs,
        },
        breaker: {
          failureThreshold: config.cbFailureThreshold,
          successThreshold: config.cbSuccessThreshold,
          openMs: config.cbTimeoutDurationSecs * 1000,
          disabled: config.disableCircuitBreaker,
        },
        clock,
        onBreakerTransition: (w, from, to) => this.metrics.breakerTransitions.inc({ worker: w.id, from, to }),
      },
      this.log,
    );
    const retry: RetryConfig = config.disableRetries
      ? { ...defaultRetryConfig, maxAttempts: 1 }
      : {
          maxAttempts: config.retryMaxRetries,
          initialBackoffMs: config.retryInitialBackoffMs,
          maxBackoffMs: config.retryMaxBackoffMs,
          multiplier: config.retryBackoffMultiplier,
          jitter: config.retryJitterFactor,
        };
    this.router = new RegularRouter({
      registry: this.registry,
      policy: this.policy,
      pools: this.pools,
      metrics: this.metrics,
      clock,
      rng,
      retry,
      timeouts: {
        totalMs: config.requestTimeoutSecs * 1000,
        firstByteMs: config.firstByteTimeoutSecs * 1000,
        idleMs: config.streamIdleTimeoutSecs * 1000,
      },
      clientAuthEnabled: this.apiKeys.size > 0,
      tokenize: (route, model, body) => this.tokenizers.tokenize(route, body, model),
    });
    if (config.pdDisaggregation) {
      this.pd = new PdRouter({
        registry: this.registry,
        pairPolicy: this.prefillPolicy === this.decodePolicy ? this.prefillPolicy : new SplitPairPolicy(this.prefillPolicy, this.decodePolicy),
        prefillPolicy: this.prefillPolicy,
        decodePolicy: this.decodePolicy,
        pools: this.pools,
        metrics: this.metrics,
        clock,
        protocol: config.pdProtocol,
        totalTimeoutMs: config.requestTimeoutSecs * 1000,
        clientAuthEnabled: this.apiKeys.size > 0,
        tokenize: (route, model, body) => this.tokenizers.tokenize(route, body, model),
      });
    }
  }

  /** Registers the configured workers (checking each once), then listens. */
  async start(): Promise<void> {
    const c = this.config;
    for (const entry of c.tokenizer) {
      const eq = entry.indexOf('=');
      if (eq > 0 && !/^[a-zA-Z]:[\\/]/.test(entry)) await this.tokenizers.load(entry.slice(0, eq), entry.slice(eq + 1));
      else this.tokenizers.default = await loadTokenizer(entry);
    }
    await this.kvEvents.start();
    await Promise.all(
      c.workerUrls.map((url, i) =>
        this.registerWorker({
          url,
          modelId: c.modelId,
          apiKey: c.workerApiKey,
          kvEventsEndpoint: c.kvEventsEndpoints[i],
          kvEventsReplayEndpoint: c.kvEventsReplayEndpoints[i],
        }),
      ),
    );
    await Promise.all([
      ...c.prefill.map((p) => this.registerWorker({ url: p.url, modelId: c.modelId, apiKey: c.workerApiKey, type: 'prefill', bootstrapPort: p.bootstrapPort })),
      ...c.decode.map((url) => this.registerWorker({ url, modelId: c.modelId, apiKey: c.workerApiKey, type: 'decode' })),
    ]);
    this.scraper?.start();
    const options = { keepAliveTimeout: 65_000, requestTimeout: 0, headersTimeout: 60_000, maxHeaderSize: c.maxHeaderSize };
    const handler = (req: IncomingMessage, res: ServerResponse) => void this.dispatch(req, res);
    const server: Server =
      c.tlsCertPath && c.tlsKeyPath
        ? (createTlsServer({ ...options, cert: readFileSync(c.tlsCertPath), key: readFileSync(c.tlsKeyPath) }, handler) as unknown as Server)
        : createServer(options, handler);
    server.on('clientError', (err: NodeJS.ErrnoException, socket) => {
      if (!socket.writable) return socket.destroy();
      const tooBig = err.code === 'HPE_HEADER_OVERFLOW';
      const body = JSON.stringify({
        error: tooBig
          ? { message: `Request headers exceed ${c.maxHeaderSize} bytes`, type: 'invalid_request_error', code: 'headers_too_large', param: null }
          : { message: 'Malformed HTTP request', type: 'invalid_request_error', code: 'bad_http_request', param: null },
      });
      socket.end(`HTTP/1.1 ${tooBig ? '431 Request Header Fields Too Large' : '400 Bad Request'}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    });
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.config.port, this.config.host, () => {
        server.removeListener('error', reject);
        this.boundPort = (server.address() as AddressInfo).port;
        resolve();
      });
    });
  }

  private boundPort = 0;

  get port(): number {
    return this.boundPort;
  }

  get url(): string {
    const host = this.config.host === '0.0.0.0' || this.config.host === '::' ? '127.0.0.1' : this.config.host;
    return `${this.config.tlsCertPath ? 'https' : 'http'}://${host}:${this.port}`;
  }

  /** Requests whose response has not ended yet. */
  get activeRequests(): number {
    return this.inFlight.size;
  }

  get isDraining(): boolean {
    return this.draining;
  }

  /**
   * Graceful shutdown: readiness turns 503 at once and every new request is answered 503
   * `shutting_down` (connection: close); in-flight requests and streams may finish for up to
   * `graceMs`; whatever still runs then is cut (its upstream requests aborted), and the listener
   * closes. Resolves with the number of requests cut.
   */
  async shutdown(graceMs: number): Promise<number> {
    // Keep listening while draining so load balancers see readiness 503 (and clients a clear
    // 503 shutting_down with connection: close) instead of refused connections.
    this.draining = true;
    const deadline = Date.now() + graceMs;
    while (this.inFlight.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const cut = this.inFlight.size;
    for (const res of this.inFlight) res.destroy();
    await this.close();
    return cut;
  }

  /**
   * Registers a worker (all its DP ranks with --dp-aware) and subscribes to its KV events:
   * rank r of a data-parallel engine publishes on the endpoint's port + r, as vLLM does.
   */
  async registerWorker(spec: {
    url: string;
    modelId?: string;
    apiKey?: string;
    kvEventsEndpoint?: string;
    kvEventsReplayEndpoint?: string;
    type?: WorkerType;
    bootstrapPort?: number | null;
  }): Promise<Worker[]> {
    const workers = await this.workers.add({
      url: spec.url,
      modelId: spec.modelId,
      apiKey: spec.apiKey,
      type: spec.type,
      bootstrapPort: spec.bootstrapPort,
      dpAware: this.config.dpAware,
      dpSize: this.config.dpSize,
    });
    if (spec.kvEventsEndpoint) {
      for (const w of workers) {
        const rank = w.dpRank ?? 0;
        await this.kvEvents.addSource(
          w.id,
          endpointForRank(spec.kvEventsEndpoint, rank),
          spec.kvEventsReplayEndpoint ? endpointForRank(spec.kvEventsReplayEndpoint, rank) : undefined,
        );
      }
    }
    return workers;
  }

  /** Bind mode: the worker whose host:port the topic names (llm-d: kv@<host>:<port>@<model>), at the batch's rank. */
  private resolveEventSource(topic: string, dpRank: number | null): { key: string } | null {
    for (const w of this.registry.all()) {
      const hostPort = new URL(w.url).host;
      if (!topic.includes(hostPort)) continue;
      if (w.dpRank === undefined || w.dpRank === (dpRank ?? 0)) return { key: w.id };
    }
    return null;
  }

  async close(): Promise<void> {
    this.draining = true;
    this.policy.close?.();
    await this.scraper?.stop();
    await this.kvEvents.close();
    const server = this.server;
    if (server) {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    }
    await this.workers.close();
    await this.pools.closeAll();
  }

  private requestId(req: IncomingMessage): string {
    const given = req.headers['x-request-id'] ?? req.headers['x-correlation-id'];
    const id = Array.isArray(given) ? given[0] : given;
    if (id && id.length <= 256) return id;
    return randomUUID();
  }

  private async dispatch(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const started = performance.now();
    const requestId = this.requestId(req);
    const q = req.url!.indexOf('?');
    const path = q < 0 ? req.url! : req.url!.slice(0, q);
    const route = GENERATION_ROUTES[path];
    const label = route ?? path;
    let status = 500;
    this.inFlight.add(res);
    res.once('close', () => this.inFlight.delete(res));
    try {
      if (this.draining && !PUBLIC_ROUTES.has(path)) {
        res.setHeader('connection', 'close');
        throw errors.unavailable('kvgate is shutting down', 'shutting_down');
      }
      const apiKey = this.authorize(req, path);
      if (route) {
        if (req.method !== 'POST') throw errors.methodNotAllowed(req.method ?? '?', path);
        if (this.keyLimiter) {
          const verdict = this.keyLimiter.take(apiKey ?? `ip:${req.socket.remoteAddress ?? ''}`);
          if (!verdict.ok) {
            this.metrics.admissionRejected.inc({ reason: 'rate_limited' });
            res.setHeader('retry-after', String(Math.max(1, Math.ceil(verdict.retryAfterMs / 1000))));
            throw errors.tooManyRequests('Request rate limit for this API key exceeded');
          }
        }
        const raw = await readBody(req, this.config.maxPayloadSize);
        const body = parseJsonObject(raw, this.config.maxJsonDepth);
        const release = await this.admit(res);
        try {
          const routed = { req, res, route, path, requestId, rawBody: raw, body };
          status = await (this.pd ? this.pd.handle(routed) : this.router.handle(routed));
        } finally {
          release();
        }
      } else {
        status = await this.control(req, res, path, requestId);
      }
    } catch (e) {
      const err = e instanceof GatewayError ? e : errors.internal((e as Error)?.message ?? String(e));
      if (!(e instanceof GatewayError)) this.log.error({ err: e, requestId, path }, 'unexpected error');
      status = err.status;
      if (status === 413) res.setHeader('connection', 'close');
      sendError(res, err, { 'x-request-id': requestId });
    } finally {
      if (route) {
        const secs = (performance.now() - started) / 1000;
        this.metrics.requests.inc({ route: label, status: String(status) });
        this.metrics.duration.observe({ route: label }, secs);
        if (this.logRequests) this.log.debug({ requestId, route: label, status, worker: res.getHeader('x-kvgate-worker'), ms: Math.round(secs * 1000) }, 'request');
      }
    }
  }

  /**
   * Checks the caller may use `path`: data-plane routes need one of the --api-key keys (when any
   * is set), admin routes --admin-api-key (or, without one, a loopback client unless
   * --allow-remote-admin). Returns the data-plane key used, if any. Throws 401/403.
   */
  private authorize(req: IncomingMessage, path: string): string | undefined {
    if (PUBLIC_ROUTES.has(path)) return undefined;
    const admin = ADMIN_ROUTES.has(path) || path.startsWith('/workers/');
    if (admin) {
      if (this.adminKeys.size > 0) {
        if (this.adminKeys.check(req) !== undefined) return undefined;
        this.metrics.authFailures.inc({ scope: 'admin' });
        throw errors.unauthorized('Admin routes need Authorization: Bearer <admin key>');
      }
      if (this.config.allowRemoteAdmin || isLoopback(req)) return undefined;
      this.metrics.authFailures.inc({ scope: 'admin' });
      throw new GatewayError(403, 'Admin routes answer only loopback clients unless --admin-api-key or --allow-remote-admin is set', 'permission_error', 'admin_loopback_only');
    }
    if (this.apiKeys.size === 0) return undefined;
    const key = this.apiKeys.check(req);
    if (key !== undefined) return key;
    this.metrics.authFailures.inc({ scope: 'data' });
    throw errors.unauthorized();
  }

  /** An admission slot for a generation request (a no-op without --max-concurrent-requests). */
  private async admit(res: ServerResponse): Promise<() => void> {
    if (!this.admission.enabled) return () => undefined;
    const ac = new AbortController();
    const onClose = () => ac.abort();
    res.once('close', onClose);
    try {
      return await this.admission.acquire(ac.signal);
    } catch (e) {
      const err = e as GatewayError;
      if (err.status === 429) {
        this.metrics.admissionRejected.inc({ reason: 'queue_full' });
        res.setHeader('retry-after', String(Math.max(1, Math.ceil(this.config.queueTimeoutSecs / 4))));
      } else if (err.status === 408) this.metrics.admissionRejected.inc({ reason: 'queue_timeout' });
      throw err;
    } finally {
      res.removeListener('close', onClose);
    }
  }

  /** Health, models, metrics and admin routes. Returns the status sent. */
  private async control(req: IncomingMessage, res: ServerResponse, path: string, requestId: string): Promise<number> {
    const method = req.method ?? 'GET';
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
        if (this.draining) return send(503, { status: 'not_ready', reason: 'shutting down' });
        const all = this.registry.all();
        if (this.pd) {
          const healthyOf = (t: WorkerType) => all.filter((w) => w.type === t && w.isAvailable()).length;
          const [p, d] = [healthyOf('prefill'), healthyOf('decode')];
          if (p === 0 || d === 0) {
            const reason = p === 0 && d === 0 ? 'no healthy prefill or decode worker' : p === 0 ? 'no healthy prefill worker' : 'no healthy decode worker';
            return send(503, { status: 'not_ready', reason, healthy_prefill_workers: p, healthy_decode_workers: d, total_workers: all.length });
          }
          return send(200, { status: 'ready', healthy_prefill_workers: p, healthy_decode_workers: d, total_workers: all.length });
        }
        const healthy = all.filter((w) => w.isAvailable()).length;
        if (healthy === 0) {
          const reason = all.length === 0 ? 'no workers are registered' : `none of the ${all.length} workers is healthy`;
          return send(503, { status: 'not_ready', reason, healthy_workers: 0, total_workers: all.length });
        }
        return send(200, { status: 'ready', healthy_workers: healthy, total_workers: all.length });
      }
      case '/v1/models': {
        expect('GET');
        const created = Math.floor(this.startedAt / 1000);
        const data = this.registry.healthyModels().map((id) => ({ id, object: 'model', created, owned_by: 'kvgate' }));
        return send(200, { object: 'list', data });
      }
      case '/metrics': {
        expect('GET');
        const text = await this.metrics.registry.metrics();
        res.writeHead(200, { ...h, 'content-type': this.metrics.registry.contentType });
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
        return send(...(await this.addWorker({ url: u })));
      }
      case '/remove_worker': {
        expect('POST');
        const u = url.searchParams.get('url');
        if (!u) throw errors.badRequest("query parameter 'url' is required", 'missing_field', 'url');
        return send(...this.removeWorker(u));
      }
      case '/list_workers':
        expect('GET');
        return send(200, { urls: [...new Set(this.registry.all().map((w) => w.url))] });
      case '/get_loads':
        expect('GET');
        return send(200, await this.getLoads());
      case '/flush_cache':
        expect('POST');
        return send(200, await this.flushCache());
    }
    if (path.startsWith('/workers/')) {
      const id = decodeURIComponent(path.slice('/workers/'.length));
      const worker = this.registry.get(id) ?? this.registry.byUrl(safeNormalize(id) ?? '')[0];
      if (!worker) throw errors.notFound(`No worker with id '${id}'`, 'worker_not_found');
      if (method === 'GET') return send(200, worker.toJSON());
      if (method === 'DELETE') return send(...this.removeWorker(worker.url));
      throw errors.methodNotAllowed(method, path);
    }
    throw errors.notFound(`No route for ${method} ${path}`, 'route_not_found');
  }

  private workersBody() {
    const workers = this.registry.all().map((w) => w.toJSON());
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
    if (this.registry.byUrl(url).length > 0) {
      throw new GatewayError(409, `Worker '${url}' is already registered`, 'invalid_request_error', 'worker_exists');
    }
    for (const f of ['kv_events_endpoint', 'kv_events_replay_endpoint'] as const) {
      if (body[f] !== undefined && (typeof body[f] !== 'string' || !/^(tcp|ipc|inproc):\/\/.+/.test(body[f] as string))) {
        throw errors.badRequest(`'${f}' must be a ZMQ endpoint (tcp://host:port)`, 'invalid_value', f);
      }
    }
    const type = body.worker_type ?? 'regular';
    if (type !== 'regular' && type !== 'prefill' && type !== 'decode') throw errors.badRequest("'worker_type' must be regular, prefill or decode", 'invalid_value', 'worker_type');
    if ((type === 'regular') === !!this.pd) {
      throw errors.badRequest(this.pd ? "in PD mode 'worker_type' must be prefill or decode" : "'worker_type' prefill/decode needs --pd-disaggregation", 'invalid_value', 'worker_type');
    }
    const bp = body.bootstrap_port;
    if (bp !== undefined && bp !== null && !(Number.isInteger(bp) && (bp as number) >= 1 && (bp as number) <= 65535)) {
      throw errors.badRequest("'bootstrap_port' must be a port number or null", 'invalid_value', 'bootstrap_port');
    }
    const workers = await this.registerWorker({
      url,
      type,
      bootstrapPort: (bp as number | null | undefined) ?? null,
      modelId: body.model_id as string | undefined,
      apiKey: body.api_key as string | undefined,
      kvEventsEndpoint: body.kv_events_endpoint as string | undefined,
      kvEventsReplayEndpoint: body.kv_events_replay_endpoint as string | undefined,
    });
    this.log.info({ workers: workers.map((w) => w.id), healthy: workers[0].healthy }, 'worker added');
    return [201, { status: 'added', worker: workers[0].toJSON(), workers: workers.map((w) => w.toJSON()) }];
  }

  private removeWorker(rawUrl: string): [number, unknown] {
    const url = safeNormalize(rawUrl);
    const removed = url ? this.workers.remove(url) : [];
    if (removed.length === 0) throw errors.notFound(`No worker with URL '${rawUrl}'`, 'worker_not_found');
    this.log.info({ url }, 'worker removed');
    return [200, { status: 'removed', removed: removed.map((w) => w.id) }];
  }

  private async fanOut<T>(method: 'GET' | 'POST', path: string, read: (status: number, body: string) => T) {
    const urls = [...new Set(this.registry.all().map((w) => w.url))];
    return Promise.all(
      urls.map(async (url) => {
        try {
          const res = await request(url + path, { method, headers: this.workers.authHeaders(url), signal: AbortSignal.timeout(this.config.healthCheckTimeoutSecs * 1000) });
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
    const loads = this.registry.all().map((w) => {
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
