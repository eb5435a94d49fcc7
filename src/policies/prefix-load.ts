import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { TokenTree } from '../cache/token-tree.js';
import { DEFAULT_COST_MODEL, prefillPairs, validateCostModel, type CostModelConfig } from '../engine/cost-model.js';
import { describeAll, noneAvailable, round, type RouteExplanation } from './explain.js';
import { available, BasePolicy, type PeerRoutingEvent, type PolicyDeps } from './policy.js';

/**
 * `prefix_load`: Preble's E2 (exploitation + exploration) request scheduler, as AIBrix ports it
 * (`prefix-cache-preble`), priced with kvgate's engine cost model.
 *
 * State, per model: a {@link TokenTree} of routing history (every request's tokens inserted
 * under the worker it was sent to, counted in a sliding window of `windowSecs`, Preble's H), and
 * per worker a ledger of the estimated GPU time of the requests sent to it in the window.
 *
 * ## Cost formulas (all in ms of modelled GPU time; c = cost model coefficients)
 *
 *   prefill(u, m) = c.slowFactor · ( c.prefillTokenMs · u + c.prefillAttentionMs · (u·m + u(u+1)/2) )
 *       u new tokens computed on top of m cached ones (the cost model's causal pair count).
 *   decode(n, D)  = c.slowFactor · ( c.decodeSeqMs · D + c.decodeContextTokenMs · (D·n + D(D+1)/2) )
 *       the marginal cost of one sequence decoding D tokens after an n-token prompt: each of
 *       the D steps adds one sequence reading n + k context tokens. The per-step overhead
 *       (c.overheadMs) is shared by the whole batch and is not charged to a request.
 *
 *   L(w) = Σ over requests r routed to w in the last windowSecs of prefill(n_r − m_r,w, m_r,w) + decode(n_r, D_r)
 *       m_r,w: the prefix of r that w held (by this tree) when r was routed; D_r: the output
 *       length from `outputTokens(ctx)` when given, else `avgOutputTokens` (AIBrix: 45).
 *       This is Preble's historical load L ("prefill time of missed tokens + decode time"): a
 *       request's missed suffix is exactly the tree nodes it added on w, and causal pairs add up
 *       over consecutive chunks, so summing per request equals Preble's sum over nodes.
 *   P(w, r) = prefill(n − m_w, m_w)   this request's uncached prefill on w (m_w: w's match).
 *   Preble's eviction term M is not modelled (it needs each engine's cache capacity and content;
 *   the router only sees history) — M = 0.
 *
 * ## Decision, over the available candidates
 *  1. m* = longest match of the request's tokens held by an available worker; matchRatio = m* ÷ n.
 *  2. Exploit if matchRatio > matchThreshold (0.5, AIBrix's rule; Preble: cached > uncached):
 *     among the available workers holding m* tokens, the lowest L; ties by in-flight, then order.
 *  3. Explore otherwise: the lowest L(w) + P(w, r); ties by in-flight, then candidate order.
 *  4. Rebalance: when the window holds at least `rebalanceMinRequests` × (available workers)
 *     requests and max L > rebalanceRatio × min L over the available workers, the request goes to
 *     the lightest worker (lowest L; ties by in-flight, then order) instead.
 *     - Preble rebalances after assignment: while its heaviest GPU's load exceeds 1.5× the
 *       lightest's (and total load ≥ 50 × #GPUs), it moves subtrees from heavy to light, i.e.
 *       their next requests go to the light GPU.
 *     - AIBrix's port has no rebalancing; it only applies `prefix-cache`'s in-flight imbalance
 *       fast path (max − min running > 8 → restrict to the least running pods).
 *     - kvgate redirects the request at hand to the lightest worker, which has the same effect
 *       request by request (the light worker's L grows until the ratio drops under the
 *       threshold) and records the prefix there; the gate keeps the cold start (where min L is
 *       ~0) from turning every request into a rebalance.
 *  5. The request is recorded: its tokens go into the tree under the chosen worker and its
 *     prefill(n − m, m) + decode(n, D) into the chosen worker's ledger.
 *
 * Inputs: `ctx.tokenIds` (the policy sets `needsTokens`). When they are missing, the Unicode code
 * points of `ctx.routingText` are used as tokens, in a separate tree per model (never mixed
 * with token ids); costs are then per code point, roughly 4× a token count.
 *
 * Time is `deps.clock`. History leaves the window lazily: every `expireIntervalMs` (AIBrix's
 * eviction loop period, 1 s) a routing call expires the trees and ledgers; with `deps.schedule`
 * the same pass also runs on that timer so idle memory is released. Observer: exploit →
 * cacheHit(worker, m*, n), explore → cacheMiss(n), rebalance → loadBalanced(worker) (token
 * counts where the observer says chars). In PD mode each pool is routed independently
 * (BasePolicy.selectPair).
 */

