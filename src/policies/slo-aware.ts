import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { describeAll, noneAvailable, round, type RouteExplanation } from './explain.js';
import { defaultKvAwareConfig, KvAwarePolicy, type KvAwareConfig, type KvIndexView, type KvScore } from './kv-aware.js';
import { defaultPredictorConfig, LatencyPredictor, type Prediction, type PredictorConfig } from './latency-predictor.js';
import { available, type LatencyPrediction, type PolicyDeps, type WorkerPair } from './policy.js';

export interface SloAwareConfig extends KvAwareConfig {
  /** Default TTFT objective (ms) of requests without `x-slo-ttft-ms`; undefined = none. */
  ttftSloMs?: number;
  /** Default TPOT objective (ms) of requests without `x-slo-tpot-ms`; undefined = none. */
  tpotSloMs?: number;
  /**
   * Without an objective: workers predicted within this many ms (or `affinityMarginRel` × the
   * best prediction, whichever is larger) of the fastest are "as fast", and the one with the
   * most of the request cached among them wins.
   */
  affinityMarginMs: number;
  affinityMarginRel: number;
  /** A worker meets an objective when its prediction is at most this fraction of it. */
  sloSafety: number;
  /**
   * A detour (the request's home — the worker holding most of it — is predicted to miss its TTFT
   * objective, another to meet it) is taken only when the latency it saves this request
   * (predicted TTFT at home − there) is at least this many times the extra prefill work it puts
   * on the cluster (the detour worker's prefill − the home's, each at its learned speed, ms).
   * 0 = always divert to a worker predicted to meet the objective (the rule before this one).
   */
  detourCostFactor: number;
  /**
   * Stay with the prefix holder while it is calm: when the worker whose engine holds most of the
   * request (KV events, or blocks its in-flight requests are computing) is predicted to meet the
   * TTFT objective within this fraction of it, the request goes there, whatever the cost ranking
   * says (rule `slo_hold`). 0 = off (the cheapest worker meeting the objective, as before).
   */
  holdFraction: number;
  predictor: PredictorConfig;
}

/**
 * slo_aware's own default overlap weight (kv_aware's is 4): on the Mooncake conversation trace,
 * weight 1 (with priced detours) sustains 1.24× kv_aware's rate at a 2 s TTFT-p90 objective for
 * 1.4 points of hit rate (docs/benchmarks.md §10.9). `--slo-overlap-weight` sets it.
 */
export const SLO_OVERLAP_WEIGHT = 1;

/**
 * slo_aware stays with the worker whose engine holds most of the request while that worker is
 * predicted within this fraction of the TTFT objective: on the Mooncake traces at the recorded
 * rate, 86–94% of the requests on which slo_aware (without this rule) left that worker for one
 * holding less left it while it was predicted to meet the objective (at a median 0.14–0.19 × it),
 * 1.1 and 3.4–3.9 points of hit rate lost for nothing against AIBrix and llm-d; holding gains 1.5 / 4.8 / 0.7 points of hit
 * rate (conversation / synthetic / shared-prefix) for 2% of throughput at SLO on the conversation
 * trace and none on the others (docs/benchmarks.md §10.12). `--slo-hold-fraction` sets it.
 */
export const SLO_HOLD_FRACTION = 0.75;

export const defaultSloAwareConfig: SloAwareConfig = {
  ...defaultKvAwareConfig,
  overlapWeight: SLO_OVERLAP_WEIGHT,
  detourCostFactor: 1,
  holdFraction: SLO_HOLD_FRACTION,
  affinityMarginMs: 100,
  affinityMarginRel: 0.2,
  sloSafety: 1,
  predictor: defaultPredictorConfig,
};

export const SLO_TTFT_HEADER = 'x-slo-ttft-ms';
export const SLO_TPOT_HEADER = 'x-slo-tpot-ms';

/** A positive number of ms from a header, else undefined (absent or not a positive number). */
export function objectiveFrom(value: string | string[] | undefined): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (v === undefined || v.trim() === '') return undefined;
  const n = Number(v);
  return Number.isFinite(n) && n > 0 ? n : undefined;
}

export type SloRule = 'slo_hold' | 'slo_headroom' | 'slo_detour_not_worth' | 'slo_unreachable' | 'lowest_ttft' | 'affinity_within_margin';

/** What slo_aware decided for the last request (the gateway's `x-kvgate-predicted-ttft-ms`, admission). */
export interface SloDecision {
  requestId: string;
  worker: string;
  predictedTtftMs: number;
  predictedTpotMs: number;
  ttftObjectiveMs?: number;
  tpotObjectiveMs?: number;
  /** Some worker was predicted to meet the request's objectives (true without objectives). */
  feasible: boolean;
  rule: SloRule;
}

