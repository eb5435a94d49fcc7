/**
 * Approximate prefix cache: one multi-tenant, character-level radix tree (the SGLang router's
 * cache-aware tree, re-implemented). Every tenant (worker id) owns the strings routed to it;
 * `prefixMatch` tells which tenant most likely holds the longest cached prefix of a prompt.
 *
 * Semantics follow SGLang's newest `tree.rs`:
 *  - characters are Unicode code points; every length and count is in code points;
 *  - a tenant is on a node when strings it inserted run through the node's whole label, so a
 *    child's tenants are always a subset of its parent's;
 *  - timestamps come from a per-tree epoch counter (read-then-increment, starting at 0), so the
 *    tree is deterministic; insert stamps only the final node of its walk, prefixMatch refreshes
 *    the stopping node when the epoch it draws is a multiple of 8;
 *  - eviction is LRU over "leaves for a tenant", with a per-tenant character cap.
 *
 * Unlike SGLang's tree, which is trimmed only by a periodic pass, a tree given `maxTenantChars`
 * also trims itself when an insert takes a tenant a quarter past the cap (at least 1 Mi
 * characters past it): unique long prompts (100k tokens, ~0.5 MB each, a hundred a second) would
 * otherwise grow it by gigabytes between passes, until the heap is full and every collection of
 * it stalls the event loop.
 *
 * Representation (this is where the speed is):
 *  - Labels are JS strings in UTF-16. Splits never separate a surrogate pair, so every label
 *    boundary is a code point boundary; each node caches its label's code point count. Text
 *    without surrogates (checked once per call with a regex, which V8 answers at once for
 *    one-byte strings) takes a path with no code point bookkeeping at all.
 *  - Long labels are compared with `text.slice(a, b) === label`: V8 slices are O(1) views and
 *    string equality is a memcmp, an order of magnitude faster than a charCodeAt loop.
 *  - A new leaf's label is a fresh flat copy of the remaining text, so the tree never pins the
 *    caller's (possibly much longer) request string; split pieces are slices of that copy.
 *  - Tenants are interned to small integers; a node's tenant map is one flat array
 *    `[id, stamp, id, stamp, ...]` in insertion order. Children are a Map keyed by the code
 *    point that starts the child's label, created only for nodes that have children.
 */

/** Outcome of {@link CharTree.prefixMatch}. */
export interface PrefixMatchResult {
  /** Code points of the input matched by the tree (a partial edge match counts its shared part). */
  matchedChars: number;
  /** Code points in the input. */
  inputChars: number;
  /** A tenant holding the node where the match stopped; undefined when the tree has no tenants. */
  tenant: string | undefined;
}

const SURROGATE = /[\uD800-\uDFFF]/;
const NON_LATIN1 = /[^\u0000-\u00FF]/;

/** Matches shorter than this are compared unit by unit; longer ones with slice equality. */
const SHORT_COMPARE = 16;

function isHigh(unit: number): boolean {
  return (unit & 0xfc00) === 0xd800;
}

function isLow(unit: number): boolean {
  return (unit & 0xfc00) === 0xdc00;
}

/** Code points in s[from, to); a lone surrogate counts as one code point, like codePointAt. */
/** Code points of a string, without building an array of them (`[...s].length` allocates one per character). */
export function codePointLength(s: string): number {
  return SURROGATE.test(s) ? countCodePoints(s, 0, s.length) : s.length;
}

function countCodePoints(s: string, from: number, to: number): number {
  let n = to - from;
  for (let i = from; i < to - 1; i++) {
    if (isHigh(s.charCodeAt(i)) && isLow(s.charCodeAt(i + 1))) {
      n--;
      i++;
    }
  }
  return n;
}

/**
 * s[from..], not keeping much more than itself alive. A plain `s.slice(from)` is a view that
 * keeps all of `s` alive: kept when it holds at least three quarters of `s` (the usual case: a
 * new leaf is a prompt minus its shared start; copying a 100k-token prompt would allocate
 * another half-megabyte string on the event loop for nothing). Otherwise a flat copy:
 * concatenating yields a V8 cons string, and slicing it flattens it into a new sequential string
 * that holds only these characters, so the result no longer references `s`.
 */
function ownedCopy(s: string, from: number): string {
  if (from <= s.length >> 2) return s.slice(from);
  return (s.slice(from) + '\0').slice(0, -1);
}

