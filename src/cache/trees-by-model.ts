import { CharTree } from './char-tree.js';

/**
 * The character trees of a policy that routes by text (cache_aware's prefix cache, kv_aware's
 * routing history): one per key (model, or model + adapter), each worker a tenant, every tree
 * bounded to `maxTenantChars` characters per worker — trimmed every `evictionIntervalSecs` by the
 * host's scheduler and at once by an insert that goes a quarter past the bound (see CharTree).
 */
export class TreesByModel {
  private readonly trees = new Map<string, CharTree>();
  private readonly cancelEviction: (() => void) | undefined;

  constructor(
    private readonly maxTenantChars: number,
    evictionIntervalSecs: number,
    schedule?: (everyMs: number, fn: () => void) => () => void,
  ) {
    if (evictionIntervalSecs > 0 && schedule) this.cancelEviction = schedule(evictionIntervalSecs * 1000, () => this.evict());
  }

  /** The tree for `key`, created on first use. */
  tree(key: string): CharTree {
    let t = this.trees.get(key);
    if (!t) {
      t = new CharTree({ maxTenantChars: this.maxTenantChars });
      this.trees.set(key, t);
    }
    return t;
  }

  /** The tree for `key` if there is one (read-only looks: explanations). */
  existing(key: string): CharTree | undefined {
    return this.trees.get(key);
  }

  /** Trims every worker's share of every tree to the bound (LRU leaves first). */
  evict(): void {
    for (const t of this.trees.values()) t.evictTenantBySize(this.maxTenantChars);
  }

  /** Forgets a worker in every tree. */
  removeTenant(workerId: string): void {
    for (const t of this.trees.values()) t.removeTenant(workerId);
  }

  /** Every string each worker holds, per key (what a joining replica needs to rebuild the trees). */
  *history(): Iterable<{ model: string; workerId: string; text: string }> {
    for (const [model, t] of this.trees) for (const [workerId, text] of t.tenantStrings()) yield { model, workerId, text };
  }

  /** Characters held per worker id, summed over keys. */
  charsByWorker(): Map<string, number> {
    const out = new Map<string, number>();
    for (const t of this.trees.values()) for (const [tenant, chars] of t.tenantCharCounts()) out.set(tenant, (out.get(tenant) ?? 0) + chars);
    return out;
  }

  /** Times an insert took a worker past the bound with slack and trimmed it at once, over all keys. */
  sizeTrims(): number {
    let n = 0;
    for (const t of this.trees.values()) n += t.sizeTriggeredTrims;
    return n;
  }

  close(): void {
    this.cancelEviction?.();
  }
}
