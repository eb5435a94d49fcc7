import { DEFAULT_COST_MODEL, prefillPairs, type CostModelConfig } from '../engine/cost-model.js';

/**
 * Online latency predictor of one worker pool (slo_aware).
 *
 * Time to first token on a worker is modelled as
 *
 *   TTFT ≈ θ1 · work + θ2 · stepCost
 *
 * - `work` (ms at the engine model's speed): the prefill this request waits for, i.e. the backlog
 *   of prefill the worker still has from earlier requests plus this request's own uncached
 *   prefill, priced with the engine cost model's prefill terms (per token, per causal attention
 *   pair);
 * - `stepCost` (ms): the steps that prefill spans (work tokens / step token budget, rounded up)
 *   times the fixed and decode cost of each step with the worker's current in-flight batch
 *   (per-step overhead + per decode sequence + per context token read);
 * - θ (per worker) is learned online from observed first-token times by recursive least squares
 *   with exponential forgetting (old observations fade, so a worker that slows down or speeds up
 *   is tracked) and Huber weighting (a few wild observations — a preemption, a hiccup — do not
 *   drag the fit). It is seeded from the cost model: θ = (1, 1) is "the engine is exactly the
 *   model", so predictions are usable before the first observation. There is no intercept: the
 *   step cost (at least one step's fixed cost) plays that part, and a free intercept would be
 *   almost collinear with it.
 *
 * The backlog is a fluid queue per worker: each routed request adds its work, and the queue
 * drains at the learned speed (1/θ1 work-ms per ms) as time passes; it never exceeds the work of
 * the requests whose first token has not arrived yet (a first token proves that prefill is done).
 *
 * Time per output token is predicted from the cost model's decode step with the worker's batch
 * after admission, scaled by the worker's learned slowness θ1 (decode speed is not observed on
 * its own: the router's hooks see the first token and the end, not the token count).
 */
export interface PredictorConfig {
  /** Engine cost model the seed comes from (the `kvgate sim` defaults unless given). */
  cost: Readonly<CostModelConfig>;
  /** Prefill token budget of one engine step (vLLM max_num_batched_tokens). */
  maxBatchedTokens: number;
  /** Forgetting factor of the regression (0 < λ ≤ 1): weight of an observation halves every ln2/−lnλ observations. */
  forgetting: number;
  /** Residuals beyond this many mean absolute residuals are down-weighted (Huber). */
  huberK: number;
  /**
   * The fixed latency outside the model is tracked as this quantile of observed − modelled
   * (stochastic quantile tracking): low enough that queueing the model missed does not leak
   * into it, high enough to cover the usual network and proxy time.
   */
  fixedQuantile: number;
}

export const defaultPredictorConfig: PredictorConfig = {
  cost: DEFAULT_COST_MODEL,
  maxBatchedTokens: 8192,
  forgetting: 0.97,
  huberK: 3,
  fixedQuantile: 0.3,
};

/** What the predictor needs to know about the candidate worker now. */
export interface WorkerLoadView {
  /** Requests in flight on the worker (its decode batch). */
  inFlight: number;
  /** Tokens of context those requests hold (KV read per decode step). */
  inFlightTokens: number;
}

/** One prediction, with the features the regression learns from once the first token is seen. */
export interface Prediction {
  ttftMs: number;
  tpotMs: number;
  /** Prefill backlog ahead of this request (ms of model work). */
  backlogWorkMs: number;
  /** This request's own prefill (ms of model work). */
  ownWorkMs: number;
  /** Regression inputs [work, stepCost]. */
  x: [number, number];
  /**
   * Model work (ms) the cache known only from the routing history is worth: the prediction with
   * none of it cached minus with all of it cached (0 when every cached token is confirmed by the
   * engine's events). The prediction credits `historyCredit` of it.
   */
  historySpanMs: number;
  /** This request's own prefill work had the history been credited in full (= ownWorkMs without history). */
  fullCreditWorkMs: number;
  /** Cost of one step with the worker's batch (ms of model time). */
  stepMs: number;
}

