import { hostname } from 'node:os';
import pino, { type Logger } from 'pino';
import type { ServeConfig } from '../config/serve-config.js';
import { systemClock, type Clock } from '../core/clock.js';
import type { RouteName } from '../core/context.js';
import { WorkerRegistry } from '../core/registry.js';
import { randomRng, type Rng } from '../core/rng.js';
import { WorkerManager } from '../core/worker-manager.js';
import type { Worker } from '../core/worker.js';
import { endpointForRank } from '../events/endpoints.js';
import { KvEventHub } from '../events/hub.js';
import { EngineMetricsScraper } from '../metrics/engine-scraper.js';
import { GatewayMetrics, registerPredictorMetrics, registerReplicaSyncMetrics } from '../metrics/gateway-metrics.js';
import { SloAwarePolicy } from '../policies/slo-aware.js';
import { ServiceDiscovery } from '../discovery/service-discovery.js';
import { NatsTransport } from '../sync/nats-transport.js';
import { ReplicaSync, type AdminChange } from '../sync/replica-sync.js';
import { CacheAwarePolicy } from '../policies/cache-aware.js';
import { createPolicy, withSessionAffinity } from '../policies/factory.js';
import { loadWorkerTls } from '../core/tls.js';
import type { RoutingPolicy, Scheduler, TextTreeStats } from '../policies/policy.js';
import { loadTokenizerEntries, TokenizerRegistry } from '../tokenize/registry.js';
import { TokenizePool } from '../tokenize/pool.js';
import { RequestTokens } from '../tokenize/request-tokens.js';
import { HotPathMetrics } from '../metrics/hot-path-metrics.js';
import { DecisionFeed } from '../observability/decision-feed.js';
import { RequestInsight } from '../observability/insight.js';
import { Tracing } from '../observability/tracing.js';
import { KvAwarePolicy } from '../policies/kv-aware.js';
import { applyConcurrentMarking } from '../processes/v8-flags.js';
import { Admission } from './admission.js';
import { ControlRoutes, type WorkerRegistration } from './control.js';
import { InsightRoutes } from './insight-routes.js';

/** OpenAI-style generation paths and the route name policies see. */
export const GENERATION_ROUTES: Record<string, RouteName> = {
  '/v1/chat/completions': 'chat',
  '/v1/completions': 'completions',
  '/v1/embeddings': 'embeddings',
  '/generate': 'generate',
};

/** Real-time one-shot and periodic timers that never keep the process alive (replica sync). */
const realTimers = {
  once(ms: number, fn: () => void): () => void {
    const t = setTimeout(fn, ms);
    t.unref();
    return () => clearTimeout(t);
  },
  every: (ms: number, fn: () => void): (() => void) => timerScheduler(ms, fn),
};

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

export interface RoutingCoreOptions {
  clock?: Clock;
  rng?: Rng;
  logger?: Logger;
}

/**
 * What every front door of kvgate routes with, built once from the serve options: the one
 * worker registry, the worker manager (health checks, model discovery), the routing policies,
 * the KV-event hub, the engine-metrics scraper, tokenizers, admission control and metrics, plus
 * worker registration and the control routes. `kvgate serve` (server/gateway.ts, an HTTP proxy)
 * and `kvgate epp` (epp/, an Envoy ext_proc endpoint picker) each own one and differ only in how
 * requests reach it.
 */
