import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Engine, RequestRecord } from './engine.js';

/**
 * Prometheus metrics of the simulated server under vLLM's V1 names (labels model_name and
 * engine = DP rank), in a private Registry. Gauges and counters are read from the engines'
 * stats at scrape time; TTFT is observed at each first token, the other histograms when a
 * request ends. Latencies are in
 * simulated seconds (the engine clock), i.e. what the modelled GPU would show.
 *
 * prom-client prints counter names verbatim (it appends nothing in the Prometheus text format),
 * so the names carry vLLM's `_total` suffix themselves.
 */

// vLLM's bucket boundaries (vllm/v1/metrics/loggers.py).
const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0];
const LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0];
const ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/** KV transfer time of one hand-off (simulated seconds). */
const KV_TRANSFER_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/** Why a decode could not get its KV. */
export type KvTransferFailure = 'timeout' | 'prefill_failed' | 'mismatch' | 'aborted';

export interface MetricsEngine {
  rank: number;
  engine: Engine;
}

export class SimMetrics {
  readonly registry = new Registry();
  private readonly ttft: Histogram<'model_name' | 'engine'>;
  private readonly e2e: Histogram<'model_name' | 'engine'>;
  private readonly queue: Histogram<'model_name' | 'engine'>;
  private readonly success: Counter<'model_name' | 'engine' | 'finished_reason'>;
  private readonly itl: Histogram<'model_name' | 'engine'>;
  private pd: {
    role: string;
    transfers: Counter<'model_name' | 'role'>;
    blocks: Counter<'model_name' | 'role'>;
    failures: Counter<'model_name' | 'role' | 'reason'>;
    seconds: Histogram<'model_name' | 'role'>;
    wait: Histogram<'model_name' | 'role'>;
  } | null = null;