interface Pending {
  workMs: number;
  x: [number, number];
  /** The prediction's model work with the history fully credited, and its span (see Prediction). */
  fullBase: number;
  historySpanMs: number;
  arrivalMs: number;
  predictedMs: number;
}

interface WorkerModel {
  /** Wall time per unit of model time (1 = the engine is the model). */
  slowness: number;
  /** Fixed latency outside the engine model (network, proxying, event loops), ms. */
  fixedMs: number;
  /** Exponential mean of |log residual| (Huber scale of the slowness) and of |residual| in ms (of the fixed part). */
  absResidualMs: number;
  absResidual: number;
  observations: number;
  /** Fluid prefill backlog (ms of model work) at `backlogAtMs`. */
  backlogWorkMs: number;
  backlogAtMs: number;
  /** Step cost (fixed + decode) with the batch last seen on the worker (ms of model time). */
  stepMs: number;
  /** Requests routed here whose first token has not come back yet. */
  pending: Map<string, Pending>;
  pendingWorkMs: number;
  /** Exponential mean of |observed − predicted| / observed, over the recent first tokens. */
  relError: number;
  /**
   * Share of the cache known only from the routing history (no KV events: the approximate tree)
   * that the engine turned out to hold, learned from first tokens (1 = it holds what was sent to
   * it). The history does not know what the engine evicted; crediting it in full priced evicted
   * prefixes as hits, and the slowness rose ~14× to absorb that (docs/benchmarks.md §10.12).
   */
  historyCredit: number;
}

/** Bounds of the slowness: an engine 20× faster or 100× slower than the model is not believed. */
const MIN_SLOWNESS = 0.05;
const MAX_SLOWNESS = 100;

export interface WorkerPredictorStats {
  /** Learned wall time per unit of the engine model's time (1 = exactly the model). */
  slowness: number;
  /** Learned fixed latency outside the model (ms). */
  fixedMs: number;
  observations: number;
  backlogWorkMs: number;
  pendingRequests: number;
  /** Mean relative error of recent predictions (exponential, ~20 observations). */
  relError: number;
  /** Learned share of history-only cache the engine holds (1 until learned otherwise). */
  historyCredit: number;
}

export class LatencyPredictor {
  private readonly workers = new Map<string, WorkerModel>();

  constructor(readonly config: PredictorConfig = defaultPredictorConfig) {}

  private model(id: string, nowMs: number): WorkerModel {
    let m = this.workers.get(id);
    if (!m) {
      m = { slowness: 1, fixedMs: 0, absResidualMs: 0, absResidual: 0, observations: 0, backlogWorkMs: 0, backlogAtMs: nowMs, stepMs: this.config.cost.overheadMs, pending: new Map(), pendingWorkMs: 0, relError: 0, historyCredit: 1 };
      this.workers.set(id, m);
    }
    return m;
  }

  /** Model work (ms at slowFactor 1) of prefilling `uncached` tokens after `cached` ones. */
  prefillWorkMs(cached: number, uncached: number): number {
    const c = this.config.cost;
    if (uncached <= 0) return 0;
    return c.prefillTokenMs * uncached + c.prefillAttentionMs * prefillPairs(cached, uncached);
  }

  /** The backlog of a worker at `nowMs` (drained at its learned speed since last looked at). */
  private backlog(m: WorkerModel, nowMs: number): number {
    // Wall ms per ms of prefill work: the learned slowness plus each step's fixed and decode
    // cost spread over the step's prefill work.
    const c = this.config.cost;
    const stepWork = c.prefillTokenMs * this.config.maxBatchedTokens;
    const slowness = m.slowness * (1 + (stepWork > 0 ? m.stepMs / stepWork : 0));
    const drained = Math.max(0, nowMs - m.backlogAtMs) / slowness;
    return Math.min(m.pendingWorkMs, Math.max(0, m.backlogWorkMs - drained));
  }