/** prefix_load configuration; see the module comment for how each knob is used. */
export interface PrefixLoadConfig {
  /** History window H (Preble and AIBrix: 3 minutes). */
  windowSecs: number;
  /** Exploit when matched/prompt tokens is strictly above this. */
  matchThreshold: number;
  /** Rebalance when the heaviest worker's L exceeds this multiple of the lightest's. */
  rebalanceRatio: number;
  /** Rebalancing needs at least this many requests per available worker in the window (Preble: 50; 0 = always). */
  rebalanceMinRequests: number;
  /** Output length assumed when `outputTokens` gives none (AIBrix's ..._DECODING_LENGTH = 45). */
  avgOutputTokens: number;
  /** Engine cost model coefficients (kvgate sim's defaults). */
  cost: CostModelConfig;
  /** History counter granularity (ms). */
  bucketMs: number;
  /** Cap on tokens per model tree (LRU leaves dropped beyond it; 0 = window bound only). */
  maxTreeTokens: number;
  /** How often history is expired (ms). */
  expireIntervalMs: number;
  /** The request's expected output tokens, when the host knows them (e.g. max_tokens). */
  outputTokens?: (ctx: RequestContext) => number | undefined;
}

export type PrefixLoadOptions = Partial<Omit<PrefixLoadConfig, 'cost'>> & { cost?: Partial<CostModelConfig> };

export const defaultPrefixLoadConfig: Readonly<PrefixLoadConfig> = Object.freeze({
  windowSecs: 180,
  matchThreshold: 0.5,
  rebalanceRatio: 1.5,
  rebalanceMinRequests: 50,
  avgOutputTokens: 45,
  cost: DEFAULT_COST_MODEL,
  bucketMs: 1000,
  maxTreeTokens: 8_388_608,
  expireIntervalMs: 1000,
});

/** prefill(u, m) above: u uncached tokens computed after m cached ones. */
export function prefillCostMs(c: CostModelConfig, uncached: number, cached: number): number {
  if (uncached <= 0) return 0;
  return c.slowFactor * (c.prefillTokenMs * uncached + c.prefillAttentionMs * prefillPairs(cached, uncached));
}

/** decode(n, D) above: one sequence decoding D tokens after an n-token prompt. */
export function decodeCostMs(c: CostModelConfig, promptTokens: number, outputTokens: number): number {
  const d = outputTokens;
  if (d <= 0) return 0;
  return c.slowFactor * (c.decodeSeqMs * d + c.decodeContextTokenMs * (d * promptTokens + (d * (d + 1)) / 2));
}

/** Two costs closer than this (ms) are equal: ledgers are running sums with rounding drift. */
const EPS_MS = 1e-6;

export type PrefixLoadDecisionKind = 'exploit' | 'explore' | 'rebalance';

export interface PrefixLoadDecision {
  kind: PrefixLoadDecisionKind;
  workerId: string;
  inputTokens: number;
  /** Longest match held by an available worker. */
  matchedTokens: number;
  /** The chosen worker's own match. */
  workerMatchedTokens: number;
  /** Cost charged to the chosen worker's ledger (ms). */
  chargedMs: number;
}

/** Per-worker window of (time, estimated ms) entries with a running sum. */
class Ledger {
  private times: number[] = [];
  private costs: number[] = [];
  private head = 0;
  private total = 0;

  add(t: number, cost: number): void {
    this.times.push(t);
    this.costs.push(cost);
    this.total += cost;
  }

  /** Drops entries at or before `cutoff`. */
  prune(cutoff: number): void {
    const times = this.times;
    let h = this.head;
    while (h < times.length && times[h] <= cutoff) {
      this.total -= this.costs[h];
      h++;
    }
    if (h === times.length) {
      this.times = [];
      this.costs = [];
      this.head = 0;
      this.total = 0;
      return;
    }
    if (h > 1024 && h * 2 > times.length) {
      this.times = times.slice(h);
      this.costs = this.costs.slice(h);
      h = 0;
    }
    this.head = h;
    if (this.total < 0) this.total = 0;
  }

