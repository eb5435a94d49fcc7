import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { RequestContext } from '../core/context.js';
import type { WorkerRegistry } from '../core/registry.js';
import type { Worker } from '../core/worker.js';
import type { KvEventHub } from '../events/hub.js';
import type { PolicyObserver, TextTreeStats } from '../policies/policy.js';
import type { EngineUsage } from '../upstream/response-tap.js';

/** Buckets from 1 ms to 4 min, as LLM requests span both. */
const DURATION_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 45, 60, 90, 120, 180, 240];
/** Time to first token: 5 ms to 2 min. */
const TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60, 120];
/** Inter-token latency: 1 ms to 5 s. */
const ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5];
/** Admission queue wait: 0 (admitted at once) to 2 min. */
const QUEUE_BUCKETS = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

/** Worker label values kept apart; beyond this many workers the rest share the label `other`. */
export const MAX_WORKER_LABELS = 256;
/** Characters per token assumed to convert cache_aware's character matches (avoidable prefill). */
export const CHARS_PER_TOKEN = 4;

/**
 * Bounded `worker` label values: the first `max` workers seen keep their id, later ones are
 * `other` (a worker that leaves frees its place). Request ids never become labels.
 */
export class WorkerLabels {
  private readonly ids = new Set<string>();
  constructor(private readonly max = MAX_WORKER_LABELS) {}
  of(id: string): string {
    if (this.ids.has(id)) return id;
    if (this.ids.size < this.max) {
      this.ids.add(id);
      return id;
    }
    return 'other';
  }
  has(id: string): boolean {
    return this.ids.has(id);
  }
  forget(id: string): void {
    this.ids.delete(id);
  }
}

/** What the policy observer noted about the decision just made (read right after selectWorker). */
export interface DecisionNote {
  /** cache_aware / prefix_load: matched and input characters (or tokens, prefix_load with a tokenizer). */
  matched?: number;
  input?: number;
  /** kv_aware: blocks of the chosen worker's overlap and of the request. */
  matchedBlocks?: number;
  requestBlocks?: number;
  /** kv_aware: the overlap came from routing history, not events. */
  fallback?: boolean;
  /** hit (prefix followed), miss (no usable match), balanced (load imbalance overrode it). */
  kind?: 'hit' | 'miss' | 'balanced';
  /** Prompt tokens (or characters / CHARS_PER_TOKEN) held elsewhere that the chosen worker recomputes. */
  avoidableTokens?: number;
}

/** Per-worker totals the dashboard reads (cheap numbers, kept beside the Prometheus series). */
export interface WorkerTotals {
  requests: number;
  promptTokens: number;
  cachedTokens: number;
  completionTokens: number;
}

/**
 * The gateway's Prometheus metrics, on a registry of its own (several gateways can live in one
 * process, as in tests). Per-worker gauges are read from the WorkerRegistry at scrape time,
 * so the request path pays nothing for them.
 */
export class GatewayMetrics {
  readonly registry = new Registry();
  readonly requests: Counter<'route' | 'status' | 'model'>;
  readonly ttft: Histogram<'model' | 'worker'>;
  readonly itl: Histogram<'model' | 'worker'>;
  readonly e2e: Histogram<'model' | 'worker'>;
  readonly queueWait: Histogram;
  readonly promptTokens: Counter<'model' | 'worker'>;
  readonly cachedTokens: Counter<'model' | 'worker'>;
  readonly completionTokens: Counter<'model' | 'worker'>;
  readonly avoidablePrefill: Counter<'model' | 'worker'>;
  readonly workerLabels = new WorkerLabels();
  /** Per-worker totals (by worker id) for the dashboard. */
  readonly totals = new Map<string, WorkerTotals>();
  /** The note of the decision being made (see takeNote). */
  private note: DecisionNote = {};
  /** cache_aware's avoidable characters, converted when the request's usage is known (settleAvoidable). */
  private readonly pendingAvoidable = new WeakMap<RequestContext, { worker: Worker; chars: number; inputChars: number }>();
  readonly duration: Histogram<'route'>;
  readonly processed: Counter<'worker'>;
  readonly decisions: Counter<'policy' | 'worker'>;
  readonly cacheHits: Counter;
  readonly cacheMisses: Counter;
  readonly loadBalancingEvents: Counter;
  readonly upstreamErrors: Counter<'worker' | 'kind'>;
  readonly clientAborts: Counter<'route'>;
  readonly retries: Counter<'route'>;
  readonly retriesExhausted: Counter<'route'>;
  readonly breakerTransitions: Counter<'worker' | 'from' | 'to'>;
  readonly admissionRejected: Counter<'reason'>;
  readonly authFailures: Counter<'scope'>;
  readonly kvDecisions: Counter<'worker' | 'source'>;
  readonly pdRequests: Counter<'route' | 'protocol'>;
  readonly pdPrefill: Counter<'worker'>;
  readonly pdDecode: Counter<'worker'>;
  readonly pdErrors: Counter<'kind'>;
  readonly kvOverlap: Histogram;