/**
 * Length in UTF-16 units of the common prefix of text[pos..] and label, cut back to a code
 * point boundary of both strings. `wide` says whether the text may contain surrogates; if it
 * has none the common prefix has none either, so no boundary can fall inside a pair.
 */
function commonPrefix(text: string, pos: number, label: string, wide: boolean): number {
  const labelLen = label.length;
  const avail = text.length - pos;
  const n = labelLen < avail ? labelLen : avail;
  let i = 0;
  const quick = n < SHORT_COMPARE ? n : SHORT_COMPARE;
  while (i < quick && text.charCodeAt(pos + i) === label.charCodeAt(i)) i++;
  if (i === quick && i < n) {
    if (text.slice(pos, pos + n) === (n === labelLen ? label : label.slice(0, n))) {
      i = n;
    } else {
      // Binary search for the first difference, then finish the last short stretch by units.
      let hi = n;
      while (hi - i > SHORT_COMPARE) {
        const mid = (i + hi) >>> 1;
        if (text.slice(pos + i, pos + mid) === label.slice(i, mid)) i = mid;
        else hi = mid;
      }
      while (text.charCodeAt(pos + i) === label.charCodeAt(i)) i++;
    }
  }
  if (wide && i > 0 && isHigh(label.charCodeAt(i - 1)) && (isLow(label.charCodeAt(i)) || isLow(text.charCodeAt(pos + i)))) {
    i--; // the last common unit is the high half of a pair that differs in its low half
  }
  return i;
}

class Node {
  /** Child nodes by the code point that starts their label; null for a node with no children. */
  children: Map<number, Node> | null = null;

  constructor(
    /** Edge label (UTF-16; starts and ends on code point boundaries). */
    public label: string,
    /** Label length in code points. */
    public cpLen: number,
    public parent: Node | null,
    /** Tenant map, flattened: [tenantId, stamp, tenantId, stamp, ...] in insertion order. */
    public tenants: number[],
    /** Tenant prefixMatch last returned (or that created this leaf); preferred while present. */
    public lastTenant: number,
  ) {}
}

/** Index of the tenant's id in a flattened tenant map, or -1. */
function tenantIndex(tenants: number[], id: number): number {
  for (let i = 0; i < tenants.length; i += 2) if (tenants[i] === id) return i;
  return -1;
}

/** The tenant map plus one entry, allocated at its exact size (push would over-allocate). */
function withTenant(tenants: number[], id: number, stamp: number): number[] {
  return tenants.concat(id, stamp);
}

function hasChildWithTenant(node: Node, id: number): boolean {
  if (node.children === null) return false;
  for (const child of node.children.values()) if (tenantIndex(child.tenants, id) >= 0) return true;
  return false;
}

/**
 * Binary min-heap of eviction entries in parallel arrays, ordered by (stamp, push order): equal
 * stamps pop first-in first-out, which keeps eviction deterministic.
 */
class EvictionHeap {
  private readonly stamps: number[] = [];
  private readonly seqs: number[] = [];
  private readonly ids: number[] = [];
  private readonly nodes: Node[] = [];
  private seq = 0;
  /** Tenant id and node of the last popped entry. */
  id = -1;
  node: Node | null = null;

  get length(): number {
    return this.nodes.length;
  }

  private less(a: number, b: number): boolean {
    const sa = this.stamps[a];
    const sb = this.stamps[b];
    return sa < sb || (sa === sb && this.seqs[a] < this.seqs[b]);
  }

  private swap(a: number, b: number): void {
    const s = this.stamps[a];
    this.stamps[a] = this.stamps[b];
    this.stamps[b] = s;
    const q = this.seqs[a];
    this.seqs[a] = this.seqs[b];
    this.seqs[b] = q;
    const t = this.ids[a];
    this.ids[a] = this.ids[b];
    this.ids[b] = t;
    const n = this.nodes[a];
    this.nodes[a] = this.nodes[b];
    this.nodes[b] = n;
  }

  push(stamp: number, id: number, node: Node): void {
    let i = this.nodes.length;
    this.stamps.push(stamp);
    this.seqs.push(this.seq++);
    this.ids.push(id);
    this.nodes.push(node);
    while (i > 0) {
      const parent = (i - 1) >>> 1;
      if (!this.less(i, parent)) break;
      this.swap(i, parent);
      i = parent;
    }
  }