  /**
   * Predicted TTFT and TPOT of a request on worker `id` that would prefill `uncached` tokens
   * on top of `cached` ones there, of which `unconfirmed` are known only from the routing
   * history (not from the engine's KV events): those are credited as cached at the worker's
   * learned `historyCredit`. Changes nothing.
   */
  predict(id: string, nowMs: number, cached: number, uncached: number, load: WorkerLoadView, outputContext = 0, unconfirmed = 0): Prediction {
    const m = this.workers.get(id);
    const slowness = m?.slowness ?? 1;
    const fixedMs = m?.fixedMs ?? 0;
    const backlogWorkMs = m ? this.backlog(m, nowMs) : 0;
    const history = Math.max(0, Math.min(unconfirmed, cached));
    const dropped = Math.round(history * (1 - (m?.historyCredit ?? 1)));
    const fullCreditWorkMs = this.prefillWorkMs(cached, uncached);
    const historySpanMs = history > 0 ? this.prefillWorkMs(cached - history, uncached + history) - fullCreditWorkMs : 0;
    const ownWorkMs = this.prefillWorkMs(cached - dropped, uncached + dropped);
    const c = this.config.cost;
    const work = backlogWorkMs + ownWorkMs;
    // Tokens the work spans, for the number of steps (attention priced as extra tokens).
    const tokens = c.prefillTokenMs > 0 ? work / c.prefillTokenMs : uncached;
    const steps = Math.max(1, Math.ceil(tokens / this.config.maxBatchedTokens));
    const stepMs = c.overheadMs + c.decodeSeqMs * load.inFlight + c.decodeContextTokenMs * load.inFlightTokens;
    const x: [number, number] = [work, steps * stepMs];
    const ttftMs = fixedMs + slowness * (x[0] + x[1]);
    const decodeStep = c.overheadMs + c.decodeSeqMs * (load.inFlight + 1) + c.decodeContextTokenMs * (load.inFlightTokens + cached + uncached + outputContext);
    const tpotMs = c.slowFactor * slowness * decodeStep;
    return { ttftMs, tpotMs, backlogWorkMs, ownWorkMs, x, stepMs, historySpanMs, fullCreditWorkMs };
  }

  /** The request was routed to `id` with this prediction: its prefill joins the worker's backlog. */
  routed(id: string, requestId: string, nowMs: number, arrivalMs: number, p: Prediction): void {
    const m = this.model(id, nowMs);
    m.backlogWorkMs = this.backlog(m, nowMs) + p.ownWorkMs;
    m.backlogAtMs = nowMs;
    m.stepMs = p.stepMs;
    const prev = m.pending.get(requestId);
    if (prev) m.pendingWorkMs -= prev.workMs;
    m.pending.set(requestId, { workMs: p.ownWorkMs, x: p.x, fullBase: p.x[0] + p.x[1] - (p.ownWorkMs - p.fullCreditWorkMs), historySpanMs: p.historySpanMs, arrivalMs, predictedMs: p.ttftMs });
    m.pendingWorkMs += p.ownWorkMs;
  }

  /**
   * The first token of `requestId` came back at `nowMs`: learn from the observed TTFT and take
   * its prefill out of the backlog bound. Returns the observation, or undefined if unknown.
   */
  firstToken(id: string, requestId: string, nowMs: number): { observedMs: number; predictedMs: number } | undefined {
    const m = this.workers.get(id);
    const r = m?.pending.get(requestId);
    if (!m || !r) return undefined;
    this.release(m, requestId, r, nowMs);
    const y = nowMs - r.arrivalMs;
    // A prediction that leaned on history-only cache teaches how much of that cache was real, not
    // the speed: the engine's model time this TTFT implies, placed between "all of it cached" and
    // "none of it", is the share it held. (Small spans — a shared template — learn as usual.)
    if (r.historySpanMs > 0.25 * r.fullBase && Number.isFinite(y) && y > 0) {
      const modelMs = Math.max(0, y - m.fixedMs) / m.slowness;
      const held = Math.min(1, Math.max(0, (r.fullBase + r.historySpanMs - modelMs) / r.historySpanMs));
      m.historyCredit += 0.25 * (held - m.historyCredit);
      m.relError = 0.95 * m.relError + 0.05 * (Math.abs(y - r.predictedMs) / y);
    } else this.learn(m, r.x, y, r.predictedMs);
    return { observedMs: y, predictedMs: r.predictedMs };
  }