interface Scored {
  sc: KvScore;
  preds: Prediction[];
  uncached: number[];
  i: number;
  rule: SloRule;
  feasible: boolean[];
  ttftObjective?: number;
  tpotObjective?: number;
}

/**
 * Routes on predicted latency (issue #15). For each available worker, kv_aware's machinery gives
 * the request's overlap there (engine KV events, routing history, prefixes in flight) and the
 * worker's in-flight batch; a {@link LatencyPredictor} learned online per worker turns the
 * worker's prefill backlog plus this request's uncached prefill into a predicted TTFT, and its
 * decode batch into a predicted TPOT.
 *
 * - With a TTFT objective, the worker whose engine holds most of the request keeps it while it is
 *   predicted within `holdFraction` × the objective (`slo_hold`): leaving a calm holder only
 *   loses cache (docs/benchmarks.md §10.12).
 * - With a TTFT (and/or TPOT) objective (`x-slo-ttft-ms` / `x-slo-tpot-ms`, else the configured
 *   default) otherwise: among the workers predicted to meet it (prediction ≤ sloSafety × objective), the
 *   one with the lowest kv_aware cost (prefill still needed there, weighed against the load in
 *   flight): it spends the least of the cluster's capacity on this request — leaving the most
 *   headroom for others — without piling onto one worker; ties by lowest predicted TTFT. If none
 *   is predicted to meet it: the lowest predicted TTFT (and the decision says so).
 * - Detours are priced: when the request's home (the worker holding most of it) is predicted to
 *   miss the TTFT objective, a worker that would meet it (or, when none would, the fastest) is
 *   taken only if the TTFT it saves this request is at least `detourCostFactor` × the extra
 *   prefill it adds there (each worker's prefill work at its learned speed); else the request
 *   stays home (`slo_detour_not_worth`). Sending a group's request to an engine that must
 *   prefill the group's long prompt cold costs the cluster more than the queueing it saves one
 *   request (docs/benchmarks.md §10.3, §10.9).
 * - Without an objective: the lowest predicted TTFT, but among the workers within a margin of it
 *   the one with the lowest kv_aware cost (cache affinity when the difference is small).
 *
 * (A first version picked, among the workers meeting the objective, the one with the fewest
 * uncached tokens: pure affinity packs prefix holders up to the objective's edge, and on the
 * Mooncake conversation trace it lost 1.2 points of hit rate and 3.8 points of requests within
 * 2 s against kv_aware — see docs/lab.md.)
 * - PD (one slo_aware for both pools): prefill worker by the rules above, decode worker by
 *   lowest predicted TPOT among those meeting the TPOT objective.
 * - Ties under any of these rules go to the emptier cache, then at random (kv_aware's
 *   tie-break), never to the first worker in the list.
 */
export class SloAwarePolicy extends KvAwarePolicy {
  override readonly name: string = 'slo_aware';
  readonly predictor: LatencyPredictor;
  /** The last decision (for the gateway header, admission and tests). */
  lastSlo: SloDecision | undefined;
  private readonly decodeTokens = new Map<string, number>();
  private readonly decodeOf = new Map<string, { workerId: string; tokens: number }>();

  constructor(
    deps: PolicyDeps,
    view: KvIndexView,
    readonly sloConfig: SloAwareConfig = defaultSloAwareConfig,
  ) {
    super(deps, view, sloConfig);
    this.predictor = new LatencyPredictor(sloConfig.predictor);
  }

  private objectives(ctx: RequestContext): { ttft?: number; tpot?: number } {
    return {
      ttft: objectiveFrom(ctx.headers[SLO_TTFT_HEADER]) ?? this.sloConfig.ttftSloMs,
      tpot: objectiveFrom(ctx.headers[SLO_TPOT_HEADER]) ?? this.sloConfig.tpotSloMs,
    };
  }

  /** Worker's in-flight batch as this router (and its peers) see it. */
  private loadOf(w: Worker, bs: number): { inFlight: number; inFlightTokens: number } {
    const s = this.state.get(w.id);
    const peer = this.peerLoad.get(w.id);
    return { inFlight: Math.max(w.load, s?.active.size ?? 0), inFlightTokens: ((s?.blocks.size ?? 0) + (peer?.blocks ?? 0)) * bs + (this.decodeTokens.get(w.id) ?? 0) };
  }