  /** Removes the minimum entry into `id` and `node`. The heap must not be empty. */
  pop(): void {
    this.id = this.ids[0];
    this.node = this.nodes[0];
    const last = this.nodes.length - 1;
    this.swap(0, last);
    this.stamps.pop();
    this.seqs.pop();
    this.ids.pop();
    this.nodes.pop();
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= last) break;
      const r = l + 1;
      const m = r < last && this.less(r, l) ? r : l;
      if (!this.less(m, i)) break;
      this.swap(m, i);
      i = m;
    }
  }
}

/** Multi-tenant character radix tree. See the module comment for the semantics. */
export class CharTree {
  private readonly root = new Node('', 0, null, [], -1);
  /** Next timestamp to hand out. */
  private epoch = 0;
  private readonly tenantIds = new Map<string, number>();
  /** Tenant name by id; undefined for a freed id. */
  private readonly tenantNames: (string | undefined)[] = [];
  /** Characters per tenant id (sum of label lengths of the nodes the tenant is on). */
  private readonly charCounts: number[] = [];
  private readonly freeIds: number[] = [];
  private nodes = 0;
  private chars = 0;
  /** A tenant past this many characters after an insert triggers an eviction pass (Infinity: never). */
  private readonly trimAbove: number;
  private trims = 0;

  /**
   * `maxTenantChars`: the per-tenant cap that inserts enforce themselves (with slack, see the
   * module comment); omitted, only explicit `evictTenantBySize` calls trim the tree.
   */
  constructor(private readonly opts: { maxTenantChars?: number } = {}) {
    const cap = opts.maxTenantChars;
    this.trimAbove = cap === undefined ? Infinity : cap + Math.max(Math.floor(cap / 4), 1 << 20);
  }

  /** Eviction passes that inserts triggered (a tenant past its cap with slack). */
  get sizeTriggeredTrims(): number {
    return this.trims;
  }

  /** Number of nodes, not counting the root. */
  get nodeCount(): number {
    return this.nodes;
  }

  /** Distinct characters stored: the sum of all label lengths, in code points. */
  get storedChars(): number {
    return this.chars;
  }

  /** Records that `tenant` now holds `text` (its whole length). `insert("", t)` just registers t. */
  insert(text: string, tenant: string): void {
    this.insertParts(text, '', tenant);
  }

  /**
   * `insert(head + tail, tenant)`, leaving the tree exactly as that would, without joining the
   * two: only the characters of new labels are copied. For a caller that holds a text as a
   * shared prefix and its own rest (a peer's decoded prompt: reading `head + tail` would first
   * flatten the whole concatenation).
   */
  insertParts(head: string, tail: string, tenant: string): void {
    let id = this.tenantIds.get(tenant);
    if (id === undefined) id = this.register(tenant);
    if (tail.length > 0 && isHigh(head.charCodeAt(head.length - 1)) && isLow(tail.charCodeAt(0))) {
      this.insertFor(head + tail, '', id); // a surrogate pair across the seam: walk the joined text
    } else {
      this.insertFor(head, tail, id);
    }
    if (this.charCounts[id] > this.trimAbove) {
      this.trims++;
      this.evictTenantBySize(this.opts.maxTenantChars!);
    }
  }