  /** The request ended without a first token (error, abort): forget it, learn nothing. */
  forget(id: string, requestId: string, nowMs: number): void {
    const m = this.workers.get(id);
    const r = m?.pending.get(requestId);
    if (m && r) this.release(m, requestId, r, nowMs);
  }

  removeWorker(id: string): void {
    this.workers.delete(id);
  }

  stats(id: string, nowMs: number): WorkerPredictorStats {
    const m = this.workers.get(id);
    if (!m) return { slowness: 1, fixedMs: 0, observations: 0, backlogWorkMs: 0, pendingRequests: 0, relError: 0, historyCredit: 1 };
    return { slowness: m.slowness, fixedMs: m.fixedMs, observations: m.observations, backlogWorkMs: this.backlog(m, nowMs), pendingRequests: m.pending.size, relError: m.relError, historyCredit: m.historyCredit };
  }

  workerIds(): IterableIterator<string> {
    return this.workers.keys();
  }

  private release(m: WorkerModel, requestId: string, r: Pending, nowMs: number): void {
    m.backlogWorkMs = this.backlog(m, nowMs);
    m.backlogAtMs = nowMs;
    m.pending.delete(requestId);
    m.pendingWorkMs = Math.max(0, m.pendingWorkMs - r.workMs);
    if (m.pending.size === 0) m.pendingWorkMs = 0;
    if (m.backlogWorkMs > m.pendingWorkMs) m.backlogWorkMs = m.pendingWorkMs;
  }

  /**
   * One robust update of the two terms, by coordinate steps:
   * - the fixed latency: the `fixedQuantile` quantile of observed − modelled, by stochastic
   *   quantile tracking (steps of 5% of the mean absolute residual), never below 0;
   * - the slowness: an exponentially weighted mean, in log space, of (observed − fixed) /
   *   modelled, Huber-clipped (a one-parameter regression through the origin).
   * A wild observation moves either little; a lasting change of speed first widens the clip
   * scale, then moves them. (A joint least-squares fit of both proved unstable: on a busy worker
   * the two inputs are nearly collinear; a mean-tracked fixed part soaked up the queueing of a
   * slowed-down engine.)
   */
  private learn(m: WorkerModel, x: readonly [number, number], y: number, predictedMs: number): void {
    if (!Number.isFinite(y) || y <= 0) return;
    const base = x[0] + x[1];
    if (!(base > 0)) return;
    const alpha = Math.max(1 - this.config.forgetting, 1 / (m.observations + 2));
    const clip = (v: number, scale: number) => {
      if (m.observations < 8) return v;
      const limit = this.config.huberK * scale;
      return Math.abs(v) > limit ? Math.sign(v) * limit : v;
    };
    // Fixed part: residual against the current prediction, in ms (scale: the residuals' mean in ms).
    const r = y - (m.fixedMs + m.slowness * base);
    const tau = this.config.fixedQuantile;
    const eta = Math.max(0.05, 0.05 * m.absResidualMs);
    m.fixedMs = Math.max(0, m.fixedMs + eta * (r >= 0 ? tau : tau - 1));
    m.absResidualMs = m.observations === 0 ? Math.abs(r) : 0.8 * m.absResidualMs + 0.2 * Math.abs(r);
    const engine = Math.max(y - m.fixedMs, 0.05 * y);
    const d = Math.log(engine / base) - Math.log(m.slowness);
    m.slowness = Math.min(MAX_SLOWNESS, Math.max(MIN_SLOWNESS, Math.exp(Math.log(m.slowness) + alpha * clip(d, Math.max(0.02, m.absResidual)))));
    m.absResidual = m.observations === 0 ? Math.abs(d) : 0.8 * m.absResidual + 0.2 * Math.abs(d);
    m.observations++;
    m.relError = m.observations === 1 ? Math.abs(y - predictedMs) / y : 0.95 * m.relError + 0.05 * (Math.abs(y - predictedMs) / y);
  }
}