export class RoutingCore {
  readonly registry = new WorkerRegistry();
  readonly log: Logger;
  readonly clock: Clock;
  readonly rng: Rng;
  readonly metrics: GatewayMetrics;
  readonly kvEvents: KvEventHub;
  readonly tokenizers = new TokenizerRegistry();
  /** Token ids for the policies that need them: tokenizer threads, --max-routing-ms, --max-tokenize-chars. */
  readonly requestTokens: RequestTokens;
  /** The tokenizer threads (--tokenize-threads), once started, when a policy needs tokens. */
  tokenizePool: TokenizePool | undefined;
  /** Event-loop health, tokenization and connection-wait metrics. */
  readonly hotPath: HotPathMetrics;
  readonly admission: Admission;
  readonly workers: WorkerManager;
  /** The policy of regular mode (and of the prefill pool in PD mode). */
  readonly policy: RoutingPolicy;
  /** Policies for the prefill and decode pools (PD mode; both are `policy` unless set apart). */
  readonly prefillPolicy: RoutingPolicy;
  readonly decodePolicy: RoutingPolicy;
  private readonly scraper: EngineMetricsScraper | undefined;
  /** Routing state shared with the other replicas (--replica-sync); policies never see it. */
  readonly sync: ReplicaSync | undefined;
  readonly replicaId: string;
  /** Charges a peer's rate-limit use (set by a front that limits per key). */
  onPeerRateLimit: ((key: string, n: number) => void) | undefined;
  /** Kubernetes pod discovery (--service-discovery), once started. */
  discovery: ServiceDiscovery | undefined;
  /** Recent decisions for the dashboard. */
  readonly feed = new DecisionFeed();
  /** Decisions, explanations, exchange metrics (fronts report through it). */
  readonly insight: RequestInsight;
  /** OpenTelemetry tracing (--otlp-traces-endpoint), when on. */
  readonly tracing: Tracing | undefined;

  /** slo_aware instances (one per pool), whose predictors are exported as metrics. */
  private readonly predictors: Array<{ pool: string; policy: SloAwarePolicy }> = [];

  private watchPredictor(pool: string, policy: RoutingPolicy): RoutingPolicy {
    if (policy instanceof SloAwarePolicy) {
      if (this.predictors.length === 0) registerPredictorMetrics(this.metrics, () => this.predictors.map((p) => ({ pool: p.pool, predictor: p.policy.predictor })), () => this.clock.now());
      this.predictors.push({ pool, policy });
    }
    return policy;
  }