  constructor(workers: WorkerRegistry, textTrees: () => TextTreeStats[], kv?: KvEventHub, opts: { processMetrics?: boolean; /** The KV-event hub's clock (ms). */ now?: () => number } = {}) {
    const registers = [this.registry];
    // Node and process metrics (CPU, memory, heap, GC, event-loop lag, handles) on this registry.
    if (opts.processMetrics !== false) collectDefaultMetrics({ register: this.registry });
    const labelOf = (id: string) => this.workerLabels.of(id);
    this.requests = new Counter({ name: 'kvgate_requests_total', help: 'Requests answered, by route, HTTP status and model (a served model, or "" when none was resolved)', labelNames: ['route', 'status', 'model'], registers });
    this.ttft = new Histogram({ name: 'kvgate_ttft_seconds', help: 'Time from arrival at kvgate to the first content chunk of a stream (the whole answer when not streaming), successful responses', labelNames: ['model', 'worker'], buckets: TTFT_BUCKETS, registers });
    this.itl = new Histogram({ name: 'kvgate_itl_seconds', help: 'Time between content chunks of a stream, as relayed by kvgate', labelNames: ['model', 'worker'], buckets: ITL_BUCKETS, registers });
    this.e2e = new Histogram({ name: 'kvgate_e2e_seconds', help: 'Time from arrival at kvgate to the end of a successful response', labelNames: ['model', 'worker'], buckets: DURATION_BUCKETS, registers });
    this.queueWait = new Histogram({ name: 'kvgate_queue_wait_seconds', help: 'Time a generation request waited for an admission slot (--max-concurrent-requests)', buckets: QUEUE_BUCKETS, registers });
    this.promptTokens = new Counter({ name: 'kvgate_prompt_tokens_total', help: 'Prompt tokens the engines reported (usage.prompt_tokens)', labelNames: ['model', 'worker'], registers });
    this.cachedTokens = new Counter({ name: 'kvgate_cached_tokens_total', help: 'Prompt tokens served from the engine prefix cache (usage.prompt_tokens_details.cached_tokens)', labelNames: ['model', 'worker'], registers });
    this.completionTokens = new Counter({ name: 'kvgate_completion_tokens_total', help: 'Completion tokens the engines reported (usage.completion_tokens)', labelNames: ['model', 'worker'], registers });
    this.avoidablePrefill = new Counter({ name: 'kvgate_avoidable_prefill_tokens_total', help: 'Prompt tokens recomputed on the chosen worker that another available worker held at decision time (estimate; see docs/operations.md)', labelNames: ['model', 'worker'], registers });

    this.duration = new Histogram({ name: 'kvgate_request_duration_seconds', help: 'Time from request arrival to the end of the response', labelNames: ['route'], buckets: DURATION_BUCKETS, registers });
    this.processed = new Counter({ name: 'kvgate_worker_processed_total', help: 'Requests finished per worker (any outcome)', labelNames: ['worker'], registers });
    this.decisions = new Counter({ name: 'kvgate_policy_decisions_total', help: 'Workers chosen, by policy', labelNames: ['policy', 'worker'], registers });
    this.cacheHits = new Counter({ name: 'kvgate_cache_hits_total', help: 'cache_aware decisions that followed a prefix match', registers });
    this.cacheMisses = new Counter({ name: 'kvgate_cache_misses_total', help: 'cache_aware decisions with no usable prefix match', registers });
    this.loadBalancingEvents = new Counter({ name: 'kvgate_load_balancing_events_total', help: 'cache_aware decisions overridden by load imbalance', registers });
    this.upstreamErrors = new Counter({ name: 'kvgate_upstream_errors_total', help: 'Failed upstream exchanges, by kind (connect, timeout, reset)', labelNames: ['worker', 'kind'], registers });
    this.clientAborts = new Counter({ name: 'kvgate_client_aborts_total', help: 'Requests whose client went away before the response ended', labelNames: ['route'], registers });
    this.retries = new Counter({ name: 'kvgate_retries_total', help: 'Requests sent again to another worker after a retryable failure', labelNames: ['route'], registers });
    this.retriesExhausted = new Counter({ name: 'kvgate_retries_exhausted_total', help: 'Requests that failed on every attempt', labelNames: ['route'], registers });
    this.breakerTransitions = new Counter({ name: 'kvgate_worker_cb_transitions_total', help: 'Circuit breaker state changes', labelNames: ['worker', 'from', 'to'], registers });
    this.admissionRejected = new Counter({ name: 'kvgate_admission_rejected_total', help: 'Requests refused by admission control (queue_full → 429, queue_timeout → 408, rate_limited → 429, token_limited → 429, shed → 429 sheddable at saturation, predicted_slo_miss → 429 sheddable predicted to miss its objective)', labelNames: ['reason'], registers });
    this.authFailures = new Counter({ name: 'kvgate_auth_failures_total', help: 'Requests refused for a missing or wrong key', labelNames: ['scope'], registers });
    this.kvDecisions = new Counter({ name: 'kvgate_kv_decisions_total', help: 'kv_aware decisions by chosen worker (url@rank) and where its overlap came from (events or approximate fallback)', labelNames: ['worker', 'source'], registers });
    this.kvOverlap = new Histogram({ name: 'kvgate_kv_decision_overlap_ratio', help: 'kv_aware: cached prefix blocks of the chosen worker / blocks of the request', buckets: [0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1], registers });
    this.pdRequests = new Counter({ name: 'kvgate_pd_requests_total', help: 'Prefill/decode disaggregated requests', labelNames: ['route', 'protocol'], registers });
    this.pdPrefill = new Counter({ name: 'kvgate_pd_prefill_requests_total', help: 'PD requests per prefill worker', labelNames: ['worker'], registers });
    this.pdDecode = new Counter({ name: 'kvgate_pd_decode_requests_total', help: 'PD requests per decode worker', labelNames: ['worker'], registers });
    this.pdErrors = new Counter({ name: 'kvgate_pd_errors_total', help: 'PD requests that failed, by error code (prefill_*, decode_*, timeouts)', labelNames: ['kind'], registers });
    if (kv) registerKvMetrics(kv, registers, this.workerLabels, opts.now ?? (() => performance.now()));
    const stateValue = { closed: 0, open: 1, half_open: 2 } as const;
    const labels = this.workerLabels;
    /** A per-worker gauge whose workers beyond the label cap are folded into `other` (sum or max). */
    const perWorker = (name: string, help: string, value: (w: Worker) => number | undefined, fold: 'sum' | 'max') =>
      new Gauge({
        name,
        help,
        labelNames: ['worker'],
        registers,
        collect() {
          this.reset();
          const out = new Map<string, number>();
          for (const w of workers.all()) {
            const v = value(w);
            if (v === undefined) continue;
            const l = labels.of(w.id);
            const prev = out.get(l);
            out.set(l, prev === undefined ? v : fold === 'sum' ? prev + v : Math.max(prev, v));
          }
          for (const [l, v] of out) this.set({ worker: l }, v);
        },
      });
    perWorker('kvgate_worker_cb_state', 'Circuit breaker state per worker: 0 closed, 1 open, 2 half-open', (w) => (w.breaker ? stateValue[w.breaker.state] : undefined), 'max');
    perWorker('kvgate_worker_load', 'In-flight requests per worker, cluster-wide (this replica and, with --replica-sync, its peers)', (w) => w.load, 'sum');
    perWorker('kvgate_worker_local_load', 'In-flight requests per worker routed by this replica', (w) => w.localLoad, 'sum');
    perWorker('kvgate_worker_healthy', '1 if the worker is healthy and routable (other: how many are)', (w) => (w.isAvailable() ? 1 : 0), 'sum');
    perWorker('kvgate_worker_engine_waiting', 'Requests waiting in the engine queue (scraped from the engine /metrics)', (w) => w.engineLoad?.waiting, 'sum');
    perWorker('kvgate_worker_engine_running', 'Requests running in the engine (scraped)', (w) => w.engineLoad?.running, 'sum');
    perWorker('kvgate_worker_engine_kv_usage', 'Engine KV-cache usage, 0..1 (scraped)', (w) => w.engineLoad?.kvUsage, 'max');
    new Gauge({
      name: 'kvgate_tree_chars',
      help: "Characters held per worker in the serving policy's character tree (cache_aware's prefix tree; kv_aware's and slo_aware's routing history)",
      labelNames: ['worker'],
      registers,
      collect() {
        this.reset();
        const trees = textTrees();
        const out = new Map<string, number>();
        for (const w of workers.all()) {
          const l = labels.of(w.id);
          let n = out.get(l) ?? 0;
          for (const t of trees) n += t.charsByWorker.get(w.id) ?? 0;
          out.set(l, n);
        }
        for (const [l, v] of out) this.set({ worker: l }, v);
      },
    });
    new Counter({
      name: 'kvgate_tree_size_trims_total',
      help: 'Times an insert took a worker a quarter past --max-tree-size in a character tree and trimmed its share at once, between eviction passes (a sign of unique long prompts arriving faster than --eviction-interval-secs)',
      registers,
      collect() {
        this.reset();
        let n = 0;
        for (const t of textTrees()) n += t.sizeTrims;
        this.inc(n);
      },
    });
    new Gauge({
      name: 'kvgate_workers',
      help: 'Registered workers by health',
      labelNames: ['state'],
      registers,
      collect() {
        this.reset();
        let healthy = 0;
        let total = 0;
        for (const w of workers.all()) {
          total++;
          if (w.isAvailable()) healthy++;
        }
        this.set({ state: 'healthy' }, healthy);
        this.set({ state: 'unhealthy' }, total - healthy);
      },
    });
  }

