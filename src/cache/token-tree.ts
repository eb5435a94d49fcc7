/**
 * Routing history as a radix tree over token ids (Preble's global prefix tree, reduced to what a
 * router can know): every request routed to a worker is inserted under that worker, and each
 * node on its path counts, per worker, the requests that ran through it in a sliding window
 * (Preble's history window H = 180 s).
 *
 * Semantics:
 *  - Edges carry token arrays (`Uint32Array`); ids are stored as uint32 (`x >>> 0`).
 *  - `insert(tokens, w, now)` records one hit for `w` at `now` on every node of the request's
 *    path (splitting an edge where the request leaves it). Because a node's hits are a superset
 *    of its children's, a worker on a child is always on the parent.
 *  - A worker *holds* a node while it has a hit on it inside the window. `match` reports, per
 *    worker, the longest prefix of the tokens running through nodes it holds (a partial edge
 *    match counts its shared part); `matchedTokens` is the longest over all workers.
 *  - Hits are counted in buckets of `bucketMs` (default min(1000, windowMs)): a hit at t falls in
 *    the bucket b = ⌊t / bucketMs⌋·bucketMs and stays in the window while b + bucketMs > now −
 *    windowMs, i.e. for between windowMs and windowMs + bucketMs. So one (node, worker) record
 *    holds at most windowMs / bucketMs + 1 counters, whatever the request rate.
 *  - `expire(now)` drops buckets that left the window, records with no bucket left, and nodes
 *    no worker holds any more. Memory is then bounded by the traffic of one window: every
 *    insert adds at most two nodes and (number of nodes on its path) records.
 *  - Optional hard cap `maxTokens` on the tokens held in edge labels: when an insert goes over
 *    it, least-recently-inserted leaves (of any worker) are dropped until the tree holds at
 *    most 90 % of the cap (hysteresis, so the sweep is amortised).
 *
 * Every label owns its own buffer (new leaves and both halves of a split are copies), so the
 * tree never pins a caller's token array and the token count is the real label memory.
 */

export interface TokenTreeOptions {
  /** Sliding window of the history (ms). Preble's H is 180 000. */
  windowMs: number;
  /** Granularity of the per-node hit counters (ms). Default min(1000, windowMs). */
  bucketMs?: number;
  /** Cap on the tokens held in edge labels (0 or absent = no cap). */
  maxTokens?: number;
}

export interface TokenMatch {
  /** Longest prefix of the tokens held by any worker (0 when none). */
  matchedTokens: number;
  /** Per worker: the longest prefix of the tokens it holds. Workers with no match are absent. */
  holders: Map<string, number>;
}

export interface TokenTreeStats {
  /** Nodes, root excluded. */
  nodes: number;
  /** Tokens in edge labels. */
  tokens: number;
  /** (node, worker) history records. */
  records: number;
  /** Time buckets over all records. */
  buckets: number;
  /** Workers with a request in the window (as of the last insert/expire). */
  workers: number;
  /**
   * Rough heap estimate in bytes: 4 per token, 160 per node (object, typed array, child map
   * share), 120 per record (map entry and two arrays), 16 per bucket.
   */
  approxBytes: number;
}

/** Per-(node, worker) hit counts in time buckets, oldest first. */
class History {
  starts: number[] = [];
  counts: number[] = [];

  add(nowMs: number, bucketMs: number): void {
    const b = Math.floor(nowMs / bucketMs) * bucketMs;
    const last = this.starts.length - 1;
    if (last >= 0 && b <= this.starts[last]) {
      // Same bucket (or a clock that went backwards): count it in the newest bucket.
      this.counts[last]++;
    } else {
      this.starts.push(b);
      this.counts.push(1);
    }
  }

  /** Drops buckets that left the window; returns whether any remains. */
  prune(cutoffMs: number, bucketMs: number): boolean {
    let i = 0;
    while (i < this.starts.length && this.starts[i] + bucketMs <= cutoffMs) i++;
    if (i > 0) {
      this.starts.splice(0, i);
      this.counts.splice(0, i);
    }
    return this.starts.length > 0;
  }

  live(cutoffMs: number, bucketMs: number): boolean {
    const n = this.starts.length;
    return n > 0 && this.starts[n - 1] + bucketMs > cutoffMs;
  }

  countSince(cutoffMs: number, bucketMs: number): number {
    let c = 0;
    for (let i = this.starts.length - 1; i >= 0 && this.starts[i] + bucketMs > cutoffMs; i--) c += this.counts[i];
    return c;
  }

  clone(): History {
    const h = new History();
    h.starts = this.starts.slice();
    h.counts = this.counts.slice();
    return h;
  }
}

class TreeNode {
  children: Map<number, TreeNode> | undefined;
  readonly hist = new Map<string, History>();
  /** Time of the last insert through this node (LRU order for the token cap). */
  lastMs = -Infinity;
  constructor(
    public label: Uint32Array,
    public parent: TreeNode | undefined,
  ) {}
}