  /**
   * The best of `set` by `keys` in turn (each minimised; within 1e-9 counts as a tie), and the
   * workers still tied after the last key split by {@link KvAwarePolicy.breakTie} (emptier cache,
   * then at random): never the lowest index by default, which sent every tie — e.g. idle workers
   * all holding the same shared first block — to the first worker (docs/benchmarks.md §10.13).
   */
  private pick(healthy: readonly Worker[], set: readonly number[], draw: boolean, ...keys: Array<(k: number) => number>): number {
    let ties = [...set];
    for (const key of keys) {
      if (ties.length === 1) break;
      let best = Infinity;
      for (const k of ties) best = Math.min(best, key(k));
      ties = ties.filter((k) => key(k) <= best + 1e-9);
    }
    return this.breakTie(healthy, ties, draw, this.drawn ? (g) => this.drawn!.push(g) : undefined);
  }

  /** While explain() evaluates: the groups of workers a decision would draw among. */
  private drawn: number[][] | undefined;

  private evaluate(healthy: readonly Worker[], sc: KvScore, ctx: RequestContext, draw = true): Scored {
    const now = this.deps.clock.now();
    const { ttft, tpot } = this.objectives(ctx);
    const preds: Prediction[] = [];
    const uncached: number[] = [];
    const held: number[] = [];
    for (let k = 0; k < healthy.length; k++) {
      // What the engine will find cached: its own KV events (and the blocks its in-flight
      // requests are computing), not the routing history kv_aware's overlap adds for affinity —
      // a prefix the engine evicted must be prefilled again, and counting it as cached hid that
      // work from the prediction (docs/benchmarks.md §10.10.2). Without fresh events, the tree.
      const c = sc.meta[k];
      const h = c.fallback ? c.overlap : Math.max(c.indexed, c.pending);
      held.push(h);
      const cached = Math.min(sc.inputTokens, h * sc.bs);
      const u = sc.inputTokens - cached;
      uncached.push(u);
      // On the approximate tree all of it is routing history: the predictor credits it at the
      // share the worker's first tokens showed real (an engine evicts what the tree remembers).
      preds.push(this.predictor.predict(healthy[k].id, now, cached, u, this.loadOf(healthy[k], sc.bs), ctx.maxOutputTokens ?? 0, c.fallback ? cached : 0));
    }
    const safety = this.sloConfig.sloSafety;
    const feasible = preds.map((p) => (ttft === undefined || p.ttftMs <= safety * ttft) && (tpot === undefined || p.tpotMs <= safety * tpot));
    const all = preds.map((_, k) => k);
    const costs = sc.costs;
    const ttftOf = (k: number) => preds[k].ttftMs;
    const costOf = (k: number) => costs[k];
    const fastest = () => this.pick(healthy, all, draw, ttftOf);
    // Among `set`, the lowest kv_aware cost (prefill still needed weighed against the load in
    // flight: cache affinity without piling up); ties by lowest predicted TTFT.
    const cheapest = (set: number[]) => this.pick(healthy, set, draw, costOf, ttftOf);
    if (ttft !== undefined || tpot !== undefined) {
      // The holder is calm: stay with the cache (no detour, no cost ranking).
      const hold = this.sloConfig.holdFraction;
      if (hold > 0 && ttft !== undefined) {
        const holder = this.pick(healthy, all, draw, (k) => -held[k], costOf);
        if (held[holder] > 0 && feasible[holder] && preds[holder].ttftMs <= hold * ttft) return { sc, preds, uncached, i: holder, rule: 'slo_hold', feasible, ttftObjective: ttft, tpotObjective: tpot };
      }
      // The request's home: the worker holding most of it (ties: the lowest cost).
      const ov = sc.meta;
      const home = this.pick(healthy, all, draw, (k) => -ov[k].overlap, costOf);
      const factor = this.sloConfig.detourCostFactor;
      // A detour pays when the TTFT it saves this request covers the extra prefill it makes the
      // cluster do (which delays the requests queued behind it there). Only a TTFT objective
      // can make the home miss by queueing; a TPOT-only miss diverts as before.
      const homeTtftOk = ttft === undefined || preds[home].ttftMs <= safety * ttft;
      const pays = (k: number) => {
        if (k === home || factor <= 0 || homeTtftOk) return true;
        const extra = this.extraWorkMs(healthy, k, home, preds, now);
        return extra <= 0 || preds[home].ttftMs - preds[k].ttftMs >= factor * extra;
      };
      const ok = all.filter((k) => feasible[k]);
      if (ok.length > 0) {
        const paying = ok.filter(pays);
        if (paying.length > 0) return { sc, preds, uncached, i: cheapest(paying), rule: 'slo_headroom', feasible, ttftObjective: ttft, tpotObjective: tpot };
        return { sc, preds, uncached, i: home, rule: 'slo_detour_not_worth', feasible, ttftObjective: ttft, tpotObjective: tpot };
      }
      // None meets it: the lowest predicted TTFT, unless leaving home for it does not pay either.
      const best = fastest();
      return { sc, preds, uncached, i: pays(best) ? best : home, rule: 'slo_unreachable', feasible, ttftObjective: ttft, tpotObjective: tpot };
    }
    const min = Math.min(...preds.map((p) => p.ttftMs));
    const margin = Math.max(this.sloConfig.affinityMarginMs, this.sloConfig.affinityMarginRel * min);
    const near = all.filter((k) => preds[k].ttftMs <= min + margin);
    const i = cheapest(near);
    return { sc, preds, uncached, i, rule: preds[i].ttftMs <= min + 1e-9 ? 'lowest_ttft' : 'affinity_within_margin', feasible };
  }