  /** The `worker` label value of a worker (capped, see WorkerLabels). */
  w(worker: Worker | string): string {
    return this.workerLabels.of(typeof worker === 'string' ? worker : worker.id);
  }

  policyObserver(): PolicyObserver {
    return {
      cacheHit: (_w, matched, input) => {
        this.cacheHits.inc();
        this.note.kind = 'hit';
        this.note.matched = matched;
        this.note.input = input;
      },
      cacheMiss: (input) => {
        this.cacheMisses.inc();
        this.note.kind = 'miss';
        this.note.input = input;
      },
      loadBalanced: () => {
        this.loadBalancingEvents.inc();
        this.note.kind = 'balanced';
      },
      kvDecision: (worker, overlap, blocks, fallback) => {
        this.kvDecisions.inc({ worker: this.w(worker), source: fallback ? 'fallback' : 'events' });
        if (blocks > 0) this.kvOverlap.observe(overlap / blocks);
        this.note.matchedBlocks = overlap;
        this.note.requestBlocks = blocks;
        this.note.fallback = fallback;
      },
      avoidablePrefill: (worker, ctx, est) => {
        if (est.tokens !== undefined) {
          this.avoidablePrefill.inc({ model: ctx.model, worker: this.w(worker) }, est.tokens);
          this.note.avoidableTokens = est.tokens;
        } else if (est.chars !== undefined && est.chars > 0) {
          this.pendingAvoidable.set(ctx, { worker, chars: est.chars, inputChars: est.inputChars ?? 0 });
          this.note.avoidableTokens = Math.round(est.chars / CHARS_PER_TOKEN);
        }
      },
    };
  }

