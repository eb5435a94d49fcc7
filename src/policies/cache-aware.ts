import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { CharTree } from '../cache/char-tree.js';
import { TreesByModel } from '../cache/trees-by-model.js';
import { describeAll, noneAvailable, round, type RouteExplanation } from './explain.js';
import { available, BasePolicy, leastLoaded, type PeerRoutingEvent, type PolicyDeps, type RoutedRecord, type TextTreeStats } from './policy.js';

export interface CacheAwareConfig {
  /** Minimum matched/total character ratio for prefix affinity (strictly greater). */
  cacheThreshold: number;
  /** Imbalance needs max−min in-flight above this... */
  balanceAbsThreshold: number;
  /** ...and max above this multiple of min. */
  balanceRelThreshold: number;
  /** Seconds between eviction passes (0 disables the timer). */
  evictionIntervalSecs: number;
  /** Characters kept per worker (tenant) in the tree. */
  maxTreeSize: number;
}

export const defaultCacheAwareConfig: CacheAwareConfig = {
  cacheThreshold: 0.3,
  balanceAbsThreshold: 64,
  balanceRelThreshold: 1.5,
  evictionIntervalSecs: 120,
  maxTreeSize: 67_108_864,
};

/**
 * Approximate prefix-cache routing: a character radix tree per model, fed with the routing
 * text of every request under the worker it was sent to. Each worker is a tenant.
 *
 * Decision, over the available candidates:
 *  1. imbalanced (max−min > abs AND max > rel×min in-flight) → least loaded;
 *  2. else matched/total > threshold → the worker holding the match (the least loaded one when
 *     several hold all of it);
 *  3. else least loaded.
 * The text is then inserted under the chosen worker.
 */
export class CacheAwarePolicy extends BasePolicy {
  readonly name = 'cache_aware';
  private readonly trees: TreesByModel;

  constructor(
    deps: PolicyDeps,
    readonly config: CacheAwareConfig = defaultCacheAwareConfig,
  ) {
    super(deps);
    this.trees = new TreesByModel(config.maxTreeSize, config.evictionIntervalSecs, deps.schedule);
  }

  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined {
    const healthy = available(candidates);
    if (healthy.length === 0) return undefined;
    const tree = this.trees.tree(ctx.model);
    const observer = this.deps.observer;
    const d = this.decide(healthy, tree, ctx.routingText, true);
    const chosen = d.chosen;
    if (d.rule === 'imbalance') observer?.loadBalanced?.(chosen);
    else if (d.rule === 'prefix_match') observer?.cacheHit?.(chosen, d.matchedChars, d.inputChars);
    else observer?.cacheMiss?.(d.inputChars);
    // Avoidable prefill: the longest match was held by another available worker than the one chosen.
    if (observer?.avoidablePrefill && d.holder !== undefined && d.holder !== chosen && d.matchedChars > 0) {
      const own = tree.prefixMatchTenant(ctx.routingText, chosen.id, false);
      if (d.matchedChars > own) observer.avoidablePrefill(chosen, ctx, { chars: d.matchedChars - own, inputChars: d.inputChars });
    }
    tree.insert(ctx.routingText, chosen.id);
    this.deps.share?.routed({ model: ctx.model, workerId: chosen.id, text: ctx.routingText });
    return chosen;
  }

  /**
   * The decision over available workers (see the class comment). `touch` false: read-only (the
   * tree's LRU stamps and remembered holders stay as they are).
   */
  private decide(healthy: readonly Worker[], tree: CharTree, text: string, touch: boolean) {
    let min = Infinity;
    let max = -Infinity;
    for (const w of healthy) {
      if (w.load < min) min = w.load;
      if (w.load > max) max = w.load;
    }
    const imbalanced = max - min > this.config.balanceAbsThreshold && max > min * this.config.balanceRelThreshold;
    // Several workers may hold the whole matched prefix (after load spreading): take the
    // least loaded of them rather than an arbitrary one, so a hot prefix does not pile up.
    const m = tree.prefixMatch(
      text,
      (holders) => {
        let best: Worker | undefined;
        for (const id of holders) {
          const w = healthy.find((h) => h.id === id);
          if (w && (!best || w.load < best.load || (w.load === best.load && w.processed < best.processed))) best = w;
        }
        return best?.id;
      },
      // Under imbalance the match only measures avoidable prefill: a read-only look, as before.
      touch && !imbalanced,
    );
    const holder = m.tenant === undefined ? undefined : healthy.find((w) => w.id === m.tenant);
    const rate = m.inputChars === 0 ? 0 : m.matchedChars / m.inputChars;
    let chosen: Worker;
    let rule: 'imbalance' | 'prefix_match' | 'least_loaded';
    if (imbalanced) {
      chosen = leastLoaded(healthy)!;
      rule = 'imbalance';
    } else if (rate > this.config.cacheThreshold && holder) {
      chosen = holder;
      rule = 'prefix_match';
    } else {
      chosen = leastLoaded(healthy)!;
      rule = 'least_loaded';
    }
    return { chosen, rule, holder, matchedChars: m.matchedChars, inputChars: m.inputChars, rate, min, max };
  }

  explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
    const described = describeAll(candidates, this.deps.clock.now());
    const healthy = available(candidates);
    if (healthy.length === 0) return noneAvailable(this.name, described);
    const tree = this.trees.existing(ctx.model) ?? new CharTree();
    const text = ctx.routingText;
    const d = this.decide(healthy, tree, text, false);
    for (const c of described) {
      const matched = tree.prefixMatchTenant(text, c.worker, false);
      c.matchedChars = matched;
      c.terms = { match_rate: d.inputChars === 0 ? 0 : round(matched / d.inputChars), tree_chars: tree.tenantCharCount(c.worker) };
    }
    const cfg = this.config;
    const detail =
      d.rule === 'imbalance'
        ? `loads imbalanced (max ${d.max} − min ${d.min} > ${cfg.balanceAbsThreshold} and max > ${cfg.balanceRelThreshold} × min): least loaded`
        : d.rule === 'prefix_match'
          ? `longest prefix match ${d.matchedChars}/${d.inputChars} chars (${round(d.rate)}) > cache threshold ${cfg.cacheThreshold}`
          : `longest prefix match ${d.matchedChars}/${d.inputChars} chars (${round(d.rate)}) not above cache threshold ${cfg.cacheThreshold}${d.holder ? '' : ' or held by no available worker'}: least loaded`;
    return { policy: this.name, chosen: d.chosen.id, rule: d.rule, detail, deterministic: true, input: { chars: d.inputChars }, candidates: described };
  }

  applyPeer(_origin: string, event: PeerRoutingEvent): void {
    if (event.kind === 'routed') this.trees.insertRouted(event.rec);
  }

  *exportHistory(): Iterable<RoutedRecord> {
    yield* this.trees.history();
  }

  onWorkerRemoved(worker: Worker): void {
    this.trees.removeTenant(worker.id);
  }

  /** Trim every worker's share of every tree to maxTreeSize characters (LRU leaves first). */
  evict(): void {
    this.trees.evict();
  }

  /** Characters held per worker id, summed over models (for kvgate_tree_chars). */
  treeChars(): Map<string, number> {
    return this.trees.charsByWorker();
  }

  textTrees(): TextTreeStats {
    return this.trees.stats();
  }

  close(): void {
    this.trees.close();
  }
}