  get sum(): number {
    return this.total;
  }

  /** Sum and count of the entries after `cutoff`, without pruning (read-only). */
  since(cutoff: number): { sum: number; count: number } {
    let sum = 0;
    let count = 0;
    for (let i = this.times.length - 1; i >= this.head && this.times[i] > cutoff; i--) {
      sum += this.costs[i];
      count++;
    }
    return { sum, count };
  }

  get count(): number {
    return this.times.length - this.head;
  }
}

export class PrefixLoadPolicy extends BasePolicy {
  readonly name = 'prefix_load';
  readonly needsTokens = true;
  readonly config: PrefixLoadConfig;
  /** The last routing decision (diagnostics, tests). */
  lastDecision: PrefixLoadDecision | undefined;
  private readonly trees = new Map<string, TokenTree>();
  private readonly ledgers = new Map<string, Ledger>();
  private readonly windowMs: number;
  private lastExpireMs = -Infinity;
  private readonly cancelTimer: (() => void) | undefined;

  constructor(deps: PolicyDeps, options: PrefixLoadOptions = {}) {
    super(deps);
    const cost: CostModelConfig = { ...DEFAULT_COST_MODEL, ...options.cost };
    validateCostModel(cost);
    const config: PrefixLoadConfig = { ...defaultPrefixLoadConfig, ...stripUndefined(options), cost };
    const positive = (k: keyof PrefixLoadConfig, v: number, allowZero: boolean) => {
      if (typeof v !== 'number' || Number.isNaN(v) || v < 0 || (!allowZero && v === 0)) {
        throw new RangeError(`prefix_load: ${k} must be a number ${allowZero ? '>=' : '>'} 0 (got ${String(v)})`);
      }
    };
    positive('windowSecs', config.windowSecs, false);
    if (!Number.isFinite(config.windowSecs)) throw new RangeError('prefix_load: windowSecs must be finite');
    positive('matchThreshold', config.matchThreshold, true);
    positive('rebalanceRatio', config.rebalanceRatio, false);
    positive('rebalanceMinRequests', config.rebalanceMinRequests, true);
    positive('avgOutputTokens', config.avgOutputTokens, true);
    positive('bucketMs', config.bucketMs, false);
    positive('maxTreeTokens', config.maxTreeTokens, true);
    positive('expireIntervalMs', config.expireIntervalMs, true);
    this.config = config;
    this.windowMs = config.windowSecs * 1000;
    if (deps.schedule && config.expireIntervalMs > 0) {
      this.cancelTimer = deps.schedule(config.expireIntervalMs, () => this.expire());
    }
  }

  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined {
    const healthy = available(candidates);
    if (healthy.length === 0) return undefined;
    const now = this.deps.clock.now();
    if (now - this.lastExpireMs >= this.config.expireIntervalMs) this.expire(now);
    const d = this.decide(healthy, ctx, now, false);
    const { kind, chosen, match, best, n, tokens, byTokens, tree } = d;
    const worker = healthy[chosen];
    const m = match[chosen];
    const charged = this.chargeOf(ctx, n, m);
    let ledger = this.ledgers.get(worker.id);
    if (!ledger) {
      ledger = new Ledger();
      this.ledgers.set(worker.id, ledger);
    }
    ledger.add(now, charged);
    if (n > 0) tree.insert(tokens, worker.id, now);
    this.deps.share?.routed({ model: ctx.model, workerId: worker.id, tokens: byTokens && n > 0 ? tokens : undefined, text: byTokens ? undefined : ctx.routingText, costMs: charged });

    const observer = this.deps.observer;
    if (kind === 'rebalance') observer?.loadBalanced?.(worker);
    else if (kind === 'exploit') observer?.cacheHit?.(worker, best, n);
    else observer?.cacheMiss?.(n);
    if (best > m && observer?.avoidablePrefill) {
      // Routing history held `best` tokens on another available worker; code points count as ~¼ token.
      if (byTokens) observer.avoidablePrefill(worker, ctx, { tokens: best - m });
      else observer.avoidablePrefill(worker, ctx, { chars: best - m, inputChars: n });
    }
    this.lastDecision = { kind, workerId: worker.id, inputTokens: n, matchedTokens: best, workerMatchedTokens: m, chargedMs: charged };
    return worker;
  }