  /** The note the policy observer took of the decision made since the last call (then cleared). */
  takeNote(): DecisionNote {
    const n = this.note;
    this.note = {};
    return n;
  }

  /**
   * Counts a request's avoidable prefill noted in characters (cache_aware) once its usage is known:
   * chars × prompt_tokens / input chars when the engine reported prompt tokens, else chars / 4.
   * Called once when the request ends (any outcome); a request never settled is not counted.
   */
  settleAvoidable(ctx: RequestContext, promptTokens: number | undefined): void {
    const p = this.pendingAvoidable.get(ctx);
    if (!p) return;
    this.pendingAvoidable.delete(ctx);
    const tokens = promptTokens !== undefined && p.inputChars > 0 ? Math.round((p.chars * promptTokens) / p.inputChars) : Math.round(p.chars / CHARS_PER_TOKEN);
    if (tokens > 0) this.avoidablePrefill.inc({ model: ctx.model, worker: this.w(p.worker) }, tokens);
  }

  /** The engine's usage for a request served by `worker`: token counters and the dashboard's totals. */
  recordUsage(model: string, worker: Worker, usage: EngineUsage | undefined): void {
    let t = this.totals.get(worker.id);
    if (!t) this.totals.set(worker.id, (t = { requests: 0, promptTokens: 0, cachedTokens: 0, completionTokens: 0 }));
    t.requests++;
    if (!usage) return;
    const labels = { model, worker: this.w(worker) };
    if (usage.promptTokens !== undefined) {
      this.promptTokens.inc(labels, usage.promptTokens);
      t.promptTokens += usage.promptTokens;
    }
    if (usage.cachedTokens !== undefined) {
      this.cachedTokens.inc(labels, usage.cachedTokens);
      t.cachedTokens += usage.cachedTokens;
    }
    if (usage.completionTokens !== undefined) {
      this.completionTokens.inc(labels, usage.completionTokens);
      t.completionTokens += usage.completionTokens;
    }
  }

