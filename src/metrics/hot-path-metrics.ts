import { monitorEventLoopDelay, performance, type EventLoopUtilization, type IntervalHistogram } from 'node:perf_hooks';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

const RESOLUTION_MS = 10;

/**
 * Metrics of the hot path (issue #12): event-loop health, tokenization for the policies that
 * need token ids (off-loop pool, --max-routing-ms budget, length cap), and time spent waiting
 * for an upstream connection when --max-connections-per-worker caps the pools.
 *
 * Event-loop delay and utilisation are measured over the interval since the previous scrape
 * (the delay histogram is reset at each scrape); Node's default metrics (nodejs_eventloop_lag_*,
 * registered elsewhere) are not duplicated here.
 */
export class HotPathMetrics {
  readonly tokenizeFallbacks: Counter<'reason'>;
  readonly tokenizeSeconds: Histogram<'where'>;
  readonly tokenizeCancelled: Counter;
  readonly connectionWait: Histogram;
  private readonly loopDelay: IntervalHistogram;
  private lastElu: EventLoopUtilization;

  constructor(registry: Registry, pending: () => number = () => 0) {
    const registers = [registry];
    this.tokenizeFallbacks = new Counter({
      name: 'kvgate_tokenize_fallbacks_total',
      help: 'Requests a token-aware policy routed by text instead of token ids: budget (--max-routing-ms passed), too_long (--max-tokenize-chars), error (a tokenizer thread failed)',
      labelNames: ['reason'],
      registers,
    });
    this.tokenizeSeconds = new Histogram({
      name: 'kvgate_tokenize_seconds',
      help: 'Time from asking for a request\'s token ids to having them (queue included), by where they were computed (pool: tokenizer threads, inline: the event loop)',
      labelNames: ['where'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5],
      registers,
    });
    this.tokenizeCancelled = new Counter({ name: 'kvgate_tokenize_cancelled_total', help: 'Tokenizations dropped or stopped because the client left', registers });
    new Gauge({
      name: 'kvgate_tokenize_pending',
      help: 'Tokenizations running or waiting in the tokenizer threads',
      registers,
      collect() {
        this.set(pending());
      },
    });
    this.connectionWait = new Histogram({
      name: 'kvgate_upstream_connection_wait_seconds',
      help: 'Time a request waited for a free upstream connection (--max-connections-per-worker set; includes connecting)',
      buckets: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30],
      registers,
    });
    this.loopDelay = monitorEventLoopDelay({ resolution: RESOLUTION_MS });
    this.loopDelay.enable();
    this.lastElu = performance.eventLoopUtilization();
    const delay = this.loopDelay;
    const self = this;
    new Gauge({
      name: 'kvgate_event_loop_utilization',
      help: 'Share of time the event loop was busy since the previous scrape (0..1)',
      registers,
      collect() {
        const now = performance.eventLoopUtilization();
        this.set(performance.eventLoopUtilization(now, self.lastElu).utilization);
        self.lastElu = now;
      },
    });
    new Gauge({
      name: 'kvgate_event_loop_delay_seconds',
      help: 'Event-loop lag percentiles since the previous scrape: how late a 10 ms timer fired (perf_hooks.monitorEventLoopDelay minus its 10 ms period)',
      labelNames: ['quantile'],
      registers,
      collect() {
        const lag = (ns: number) => (delay.count > 0 ? Math.max(0, ns / 1e9 - RESOLUTION_MS / 1000) : 0);
        this.set({ quantile: '0.5' }, lag(delay.percentile(50)));
        this.set({ quantile: '0.9' }, lag(delay.percentile(90)));
        this.set({ quantile: '0.99' }, lag(delay.percentile(99)));
        this.set({ quantile: '1' }, lag(delay.max));
        delay.reset();
      },
    });
  }

  close(): void {
    this.loopDelay.disable();
  }
}
