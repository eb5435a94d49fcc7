import { CharTree } from './char-tree.js';

/** What a policy's character trees hold, for metrics: characters per worker, insert-time trims. */
export interface TextTreeStats {
  charsByWorker: Map<string, number>;
  sizeTrims: number;
}

/** A routed prompt to insert: its text, or (a peer's decoded prompt) its text as two unjoined parts. */
export interface RoutedText {
  model: string;
  workerId: string;
  text?: string;
  textParts?: readonly [string, string];
}

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

  /**
   * Inserts a routed record's prompt into the tree for `rec.model` (the two parts when it has
   * them, so the joined text is never read). `skipEmpty`: an empty prompt does not register the
   * worker. Returns whether a prompt was inserted.
   */
  insertRouted(rec: RoutedText, skipEmpty = false): boolean {
    const parts = rec.textParts;
    if (parts !== undefined) {
      if (skipEmpty && parts[0].length + parts[1].length === 0) return false;
      this.tree(rec.model).insertParts(parts[0], parts[1], rec.workerId);
      return true;
    }
    if (rec.text === undefined || (skipEmpty && rec.text.length === 0)) return false;
    this.tree(rec.model).insert(rec.text, rec.workerId);
    return true;
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

  /** Characters per worker, and how often an insert took a worker past the bound with slack and trimmed it at once. */
  stats(): TextTreeStats {
    let sizeTrims = 0;
    for (const t of this.trees.values()) sizeTrims += t.sizeTriggeredTrims;
    return { charsByWorker: this.charsByWorker(), sizeTrims };
  }

  close(): void {
    this.cancelEviction?.();
  }
}