  /**
   * Inserts the text `head + tail` (no surrogate pair across the seam). Positions are in the
   * joined text; the walk reads whichever part holds them, and the one label that may straddle
   * the seam is compared with the end of `head`, then the start of `tail`.
   */
  private insertFor(head: string, tail: string, id: number): void {
    const counts = this.charCounts;
    const wide = SURROGATE.test(head) || (tail.length > 0 && SURROGATE.test(tail));
    const seam = head.length;
    const end = seam + tail.length;
    let node = this.root;
    let pos = 0;
    while (pos < end) {
      const inHead = pos < seam;
      const s = inHead ? head : tail;
      const at = inHead ? pos : pos - seam;
      let key = s.charCodeAt(at);
      if (wide && isHigh(key)) key = s.codePointAt(at)!;
      const child = node.children === null ? undefined : node.children.get(key);
      if (child === undefined) {
        let label: string;
        let cpLen: number;
        if (!inHead) {
          label = ownedCopy(tail, at);
          cpLen = wide ? countCodePoints(tail, at, tail.length) : end - pos;
        } else if (tail.length === 0) {
          label = ownedCopy(head, at);
          cpLen = wide ? countCodePoints(head, at, seam) : end - pos;
        } else {
          label = (head.slice(at) + tail + '\0').slice(0, -1); // one flat copy of both pieces
          cpLen = wide ? countCodePoints(head, at, seam) + countCodePoints(tail, 0, tail.length) : end - pos;
        }
        const leaf = new Node(label, cpLen, node, [id, this.epoch++], id);
        (node.children ??= new Map()).set(key, leaf);
        counts[id] += cpLen;
        this.nodes++;
        this.chars += cpLen;
        return;
      }
      const label = child.label;
      let k = commonPrefix(s, at, label, wide);
      if (inHead && k === seam - at && k < label.length && tail.length > 0) {
        // The head ends inside this label: the rest of the label goes on against the tail.
        k += commonPrefix(tail, 0, label.slice(k), wide);
      }
      if (k === label.length) {
        if (tenantIndex(child.tenants, id) < 0) {
          child.tenants = withTenant(child.tenants, id, 0);
          counts[id] += child.cpLen;
        }
        node = child;
      } else {
        // Split: a new node with label[0..k] (and a copy of the tenant map) takes the child's place.
        const cpTop = child.cpLen === label.length ? k : countCodePoints(label, 0, k);
        const isNew = tenantIndex(child.tenants, id) < 0;
        const tenants = isNew ? withTenant(child.tenants, id, 0) : child.tenants.slice();
        if (isNew) counts[id] += cpTop;
        const top = new Node(label.slice(0, k), cpTop, node, tenants, child.lastTenant);
        const rest = label.slice(k);
        child.label = rest;
        child.cpLen -= cpTop;
        child.parent = top;
        top.children = new Map([[rest.codePointAt(0)!, child]]);
        node.children!.set(key, top);
        this.nodes++;
        node = top;
      }
      pos += k;
    }
    node.tenants[tenantIndex(node.tenants, id) + 1] = this.epoch++;
  }

  /**
   * Longest cached prefix of `text` over all tenants, and a tenant that holds it.
   * When several tenants hold the whole match, `choose` (if given) picks among them (e.g. the
   * least loaded); otherwise the node's last returned tenant, else its first, is used.
   * `touch` false: a read-only look (explanations): no LRU refresh, the node's last tenant kept.
   */
  prefixMatch(text: string, choose?: (tenants: string[]) => string | undefined, touch = true): PrefixMatchResult {
    const wide = SURROGATE.test(text);
    const end = text.length;
    let node = this.root;
    let pos = 0;
    let matched = 0;
    while (pos < end) {
      let key = text.charCodeAt(pos);
      if (wide && isHigh(key)) key = text.codePointAt(pos)!;
      const child = node.children === null ? undefined : node.children.get(key);
      if (child === undefined) break;
      const label = child.label;
      const k = commonPrefix(text, pos, label, wide);
      node = child;
      if (k === label.length) {
        matched += child.cpLen;
        pos += k;
      } else {
        matched += child.cpLen === label.length ? k : countCodePoints(label, 0, k);
        break;
      }
    }

    const tenants = node.tenants;
    let id = node.lastTenant;
    let at = id < 0 ? -1 : tenantIndex(tenants, id);
    if (choose !== undefined && tenants.length > 2) {
      const names: string[] = [];
      for (let i = 0; i < tenants.length; i += 2) names.push(this.tenantNames[tenants[i]]!);
      const chosen = choose(names);
      const chosenId = chosen === undefined ? undefined : this.tenantIds.get(chosen);
      const chosenAt = chosenId === undefined ? -1 : tenantIndex(tenants, chosenId);
      if (chosenAt >= 0) {
        at = chosenAt;
        id = chosenId!;
        if (touch) node.lastTenant = id;
      }
    }
    if (at < 0 && tenants.length > 0) {
      at = 0;
      id = tenants[0];
      if (touch) node.lastTenant = id;
    }
    if (touch) {
      // Sampled LRU refresh: one access in 8 (by epoch) updates the stopping node's timestamp.
      const epoch = this.epoch++;
      if (at >= 0 && (epoch & 7) === 0) tenants[at + 1] = epoch;
    }

    return {
      matchedChars: matched,
      inputChars: wide ? countCodePoints(text, 0, end) : end,
      tenant: at < 0 ? undefined : this.tenantNames[id],
    };
  }