  /** Prefill work (ms, at each worker's learned speed) the request costs on `k` beyond what it costs on `home`. */
  private extraWorkMs(healthy: readonly Worker[], k: number, home: number, preds: Prediction[], now: number): number {
    const speed = (j: number) => this.predictor.stats(healthy[j].id, now).slowness;
    return speed(k) * preds[k].ownWorkMs - speed(home) * preds[home].ownWorkMs;
  }

  private pending: Scored | undefined;

  protected override choose(healthy: readonly Worker[], sc: KvScore, ctx: RequestContext): number {
    this.pending = this.evaluate(healthy, sc, ctx);
    return this.pending.i;
  }

  protected override commit(healthy: readonly Worker[], sc: KvScore, i: number, ctx: RequestContext): void {
    super.commit(healthy, sc, i, ctx);
    const e = this.pending!;
    this.pending = undefined;
    const p = e.preds[i];
    this.predictor.routed(healthy[i].id, ctx.requestId, this.deps.clock.now(), this.deps.clock.now(), p);
    this.lastSlo = {
      requestId: ctx.requestId,
      worker: healthy[i].id,
      predictedTtftMs: p.ttftMs,
      predictedTpotMs: p.tpotMs,
      ttftObjectiveMs: e.ttftObjective,
      tpotObjectiveMs: e.tpotObjective,
      feasible: e.feasible.some((f) => f) || (e.ttftObjective === undefined && e.tpotObjective === undefined),
      rule: e.rule,
    };
  }

  predictionFor(requestId: string): LatencyPrediction | undefined {
    const d = this.lastSlo;
    if (!d || d.requestId !== requestId) return undefined;
    return { ttftMs: d.predictedTtftMs, tpotMs: d.predictedTpotMs, feasible: d.feasible };
  }

  override onFirstToken(worker: Worker, ctx: RequestContext): void {
    super.onFirstToken(worker, ctx);
    // Without streaming the first byte is the whole response: not a first-token time.
    if (ctx.stream) this.predictor.firstToken(worker.id, ctx.requestId, this.deps.clock.now());
    else this.predictor.forget(worker.id, ctx.requestId, this.deps.clock.now());
  }

  override onRequestComplete(worker: Worker, ctx: RequestContext): void {
    super.onRequestComplete(worker, ctx);
    this.predictor.forget(worker.id, ctx.requestId, this.deps.clock.now());
    const d = this.decodeOf.get(ctx.requestId);
    if (d && d.workerId === worker.id) {
      this.decodeOf.delete(ctx.requestId);
      const left = (this.decodeTokens.get(worker.id) ?? 0) - d.tokens;
      if (left > 0) this.decodeTokens.set(worker.id, left);
      else this.decodeTokens.delete(worker.id);
    }
  }

  override onWorkerRemoved(worker: Worker): void {
    super.onWorkerRemoved(worker);
    this.predictor.removeWorker(worker.id);
    this.decodeTokens.delete(worker.id);
  }