  forgetWorker(id: string): void {
    if (!this.workerLabels.has(id)) return;
    for (const m of [this.processed, this.promptTokens, this.cachedTokens, this.completionTokens, this.avoidablePrefill, this.ttft, this.itl, this.e2e] as Array<Counter<string> | Histogram<string>>) {
      // Series of every model for this worker (prom-client removes by exact label set).
      for (const labels of seriesOf(m, id)) m.remove(labels);
    }
    this.totals.delete(id);
    this.workerLabels.forget(id);
  }
}

/** The label sets of `metric`'s series whose worker is `id`. */
function seriesOf(metric: Counter<string> | Histogram<string>, id: string): Array<Record<string, string>> {
  const out: Array<Record<string, string>> = [];
  const hashMap = (metric as unknown as { hashMap?: Record<string, { labels: Record<string, string> }> }).hashMap;
  if (!hashMap) return [{ worker: id }];
  for (const v of Object.values(hashMap)) if (v.labels?.worker === id) out.push(v.labels);
  return out;
}

/** KV-event ingestion and index metrics, read from the hub at scrape time. */
function registerKvMetrics(kv: KvEventHub, registers: Registry[], labels: WorkerLabels, now: () => number): void {
  type Stats = NonNullable<ReturnType<KvEventHub['sourceStats']>>;
  /** Per-source values folded under the worker label cap. */
  const fold = (pick: (s: Stats) => number | null, how: 'sum' | 'max') => {
    const out = new Map<string, number>();
    for (const [id, s] of kv.allSourceStats()) {
      const v = pick(s);
      if (v === null) continue;
      const l = labels.of(id);
      const prev = out.get(l);
      out.set(l, prev === undefined ? v : how === 'sum' ? prev + v : Math.max(prev, v));
    }
    return out;
  };
  const perSourceCounter = (name: string, help: string, pick: (s: Stats) => number) =>
    new Counter({
      name,
      help,
      labelNames: ['worker'],
      registers,
      collect() {
        this.reset();
        for (const [l, v] of fold(pick, 'sum')) this.inc({ worker: l }, v);
      },
    });
  const perSourceGauge = (name: string, help: string, pick: (s: Stats) => number | null) =>
    new Gauge({
      name,
      help,
      labelNames: ['worker'],
      registers,
      collect() {
        this.reset();
        for (const [l, v] of fold(pick, 'max')) this.set({ worker: l }, v);
      },
    });
  perSourceCounter('kvgate_kv_events_received_total', 'KV event batches received per worker', (s) => s.received);
  perSourceCounter('kvgate_kv_events_applied_total', 'KV event batches applied in sequence order per worker', (s) => s.applied);
  perSourceCounter('kvgate_kv_events_replayed_total', 'KV event batches recovered through replay per worker', (s) => s.replayed);
  perSourceCounter('kvgate_kv_events_dropped_total', 'KV event batches dropped (duplicates, or lost when replay could not recover them) per worker', (s) => s.dropped);
  perSourceCounter('kvgate_kv_events_malformed_total', 'KV events that could not be decoded per worker', (s) => s.malformed);
  perSourceCounter('kvgate_kv_events_restarts_total', 'Engine restarts detected from the sequence numbers per worker', (s) => s.restarts);
  perSourceGauge('kvgate_kv_event_lag_seconds', 'Age of the last applied KV event batch when it was applied (publisher timestamp to now)', (s) => s.lastEventLagS);
  perSourceGauge('kvgate_kv_events_inaccurate', "1 while a worker's index entries are known to be incomplete", (s) => (s.inaccurate ? 1 : 0));
  new Gauge({
    name: 'kvgate_kv_last_event_age_seconds',
    help: 'Seconds since the last KV event batch arrived per worker (a silent event stream grows it)',
    labelNames: ['worker'],
    registers,
    collect() {
      this.reset();
      const out = new Map<string, number>();
      for (const id of kv.allSourceStats().keys()) {
        const at = kv.lastEventAtMs(id);
        if (at === undefined) continue;
        const l = labels.of(id);
        out.set(l, Math.max(out.get(l) ?? 0, Math.max(0, (now() - at) / 1000)));
      }
      for (const [l, v] of out) this.set({ worker: l }, v);
    },
  });
  new Gauge({
    name: 'kvgate_kv_events_silent',
    help: '1 while a worker completes requests but its KV-event subscription delivers nothing (misconfigured publisher/subscriber: see the log)',
    labelNames: ['worker'],
    registers,
    collect() {
      this.reset();
      for (const [id, silent] of kv.silentSources()) this.set({ worker: id }, silent ? 1 : 0);
    },
  });
  new Gauge({
    name: 'kvgate_kv_indexed_blocks',
    help: 'Blocks in the KV index per worker (url or url@rank)',
    labelNames: ['worker'],
    registers,
    collect() {
      this.reset();
      const out = new Map<string, number>();
      for (const [id, n] of kv.index.stats().blocksPerSource) {
        const l = labels.of(id.split('#')[0]) === id.split('#')[0] ? id : 'other';
        out.set(l, (out.get(l) ?? 0) + n);
      }
      for (const [l, n] of out) this.set({ worker: l }, n);
    },
  });
  const indexGauge = (name: string, help: string, pick: (s: ReturnType<KvEventHub['index']['stats']>) => number) =>
    new Gauge({
      name,
      help,
      registers,
      collect() {
        this.set(pick(kv.index.stats()));
      },
    });
  const indexCounter = (name: string, help: string, pick: (s: ReturnType<KvEventHub['index']['stats']>) => number) =>
    new Counter({
      name,
      help,
      registers,
      collect() {
        this.reset();
        this.inc(pick(kv.index.stats()));
      },
    });
  indexGauge('kvgate_kv_index_memory_bytes', 'Estimated heap bytes of the KV block index', (s) => s.memoryBytes);
  indexGauge('kvgate_kv_index_nodes', 'Nodes (distinct block paths) in the KV block index', (s) => s.nodes);
  indexCounter('kvgate_kv_index_unknown_parent_total', 'Stored events whose parent block the worker had not stored (skipped)', (s) => s.unknownParent);
  indexCounter('kvgate_kv_index_malformed_total', 'Events rejected by the index (sizes, self references)', (s) => s.malformed);
  indexCounter('kvgate_kv_index_pruned_total', 'Index nodes dropped to stay under --kv-index-max-blocks', (s) => s.pruned);
}