function copyTokens(tokens: ArrayLike<number>, from: number, to: number): Uint32Array {
  const out = new Uint32Array(to - from);
  for (let i = from; i < to; i++) out[i - from] = tokens[i] >>> 0;
  return out;
}

/** Binary min-heap of nodes by lastMs (for LRU eviction under the token cap). */
class NodeHeap {
  private readonly a: TreeNode[] = [];
  get size(): number {
    return this.a.length;
  }
  push(n: TreeNode): void {
    const a = this.a;
    a.push(n);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (a[p].lastMs <= a[i].lastMs) break;
      [a[p], a[i]] = [a[i], a[p]];
      i = p;
    }
  }
  pop(): TreeNode | undefined {
    const a = this.a;
    if (a.length === 0) return undefined;
    const top = a[0];
    const last = a.pop()!;
    if (a.length > 0) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && a[l].lastMs < a[m].lastMs) m = l;
        if (r < a.length && a[r].lastMs < a[m].lastMs) m = r;
        if (m === i) break;
        [a[m], a[i]] = [a[i], a[m]];
        i = m;
      }
    }
    return top;
  }
}

export class TokenTree {
  readonly windowMs: number;
  readonly bucketMs: number;
  readonly maxTokens: number;
  private readonly root = new TreeNode(new Uint32Array(0), undefined);
  /** Per worker: requests inserted, in the same buckets (for recentRequests). */
  private readonly totals = new Map<string, History>();
  private nodeCount = 0;
  private tokenCount = 0;

  constructor(opts: TokenTreeOptions) {
    if (!(opts.windowMs > 0) || !Number.isFinite(opts.windowMs)) throw new RangeError(`windowMs must be a finite number > 0 (got ${opts.windowMs})`);
    this.windowMs = opts.windowMs;
    const bucket = opts.bucketMs ?? Math.min(1000, opts.windowMs);
    if (!(bucket > 0) || !Number.isFinite(bucket)) throw new RangeError(`bucketMs must be a finite number > 0 (got ${bucket})`);
    this.bucketMs = bucket;
    const cap = opts.maxTokens ?? 0;
    if (!(cap >= 0)) throw new RangeError(`maxTokens must be >= 0 (got ${cap})`);
    this.maxTokens = cap;
  }

  /** Nodes (root excluded). */
  get size(): number {
    return this.nodeCount;
  }

  /** Tokens held in edge labels. */
  get tokens(): number {
    return this.tokenCount;
  }

  /** Records one request of `workerId` at `nowMs` on every node of the tokens' path. */
  insert(tokens: ArrayLike<number>, workerId: string, nowMs: number): void {
    const n = tokens.length;
    if (n === 0) return;
    this.hitIn(this.totals, workerId, nowMs);
    let node = this.root;
    let pos = 0;
    while (pos < n) {
      let child = node.children?.get(tokens[pos] >>> 0);
      if (!child) {
        const leaf = new TreeNode(copyTokens(tokens, pos, n), node);
        (node.children ??= new Map()).set(leaf.label[0], leaf);
        this.nodeCount++;
        this.tokenCount += n - pos;
        this.hit(leaf, workerId, nowMs);
        break;
      }
      const label = child.label;
      const max = Math.min(label.length, n - pos);
      let l = 1;
      while (l < max && label[l] === tokens[pos + l] >>> 0) l++;
      if (l < label.length) child = this.split(child, l);
      this.hit(child, workerId, nowMs);
      node = child;
      pos += l;
    }
    if (this.maxTokens > 0 && this.tokenCount > this.maxTokens) this.evictToCap(Math.floor(this.maxTokens * 0.9));
  }

  /**
   * Longest prefix of `tokens` per worker. With `nowMs`, records whose newest hit left the
   * window are ignored even before `expire` ran; without it, everything not yet expired counts.
   */
  match(tokens: ArrayLike<number>, nowMs?: number): TokenMatch {
    const cutoff = nowMs === undefined ? -Infinity : nowMs - this.windowMs;
    const holders = new Map<string, number>();
    let best = 0;
    const n = tokens.length;
    let node = this.root;
    let pos = 0;
    while (pos < n) {
      const child = node.children?.get(tokens[pos] >>> 0);
      if (!child) break;
      const label = child.label;
      const max = Math.min(label.length, n - pos);
      let l = 1;
      while (l < max && label[l] === tokens[pos + l] >>> 0) l++;
      const reach = pos + l;
      let any = false;
      for (const [w, h] of child.hist) {
        if (!h.live(cutoff, this.bucketMs)) continue;
        holders.set(w, reach);
        any = true;
      }
      if (!any) break; // children hold a subset of this node's workers
      best = reach;
      if (l < label.length) break;
      node = child;
      pos = reach;
    }
    return { matchedTokens: best, holders };
  }

  /** Requests inserted for `workerId` in the window ending at `nowMs`. */
  recentRequests(workerId: string, nowMs: number): number {
    return this.totals.get(workerId)?.countSince(nowMs - this.windowMs, this.bucketMs) ?? 0;
  }

