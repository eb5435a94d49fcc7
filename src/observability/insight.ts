import type { Logger } from 'pino';
import { boundObserver } from '../metrics/bound-observer.js';
import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import type { DecisionNote, GatewayMetrics } from '../metrics/gateway-metrics.js';
import { compactSummary, type PairExplanation, type RouteExplanation } from '../policies/explain.js';
import { ResponseTap, type EngineUsage } from '../upstream/response-tap.js';
import type { DecisionFeed } from './decision-feed.js';
import type { RequestTrace, Span } from './tracing.js';

export interface InsightOptions {
  metrics: GatewayMetrics;
  feed: DecisionFeed;
  log: Logger;
  /** --explain-decisions: explain every decision and answer it in `x-kvgate-route`. */
  explainDecisions: boolean;
  /** --decision-log-sample-rate: share of decisions logged as one structured line (0..1). */
  decisionLogSampleRate: number;
}

/** What a front knows of a request when it records a decision. */
export interface DecisionInput {
  requestId: string;
  route: string;
  ctx: RequestContext;
  policy: string;
  worker: Worker;
  prefill?: Worker;
  attempt: number;
  explanation?: RouteExplanation | PairExplanation;
  sampled: boolean;
}

/**
 * What the fronts (serve's routers, the endpoint picker) tell about each request beyond
 * forwarding it: decisions (dashboard feed, explanations, sampled log lines), the latency and
 * token metrics of each exchange, and trace spans. The request path pays for explanations only
 * when they are asked for (the flag, a dashboard watching, a sampled log line).
 */
export class RequestInsight {
  constructor(readonly opts: InsightOptions) {}

  get feed(): DecisionFeed {
    return this.opts.feed;
  }

  /** Draws whether this decision gets a log line. */
  sample(): boolean {
    const rate = this.opts.decisionLogSampleRate;
    return rate > 0 && (rate >= 1 || Math.random() < rate);
  }

  /** Whether to pay for an explanation of this decision. */
  wantsExplanation(sampled: boolean): boolean {
    return this.opts.explainDecisions || sampled || this.opts.feed.watched;
  }

  get headerEnabled(): boolean {
    return this.opts.explainDecisions;
  }

  /** The `x-kvgate-route` value for a decision, when --explain-decisions is on. */
  routeHeader(e: RouteExplanation | PairExplanation | undefined, worker: Worker, prefill?: Worker): string | undefined {
    if (!this.opts.explainDecisions || !e) return undefined;
    if ('prefill' in e && 'decode' in e) return `prefill: ${compactSummary(e.prefill, prefill?.id)} | decode: ${compactSummary(e.decode, worker.id)}`;
    return compactSummary(e as RouteExplanation, worker.id);
  }

  /** Records a decision just made (call right after selectWorker: it takes the policy's note). Returns its feed sequence number and the note. */
  decided(d: DecisionInput): { seq: number; note: DecisionNote } {
    const note = this.opts.metrics.takeNote();
    const entry = {
      requestId: d.requestId,
      route: d.route,
      model: d.ctx.model,
      policy: d.policy,
      worker: d.worker.id,
      prefillWorker: d.prefill?.id,
      attempt: d.attempt,
      note,
      explanation: d.explanation,
    };
    const seq = this.opts.feed.push(entry, d.ctx.routingText);
    if (d.sampled) {
      const e = d.explanation;
      const summary = e ? this.routeHeader(e, d.worker, d.prefill) ?? (('prefill' in e && 'decode' in e) ? undefined : compactSummary(e as RouteExplanation, d.worker.id)) : undefined;
      const { explanation: _omitted, ...base } = entry;
      this.opts.log.info(
        {
          decision: {
            ...base,
            summary,
            candidates: e && !('prefill' in e && 'decode' in e) ? (e as RouteExplanation).candidates : undefined,
            rule: e && !('prefill' in e && 'decode' in e) ? (e as RouteExplanation).rule : undefined,
          },
        },
        'routing decision',
      );
    }
    return { seq, note };
  }

  /**
   * A tap for one exchange with `worker`: TTFT is observed at the first content chunk (from
   * `arrivedAt`, the request's arrival at kvgate), inter-token gaps as they come; a trace's
   * `first_token` span ends there too.
   */
  tap(model: string, worker: Worker, arrivedAt: number, trace?: { rt: RequestTrace; attempt: Span; startedAt: number }): ResponseTap {
    const m = this.opts.metrics;
    const labels = { model, worker: m.w(worker) };
    let tap: ResponseTap;
    const firstToken = trace ? trace.rt.child('first_token', { 'kvgate.worker': worker.id }, trace.attempt, undefined, trace.startedAt) : undefined;
    tap = new ResponseTap({
      onFirstContent: (at) => {
        if (tap.status > 0 && tap.status < 400) m.ttft.observe(labels, Math.max(0, at - arrivedAt) / 1000);
        firstToken?.end(at);
      },
      // One series per stream: bound once (not prom-client's label hashing on every chunk).
      onInterToken: boundObserver(m.itl, labels),
    });
    return tap;
  }

  /**
   * An exchange ended: end-to-end latency (successful answers), token counters from the
   * engine's usage, the request's avoidable prefill (settled with its prompt tokens), the feed.
   */
  finished(seq: number, ctx: RequestContext, worker: Worker, tap: ResponseTap | undefined, status: number, arrivedAt: number, usage: EngineUsage | undefined = tap?.usage()): void {
    const m = this.opts.metrics;
    const now = performance.now();
    const ok = status > 0 && status < 400;
    if (ok && tap?.endedAt !== undefined) m.e2e.observe({ model: ctx.model, worker: m.w(worker) }, Math.max(0, tap.endedAt - arrivedAt) / 1000);
    if (ok) m.recordUsage(ctx.model, worker, usage);
    m.settleAvoidable(ctx, usage?.promptTokens);
    this.opts.feed.done({
      seq,
      status,
      ttftMs: ok && tap?.firstContentAt !== undefined ? tap.firstContentAt - arrivedAt : undefined,
      e2eMs: now - arrivedAt,
      usage,
    });
  }
}
