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
      this.success.inc({ ...labels, finished_reason: 'length' }, 0);
    });
  }

  /** A request produced its first token on engine `rank` (TTFT is observed then, as vLLM does). */
  observeFirstToken(rank: number, ttftMs: number): void {
    this.ttft.observe({ model_name: this.model, engine: String(rank) }, ttftMs / 1000);
  }

  /** Record a request that ended (finished or aborted) on engine `rank`. */
  observe(rank: number, r: RequestRecord): void {
    const labels = { model_name: this.model, engine: String(rank) };
    if (r.queueMs >= 0) this.queue.observe(labels, r.queueMs / 1000);
    if (r.finishReason === 'length') this.e2e.observe(labels, r.e2eMs / 1000);
    this.success.inc({ ...labels, finished_reason: r.finishReason });
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  render(): Promise<string> {
    return this.registry.metrics();
  }
}