  private chargeOf(ctx: RequestContext, n: number, m: number): number {
    const cfg = this.config;
    const out = cfg.outputTokens?.(ctx);
    const d = out !== undefined && Number.isFinite(out) && out >= 0 ? out : cfg.avgOutputTokens;
    return prefillCostMs(cfg.cost, n - m, m) + decodeCostMs(cfg.cost, n, d);
  }

  /** The decision (see the class comment). `readOnly`: ledgers are summed without pruning, no tree is created. */
  private decide(healthy: readonly Worker[], ctx: RequestContext, now: number, readOnly: boolean) {
    const cfg = this.config;
    const cost = cfg.cost;
    const byTokens = ctx.tokenIds !== undefined;
    const tokens: ArrayLike<number> = ctx.tokenIds ?? codePoints(ctx.routingText);
    const n = tokens.length;
    const key = byTokens ? ctx.model : `${ctx.model}\u0000chars`;
    const tree = readOnly ? (this.trees.get(key) ?? this.emptyTree()) : this.treeFor(key);
    const { holders } = tree.match(tokens, now);

    // Per available worker: its match and its window load L.
    const k = healthy.length;
    const match = new Array<number>(k);
    const load = new Array<number>(k);
    let best = 0;
    let windowRequests = 0;
    for (let i = 0; i < k; i++) {
      const w = healthy[i];
      const m = holders.get(w.id) ?? 0;
      match[i] = m;
      if (m > best) best = m;
      const ledger = this.ledgers.get(w.id);
      if (!ledger) load[i] = 0;
      else if (readOnly) {
        const since = ledger.since(now - this.windowMs);
        load[i] = since.sum;
        windowRequests += since.count;
      } else {
        ledger.prune(now - this.windowMs);
        load[i] = ledger.sum;
        windowRequests += ledger.count;
      }
    }

    // Lowest score; ties (within EPS_MS) by in-flight, then candidate order.
    const argmin = (score: (i: number) => number, eligible: (i: number) => boolean = () => true): number => {
      let bi = -1;
      let bs = Infinity;
      for (let i = 0; i < k; i++) {
        if (!eligible(i)) continue;
        const s = score(i);
        if (bi < 0 || s < bs - EPS_MS || (s <= bs + EPS_MS && healthy[i].load < healthy[bi].load)) {
          bi = i;
          bs = s;
        }
      }
      return bi;
    };

    let kind: PrefixLoadDecisionKind;
    let chosen: number;
    if (n > 0 && best / n > cfg.matchThreshold) {
      kind = 'exploit';
      chosen = argmin((i) => load[i], (i) => match[i] === best);
    } else {
      kind = 'explore';
      chosen = argmin((i) => load[i] + prefillCostMs(cost, n - match[i], match[i]));
    }

    let maxLoad = -Infinity;
    for (let i = 0; i < k; i++) if (load[i] > maxLoad) maxLoad = load[i];
    if (k > 1 && windowRequests >= cfg.rebalanceMinRequests * k) {
      const lightest = argmin((i) => load[i]);
      if (maxLoad > cfg.rebalanceRatio * load[lightest] + EPS_MS && chosen !== lightest) {
        kind = 'rebalance';
        chosen = lightest;
      }
    }
    return { kind, chosen, match, load, best, n, tokens, byTokens, tree, windowRequests };
  }