  constructor(
    private readonly model: string,
    private readonly engines: readonly MetricsEngine[],
  ) {
    const labelNames = ['model_name', 'engine'] as const;
    const registers = [this.registry];
    const perEngine = (fn: (e: MetricsEngine, labels: { model_name: string; engine: string }) => void) => {
      for (const e of this.engines) fn(e, { model_name: this.model, engine: String(e.rank) });
    };
    const gauge = (name: string, help: string, read: (e: Engine) => number) =>
      new Gauge({
        name,
        help,
        labelNames,
        registers,
        collect(this: Gauge<'model_name' | 'engine'>) {
          perEngine((e, labels) => this.set(labels, read(e.engine)));
        },
      });
    const counter = (name: string, help: string, read: (e: Engine) => number) =>
      new Counter({
        name,
        help,
        labelNames,
        registers,
        collect(this: Counter<'model_name' | 'engine'>) {
          this.reset();
          perEngine((e, labels) => this.inc(labels, read(e.engine)));
        },
      });

    gauge('vllm:num_requests_running', 'Number of requests in model execution batches.', (e) => e.stats().running);
    gauge('vllm:num_requests_waiting', 'Number of requests waiting to be processed.', (e) => e.stats().waiting);
    gauge('vllm:kv_cache_usage_perc', 'KV-cache usage. 1 means 100 percent usage.', (e) => e.stats().kvUsage);
    counter('vllm:prefix_cache_queries_total', 'Prefix cache queries, in terms of number of queried tokens.', (e) => e.stats().prefixCacheQueries);
    counter('vllm:prefix_cache_hits_total', 'Prefix cache hits, in terms of number of cached tokens.', (e) => e.stats().prefixCacheHits);
    counter('vllm:prompt_tokens_total', 'Number of prefill tokens processed.', (e) => e.stats().promptTokens);
    counter('vllm:generation_tokens_total', 'Number of generation tokens processed.', (e) => e.stats().generationTokens);
    counter('vllm:num_preemptions_total', 'Cumulative number of preemption from the engine.', (e) => e.stats().preemptions);

    new Gauge({
      name: 'vllm:cache_config_info',
      help: 'Information of the LLMEngine CacheConfig',
      labelNames: ['model_name', 'engine', 'block_size', 'num_gpu_blocks', 'enable_prefix_caching'],
      registers,
      collect(this: Gauge<string>) {
        perEngine((e, labels) =>
          this.set(
            {
              ...labels,
              block_size: String(e.engine.config.blockSize),
              num_gpu_blocks: String(e.engine.config.numGpuBlocks),
              enable_prefix_caching: 'True',
            },
            1,
          ),
        );
      },
    });

    this.ttft = new Histogram({
      name: 'vllm:time_to_first_token_seconds',
      help: 'Histogram of time to first token in seconds.',
      labelNames,
      buckets: TTFT_BUCKETS,
      registers,
    });
    this.e2e = new Histogram({
      name: 'vllm:e2e_request_latency_seconds',
      help: 'Histogram of e2e request latency in seconds.',
      labelNames,
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.queue = new Histogram({
      name: 'vllm:request_queue_time_seconds',
      help: 'Histogram of time spent in WAITING phase for request.',
      labelNames,
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.itl = new Histogram({
      name: 'vllm:inter_token_latency_seconds',
      help: 'Histogram of inter-token latency in seconds.',
      labelNames,
      buckets: ITL_BUCKETS,
      registers,
    });
    this.success = new Counter({
      name: 'vllm:request_success_total',
      help: 'Count of successfully processed requests.',
      labelNames: ['model_name', 'engine', 'finished_reason'],
      registers,
    });
    // Series exist from the start (scrapers see 0, not absence).
    perEngine((_e, labels) => {
      this.ttft.zero(labels);
      this.e2e.zero(labels);
      this.queue.zero(labels);
      this.itl.zero(labels);
      this.success.inc({ ...labels, finished_reason: 'length' }, 0);
    });
  }

  /** A request produced its first token on engine `rank` (TTFT is observed then, as vLLM does). */
  observeFirstToken(rank: number, ttftMs: number): void {
    this.ttft.observe({ model_name: this.model, engine: String(rank) }, ttftMs / 1000);
  }

  /** Gap between two consecutive tokens of one request on engine `rank` (simulated ms). */
  observeInterToken(rank: number, gapMs: number): void {
    this.itl.observe({ model_name: this.model, engine: String(rank) }, gapMs / 1000);
  }

  /**
   * Record a request that ended (finished or aborted) on engine `rank`. `handoffMs` (PD decode)
   * is the time the request spent waiting for its KV before reaching the engine; it is added to
   * the queue time and the e2e latency, as vLLM counts a request waiting for remote KV as queued.
   */
  observe(rank: number, r: RequestRecord, handoffMs = 0): void {
    const labels = { model_name: this.model, engine: String(rank) };
    if (r.queueMs >= 0) this.queue.observe(labels, (r.queueMs + handoffMs) / 1000);
    if (r.finishReason === 'length') this.e2e.observe(labels, (r.e2eMs + handoffMs) / 1000);
    this.success.inc({ ...labels, finished_reason: r.finishReason });
  }

  /**
   * Register the KV hand-off metrics of a PD sim (label role = prefill | decode):
   * kvgate_sim_kv_transfers_total, kvgate_sim_kv_transfer_blocks_total,
   * kvgate_sim_kv_transfer_failures_total{reason}, kvgate_sim_kv_transfer_seconds and
   * kvgate_sim_kv_handoff_wait_seconds (decode only observe the two histograms).
   */
  enablePd(role: 'prefill' | 'decode'): void {
    if (this.pd) return;
    const registers = [this.registry];
    const labelNames = ['model_name', 'role'] as const;
    this.pd = {
      role,
      transfers: new Counter({
        name: 'kvgate_sim_kv_transfers_total',
        help: 'KV hand-offs completed: prefill = KV pulled by a decode, decode = KV imported into the engine.',
        labelNames,
        registers,
      }),
      blocks: new Counter({
        name: 'kvgate_sim_kv_transfer_blocks_total',
        help: 'KV blocks moved by completed hand-offs.',
        labelNames,
        registers,
      }),
      failures: new Counter({
        name: 'kvgate_sim_kv_transfer_failures_total',
        help: 'KV hand-offs that did not complete (timeout, prefill_failed, mismatch, aborted).',
        labelNames: ['model_name', 'role', 'reason'],
        registers,
      }),
      seconds: new Histogram({
        name: 'kvgate_sim_kv_transfer_seconds',
        help: 'Simulated KV transfer time of a hand-off (blocks x --kv-transfer-ms-per-block), decode side.',
        labelNames,
        buckets: KV_TRANSFER_BUCKETS,
        registers,
      }),
      wait: new Histogram({
        name: 'kvgate_sim_kv_handoff_wait_seconds',
        help: 'Decode side: time from the request arrival until the prefill KV was ready, before the transfer.',
        labelNames,
        buckets: TTFT_BUCKETS,
        registers,
      }),
    };
    const labels = { model_name: this.model, role };
    this.pd.transfers.inc(labels, 0);
    this.pd.blocks.inc(labels, 0);
    this.pd.seconds.zero(labels);
    this.pd.wait.zero(labels);
  }

  /** A hand-off completed (prefill: served to a decode; decode: imported, after `transferMs`). */
  observeKvTransfer(blocks: number, transferMs?: number, waitMs?: number): void {
    if (!this.pd) return;
    const labels = { model_name: this.model, role: this.pd.role };
    this.pd.transfers.inc(labels);
    this.pd.blocks.inc(labels, blocks);
    if (transferMs !== undefined) this.pd.seconds.observe(labels, transferMs / 1000);
    if (waitMs !== undefined) this.pd.wait.observe(labels, waitMs / 1000);
  }

  observeKvTransferFailure(reason: KvTransferFailure): void {
    if (!this.pd) return;
    this.pd.failures.inc({ model_name: this.model, role: this.pd.role, reason });
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  render(): Promise<string> {
    return this.registry.metrics();
  }
}