  /**
   * Code points of `text` matched by `tenant`'s strings alone (only descending into nodes the
   * tenant is on); 0 for an unknown tenant. Like SGLang, this counts as an access: the stopping
   * node's timestamp for the tenant is refreshed (unless `touch` is false: a read-only look).
   */
  prefixMatchTenant(text: string, tenant: string, touch = true): number {
    const id = this.tenantIds.get(tenant);
    if (id === undefined) return 0;
    const wide = SURROGATE.test(text);
    const end = text.length;
    let node = this.root;
    let pos = 0;
    let matched = 0;
    while (pos < end) {
      let key = text.charCodeAt(pos);
      if (wide && isHigh(key)) key = text.codePointAt(pos)!;
      const child = node.children === null ? undefined : node.children.get(key);
      if (child === undefined || tenantIndex(child.tenants, id) < 0) break;
      const label = child.label;
      const k = commonPrefix(text, pos, label, wide);
      node = child;
      if (k === label.length) {
        matched += child.cpLen;
        pos += k;
      } else {
        matched += child.cpLen === label.length ? k : countCodePoints(label, 0, k);
        break;
      }
    }
    const at = tenantIndex(node.tenants, id);
    if (touch && at >= 0) node.tenants[at + 1] = this.epoch++;
    return matched;
  }

  /** Forgets a tenant everywhere; nodes left with no tenant are dropped. */
  removeTenant(tenant: string): void {
    const id = this.tenantIds.get(tenant);
    if (id === undefined) return;
    // Reverse pre-order visits every child before its parent, so emptied nodes unlink bottom-up.
    const order = this.preorder();
    for (let i = order.length - 1; i >= 0; i--) {
      const node = order[i];
      const at = tenantIndex(node.tenants, id);
      if (at < 0) continue;
      node.tenants.splice(at, 2);
      if (node !== this.root && node.tenants.length === 0 && node.children === null) this.unlink(node);
    }
    this.tenantIds.delete(tenant);
    this.tenantNames[id] = undefined;
    this.charCounts[id] = 0;
    this.freeIds.push(id);
  }

  /**
   * Evicts least recently used leaves, per tenant, until every tenant holds at most `maxChars`
   * characters. A node is a leaf for a tenant when the tenant is on it and on none of its
   * children; removing a tenant from its leaf can make the parent a leaf for it in turn.
   */
  evictTenantBySize(maxChars: number): void {
    const counts = this.charCounts;
    const heap = new EvictionHeap();
    // mark[id] === gen  <=>  some child of the node being scanned holds tenant id.
    const mark = new Int32Array(this.tenantNames.length);
    let gen = 0;
    const stack: Node[] = [];
    if (this.root.children !== null) for (const child of this.root.children.values()) stack.push(child);
    while (stack.length > 0) {
      const node = stack.pop()!;
      gen++;
      if (node.children !== null) {
        for (const child of node.children.values()) {
          stack.push(child);
          const ct = child.tenants;
          for (let i = 0; i < ct.length; i += 2) mark[ct[i]] = gen;
        }
      }
      const nt = node.tenants;
      for (let i = 0; i < nt.length; i += 2) if (mark[nt[i]] !== gen) heap.push(nt[i + 1], nt[i], node);
    }

    while (heap.length > 0) {
      heap.pop();
      const id = heap.id;
      const node = heap.node!;
      if (counts[id] <= maxChars) continue;
      const at = tenantIndex(node.tenants, id);
      if (at < 0 || hasChildWithTenant(node, id)) continue; // no longer a leaf for this tenant
      node.tenants.splice(at, 2);
      counts[id] = Math.max(0, counts[id] - node.cpLen);
      const parent = node.parent!;
      if (node.tenants.length === 0 && node.children === null) this.unlink(node);
      if (parent !== this.root) {
        const pAt = tenantIndex(parent.tenants, id);
        if (pAt >= 0 && !hasChildWithTenant(parent, id)) heap.push(parent.tenants[pAt + 1], id, parent);
      }
    }
  }

  /**
   * Every string a tenant holds that is not a prefix of a longer one it holds, as
   * `[tenant, text]`, oldest-stamped first (so replaying them keeps the LRU order roughly).
   * Inserting them all into an empty tree rebuilds this tree's tenant sets (replica snapshots).
   */
  tenantStrings(): Array<[string, string]> {
    const out: Array<[string, string, number]> = [];
    const stack: Array<[Node, string]> = [[this.root, '']];
    while (stack.length > 0) {
      const [node, prefix] = stack.pop()!;
      const path = prefix + node.label;
      const t = node.tenants;
      if (node !== this.root) {
        for (let i = 0; i < t.length; i += 2) {
          if (!hasChildWithTenant(node, t[i])) out.push([this.tenantNames[t[i]]!, path, t[i + 1]]);
        }
      }
      if (node.children !== null) for (const child of node.children.values()) stack.push([child, path]);
    }
    out.sort((a, b) => a[2] - b[2]);
    return out.map(([tenant, text]) => [tenant, text]);
  }

