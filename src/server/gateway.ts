import { createHash, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import type { ServeConfig } from '../config/serve-config.js';
import { DroppedError, errors, GatewayError } from '../core/errors.js';
import type { WorkerRegistry } from '../core/registry.js';
import type { WorkerManager } from '../core/worker-manager.js';
import type { GatewayMetrics } from '../metrics/gateway-metrics.js';
import type { RoutingPolicy } from '../policies/policy.js';
import { PdRouter, SplitPairPolicy } from '../routers/pd.js';
import { RegularRouter } from '../routers/regular.js';
import type { RoutedRequest } from '../routers/request.js';
import { UpstreamPools } from '../upstream/pools.js';
import { loadWorkerTls } from '../core/tls.js';
import { defaultRetryConfig, type RetryConfig } from '../core/retry.js';
import type { KvEventHub } from '../events/hub.js';
import type { TokenizerRegistry } from '../tokenize/registry.js';
import type { Worker } from '../core/worker.js';
import { KeyRateLimiter, KeyTokenLimiter, type Admission, type AdmissionRequest } from './admission.js';
import { objectiveFrom, SLO_TTFT_HEADER } from '../policies/slo-aware.js';
import { isLoopback, KeySet, readKeyFile } from './auth.js';
import { isAdminRoute, PUBLIC_ROUTES, type ControlRoutes, type WorkerRegistration } from './control.js';
import { parseJsonObject } from '../core/request-body.js';
import { readBody, sendError } from './http-util.js';
import { GENERATION_ROUTES, RoutingCore, type RoutingCoreOptions } from './routing-core.js';

export { createLogger, timerScheduler } from './routing-core.js';

export type GatewayOptions = RoutingCoreOptions;

/** How long the body of a request refused before its body was read may keep arriving (then the connection is closed). */
const BODY_DRAIN_TIMEOUT_MS = 30_000;

/**
 * The composition root of `kvgate serve`: the routing core shared with `kvgate epp` (registry,
 * policies, worker manager, KV events, metrics; server/routing-core.ts), upstream pools, the
 * routers and the HTTP front.
 */
export class Gateway {
  readonly core: RoutingCore;
  readonly registry: WorkerRegistry;
  readonly policy: RoutingPolicy;
  readonly metrics: GatewayMetrics;
  readonly workers: WorkerManager;
  readonly log: Logger;
  /** Each generation request is logged at debug level (one line when its response ends). */
  private readonly logRequests: boolean;
  readonly admission: Admission;
  readonly kvEvents: KvEventHub;
  readonly tokenizers: TokenizerRegistry;
  /** Routing state shared with the other replicas (--replica-sync). */
  get sync() {
    return this.core.sync;
  }
  /** Kubernetes pod discovery (--service-discovery), once started. */
  get discovery() {
    return this.core.discovery;
  }
  private readonly pools: UpstreamPools;
  private readonly router: RegularRouter;
  private readonly control: ControlRoutes;
  /** Set in prefill/decode disaggregated mode. */
  private readonly pd: PdRouter | undefined;
  /** Policies for the prefill and decode pools (PD mode; both are `policy` unless set apart). */
  private readonly prefillPolicy: RoutingPolicy;
  private readonly decodePolicy: RoutingPolicy;
  /** What picks (prefill, decode) pairs in PD mode. */
  private readonly pairPolicy: RoutingPolicy;
  private readonly apiKeys: KeySet;
  private readonly adminKeys: KeySet;
  private readonly keyLimiter: KeyRateLimiter | undefined;
  private readonly keyPriority = new Map<string, number>();
  private readonly tokenLimiter: KeyTokenLimiter | undefined;
  private server: Server | undefined;
  private readonly startedAt = Date.now();
  /** Responses not yet finished (for graceful shutdown). */
  private readonly inFlight = new Set<ServerResponse>();
  private draining = false;

  constructor(
    readonly config: ServeConfig,
    opts: GatewayOptions = {},
  ) {
    const core = (this.core = new RoutingCore(config, opts));
    ({ registry: this.registry, policy: this.policy, metrics: this.metrics, workers: this.workers, log: this.log } = core);
    ({ admission: this.admission, kvEvents: this.kvEvents, tokenizers: this.tokenizers } = core);
    ({ prefillPolicy: this.prefillPolicy, decodePolicy: this.decodePolicy } = core);
    this.logRequests = this.log.isLevelEnabled('debug');
    const { clock, rng } = core;
    this.pairPolicy = this.prefillPolicy === this.decodePolicy ? this.prefillPolicy : new SplitPairPolicy(this.prefillPolicy, this.decodePolicy);
    this.pools = new UpstreamPools(config.connectTimeoutSecs * 1000, config.maxConnectionsPerWorker ?? null, loadWorkerTls(config));
    this.apiKeys = new KeySet([...config.apiKey, ...(config.apiKeyFile ? readKeyFile(config.apiKeyFile) : [])]);
    this.adminKeys = new KeySet(config.adminApiKey ? [config.adminApiKey] : []);
    this.keyLimiter = config.apiKeyRateLimitRps > 0 ? new KeyRateLimiter(config.apiKeyRateLimitRps) : undefined;
    this.tokenLimiter = config.apiKeyTokenLimitPerMin > 0 ? new KeyTokenLimiter(config.apiKeyTokenLimitPerMin) : undefined;
    for (const entry of config.apiKeyPriority ?? []) {
      const eq = entry.lastIndexOf('=');
      this.keyPriority.set(entry.slice(0, eq), Number(entry.slice(eq + 1)));
    }
    if (this.keyLimiter) core.onPeerRateLimit = (key, n) => this.keyLimiter!.consume(key, n);
    this.registry.on('removed', (w) => {
      if (this.registry.byUrl(w.url).length === 0) void this.pools.drop(w.url);
    });
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
      tokens: core.requestTokens,
      strictModel: config.strictModel,
      maxJsonDepth: config.maxJsonDepth,
      forwardHeaders: new Set(config.forwardHeaders),
      insight: core.insight,
      connectionWait: this.pools.capped ? (s) => core.hotPath.connectionWait.observe(s) : undefined,
    });
    if (config.pdDisaggregation) {
      this.pd = new PdRouter({
        insight: core.insight,
        registry: this.registry,
        pairPolicy: this.pairPolicy,
        prefillPolicy: this.prefillPolicy,
        decodePolicy: this.decodePolicy,
        pools: this.pools,
        metrics: this.metrics,
        clock,
        protocol: config.pdProtocol,
        totalTimeoutMs: config.requestTimeoutSecs * 1000,
        clientAuthEnabled: this.apiKeys.size > 0,
        tokenize: (route, model, body) => this.tokenizers.tokenize(route, body, model),
        tokens: core.requestTokens,
        strictModel: config.strictModel,
        forwardHeaders: new Set(config.forwardHeaders),
      });
    }
    this.control = core.controlRoutes({ pdMode: !!this.pd, startedAt: this.startedAt, isDraining: () => this.draining, pairPolicy: this.pairPolicy });
  }

  /** Registers the configured workers (checking each once), then listens. */
  async start(): Promise<void> {
    const c = this.config;
    await this.core.start();
    await this.core.registerConfiguredWorkers();
    await this.core.startDiscovery();
    this.core.startScraper();
    // Joins the peers (--replica-sync): readiness answers 503 until their shared state is applied.
    this.core.startSync();
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
    if (c.prometheusPort !== undefined) await this.startMetricsListener(c.prometheusPort, c.prometheusHost);
  }

  private boundPort = 0;

  /** The client-facing HTTP(S) server, once started (the process supervisor's connection balancing attaches to it). */
  get httpServer(): Server | undefined {
    return this.server;
  }

  /** The --prometheus-port listener (GET /metrics only), when configured. */
  private metricsServer: Server | undefined;
  private metricsBoundPort = 0;

  /** Port of the --prometheus-port listener (0 when there is none). */
  get metricsPort(): number {
    return this.metricsBoundPort;
  }

  /** --prometheus-port: /metrics on its own listener (the main port keeps serving it too). */
  private async startMetricsListener(port: number, host: string): Promise<void> {
    const server = createServer((req, res) => {
      const path = (req.url ?? '/').split('?')[0];
      if (path !== '/metrics' || req.method !== 'GET') {
        sendError(res, path === '/metrics' ? errors.methodNotAllowed(req.method ?? '?', path) : errors.notFound(`No route for ${req.method} ${path}`, 'route_not_found'));
        return;
      }
      void this.metrics.registry.metrics().then(
        (text) => {
          res.writeHead(200, { 'content-type': this.metrics.registry.contentType });
          res.end(text);
        },
        (e: Error) => sendError(res, errors.internal(e.message)),
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.removeListener('error', reject);
        this.metricsBoundPort = (server.address() as AddressInfo).port;
        resolve();
      });
    });
    this.metricsServer = server;
  }

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

  /** Registers a worker (all its DP ranks with --dp-aware) and subscribes to its KV events. */
  registerWorker(spec: WorkerRegistration): Promise<Worker[]> {
    return this.core.registerWorker(spec);
  }

  async close(): Promise<void> {
    this.draining = true;
    await this.core.stopBackground();
    const metricsServer = this.metricsServer;
    this.metricsServer = undefined;
    if (metricsServer) {
      await new Promise<void>((resolve) => {
        metricsServer.close(() => resolve());
        metricsServer.closeAllConnections();
      });
    }
    const server = this.server;
    if (server) {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    }
    await this.core.closeWorkers();
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
    let routed: RoutedRequest | undefined;
    const trace = route ? this.core.tracing?.startRequest(`POST ${path}`, req.headers, { 'http.request.method': 'POST', 'url.path': path, 'kvgate.request_id': requestId, 'kvgate.route': route, 'kvgate.policy': this.policy.name }) : undefined;
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
          // Keys are hashed: the bucket id may travel to peer replicas (replica sync), the key must not.
          const bucket = this.digest(apiKey ?? `ip:${req.socket.remoteAddress ?? ''}`).slice(0, 22);
          const verdict = this.keyLimiter.take(bucket);
          if (verdict.ok) this.core.sync?.rateLimitTaken(bucket);
          if (!verdict.ok) {
            this.metrics.admissionRejected.inc({ reason: 'rate_limited' });
            res.setHeader('retry-after', String(Math.max(1, Math.ceil(verdict.retryAfterMs / 1000))));
            throw errors.tooManyRequests('Request rate limit for this API key exceeded');
          }
        }
        const tokenBucket = this.tokenLimiter ? this.digest(apiKey ?? `ip:${req.socket.remoteAddress ?? ''}`).slice(0, 22) : undefined;
        if (this.tokenLimiter && tokenBucket) {
          const verdict = this.tokenLimiter.check(tokenBucket);
          if (!verdict.ok) {
            this.metrics.admissionRejected.inc({ reason: 'token_limited' });
            res.setHeader('retry-after', String(Math.max(1, Math.ceil(verdict.retryAfterMs / 1000))));
            throw new GatewayError(429, 'Token rate limit for this API key exceeded (prompt + completion tokens per minute)', 'rate_limit_error', 'token_rate_limited');
          }
        }
        // Priority and fairness come from headers alone: a sheddable request that admission would
        // refuse anyway is refused now, before its body is read, parsed or tokenized.
        const who = this.admissionRequest(req, apiKey, started);
        // (A body declared over --max-payload-size still gets its 413 from readBody.)
        if (this.admission.shedsAtOnce(who.priority) && !(Number(req.headers['content-length']) > this.config.maxPayloadSize)) this.refuseBeforeBody(req, who.priority);
        const raw = await readBody(req, this.config.maxPayloadSize);
        // A large body for a policy that tokenizes is parsed (and tokenized) in a tokenizer thread, not here.
        const unparsed = !this.pd && !!this.policy.needsTokens && this.core.requestTokens.offLoop(raw.length);
        const body = unparsed ? {} : parseJsonObject(raw, this.config.maxJsonDepth);
        const release = await this.admit(res, who);
        let served: RoutedRequest | undefined;
        try {
          const r: RoutedRequest = { req, res, route, path, requestId, rawBody: raw, body, arrivedAt: started, trace, priority: who.priority, unparsed };
          routed = served = r;
          status = await (this.pd ? this.pd.handle(r) : this.router.handle(r));
        } finally {
          release();
          // Charge what the engine reported; without a usage report, an estimate (body / 4 + max tokens).
          if (this.tokenLimiter && tokenBucket && served && status > 0 && status < 400) {
            const u = served.usage;
            const b = served.body;
            const maxTokens = Number(b.max_tokens ?? b.max_completion_tokens ?? 0) || 0;
            const used = u && (u.promptTokens !== undefined || u.completionTokens !== undefined) ? (u.promptTokens ?? 0) + (u.completionTokens ?? 0) : Math.ceil(raw.length / 4) + maxTokens;
            this.tokenLimiter.charge(tokenBucket, used);
          }
        }
      } else {
        status = await this.control.handle(req, res, path, requestId);
      }
    } catch (e) {
      const err = e instanceof GatewayError ? e : errors.internal((e as Error)?.message ?? String(e));
      if (!(e instanceof GatewayError)) this.log.error({ err: e, requestId, path }, 'unexpected error');
      status = err.status;
      if (status === 413) res.setHeader('connection', 'close');
      if (!res.headersSent) {
        if (err instanceof DroppedError) {
          res.setHeader('x-kvgate-dropped-reason', err.reason);
          if (err.reason === 'predicted-slo-miss') this.metrics.admissionRejected.inc({ reason: 'predicted_slo_miss' });
        }
        else if (status === 503 && (err.code === 'no_available_workers' || err.code === 'no_healthy_workers')) res.setHeader('x-kvgate-dropped-reason', 'no-endpoints');
      }
      sendError(res, err, { 'x-request-id': requestId });
    } finally {
      if (route) {
        const secs = (performance.now() - started) / 1000;
        this.metrics.requests.inc({ route: label, status: String(status), model: routed?.model ?? '' });
        this.metrics.duration.observe({ route: label }, secs);
        trace?.end(status, routed?.model ? { 'kvgate.model': routed.model } : undefined);
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
    const admin = isAdminRoute(path);
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

  /** SHA-256 (base64url) of API keys, fairness keys and client addresses, remembered for the next request with the same one. */
  private readonly digests = new Map<string, string>();
  private digest(source: string): string {
    let d = this.digests.get(source);
    if (d === undefined) {
      if (this.digests.size >= 4096) this.digests.clear();
      d = createHash('sha256').update(source).digest('base64url');
      this.digests.set(source, d);
    }
    return d;
  }

  /**
   * Priority (x-kvgate-priority, else the API key's --api-key-priority class, else 0), fairness
   * key (--fairness-header, else the API key, else the client address) and admission deadline
   * (arrival + the TTFT objective) of a request. A malformed priority is a 400.
   */
  private admissionRequest(req: IncomingMessage, apiKey: string | undefined, arrivedAt: number): AdmissionRequest & { priority: number } {
    let priority = apiKey !== undefined ? (this.keyPriority.get(apiKey) ?? 0) : 0;
    const given = req.headers['x-kvgate-priority'];
    const raw = Array.isArray(given) ? given[0] : given;
    if (raw !== undefined) {
      if (!/^\s*-?\d{1,6}\s*$/.test(raw)) throw errors.badRequest(`x-kvgate-priority must be an integer (got '${raw.slice(0, 40)}')`, 'invalid_priority', 'x-kvgate-priority');
      priority = Number(raw);
    }
    const fh = this.config.fairnessHeader?.toLowerCase();
    const fv = fh ? req.headers[fh] : undefined;
    const keySource = (Array.isArray(fv) ? fv[0] : fv) ?? (apiKey !== undefined ? `key:${apiKey}` : `ip:${req.socket.remoteAddress ?? ''}`);
    const key = this.digest(keySource).slice(0, 16);
    const objective = objectiveFrom(req.headers[SLO_TTFT_HEADER]) ?? this.config.ttftSloMs;
    return { priority, key, deadlineMs: objective !== undefined ? arrivedAt + objective : undefined };
  }

  /**
   * Refuses a sheddable request while admission is full, from its headers alone (429, reason
   * `saturated`, the same answer `Admission.acquire` gives). Its body is not read for routing but
   * still drained, so the connection stays usable for keep-alive: Node discards an unread body
   * after the response ends; here it is counted, and a body that grows past --max-payload-size (or
   * is still arriving 30 s later) closes the connection instead of being read on.
   */
  private refuseBeforeBody(req: IncomingMessage, priority: number): never {
    this.metrics.admissionRejected.inc({ reason: 'shed' });
    if (!req.complete) {
      const limit = this.config.maxPayloadSize;
      let size = 0;
      const onData = (chunk: Buffer) => {
        size += chunk.length;
        if (size > limit) {
          cleanup();
          req.socket.destroy();
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        req.socket.destroy();
      }, BODY_DRAIN_TIMEOUT_MS);
      timer.unref();
      const cleanup = () => {
        clearTimeout(timer);
        req.removeListener('data', onData);
        req.removeListener('end', cleanup);
        req.removeListener('close', cleanup);
      };
      req.on('data', onData);
      req.once('end', cleanup);
      req.once('close', cleanup);
    }
    throw this.admission.shedError(priority);
  }

  /** An admission slot for a generation request (a no-op without --max-concurrent-requests). */
  private async admit(res: ServerResponse, who: AdmissionRequest = {}): Promise<() => void> {
    if (!this.admission.enabled) return () => undefined;
    const ac = new AbortController();
    const onClose = () => ac.abort();
    res.once('close', onClose);
    const t0 = performance.now();
    try {
      const release = await this.admission.acquire(ac.signal, who);
      this.metrics.queueWait.observe((performance.now() - t0) / 1000);
      return release;
    } catch (e) {
      const err = e as GatewayError;
      if (err instanceof DroppedError) {
        this.metrics.admissionRejected.inc({ reason: 'shed' });
      } else if (err.status === 429) {
        this.metrics.admissionRejected.inc({ reason: 'queue_full' });
        res.setHeader('retry-after', String(Math.max(1, Math.ceil(this.config.queueTimeoutSecs / 4))));
      } else if (err.status === 408) this.metrics.admissionRejected.inc({ reason: 'queue_timeout' });
      throw err;
    } finally {
      res.removeListener('close', onClose);
    }
  }
}

