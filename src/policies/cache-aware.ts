import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { CharTree } from '../cache/char-tree.js';
import { available, BasePolicy, leastLoaded, type PeerRoutingEvent, type PolicyDeps, type RoutedRecord } from './policy.js';

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
  private readonly trees = new Map<string, CharTree>();
  private readonly cancelEviction: (() => void) | undefined;

  constructor(
    deps: PolicyDeps,
    readonly config: CacheAwareConfig = defaultCacheAwareConfig,
  ) {
    super(deps);
    if (config.evictionIntervalSecs > 0 && deps.schedule) {
      this.cancelEviction = deps.schedule(config.evictionIntervalSecs * 1000, () => this.evict());
    }
  }

  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined {
    const healthy = available(candidates);
    if (healthy.length === 0) return undefined;
    const tree = this.treeFor(ctx.model);
    const observer = this.deps.observer;

    let min = Infinity;
    let max = -Infinity;
    for (const w of healthy) {
      if (w.load < min) min = w.load;
      if (w.load > max) max = w.load;
    }
    const imbalanced = max - min > this.config.balanceAbsThreshold && max > min * this.config.balanceRelThreshold;

    let chosen: Worker | undefined;
    if (imbalanced) {
      chosen = leastLoaded(healthy);
      if (chosen) observer?.loadBalanced?.(chosen);
    } else {
      // Several workers may hold the whole matched prefix (after load spreading): take the
      // least loaded of them rather than an arbitrary one, so a hot prefix does not pile up.
      const m = tree.prefixMatch(ctx.routingText, (holders) => {
        let best: Worker | undefined;
        for (const id of holders) {
          const w = healthy.find((h) => h.id === id);
          if (w && (!best || w.load < best.load || (w.load === best.load && w.processed < best.processed))) best = w;
        }
        return best?.id;
      });
      const rate = m.inputChars === 0 ? 0 : m.matchedChars / m.inputChars;
      if (rate > this.config.cacheThreshold && m.tenant !== undefined) {
        chosen = healthy.find((w) => w.id === m.tenant);
        if (chosen) observer?.cacheHit?.(chosen, m.matchedChars, m.inputChars);
      }
      if (!chosen) {
        observer?.cacheMiss?.(m.inputChars);
        chosen = leastLoaded(healthy);
      }
    }
    if (chosen) {
      tree.insert(ctx.routingText, chosen.id);
      this.deps.share?.routed({ model: ctx.model, workerId: chosen.id, text: ctx.routingText });
    }
    return chosen;
  }

  applyPeer(_origin: string, event: PeerRoutingEvent): void {
    if (event.kind === 'routed' && event.rec.text !== undefined) this.treeFor(event.rec.model).insert(event.rec.text, event.rec.workerId);
  }

  *exportHistory(): Iterable<RoutedRecord> {
    for (const [model, tree] of this.trees) for (const [workerId, text] of tree.tenantStrings()) yield { model, workerId, text };
  }

  onWorkerRemoved(worker: Worker): void {
    for (const tree of this.trees.values()) tree.removeTenant(worker.id);
  }

  /** Trim every worker's share of every tree to maxTreeSize characters (LRU leaves first). */
  evict(): void {
    for (const tree of this.trees.values()) tree.evictTenantBySize(this.config.maxTreeSize);
  }

  /** Characters held per worker id, summed over models (for kvgate_tree_chars). */
  treeChars(): Map<string, number> {
    const out = new Map<string, number>();
    for (const tree of this.trees.values()) {
      for (const [tenant, chars] of tree.tenantCharCounts()) out.set(tenant, (out.get(tenant) ?? 0) + chars);
    }
    return out;
  }

  close(): void {
    this.cancelEviction?.();
  }

  private treeFor(model: string): CharTree {
    let tree = this.trees.get(model);
    if (!tree) {
      tree = new CharTree();
      this.trees.set(model, tree);
    }
    return tree;
  }
}