  /** PD: prefill worker by predicted TTFT (the rules above), decode worker by predicted TPOT. */
  override selectPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): WorkerPair | undefined {
    const dec = available(decode);
    if (dec.length === 0) return undefined;
    const p = this.selectWorker(prefill, ctx);
    if (!p) return undefined;
    const { k } = this.pickDecode(dec, ctx);
    const d = dec[k];
    const tokens = (ctx.tokenIds?.length ?? Math.ceil(ctx.routingText.length / 4)) + (ctx.maxOutputTokens ?? 0);
    this.decodeOf.set(ctx.requestId, { workerId: d.id, tokens });
    this.decodeTokens.set(d.id, (this.decodeTokens.get(d.id) ?? 0) + tokens);
    return { prefill: p, decode: d };
  }

  private pickDecode(dec: readonly Worker[], ctx: RequestContext): { k: number; tpot: number[] } {
    const bs = this.config.defaultBlockSize;
    const input = ctx.tokenIds?.length ?? Math.ceil(ctx.routingText.length / 4);
    const now = this.deps.clock.now();
    const tpot = dec.map((w) => this.predictor.predict(w.id, now, input, 0, this.loadOf(w, bs), ctx.maxOutputTokens ?? 0).tpotMs);
    // Every decode worker gets the same added work, so the lowest predicted TPOT is also the
    // choice that meets a TPOT objective whenever any worker does.
    let k = 0;
    for (let j = 1; j < dec.length; j++) if (tpot[j] < tpot[k]) k = j;
    return { k, tpot };
  }

  override explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
    const described = describeAll(candidates, this.deps.clock.now());
    const healthy = available(candidates);
    if (healthy.length === 0) return noneAvailable(this.name, described);
    const sc = this.score(healthy, ctx, true);
    const drawn: number[][] = [];
    this.drawn = drawn;
    let e: Scored;
    try {
      e = this.evaluate(healthy, sc, ctx, false);
    } finally {
      this.drawn = undefined;
    }
    // The decision draws at random among equally good workers (see pick): no one chosen worker.
    const random = drawn.some((g) => g.includes(e.i));
    const byId = new Map(described.map((c) => [c.worker, c]));
    const now = this.deps.clock.now();
    for (let k = 0; k < healthy.length; k++) {
      const c = byId.get(healthy[k].id)!;
      const p = e.preds[k];
      const st = this.predictor.stats(healthy[k].id, now);
      c.matchedBlocks = sc.meta[k].overlap;
      c.cost = round(p.ttftMs);
      c.terms = {
        source: sc.meta[k].fallback ? 'history' : 'events',
        uncached_tokens: e.uncached[k],
        predicted_ttft_ms: round(p.ttftMs),
        predicted_tpot_ms: round(p.tpotMs),
        backlog_work_ms: round(p.backlogWorkMs),
        own_work_ms: round(p.ownWorkMs),
        meets_objective: e.feasible[k],
        slowness: round(st.slowness),
        history_credit: round(st.historyCredit),
        observations: st.observations,
      };
    }
    const obj = [e.ttftObjective !== undefined ? `TTFT ≤ ${e.ttftObjective} ms` : '', e.tpotObjective !== undefined ? `TPOT ≤ ${e.tpotObjective} ms` : ''].filter(Boolean).join(', ');
    const chosen = healthy[e.i];
    const p = e.preds[e.i];
    const detail =
      e.rule === 'slo_hold'
        ? `objective ${obj}: the worker whose engine holds most of the request (${e.uncached[e.i]} uncached tokens there) is predicted at ${round(p.ttftMs, 1)} ms, within ${this.sloConfig.holdFraction} × the objective: kept there`
        : e.rule === 'slo_headroom'
        ? `objective ${obj}: ${e.feasible.filter(Boolean).length} of ${healthy.length} workers predicted to meet it (≤ ${this.sloConfig.sloSafety} × objective); the one adding the least prefill (${e.uncached[e.i]} uncached tokens), predicted TTFT ${round(p.ttftMs, 1)} ms`
        : e.rule === 'slo_detour_not_worth'
          ? `objective ${obj}: the worker holding most of the request is predicted to miss it (${round(p.ttftMs, 1)} ms), but no worker predicted to meet it saves this request as much time as ${this.sloConfig.detourCostFactor} × the extra prefill it would add there: kept on the former`
        : e.rule === 'slo_unreachable'
          ? `objective ${obj}: no worker predicted to meet it; lowest predicted TTFT (or the worker holding most of the request, when leaving it does not pay) ${round(p.ttftMs, 1)} ms`
          : e.rule === 'lowest_ttft'
            ? `no objective: lowest predicted TTFT ${round(p.ttftMs, 1)} ms`
            : `no objective: most cached among workers within the margin of the lowest predicted TTFT; predicted ${round(p.ttftMs, 1)} ms`;
    const input = { tokens: sc.inputTokens, blocks: sc.requestBlocks, blockSize: sc.bs, chars: ctx.routingText.length };
    return { policy: this.name, chosen: random ? undefined : chosen.id, rule: e.rule, detail: random ? `${detail} (a tie: one of the equally good workers with the emptiest cache is drawn at random)` : detail, deterministic: !random, input, candidates: described };
  }
}