  constructor(
    readonly config: ServeConfig,
    opts: RoutingCoreOptions = {},
  ) {
    this.log = opts.logger ?? createLogger(config);
    const clock = (this.clock = opts.clock ?? systemClock);
    const rng = (this.rng = opts.rng ?? randomRng());
    this.admission = new Admission({
      maxConcurrent: config.maxConcurrentRequests,
      queueSize: config.queueSize,
      queueTimeoutMs: config.queueTimeoutSecs * 1000,
    });
    this.kvEvents = new KvEventHub({
      clock,
      logger: this.log,
      mediums: config.kvEventsMediums,
      bind: config.kvEventsBind,
      maxBlocks: config.kvIndexMaxBlocks,
      resolveSource: (topic, dpRank) => this.resolveEventSource(topic, dpRank),
      workers: () => this.registry.all(),
      staleAfterMs: config.kvEventsStaleSecs * 1000,
    });
    this.metrics = new GatewayMetrics(this.registry, () => this.textTrees(), this.kvEvents, { now: () => clock.now() });
    this.hotPath = new HotPathMetrics(this.metrics.registry, () => this.tokenizePool?.pending ?? 0);
    this.requestTokens = new RequestTokens(this.tokenizers, {
      maxRoutingMs: config.maxRoutingMs,
      maxChars: config.maxTokenizeChars,
      inlineChars: config.inlineTokenizeChars,
      offLoopBytes: config.parseOffLoopBytes,
      maxJsonDepth: config.maxJsonDepth,
      onFallback: (reason) => this.hotPath.tokenizeFallbacks.inc({ reason }),
      onCancelled: () => this.hotPath.tokenizeCancelled.inc(),
      onTokenized: (where, secs) => this.hotPath.tokenizeSeconds.observe({ where }, secs),
    });
    // Replica sync (--replica-sync): policies report what they record to it; it applies peers' events.
    this.replicaId = config.replicaId ?? `${hostname()}:${config.port}:${process.pid}`;
    const syncedPolicies = new Map<string, RoutingPolicy>();
    if (config.replicaSync && config.replicaSync !== 'off') {
      this.sync = new ReplicaSync(
        NatsTransport.start({
          servers: config.replicaSync,
          name: this.replicaId,
          user: config.replicaSyncUser,
          pass: config.replicaSyncPassword,
          token: config.replicaSyncToken,
          credsFile: config.replicaSyncCreds,
          tlsCaFile: config.replicaSyncTlsCa,
          tlsCertFile: config.replicaSyncTlsCert,
          tlsKeyFile: config.replicaSyncTlsKey,
        }),
        {
          registry: this.registry,
          policies: syncedPolicies,
          clock,
          timers: realTimers,
          log: this.log,
          applyAdmin: (c) => this.applyPeerAdmin(c),
          consumeRateLimit: (key, n) => this.onPeerRateLimit?.(key, n),
        },
        {
          replicaId: this.replicaId,
          subject: config.replicaSyncSubject,
          flushMs: config.replicaSyncFlushMs,
          heartbeatMs: config.replicaHeartbeatMs,
          peerExpiryMs: config.replicaExpirySecs * 1000,
          snapshotTimeoutMs: config.replicaSnapshotTimeoutSecs * 1000,
        },
      );
      registerReplicaSyncMetrics(this.metrics, this.sync);
    }
    const tls = loadWorkerTls(config);
    const makePolicy = (name: string, role: string) => {
      const policyDeps = { clock, rng, schedule: timerScheduler, observer: this.metrics.policyObserver(), share: this.sync?.shareFor(role) };
      return withSessionAffinity(this.watchPredictor(role, createPolicy(
      name,
      policyDeps,
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
          hostHitWeight: config.kvHostHitWeight,
          diskHitWeight: config.kvDiskHitWeight,
          temperature: config.routerTemperature,
          staleAfterMs: config.kvEventsStaleSecs * 1000,
          maxTreeSize: config.maxTreeSize,
          evictionIntervalSecs: config.evictionIntervalSecs,
        },
        prefixLoad: { windowSecs: config.windowSecs },
        engineLoad: { staleAfterMs: config.engineMetricsStaleSecs * 1000 },
        sloAware: { ttftSloMs: config.ttftSloMs, tpotSloMs: config.tpotSloMs, overlapWeight: config.sloOverlapWeight, holdFraction: config.sloHoldFraction },
      },
    )), policyDeps, config.sessionAffinityHeader, config.sessionAffinityTtlSecs);
    };
    // PD mode: one instance per pool (each falls back to --policy), so no state (round-robin
    // counters, prefix trees) is shared between the prefill and the decode pool.
    this.policy = makePolicy(config.pdDisaggregation ? (config.prefillPolicy ?? config.policy) : config.policy, 'main');
    this.prefillPolicy = this.policy;
    this.decodePolicy = config.pdDisaggregation ? makePolicy(config.decodePolicy ?? config.policy, 'decode') : this.policy;
    syncedPolicies.set('main', this.policy);
    if (this.decodePolicy !== this.policy) syncedPolicies.set('decode', this.decodePolicy);
    if (config.engineMetricsIntervalSecs > 0) {
      this.scraper = new EngineMetricsScraper(this.registry, { intervalMs: config.engineMetricsIntervalSecs * 1000, clock, tls }, this.log);
    }
    this.insight = new RequestInsight({
      metrics: this.metrics,
      feed: this.feed,
      log: this.log,
      explainDecisions: config.explainDecisions,
      decisionLogSampleRate: config.decisionLogSampleRate,
    });
    if (config.otlpTracesEndpoint) {
      this.tracing = new Tracing({ endpoint: config.otlpTracesEndpoint, attributes: { 'service.instance.id': this.replicaId } });
    }
    this.registry.on('removed', (w) => {
      this.feed.forgetWorker(w.id);
      for (const p of this.policies()) p.onWorkerRemoved?.(w);
      void this.kvEvents.removeSource(w.id);
      this.metrics.forgetWorker(w.id);
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
          startupCheckIntervalSecs: config.workerStartupCheckInterval,
        },
        breaker: {
          failureThreshold: config.cbFailureThreshold,
          successThreshold: config.cbSuccessThreshold,
          openMs: config.cbTimeoutDurationSecs * 1000,
          disabled: config.disableCircuitBreaker,
          windowMs: config.cbWindowDurationSecs * 1000,
        },
        clock,
        tls,
        onBreakerTransition: (w, from, to) => this.metrics.breakerTransitions.inc({ worker: this.metrics.w(w), from, to }),
      },
      this.log,
    );
  }

  /** The distinct policies in use (one, or prefill and decode apart). */
  policies(): RoutingPolicy[] {
    return [...new Set([this.policy, this.prefillPolicy, this.decodePolicy])];
  }

  /**
   * Loads the --tokenizer entries (and, when a policy needs token ids, starts the tokenizer
   * threads holding the same tokenizers) and starts the KV-event hub.
   */
  async start(): Promise<void> {
    const c = this.config;
    const tokenizerOptions = { wordCacheEntries: c.tokenizerWordCache };
    const threads = c.tokenizeThreads > 0 && this.policies().some((p) => p.needsTokens);
    // Every prompt tokenized in the threads (short ones in the short lane, --short-tokenize-chars):
    // the event loop loads its tokenizers only if something still tokenizes there (/debug/route),
    // at that first use.
    const deferred = threads && c.inlineTokenizeChars === 0;
    const loaded = await loadTokenizerEntries(this.tokenizers, c.tokenizer, tokenizerOptions, deferred);
    // Process-wide: with tokenizer threads busy on every idle core, V8 marks on the event loop (auto).
    applyConcurrentMarking(c.v8ConcurrentMarking, threads);
    if (threads) {
      this.tokenizePool = await TokenizePool.start({ threads: c.tokenizeThreads, entries: c.tokenizer, nice: c.tokenizeNice, tokenizerOptions, shortChars: c.shortTokenizeChars });
      // The threads hold the same tokenizers: the loaded ones and the default (loaded, or the built-in chunk tokenizer).
      this.requestTokens.usePool(this.tokenizePool, new Set([...loaded, this.tokenizers.default]));
    }
    await this.kvEvents.start();
  }

  /** Registers the workers the flags name (--worker-urls, --prefill, --decode), checking each once. */
  async registerConfiguredWorkers(): Promise<void> {
    const c = this.config;
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
  }

  /** Starts Kubernetes pod discovery (--service-discovery): list, then watch. */
  async startDiscovery(): Promise<void> {
    const c = this.config;
    if (!c.serviceDiscovery) return;
    const sink = {
      registry: this.registry,
      registerWorker: (t: WorkerRegistration) => this.registerWorker({ ...t, apiKey: c.workerApiKey }),
      removeWorker: (url: string) => void this.workers.remove(url),
    };
    this.discovery = new ServiceDiscovery(c, sink, this.log);
    await this.discovery.start();
  }

  /** Joins the peer replicas (--replica-sync); never blocks routing. */
  startSync(): void {
    this.sync?.start();
  }

  /** Starts scraping engine metrics (when --engine-metrics-interval-secs > 0). */
  startScraper(): void {
    this.scraper?.start();
  }

  /**
   * Registers a worker (all its DP ranks with --dp-aware) and subscribes to its KV events:
   * rank r of a data-parallel engine publishes on the endpoint's port + r, as vLLM does.
   */
  async registerWorker(spec: WorkerRegistration): Promise<Worker[]> {
    const workers = await this.workers.add({
      url: spec.url,
      modelId: spec.modelId,
      apiKey: spec.apiKey,
      type: spec.type,
      bootstrapPort: spec.bootstrapPort,
      dpAware: this.config.dpAware,
      dpSize: spec.dpSize ?? this.config.dpSize,
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

  /** /debug/route and the dashboard over this core. `pairPolicy`: the PD front's pair policy. */
  insightRoutes(pairPolicy: RoutingPolicy = this.policy): InsightRoutes {
    const c = this.config;
    return new InsightRoutes({
      registry: this.registry,
      metrics: this.metrics,
      feed: this.feed,
      clock: this.clock,
      pdMode: c.pdDisaggregation,
      policy: this.policy,
      decodePolicy: this.decodePolicy,
      pairPolicy,
      tokenize: (route, model, body) => this.tokenizers.tokenize(route, body, model),
      strictModel: c.strictModel,
      maxPayloadSize: c.maxPayloadSize,
      maxJsonDepth: c.maxJsonDepth,
      cacheHeld: () => this.cacheHeld(),
      replicas: this.sync ? () => this.sync!.status() : undefined,
      replicaId: this.replicaId,
    });
  }

  /** The character trees of the policies in use (each policy once, wrappers looked through). */
  private textTrees(): TextTreeStats[] {
    const out: TextTreeStats[] = [];
    for (const p of new Set([this.policy, this.prefillPolicy, this.decodePolicy].filter(Boolean).map((x) => innermost(x)))) {
      const t = p.textTrees?.();
      if (t) out.push(t);
    }
    return out;
  }

  /** What the policy's own structures hold per worker (cache_aware tree chars, kv_aware indexed blocks). */
  private cacheHeld(): { unit: string; perWorker: Map<string, number> } | undefined {
    const p = innermost(this.policy);
    if (p instanceof CacheAwarePolicy) return { unit: 'tree chars', perWorker: p.treeChars() };
    if (p instanceof KvAwarePolicy) return { unit: 'indexed blocks', perWorker: this.kvEvents.index.stats().blocksPerSource };
    return undefined;
  }

  /** The control routes (probes, models, metrics, worker admin API, debug and dashboard) over this core. */
  controlRoutes(front: { pdMode: boolean; startedAt: number; isDraining(): boolean; pairPolicy?: RoutingPolicy }): ControlRoutes {
    const insight = this.insightRoutes(front.pairPolicy);
    return new ControlRoutes({
      extra: (req, res, path, requestId) => insight.handle(req, res, path, requestId),
      registry: this.registry,
      workers: this.workers,
      metrics: this.metrics,
      log: this.log,
      pdMode: front.pdMode,
      startedAt: front.startedAt,
      healthCheckTimeoutSecs: this.config.healthCheckTimeoutSecs,
      isDraining: front.isDraining,
      registerWorker: (spec) => this.registerWorker(spec),
      announce: this.sync ? (c) => this.sync!.announceAdmin(c) : undefined,
      replicas: this.sync ? () => ({ ready: this.sync!.initialSyncDone, status: this.sync!.status() }) : undefined,
    });
  }

  /** A worker added or removed through another replica's admin API. */
  private applyPeerAdmin(c: AdminChange): void {
    if (c.op === 'remove') {
      const removed = this.workers.remove(c.url);
      if (removed.length > 0) this.log.info({ url: c.url, by: c.origin }, 'worker removed by a peer replica');
      return;
    }
    if (this.registry.byUrl(c.url).length > 0) return;
    const b = c.spec ?? {};
    const str = (v: unknown) => (typeof v === 'string' ? v : undefined);
    const type = b.worker_type === 'prefill' || b.worker_type === 'decode' ? b.worker_type : undefined;
    if ((type === undefined) === this.config.pdDisaggregation) {
      this.log.warn({ url: c.url, by: c.origin, workerType: b.worker_type ?? 'regular' }, 'peer replica added a worker of a type this replica does not route (PD mode differs); ignored');
      return;
    }
    void this.registerWorker({
      url: c.url,
      type,
      modelId: str(b.model_id),
      apiKey: str(b.api_key),
      bootstrapPort: typeof b.bootstrap_port === 'number' ? b.bootstrap_port : null,
      kvEventsEndpoint: str(b.kv_events_endpoint),
      kvEventsReplayEndpoint: str(b.kv_events_replay_endpoint),
    }).then(
      (ws) => this.log.info({ workers: ws.map((w) => w.id), by: c.origin }, 'worker added by a peer replica'),
      (e) => this.log.warn({ url: c.url, by: c.origin, err: (e as Error).message }, 'could not add the worker a peer replica added'),
    );
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

  /** Stops policy timers, the scraper and the KV-event hub (first step of a shutdown). */
  async stopBackground(): Promise<void> {
    this.feed.close();
    await this.tracing?.shutdown().catch((e: Error) => this.log.warn({ err: e.message }, 'trace export at shutdown failed'));
    await this.sync?.close();
    await this.discovery?.stop();
    for (const p of this.policies()) p.close?.();
    await this.scraper?.stop();
    await this.kvEvents.close();
    await this.tokenizePool?.close();
    this.hotPath.close();
  }

  /** Stops health checks and forgets the workers (last step of a shutdown). */
  async closeWorkers(): Promise<void> {
    await this.workers.close();
  }
}

/** The policy under wrappers (session affinity, manual's fallback is not unwrapped). */
function innermost(p: RoutingPolicy): RoutingPolicy {
  const inner = (p as unknown as { inner?: RoutingPolicy }).inner;
  return inner ? innermost(inner) : p;
}