/** What the replica-sync metrics read (src/sync's ReplicaSync; kept structural so metrics need not import it). */
export interface ReplicaSyncView {
  readonly connected: boolean;
  readonly peerCount: number;
  readonly unresolvedTexts: number;
  readonly stats: {
    readonly messagesSent: number;
    readonly bytesSent: number;
    readonly messagesReceived: number;
    readonly bytesReceived: number;
    readonly routedSent: number;
    readonly repeatsSuppressed: number;
    readonly routedReceived: number;
    readonly gaps: number;
    readonly refusedVersion: number;
    readonly malformed: number;
    readonly unsent: number;
    readonly peersExpired: number;
  };
}

/** Replica sync: connection, peers, traffic and repairs, read at scrape time. */
export function registerReplicaSyncMetrics(metrics: GatewayMetrics, sync: ReplicaSyncView): void {
  const registers = [metrics.registry];
  new Gauge({ name: 'kvgate_replica_sync_connected', help: '1 while connected to the replica-sync bus (NATS)', registers, collect() { this.set(sync.connected ? 1 : 0); } });
  new Gauge({ name: 'kvgate_replica_peers', help: 'Peer replicas heard from within the expiry time', registers, collect() { this.set(sync.peerCount); } });
  const counter = (name: string, help: string, read: () => number, labels?: Record<string, string>) => {
    new Counter({
      name,
      help,
      labelNames: labels ? Object.keys(labels) : [],
      registers,
      collect() {
        this.reset();
        if (labels) this.inc(labels, read());
        else this.inc(read());
      },
    });
  };
  counter('kvgate_replica_sync_messages_sent_total', 'Replica-sync messages published', () => sync.stats.messagesSent);
  counter('kvgate_replica_sync_bytes_sent_total', 'Replica-sync bytes published', () => sync.stats.bytesSent);
  counter('kvgate_replica_sync_messages_received_total', 'Replica-sync messages received from peers', () => sync.stats.messagesReceived);
  counter('kvgate_replica_sync_bytes_received_total', 'Replica-sync bytes received from peers', () => sync.stats.bytesReceived);
  counter('kvgate_replica_sync_routed_sent_total', 'Routing records (one per routed request and policy) published', () => sync.stats.routedSent);
  counter('kvgate_replica_sync_repeats_suppressed_total', 'Routing records whose prompt was not published again (same worker, published within the repeat window)', () => sync.stats.repeatsSuppressed);
  counter('kvgate_replica_sync_routed_received_total', 'Routing records applied from peers', () => sync.stats.routedReceived);
  counter('kvgate_replica_sync_gaps_total', 'Gaps in a peer’s sequence numbers (each repaired by a state request)', () => sync.stats.gaps);
  counter('kvgate_replica_sync_refused_total', 'Messages refused because the peer runs another state format version', () => sync.stats.refusedVersion);
  counter('kvgate_replica_sync_malformed_total', 'Replica-sync messages that could not be decoded', () => sync.stats.malformed);
  counter('kvgate_replica_sync_unsent_total', 'Replica-sync messages not sent (not connected)', () => sync.stats.unsent);
  counter('kvgate_replica_sync_peers_expired_total', 'Peers dropped after missing heartbeats', () => sync.stats.peersExpired);
  counter('kvgate_replica_sync_unresolved_total', 'Shared prompts that could not be rebuilt here (a chunk was unknown)', () => sync.unresolvedTexts);
}

