import { hashBlocks } from '../cache/block-index.js';
import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { describeAll, noneAvailable, round, type RouteExplanation } from '../policies/explain.js';
import { createPolicy, type PolicyOptions } from '../policies/factory.js';
import { defaultKvAwareConfig, KvAwarePolicy, type KvIndexView } from '../policies/kv-aware.js';
import { hasFreshEngineLoad } from '../policies/least-kv-cache.js';
import { available, BasePolicy, type PolicyDeps, type RoutingPolicy } from '../policies/policy.js';

/**
 * Lab-only baselines: what users would run instead of kvgate, reproduced from the anchors'
 * public docs and source (our own code; see docs/lab.md "Peer baselines" for each one's source
 * and the limits of the reproduction). They are not `kvgate serve` policies.
 */
export const PEER_POLICY_NAMES = ['peer_dynamo', 'peer_llmd', 'peer_aibrix'] as const;

export function isPeerPolicy(name: string): boolean {
  return (PEER_POLICY_NAMES as readonly string[]).includes(name);
}

/** Policies the lab runs: kvgate's own (createPolicy) and the peer baselines. */
export function createLabPolicy(name: string, deps: PolicyDeps, options: PolicyOptions): RoutingPolicy {
  const view = options.kvIndex;
  switch (name) {
    case 'peer_dynamo':
      if (!view) throw new Error('peer_dynamo needs the KV-event index');
      return new DynamoKvPolicy(deps, view);
    case 'peer_llmd':
      if (!view) throw new Error('peer_llmd needs the KV-event index');
      return new LlmdDefaultPolicy(deps, view, options.engineLoad?.staleAfterMs ?? 5000);
    case 'peer_aibrix':
      if (!view) throw new Error('peer_aibrix needs the KV-event index');
      return new AibrixPrefixPolicy(deps, view);
    default:
      return createPolicy(name, deps, options);
  }
}

/**
 * NVIDIA Dynamo's KV router with its defaults: cost = overlap_score_weight (1) × potential
 * prefill blocks (this request's uncached blocks + the prefill its in-flight requests still
 * have) + potential decode blocks (blocks of in-flight requests + this request's), lowest cost
 * wins (router temperature 0). Overlap from the engines' KV events only (no routing-history
 * affinity). It is kv_aware's machinery with Dynamo's weights.
 */
export class DynamoKvPolicy extends KvAwarePolicy {
  override readonly name: string = 'peer_dynamo';
  constructor(deps: PolicyDeps, view: KvIndexView) {
    super(deps, view, { ...defaultKvAwareConfig, overlapWeight: 1, activeWeight: 1, historyWeight: 0, temperature: 0, evictionIntervalSecs: 0 });
  }
}

/** Matched leading blocks of the request per worker, from the KV-event index, and the request's block count. */
function prefixMatch(view: KvIndexView, ctx: RequestContext, fallbackBlockSize = 16): { matched: Map<string, number>; blocks: number } {
  const bs = view.index.blockSize ?? fallbackBlockSize;
  const tokens = ctx.tokenIds;
  if (!tokens || tokens.length === 0) return { matched: new Map(), blocks: 0 };
  const local = hashBlocks(tokens, bs);
  return { matched: view.index.match(local, { touch: false }), blocks: Math.ceil(tokens.length / bs) };
}

/**
 * llm-d's default scheduling profile (the "intelligent inference scheduling" well-lit path and
 * the inference-scheduler's default config): score = 3 × prefix-cache-scorer + 2 × queue-scorer
 * + 2 × kv-cache-utilization-scorer, highest score wins (max-score-picker; ties at random).
 * - prefix: fraction of the request's blocks cached on the pod (here from KV events, as the
 *   precise-prefix-cache-scorer; the default approximate scorer learns it from its own routing);
 * - queue: min-max normalised waiting queue from the pods' metrics (shortest 1, longest 0, all equal 1);
 * - kv utilisation: 1 − KV-cache usage from the pods' metrics.
 * Metrics come from the scraper (in the lab: sampled every second, seen 50 ms later).
 */
export class LlmdDefaultPolicy extends BasePolicy {
  readonly name = 'peer_llmd';
  readonly needsTokens = true;
  constructor(
    deps: PolicyDeps,
    private readonly view: KvIndexView,
    private readonly staleAfterMs: number,
  ) {
    super(deps);
  }

  private scores(healthy: readonly Worker[], ctx: RequestContext) {
    const now = this.deps.clock.now();
    const { matched, blocks } = prefixMatch(this.view, ctx);
    const queue = healthy.map((w) => (hasFreshEngineLoad(w, now, this.staleAfterMs) ? w.engineLoad!.waiting : 0));
    const kv = healthy.map((w) => (hasFreshEngineLoad(w, now, this.staleAfterMs) ? w.engineLoad!.kvUsage : 0));
    const qmin = Math.min(...queue);
    const qmax = Math.max(...queue);
    return healthy.map((w, k) => {
      const prefix = blocks > 0 ? (matched.get(w.id) ?? 0) / blocks : 0;
      const q = qmax === qmin ? 1 : (qmax - queue[k]) / (qmax - qmin);
      const u = 1 - kv[k];
      return { prefix, q, u, score: 3 * prefix + 2 * q + 2 * u };
    });
  }

  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined {
    const healthy = available(candidates);
    if (healthy.length === 0) return undefined;
    const s = this.scores(healthy, ctx);
    const best = Math.max(...s.map((x) => x.score));
    const ties = healthy.filter((_, k) => s[k].score >= best - 1e-12);
    return ties.length === 1 ? ties[0] : ties[this.deps.rng.int(ties.length)];
  }

  explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
    const described = describeAll(candidates, this.deps.clock.now());
    const healthy = available(candidates);
    if (healthy.length === 0) return noneAvailable(this.name, described);
    const s = this.scores(healthy, ctx);
    const byId = new Map(described.map((c) => [c.worker, c]));
    for (let k = 0; k < healthy.length; k++) byId.get(healthy[k].id)!.terms = { prefix: round(s[k].prefix), queue: round(s[k].q), kv_free: round(s[k].u), score: round(s[k].score) };
    const best = Math.max(...s.map((x) => x.score));
    const ties = healthy.filter((_, k) => s[k].score >= best - 1e-12);
    return { policy: this.name, chosen: ties.length === 1 ? ties[0].id : undefined, rule: 'max_score', detail: 'score = 3 × prefix + 2 × queue + 2 × (1 − kv usage)', deterministic: ties.length === 1, candidates: described };
  }
}

/**
 * AIBrix's prefix-cache routing (gateway plugin `prefix-cache`, the defaults of its code,
 * `pkg/plugins/gateway/algorithms/prefix_cache.go`):
 * - load gate: when the busiest pod runs more than `imbalanceFactor` × (mean + 1) requests and
 *   at least `imbalanceMinGap` more than the least busy, only the least busy pods are candidates;
 * - the candidates holding a prefix of the request, shuffled, then by decreasing match
 *   percentage (a whole percent, as AIBrix computes it) then fewest running requests: the first
 *   whose running requests are at most mean + `stdFactor` standard deviations (over all pods);
 * - no such pod: the fewest running (ties at random).
 * Running requests are the router's own in-flight counts; the match comes from the KV-event
 * index (AIBrix keeps its own table of routed prefixes). AIBrix's README gives other values
 * (an absolute gap of 16 that sends to the least busy pod, 2 standard deviations); the code's
 * defaults are what a deployment runs (docs/lab.md).
 */
export class AibrixPrefixPolicy extends BasePolicy {
  readonly name = 'peer_aibrix';
  readonly needsTokens = true;
  /** AIBRIX_PREFIX_CACHE_LOAD_IMBALANCE_FACTOR, _LOAD_IMBALANCE_MIN_GAP, _STANDARD_DEVIATION_FACTOR (code defaults). */
  readonly imbalanceFactor = 2;
  readonly imbalanceMinGap = 8;
  readonly stdFactor = 1;
  constructor(
    deps: PolicyDeps,
    private readonly view: KvIndexView,
  ) {
    super(deps);
  }

  /**
   * `draw`: break ties with the RNG (decisions); explanations do not draw, and `tied` says
   * whether the decision would have been a draw.
   */
  private decide(healthy: readonly Worker[], ctx: RequestContext, draw = true): { worker: Worker; rule: string; tied: boolean } {
    const loads = healthy.map((w) => w.load);
    const { matched, blocks } = prefixMatch(this.view, ctx);
    const mean = loads.reduce((a, b) => a + b, 0) / loads.length;
    const std = Math.sqrt(loads.reduce((a, b) => a + (b - mean) ** 2, 0) / loads.length);
    const min = Math.min(...loads);
    const max = Math.max(...loads);
    // Ties at random: AIBrix picks among the least-loaded pods in Go map order, which is random.
    const least = (): { worker: Worker; tied: boolean } => {
      const ties = healthy.filter((_, k) => loads[k] === min);
      return { worker: ties.length === 1 || !draw ? ties[0] : ties[this.deps.rng.int(ties.length)], tied: ties.length > 1 };
    };
    // Load gate: matching only among the least busy pods.
    const gated = max > this.imbalanceFactor * (mean + 1) && max - min >= this.imbalanceMinGap;
    // AIBrix's match percent is an integer ((i + 1) · 100 / blocks in Go's int arithmetic), and
    // it shuffles the matched pods before a stable sort by percent (descending) and running
    // requests (ascending): pods equal on both are taken in random order, not by position.
    const matches = healthy
      .map((w, k) => ({ w, k, pct: blocks > 0 ? Math.floor(((matched.get(w.id) ?? 0) * 100) / blocks) : 0 }))
      .filter((x) => x.pct > 0 && (!gated || loads[x.k] === min) && loads[x.k] <= mean + this.stdFactor * std);
    if (matches.length > 0) {
      if (draw) shuffle(matches, this.deps.rng);
      matches.sort((a, b) => b.pct - a.pct || loads[a.k] - loads[b.k]);
      const first = matches[0];
      const tied = matches.filter((m) => m.pct === first.pct && loads[m.k] === loads[first.k]).length > 1;
      return { worker: first.w, rule: gated ? 'imbalance_prefix_match' : 'prefix_match', tied };
    }
    return { ...least(), rule: gated ? 'imbalance' : 'least_request' };
  }

  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined {
    const healthy = available(candidates);
    if (healthy.length === 0) return undefined;
    return this.decide(healthy, ctx).worker;
  }

  explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
    const described = describeAll(candidates, this.deps.clock.now());
    const healthy = available(candidates);
    if (healthy.length === 0) return noneAvailable(this.name, described);
    const d = this.decide(healthy, ctx, false);
    return { policy: this.name, chosen: d.tied ? undefined : d.worker.id, rule: d.rule, detail: 'AIBrix prefix-cache: load gate (max > 2 × (mean + 1) and max − min ≥ 8) → least running pods only; best integer prefix-match percent under mean + 1σ running, ties at random; else least running', deterministic: !d.tied, candidates: described };
  }
}

/** Fisher–Yates shuffle in place with the injected RNG. */
function shuffle<T>(a: T[], rng: { int(n: number): number }): void {
  for (let i = a.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    const t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
}
