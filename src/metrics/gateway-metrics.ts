import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { WorkerRegistry } from '../core/registry.js';
import type { KvEventHub } from '../events/hub.js';
import type { PolicyObserver } from '../policies/policy.js';

/** Buckets from 1 ms to 4 min, as LLM requests span both. */
const DURATION_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 45, 60, 90, 120, 180, 240];

/**
 * The gateway's Prometheus metrics, on a registry of its own (several gateways can live in one
 * process, as in tests). Per-worker gauges are read from the WorkerRegistry at scrape time,
 * so the request path pays nothing for them.
 */
export class GatewayMetrics {
  readonly registry = new Registry();
  readonly requests: Counter<'route' | 'status'>;
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

  constructor(workers: WorkerRegistry, treeChars: () => Map<string, number>, kv?: KvEventHub) {
    const registers = [this.registry];
    this.requests = new Counter({ name: 'kvgate_requests_total', help: 'Requests answered, by route and HTTP status', labelNames: ['route', 'status'], registers });
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
    this.admissionRejected = new Counter({ name: 'kvgate_admission_rejected_total', help: 'Requests refused by admission control (queue_full → 429, queue_timeout → 408, rate_limited → 429)', labelNames: ['reason'], registers });
    this.authFailures = new Counter({ name: 'kvgate_auth_failures_total', help: 'Requests refused for a missing or wrong key', labelNames: ['scope'], registers });
    this.kvDecisions = new Counter({ name: 'kvgate_kv_decisions_total', help: 'kv_aware decisions by chosen worker (url@rank) and where its overlap came from (events or approximate fallback)', labelNames: ['worker', 'source'], registers });
    this.kvOverlap = new Histogram({ name: 'kvgate_kv_decision_overlap_ratio', help: 'kv_aware: cached prefix blocks of the chosen worker / blocks of the request', buckets: [0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1], registers });
    this.pdRequests = new Counter({ name: 'kvgate_pd_requests_total', help: 'Prefill/decode disaggregated requests', labelNames: ['route', 'protocol'], registers });
    this.pdPrefill = new Counter({ name: 'kvgate_pd_prefill_requests_total', help: 'PD requests per prefill worker', labelNames: ['worker'], registers });
    this.pdDecode = new Counter({ name: 'kvgate_pd_decode_requests_total', help: 'PD requests per decode worker', labelNames: ['worker'], registers });
    this.pdErrors = new Counter({ name: 'kvgate_pd_errors_total', help: 'PD requests that failed, by error code (prefill_*, decode_*, timeouts)', labelNames: ['kind'], registers });
    if (kv) registerKvMetrics(kv, registers);
    const stateValue = { closed: 0, open: 1, half_open: 2 } as const;
    new Gauge({
      name: 'kvgate_worker_cb_state',
      help: 'Circuit breaker state per worker: 0 closed, 1 open, 2 half-open',
      labelNames: ['worker'],
      registers,
      collect() {
        this.reset();
        for (const w of workers.all()) if (w.breaker) this.set({ worker: w.id }, stateValue[w.breaker.state]);
      },
    });
    new Gauge({
      name: 'kvgate_worker_load',
      help: 'In-flight requests per worker',
      labelNames: ['worker'],
      registers,
      collect() {
        this.reset();
        for (const w of workers.all()) this.set({ worker: w.id }, w.load);
      },
    });
    new Gauge({
      name: 'kvgate_worker_healthy',
      help: '1 if the worker is healthy and routable',
      labelNames: ['worker'],
      registers,
      collect() {
        this.reset();
        for (const w of workers.all()) this.set({ worker: w.id }, w.isAvailable() ? 1 : 0);
      },
    });
    new Gauge({
      name: 'kvgate_tree_chars',
      help: 'Characters held per worker in the cache_aware prefix tree',
      labelNames: ['worker'],
      registers,
      collect() {
        this.reset();
        const chars = treeChars();
        for (const w of workers.all()) this.set({ worker: w.id }, chars.get(w.id) ?? 0);
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

  policyObserver(): PolicyObserver {
    return {
      cacheHit: () => this.cacheHits.inc(),
      cacheMiss: () => this.cacheMisses.inc(),
      loadBalanced: () => this.loadBalancingEvents.inc(),
      kvDecision: (worker, overlap, blocks, fallback) => {
        this.kvDecisions.inc({ worker: worker.id, source: fallback ? 'fallback' : 'events' });
        if (blocks > 0) this.kvOverlap.observe(overlap / blocks);
      },
    };
  }

  forgetWorker(id: string): void {
    this.processed.remove({ worker: id });
  }
}

/** KV-event ingestion and index metrics, read from the hub at scrape time. */
function registerKvMetrics(kv: KvEventHub, registers: Registry[]): void {
  const perSource = (name: string, help: string, pick: (s: NonNullable<ReturnType<KvEventHub['sourceStats']>>) => number | null) =>
    new Gauge({
      name,
      help,
      labelNames: ['worker'],
      registers,
      collect() {
        this.reset();
        for (const [id, s] of kv.allSourceStats()) {
          const v = pick(s);
          if (v !== null) this.set({ worker: id }, v);
        }
      },
    });
  perSource('kvgate_kv_events_received_total', 'KV event batches received per worker (counter)', (s) => s.received);
  perSource('kvgate_kv_events_applied_total', 'KV event batches applied in sequence order per worker (counter)', (s) => s.applied);
  perSource('kvgate_kv_events_replayed_total', 'KV event batches recovered through replay per worker (counter)', (s) => s.replayed);
  perSource('kvgate_kv_events_dropped_total', 'KV event batches dropped (duplicates, or lost when replay could not recover them) per worker (counter)', (s) => s.dropped);
  perSource('kvgate_kv_events_malformed_total', 'KV events that could not be decoded per worker (counter)', (s) => s.malformed);
  perSource('kvgate_kv_events_restarts_total', 'Engine restarts detected from the sequence numbers per worker (counter)', (s) => s.restarts);
  perSource('kvgate_kv_event_lag_seconds', 'Age of the last applied KV event batch when it was applied (publisher timestamp to now)', (s) => s.lastEventLagS);
  perSource('kvgate_kv_events_inaccurate', '1 while a worker\'s index entries are known to be incomplete', (s) => (s.inaccurate ? 1 : 0));
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
      for (const [id, n] of kv.index.stats().blocksPerSource) this.set({ worker: id }, n);
    },
  });
  const indexStat = (name: string, help: string, pick: (s: ReturnType<KvEventHub['index']['stats']>) => number) =>
    new Gauge({
      name,
      help,
      registers,
      collect() {
        this.set(pick(kv.index.stats()));
      },
    });
  indexStat('kvgate_kv_index_memory_bytes', 'Estimated heap bytes of the KV block index', (s) => s.memoryBytes);
  indexStat('kvgate_kv_index_nodes', 'Nodes (distinct block paths) in the KV block index', (s) => s.nodes);
  indexStat('kvgate_kv_index_unknown_parent_total', 'Stored events whose parent block the worker had not stored (skipped)', (s) => s.unknownParent);
  indexStat('kvgate_kv_index_malformed_total', 'Events rejected by the index (sizes, self references)', (s) => s.malformed);
  indexStat('kvgate_kv_index_pruned_total', 'Index nodes dropped to stay under --kv-index-max-blocks', (s) => s.pruned);
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
  counter('kvgate_replica_sync_routed_received_total', 'Routing records applied from peers', () => sync.stats.routedReceived);
  counter('kvgate_replica_sync_gaps_total', 'Gaps in a peer’s sequence numbers (each repaired by a state request)', () => sync.stats.gaps);
  counter('kvgate_replica_sync_refused_total', 'Messages refused because the peer runs another state format version', () => sync.stats.refusedVersion);
  counter('kvgate_replica_sync_malformed_total', 'Replica-sync messages that could not be decoded', () => sync.stats.malformed);
  counter('kvgate_replica_sync_unsent_total', 'Replica-sync messages not sent (not connected)', () => sync.stats.unsent);
  counter('kvgate_replica_sync_peers_expired_total', 'Peers dropped after missing heartbeats', () => sync.stats.peersExpired);
  counter('kvgate_replica_sync_unresolved_total', 'Shared prompts that could not be rebuilt here (a chunk was unknown)', () => sync.unresolvedTexts);
}