/** What the predictor metrics read: each slo_aware pool's predictor. */
export interface PredictorView {
  pool: string;
  predictor: { workerIds(): IterableIterator<string>; stats(id: string, nowMs: number): { slowness: number; fixedMs: number; observations: number; backlogWorkMs: number; relError: number; historyCredit: number } };
}

/** slo_aware's learned per-worker speeds and prediction error, read at scrape time. */
export function registerPredictorMetrics(metrics: GatewayMetrics, views: () => PredictorView[], now: () => number): void {
  const registers = [metrics.registry];
  const gauge = (name: string, help: string, read: (s: ReturnType<PredictorView['predictor']['stats']>) => number) =>
    new Gauge({
      name,
      help,
      labelNames: ['pool', 'worker'],
      registers,
      collect() {
        this.reset();
        const t = now();
        for (const v of views()) for (const id of v.predictor.workerIds()) this.set({ pool: v.pool, worker: id }, read(v.predictor.stats(id, t)));
      },
    });
  gauge('kvgate_slo_predictor_slowness', 'slo_aware: learned wall time per unit of engine-model time, per worker (1 = the engine is the cost model)', (s) => s.slowness);
  gauge('kvgate_slo_predictor_fixed_ms', 'slo_aware: learned fixed latency outside the engine model (network, proxying), per worker', (s) => s.fixedMs);
  gauge('kvgate_slo_predictor_observations', 'slo_aware: first-token times the worker\'s predictor has learned from', (s) => s.observations);
  gauge('kvgate_slo_predictor_backlog_ms', 'slo_aware: predicted prefill backlog of the worker (ms of engine-model work)', (s) => s.backlogWorkMs);
  gauge('kvgate_slo_predictor_history_credit', 'slo_aware: learned share of the cache known only from routing history (no KV events) that the worker\'s engine held, per worker (1 = all of it)', (s) => s.historyCredit);
  gauge('kvgate_slo_predictor_relative_error', 'slo_aware: recent mean |observed − predicted| / observed TTFT of the worker', (s) => s.relError);
}