  /**
   * The whole tree as text, for tests: the epoch, then one line per node in pre-order (children
   * in insertion order) with its depth, label, code point count, tenants with their stamps, and
   * last tenant. Two trees with equal dumps answer every call alike.
   */
  dump(): string {
    const lines = [`epoch ${this.epoch} nodes ${this.nodes} chars ${this.chars}`];
    const name = (id: number) => (id < 0 ? '-' : (this.tenantNames[id] ?? `#${id}`));
    const walk = (node: Node, depth: number) => {
      const t: string[] = [];
      for (let i = 0; i < node.tenants.length; i += 2) t.push(`${name(node.tenants[i])}@${node.tenants[i + 1]}`);
      lines.push(`${depth} ${JSON.stringify(node.label)} ${node.cpLen} [${t.join(' ')}] ${name(node.lastTenant)}`);
      if (node.children !== null) for (const [key, child] of node.children) {
        if (key !== child.label.codePointAt(0)) lines.push(`  bad key ${key}`);
        if (child.parent !== node) lines.push('  bad parent');
        walk(child, depth + 1);
      }
    };
    walk(this.root, 0);
    lines.push(`counts ${[...this.tenantIds].map(([n, id]) => `${n}=${this.charCounts[id]}`).join(' ')}`);
    return lines.join('\n');
  }

  /** Registered tenants, in registration order. */
  tenants(): string[] {
    return [...this.tenantIds.keys()];
  }

  /** Characters (code points) held by a tenant; 0 for an unknown tenant. */
  tenantCharCount(tenant: string): number {
    const id = this.tenantIds.get(tenant);
    return id === undefined ? 0 : this.charCounts[id];
  }

  /** Characters held per tenant, as maintained incrementally. */
  tenantCharCounts(): Map<string, number> {
    const out = new Map<string, number>();
    for (const [name, id] of this.tenantIds) out.set(name, this.charCounts[id]);
    return out;
  }

  /** Characters per tenant recomputed by a full walk (a consistency check for tests). */
  recountTenantChars(): Map<string, number> {
    const out = new Map<string, number>();
    for (const node of this.preorder()) {
      const t = node.tenants;
      for (let i = 0; i < t.length; i += 2) {
        const name = this.tenantNames[t[i]]!;
        out.set(name, (out.get(name) ?? 0) + node.cpLen);
      }
    }
    return out;
  }

  /**
   * Rough V8 heap footprint of the tree in bytes, by a walk over all nodes (O(nodes); meant for
   * occasional metrics). Object sizes are those of 64-bit Node.js builds (8-byte fields, no
   * pointer compression); label text counts 1 byte per unit when Latin-1, else 2.
   */
  memoryBytes(): number {
    let bytes = 0;
    for (const node of this.preorder()) {
      bytes += 72; // the node object
      bytes += 48 + 8 * node.tenants.length; // tenant array and its backing store
      bytes += 32 + node.label.length * (NON_LATIN1.test(node.label) ? 2 : 1); // label
      const children = node.children;
      if (children !== null) {
        let capacity = 4; // ordered hash table: 28 bytes per slot, power-of-two capacity
        while (capacity < children.size) capacity *= 2;
        bytes += 72 + 28 * capacity;
      }
    }
    return bytes;
  }

  private register(tenant: string): number {
    const id = this.freeIds.pop() ?? this.tenantNames.length;
    this.tenantIds.set(tenant, id);
    this.tenantNames[id] = tenant;
    this.charCounts[id] = 0;
    this.root.tenants.push(id, 0);
    return id;
  }

  private unlink(node: Node): void {
    const parent = node.parent!;
    const siblings = parent.children!;
    siblings.delete(node.label.codePointAt(0)!);
    if (siblings.size === 0) parent.children = null;
    node.parent = null;
    this.nodes--;
    this.chars -= node.cpLen;
  }

  private preorder(): Node[] {
    const out: Node[] = [];
    const stack: Node[] = [this.root];
    while (stack.length > 0) {
      const node = stack.pop()!;
      out.push(node);
      if (node.children !== null) for (const child of node.children.values()) stack.push(child);
    }
    return out;
  }
}