  /** Per candidate: matched tokens, window load L, this request's prefill cost P; the E2 rule that decides. */
  explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
    const described = describeAll(candidates, this.deps.clock.now());
    const healthy = available(candidates);
    if (healthy.length === 0) return noneAvailable(this.name, described);
    const now = this.deps.clock.now();
    const d = this.decide(healthy, ctx, now, true);
    const cfg = this.config;
    const byId = new Map(described.map((c) => [c.worker, c]));
    for (let i = 0; i < healthy.length; i++) {
      const c = byId.get(healthy[i].id)!;
      const p = prefillCostMs(cfg.cost, d.n - d.match[i], d.match[i]);
      if (d.byTokens) c.matchedTokens = d.match[i];
      else c.matchedChars = d.match[i];
      c.cost = round(d.load[i] + p);
      c.terms = { window_load_ms: round(d.load[i]), prefill_ms: round(p), charge_ms: round(this.chargeOf(ctx, d.n, d.match[i])) };
    }
    const unit = d.byTokens ? 'tokens' : 'code points';
    const detail =
      d.kind === 'exploit'
        ? `exploit: longest match ${d.best}/${d.n} ${unit} > ${cfg.matchThreshold}; lowest window load among its holders`
        : d.kind === 'explore'
          ? `explore: longest match ${d.best}/${d.n} ${unit} not above ${cfg.matchThreshold}; lowest window load + prefill cost`
          : `rebalance: heaviest window load above ${cfg.rebalanceRatio} × the lightest's (${d.windowRequests} requests in the window)`;
    const input = d.byTokens ? { tokens: d.n } : { chars: d.n };
    return { policy: this.name, chosen: healthy[d.chosen].id, rule: d.kind, detail, deterministic: true, input, candidates: described };
  }

  private emptyTree(): TokenTree {
    return new TokenTree({ windowMs: this.windowMs, bucketMs: Math.min(this.config.bucketMs, this.windowMs), maxTokens: 0 });
  }

  /** A peer replica routed a request: its window history and its charged cost count here too. */
  applyPeer(_origin: string, event: PeerRoutingEvent): void {
    if (event.kind !== 'routed') return;
    const { rec } = event;
    const now = this.deps.clock.now();
    if (rec.costMs !== undefined && rec.costMs > 0) {
      let ledger = this.ledgers.get(rec.workerId);
      if (!ledger) this.ledgers.set(rec.workerId, (ledger = new Ledger()));
      ledger.add(now, rec.costMs);
    }
    if (rec.tokens !== undefined && rec.tokens.length > 0) this.treeFor(rec.model).insert(rec.tokens, rec.workerId, now);
    else if (rec.text) this.treeFor(`${rec.model}\u0000chars`).insert(codePoints(rec.text), rec.workerId, now);
  }

  /** L(w): the estimated GPU ms of the requests routed to `workerId` in the window ending now. */
  workerLoadMs(workerId: string): number {
    const ledger = this.ledgers.get(workerId);
    if (!ledger) return 0;
    ledger.prune(this.deps.clock.now() - this.windowMs);
    return ledger.sum;
  }

  /** Drops history that left the window (trees, ledgers) and empty trees. */
  expire(nowMs: number = this.deps.clock.now()): void {
    this.lastExpireMs = nowMs;
    for (const [key, tree] of this.trees) {
      tree.expire(nowMs);
      if (tree.size === 0) this.trees.delete(key);
    }
    const cutoff = nowMs - this.windowMs;
    for (const [id, ledger] of this.ledgers) {
      ledger.prune(cutoff);
      if (ledger.count === 0) this.ledgers.delete(id);
    }
  }

  onWorkerRemoved(worker: Worker): void {
    for (const [key, tree] of this.trees) {
      tree.removeWorker(worker.id);
      if (tree.size === 0) this.trees.delete(key);
    }
    this.ledgers.delete(worker.id);
  }

  /** Tree sizes per model key (diagnostics). */
  treeStats(): Map<string, ReturnType<TokenTree['stats']>> {
    const out = new Map<string, ReturnType<TokenTree['stats']>>();
    for (const [key, tree] of this.trees) out.set(key, tree.stats());
    return out;
  }

  close(): void {
    this.cancelTimer?.();
  }

  private treeFor(key: string): TokenTree {
    let tree = this.trees.get(key);
    if (!tree) {
      tree = new TokenTree({ windowMs: this.windowMs, bucketMs: Math.min(this.config.bucketMs, this.windowMs), maxTokens: this.config.maxTreeTokens });
      this.trees.set(key, tree);
    }
    return tree;
  }
}

function codePoints(s: string): Uint32Array {
  const out = new Uint32Array(s.length);
  let n = 0;
  for (const ch of s) out[n++] = ch.codePointAt(0)!;
  return out.subarray(0, n);
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  const out: Partial<T> = {};
  for (const [k, v] of Object.entries(o)) if (v !== undefined && k !== 'cost') (out as Record<string, unknown>)[k] = v;
  return out;
}