  /** Hits of `workerId` on the node where `tokens` end exactly (0 if no such node); for tests and diagnostics. */
  nodeHits(tokens: ArrayLike<number>, workerId: string, nowMs: number): number {
    let node = this.root;
    let pos = 0;
    const n = tokens.length;
    while (pos < n) {
      const child = node.children?.get(tokens[pos] >>> 0);
      if (!child || child.label.length > n - pos) return 0;
      for (let i = 1; i < child.label.length; i++) if (child.label[i] !== tokens[pos + i] >>> 0) return 0;
      node = child;
      pos += child.label.length;
    }
    if (node === this.root) return 0;
    return node.hist.get(workerId)?.countSince(nowMs - this.windowMs, this.bucketMs) ?? 0;
  }

  /** Forgets a worker everywhere; nodes nobody else holds are dropped. */
  removeWorker(workerId: string): void {
    this.totals.delete(workerId);
    this.sweep((node) => {
      node.hist.delete(workerId);
    });
  }

  /** Drops history older than the window and the nodes nobody holds any more. Returns the nodes removed. */
  expire(nowMs: number): number {
    const cutoff = nowMs - this.windowMs;
    const b = this.bucketMs;
    for (const [w, h] of this.totals) if (!h.prune(cutoff, b)) this.totals.delete(w);
    return this.sweep((node) => {
      for (const [w, h] of node.hist) if (!h.prune(cutoff, b)) node.hist.delete(w);
    });
  }

  clear(): void {
    this.root.children = undefined;
    this.totals.clear();
    this.nodeCount = 0;
    this.tokenCount = 0;
  }

  stats(): TokenTreeStats {
    let records = 0;
    let buckets = 0;
    const stack: TreeNode[] = [this.root];
    while (stack.length > 0) {
      const node = stack.pop()!;
      records += node.hist.size;
      for (const h of node.hist.values()) buckets += h.starts.length;
      if (node.children) for (const c of node.children.values()) stack.push(c);
    }
    return {
      nodes: this.nodeCount,
      tokens: this.tokenCount,
      records,
      buckets,
      workers: this.totals.size,
      approxBytes: this.tokenCount * 4 + this.nodeCount * 160 + records * 120 + buckets * 16,
    };
  }

  private hit(node: TreeNode, workerId: string, nowMs: number): void {
    this.hitIn(node.hist, workerId, nowMs);
    if (nowMs > node.lastMs) node.lastMs = nowMs;
  }

  private hitIn(map: Map<string, History>, workerId: string, nowMs: number): void {
    let h = map.get(workerId);
    if (!h) {
      h = new History();
      map.set(workerId, h);
    }
    h.add(nowMs, this.bucketMs);
  }

  /** Splits `node` after `at` tokens; returns the new upper node (which carries a copy of the history). */
  private split(node: TreeNode, at: number): TreeNode {
    const parent = node.parent!;
    const top = new TreeNode(node.label.slice(0, at), parent);
    for (const [w, h] of node.hist) top.hist.set(w, h.clone());
    top.lastMs = node.lastMs;
    node.label = node.label.slice(at);
    node.parent = top;
    top.children = new Map([[node.label[0], node]]);
    parent.children!.set(top.label[0], top);
    this.nodeCount++;
    return top;
  }

  /**
   * Applies `update` to every node (root excluded), children before parents, then removes the
   * nodes left with no holder and no child. Returns the number removed.
   */
  private sweep(update: (node: TreeNode) => void): number {
    const order: TreeNode[] = [];
    const stack: TreeNode[] = [];
    if (this.root.children) for (const c of this.root.children.values()) stack.push(c);
    while (stack.length > 0) {
      const node = stack.pop()!;
      order.push(node);
      if (node.children) for (const c of node.children.values()) stack.push(c);
    }
    let removed = 0;
    for (let i = order.length - 1; i >= 0; i--) {
      const node = order[i];
      update(node);
      if (node.hist.size === 0 && (!node.children || node.children.size === 0)) {
        this.detach(node);
        removed++;
      }
    }
    return removed;
  }

  private detach(node: TreeNode): void {
    const parent = node.parent!;
    parent.children!.delete(node.label[0]);
    if (parent.children!.size === 0) parent.children = undefined;
    node.parent = undefined;
    this.nodeCount--;
    this.tokenCount -= node.label.length;
  }

  /** Drops least-recently-inserted leaves until at most `target` tokens remain. */
  private evictToCap(target: number): void {
    const heap = new NodeHeap();
    const stack: TreeNode[] = [this.root];
    while (stack.length > 0) {
      const node = stack.pop()!;
      if (node.children) for (const c of node.children.values()) stack.push(c);
      else if (node !== this.root) heap.push(node);
    }
    while (this.tokenCount > target && heap.size > 0) {
      const leaf = heap.pop()!;
      const parent = leaf.parent!;
      this.detach(leaf);
      if (parent !== this.root && !parent.children) heap.push(parent);
    }
  }
}
