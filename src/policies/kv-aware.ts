import { CharTree, codePointLength } from '../cache/char-tree.js';
import { TreesByModel } from '../cache/trees-by-model.js';
import { hashBlocks, loraSeed, sequenceHashes, type BlockIndex } from '../cache/block-index.js';
import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { KeyCounts } from './key-counts.js';
import { describeAll, noneAvailable, round, type RouteExplanation } from './explain.js';
import { available, BasePolicy, type PeerRoutingEvent, type PolicyDeps, type RoutedRecord, type TextTreeStats } from './policy.js';

/** What kv_aware reads from the KV-event side: the index and each worker's event freshness. */
export interface KvIndexView {
  readonly index: BlockIndex;
  /** Policy-clock time of the last event batch applied for this worker; undefined if none ever. */
  lastEventAtMs(workerId: string): number | undefined;
  /** False while the worker's entries are known to be incomplete (e.g. a gap replay could not repair). */
  isAccurate(workerId: string): boolean;
  /**
   * Times the worker's cache was emptied (AllBlocksCleared, engine restart). When it changes the
   * policy forgets its routing history for that worker too: the engine said its cache is empty.
   */
  resetCount(workerId: string): number;
}

export interface KvAwareConfig {
  /** Weight of the prefill still needed against the blocks already active (Dynamo: 1.0). */
  overlapWeight: number;
  /** Weight of the blocks in-flight requests occupy (decode load) next to their pending prefill. */
  activeWeight: number;
  /** 0 = argmin; > 0 samples a softmax over normalised costs. */
  temperature: number;
  /**
   * A worker whose last event batch is older than its last finished request by more than this
   * is treated as stale (its events stopped arriving) and routed on the approximate tree.
   */
  staleAfterMs: number;
  /**
   * How much the routing history counts next to the engines' events (0 = events only, 1 = a
   * block sent to a worker before counts as held there even after the engine evicted it).
   */
  historyWeight: number;
  /**
   * A prefix block the worker holds only in host memory (CPU offload tier) counts this much of a
   * GPU block in its overlap; on disk/remote storage, `diskHitWeight` (Dynamo: 0.75 and 0.25).
   * Needs `--kv-events-mediums separate` (tier events indexed); 0 = not credited.
   */
  hostHitWeight: number;
  diskHitWeight: number;
  /** Block size when the index has not learnt it from events yet. */
  defaultBlockSize: number;
  /** Approximate fallback tree: characters kept per worker. */
  maxTreeSize: number;
  evictionIntervalSecs: number;
}

export const defaultKvAwareConfig: KvAwareConfig = {
  overlapWeight: 4,
  activeWeight: 0.1,
  temperature: 0,
  staleAfterMs: 5000,
  historyWeight: 1,
  hostHitWeight: 0.75,
  diskHitWeight: 0.25,
  defaultBlockSize: 16,
  maxTreeSize: 67_108_864,
  evictionIntervalSecs: 120,
};

interface Active {
  /** blockKeys() of the request's sequence hashes. */
  blockKeys: Int32Array;
  prefillTokens: number;
}

interface WorkerState {
  active: Map<string, Active>;
  /** Refcounts of the block keys of active requests' blocks (shared prefixes counted once). */
  blocks: KeyCounts;
  pendingPrefillTokens: number;
  lastCompletionMs: number;
}

/** What peer replicas have in flight on one worker (replica sync; blocks not deduplicated). */
interface PeerLoad {
  blocks: number;
  pendingPrefillTokens: number;
}

interface PeerActive {
  workerId: string;
  blocks: number;
  prefillTokens: number;
}

export interface KvDecision {
  worker: Worker;
  overlapBlocks: number;
  requestBlocks: number;
  cost: number;
  /** The chosen worker's overlap came from the approximate tree (no fresh events). */
  fallback: boolean;
}

/** What kv_aware measured about one candidate (overlap in blocks, and where it came from). */
export interface KvCandidate {
  overlap: number;
  fallback: boolean;
  indexed: number;
  history: number;
  pending: number;
  prefillBlocks: number;
  active: number;
  newBlocks: number;
}

/** One scoring pass over the available workers (shared with slo_aware). */
export interface KvScore {
  costs: number[];
  meta: KvCandidate[];
  requestBlocks: number;
  inputTokens: number;
  bs: number;
  /** blockKeys() of the request's sequence hashes. */
  keys: Int32Array;
  textChars: number;
  tree: CharTree;
  text: string;
}

/**
 * Precise KV-cache-aware routing from the engines' own KV events (NVIDIA Dynamo's cost model,
 * with kvgate's own tracking of what it routed).
 *
 * For each available worker (each data-parallel rank is its own worker):
 *   overlap   = consecutive prefix blocks of the request the worker holds (block index)
 *   prefill   = this request's blocks still to compute there (blocks − overlap)
 *   active    = distinct blocks of its in-flight requests + this request's blocks not among them
 *               + the prefill its in-flight requests still have to do (in blocks)
 *   cost      = overlapWeight × prefill + active
 * Lowest cost wins; ties go to the emptier cache (fewer indexed blocks), then at random.
 * With temperature > 0 the choice is sampled from softmax(−cost / (max − min) / T).
 * In-flight tracking: added on routing, prefill marked done at the first streamed token, freed
 * when the request ends. Workers whose events are absent or stale use an approximate character
 * tree of routing history for their overlap, and the decision says so. A worker's overlap also
 * counts the request's leading blocks that its in-flight requests are computing right now: they
 * will be cached there before this request's prefill reaches them, but their events have not
 * arrived yet.
 */
export class KvAwarePolicy extends BasePolicy {
  readonly name: string = 'kv_aware';
  readonly needsTokens = true;
  protected readonly state = new Map<string, WorkerState>();
  /** Routing history per model (and per adapter of a model). */
  private readonly trees: TreesByModel;
  private readonly seenResets = new Map<string, number>();
  /** Peer replicas' in-flight requests, by origin then request id, and their sum per worker. */
  private readonly peerActive = new Map<string, Map<string, PeerActive>>();
  protected readonly peerLoad = new Map<string, PeerLoad>();
  /** The last decision (for metrics and tests). */
  lastDecision: KvDecision | undefined;

  constructor(
    deps: PolicyDeps,
    private readonly view: KvIndexView,
    readonly config: KvAwareConfig = defaultKvAwareConfig,
  ) {
    super(deps);
    this.trees = new TreesByModel(config.maxTreeSize, config.evictionIntervalSecs, deps.schedule);
  }

  /** Whether a worker's KV events can be trusted now. */
  isFresh(workerId: string): boolean {
    const last = this.view.lastEventAtMs(workerId);
    if (last === undefined || !this.view.isAccurate(workerId)) return false;
    const completed = this.state.get(workerId)?.lastCompletionMs ?? -Infinity;
    return completed - last <= this.config.staleAfterMs;
  }

  /** The block size and seed score() hashes with: a tokenizer thread computes ctx.blockHashes with them. */
  blockHashing(ctx: RequestContext): { blockSize: number; seed: bigint } {
    return { blockSize: this.view.index.blockSize ?? this.config.defaultBlockSize, seed: loraSeed(ctx.loraName) };
  }

  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined {
    const healthy = available(candidates);
    if (healthy.length === 0) return undefined;
    const sc = this.score(healthy, ctx, false);
    const i = this.choose(healthy, sc, ctx);
    this.commit(healthy, sc, i, ctx);
    return healthy[i];
  }

  /** Index of the chosen worker among `healthy` (kv_aware: lowest cost, or a softmax sample). */
  protected choose(healthy: readonly Worker[], sc: KvScore, _ctx: RequestContext): number {
    return this.config.temperature > 0 ? this.sample(sc.costs) : this.argmin(healthy, sc.costs);
  }

  /** Records the decision: observer, in-flight accounting, routing history, replica share. */
  protected commit(healthy: readonly Worker[], sc: KvScore, i: number, ctx: RequestContext): void {
    const { costs, meta, requestBlocks, inputTokens, bs, keys, textChars, tree, text } = sc;
    const chosen = healthy[i];
    this.lastDecision = { worker: chosen, overlapBlocks: meta[i].overlap, requestBlocks, cost: costs[i], fallback: meta[i].fallback };
    const observer = this.deps.observer;
    observer?.kvDecision?.(chosen, meta[i].overlap, requestBlocks, meta[i].fallback);
    if (observer?.avoidablePrefill) {
      // Blocks another available worker held by its engine's own (fresh) events, beyond what the chosen one has.
      let heldElsewhere = 0;
      for (let k = 0; k < healthy.length; k++) if (k !== i && !meta[k].fallback && meta[k].indexed > heldElsewhere) heldElsewhere = meta[k].indexed;
      const avoidable = Math.min(inputTokens, heldElsewhere * bs) - Math.min(inputTokens, meta[i].overlap * bs);
      if (avoidable > 0) observer.avoidablePrefill(chosen, ctx, { tokens: avoidable });
    }
    const prefillTokens = Math.max(0, inputTokens - meta[i].overlap * bs);
    this.track(chosen, ctx.requestId, keys, prefillTokens);
    if (textChars > 0) tree.insert(text, chosen.id);
    // The tree key (model, or model + adapter) goes to peers as the record's model: they insert under the same key.
    const treeKey = ctx.loraName ? `${ctx.model}\u0000lora:${ctx.loraName}` : ctx.model;
    this.deps.share?.routed({ model: treeKey, workerId: chosen.id, requestId: ctx.requestId, text: textChars > 0 ? text : undefined, blocks: requestBlocks, prefillTokens });
  }

  /**
   * Per available worker: overlap (and where it came from), new blocks, active load and cost.
   * `readOnly` (explanations): no LRU touches and no forgetting of history on engine resets (a
   * worker whose cache was reset since the last decision is scored with no history instead).
   */
  protected score(healthy: readonly Worker[], ctx: RequestContext, readOnly: boolean): KvScore {
    const bs = this.view.index.blockSize ?? this.config.defaultBlockSize;
    const tokens = ctx.tokenIds;
    const text = ctx.routingText;
    // Without token ids (no tokenizer for this model) every worker is judged on the text tree.
    // A LoRA request's blocks are keyed by its adapter, as the engines key them.
    // Block hashes: those the tokenizer thread computed with the tokens when they are for this
    // block size and seed (the usual case: off the event loop), else computed here.
    const seed = loraSeed(ctx.loraName);
    const given = tokens ? ctx.blockHashes : undefined;
    const reuse = given !== undefined && given.blockSize === bs && given.seed === seed && given.local.length === Math.floor(tokens!.length / bs);
    const local: ArrayLike<bigint> = reuse ? given.local : tokens ? hashBlocks(tokens, bs, seed) : [];
    const inputTokens = tokens ? tokens.length : Math.ceil(codePointLength(text) / 4);
    const requestBlocks = Math.ceil(inputTokens / bs);
    // In-flight blocks are tracked by number keys, not bigints (see blockKeys).
    const keys = blockKeys(reuse ? given.seq : sequenceHashes(local));
    const fullBlocks = Math.floor(inputTokens / bs);
    const overlaps = tokens
      ? this.view.index.matchTiered(local, { host: this.config.hostHitWeight ?? 0, disk: this.config.diskHitWeight ?? 0 }, readOnly ? { touch: false } : undefined)
      : new Map<string, number>();
    // Routing history per model, and per adapter of a model (peers get the same key).
    const treeKey = ctx.loraName ? `${ctx.model}\u0000lora:${ctx.loraName}` : ctx.model;
    const tree = readOnly ? (this.trees.existing(treeKey) ?? new CharTree()) : this.trees.tree(treeKey);
    const textChars = text.length > 0 ? codePointLength(text) : 0;

    const costs: number[] = [];
    const meta: KvCandidate[] = [];
    for (const w of healthy) {
      const resets = this.view.resetCount(w.id);
      let reset = false;
      if ((this.seenResets.get(w.id) ?? 0) !== resets) {
        reset = true;
        if (!readOnly) {
          this.seenResets.set(w.id, resets);
          this.trees.removeTenant(w.id);
        }
      }
      const fresh = tokens !== undefined && this.isFresh(w.id);
      const s = this.state.get(w.id);
      // Routing history (approximate): blocks of this request that went to this worker before.
      const history = textChars > 0 && !(readOnly && reset) ? Math.floor((tree.prefixMatchTenant(text, w.id, !readOnly) / textChars) * fullBlocks) : 0;
      const indexed = overlaps.get(w.id) ?? 0;
      let overlap: number;
      if (fresh) {
        // The engine's own events say what it holds now. History adds affinity: a prefix the
        // engine has evicted is still best re-warmed where it lived, so prefixes stay on one
        // worker instead of spreading over all of them (which wastes the cluster's cache).
        overlap = Math.max(indexed, Math.floor(this.config.historyWeight * history));
      } else overlap = history;
      // Blocks that requests in flight on this worker are computing now will be in its cache
      // before this request's prefill gets there: count them as overlap too (their events have
      // not arrived yet, so the index cannot know).
      let pending = 0;
      if (s && s.blocks.size > 0) {
        while (pending < keys.length && s.blocks.has(keys[pending])) pending++;
        if (pending > overlap) overlap = pending;
      }
      const uncached = Math.max(0, inputTokens - overlap * bs);
      // Sequence hashes are chained: an in-flight request holding block k of this sequence
      // holds every block before it. So the blocks in flight here are exactly the leading
      // `pending` ones, and the rest (with the trailing partial block) are new.
      const newBlocks = requestBlocks - pending;
      // Load already on the worker: the blocks its in-flight requests occupy plus the prefill
      // they still have to do, and what this request adds.
      // Peer replicas' requests on this worker count too (their blocks are not deduplicated).
      const peer = this.peerLoad.get(w.id);
      const active =
        this.config.activeWeight * ((s?.blocks.size ?? 0) + (peer?.blocks ?? 0) + newBlocks) +
        ((s?.pendingPrefillTokens ?? 0) + (peer?.pendingPrefillTokens ?? 0)) / bs;
      costs.push((this.config.overlapWeight * uncached) / bs + active);
      meta.push({ overlap, fallback: !fresh, indexed: fresh ? indexed : 0, history, pending, prefillBlocks: uncached / bs, active, newBlocks });
    }
    return { costs, meta, requestBlocks, inputTokens, bs, keys, textChars, tree, text };
  }

  /** Per candidate: overlap (index, history, in-flight), prefill blocks, active load, cost; the argmin or softmax. */
  explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
    const described = describeAll(candidates, this.deps.clock.now());
    const healthy = available(candidates);
    if (healthy.length === 0) return noneAvailable(this.name, described);
    const { costs, meta, requestBlocks, inputTokens, bs } = this.score(healthy, ctx, true);
    const cfg = this.config;
    const byId = new Map(described.map((c) => [c.worker, c]));
    for (let k = 0; k < healthy.length; k++) {
      const c = byId.get(healthy[k].id)!;
      const m = meta[k];
      c.matchedBlocks = m.overlap;
      c.cost = round(costs[k]);
      c.terms = {
        source: m.fallback ? 'history' : 'events',
        indexed_blocks: m.indexed,
        history_blocks: m.history,
        in_flight_prefix_blocks: m.pending,
        prefill_blocks: round(m.prefillBlocks),
        prefill_term: round(cfg.overlapWeight * m.prefillBlocks),
        active_term: round(m.active),
        new_blocks: m.newBlocks,
      };
    }
    const input = { tokens: inputTokens, blocks: requestBlocks, blockSize: bs, chars: ctx.routingText.length };
    const formula = `cost = ${cfg.overlapWeight} × prefill blocks + active (${cfg.activeWeight} × blocks in flight + pending prefill)`;
    if (cfg.temperature > 0) {
      const min = Math.min(...costs);
      const span = Math.max(...costs) - min || 1;
      const weights = costs.map((x) => Math.exp(-((x - min) / span) / cfg.temperature));
      const total = weights.reduce((a, b) => a + b, 0);
      for (let k = 0; k < healthy.length; k++) byId.get(healthy[k].id)!.probability = round(weights[k] / total, 4);
      return { policy: this.name, chosen: undefined, rule: 'softmax', detail: `${formula}; sampled from softmax(−cost, temperature ${cfg.temperature})`, deterministic: false, input, candidates: described };
    }
    let best = Infinity;
    for (const x of costs) if (x < best) best = x;
    const ties = healthy.filter((_, k) => Math.abs(costs[k] - best) <= 1e-9);
    let chosen = ties[0];
    let deterministic = true;
    if (ties.length > 1) {
      const fewest = Math.min(...ties.map((w) => this.view.index.blocksOf(w.id)));
      const emptiest = ties.filter((w) => this.view.index.blocksOf(w.id) === fewest);
      chosen = emptiest[0];
      deterministic = emptiest.length === 1;
    }
    const detail = `${formula}; lowest cost ${round(best)}${deterministic ? '' : ` (tie among ${ties.length}: one is drawn at random)`}`;
    return { policy: this.name, chosen: deterministic ? chosen.id : undefined, rule: 'lowest_cost', detail, deterministic, input, candidates: described };
  }

  onFirstToken(worker: Worker, ctx: RequestContext): void {
    const s = this.state.get(worker.id);
    const a = s?.active.get(ctx.requestId);
    if (!s || !a || a.prefillTokens === 0) return;
    s.pendingPrefillTokens -= a.prefillTokens;
    a.prefillTokens = 0;
    this.deps.share?.firstToken(worker.id, ctx.requestId);
  }

  onRequestComplete(worker: Worker, ctx: RequestContext): void {
    const s = this.state.get(worker.id);
    if (!s) return;
    s.lastCompletionMs = this.deps.clock.now();
    const a = s.active.get(ctx.requestId);
    if (!a) return;
    this.deps.share?.completed(worker.id, ctx.requestId);
    s.active.delete(ctx.requestId);
    s.pendingPrefillTokens -= a.prefillTokens;
    for (let k = 0; k < a.blockKeys.length; k++) s.blocks.release(a.blockKeys[k]);
  }

  applyPeer(origin: string, event: PeerRoutingEvent): void {
    if (event.kind === 'routed') {
      const { rec } = event;
      this.trees.insertRouted(rec, true);
      if (rec.requestId === undefined) return;
      let mine = this.peerActive.get(origin);
      if (!mine) this.peerActive.set(origin, (mine = new Map()));
      if (mine.has(rec.requestId)) return;
      const a: PeerActive = { workerId: rec.workerId, blocks: rec.blocks ?? 0, prefillTokens: rec.prefillTokens ?? 0 };
      mine.set(rec.requestId, a);
      this.addPeerLoad(a, 1);
      return;
    }
    const mine = this.peerActive.get(origin);
    const a = mine?.get(event.requestId);
    if (!mine || !a) return;
    if (event.kind === 'first_token') {
      this.addPeerLoad({ ...a, blocks: 0 }, -1);
      a.prefillTokens = 0;
    } else {
      mine.delete(event.requestId);
      this.addPeerLoad(a, -1);
    }
  }

  forgetPeer(origin: string): void {
    const mine = this.peerActive.get(origin);
    if (!mine) return;
    for (const a of mine.values()) this.addPeerLoad(a, -1);
    this.peerActive.delete(origin);
  }

  *exportHistory(): Iterable<RoutedRecord> {
    yield* this.trees.history();
  }

  /** The routing history's trees (characters per worker, insert-time trims). */
  textTrees(): TextTreeStats {
    return this.trees.stats();
  }

  private addPeerLoad(a: PeerActive, sign: 1 | -1): void {
    let p = this.peerLoad.get(a.workerId);
    if (!p) this.peerLoad.set(a.workerId, (p = { blocks: 0, pendingPrefillTokens: 0 }));
    p.blocks += sign * a.blocks;
    p.pendingPrefillTokens += sign * a.prefillTokens;
    if (p.blocks <= 0 && p.pendingPrefillTokens <= 0) this.peerLoad.delete(a.workerId);
  }

  onWorkerRemoved(worker: Worker): void {
    this.state.delete(worker.id);
    this.trees.removeTenant(worker.id);
  }

  close(): void {
    this.trees.close();
  }

  /** In-flight view of a worker (for metrics and tests). */
  activeOf(workerId: string): { requests: number; blocks: number; pendingPrefillTokens: number } {
    const s = this.state.get(workerId);
    return { requests: s?.active.size ?? 0, blocks: s?.blocks.size ?? 0, pendingPrefillTokens: s?.pendingPrefillTokens ?? 0 };
  }

  /** What peer replicas have in flight on a worker, as this replica was told (replica sync). */
  peerActiveOf(workerId: string): { blocks: number; pendingPrefillTokens: number } {
    const p = this.peerLoad.get(workerId);
    return { blocks: p?.blocks ?? 0, pendingPrefillTokens: p?.pendingPrefillTokens ?? 0 };
  }

  private track(worker: Worker, requestId: string, keys: Int32Array, prefillTokens: number): void {
    let s = this.state.get(worker.id);
    if (!s) {
      s = { active: new Map(), blocks: new KeyCounts(), pendingPrefillTokens: 0, lastCompletionMs: -Infinity };
      this.state.set(worker.id, s);
    }
    s.active.set(requestId, { blockKeys: keys, prefillTokens });
    s.pendingPrefillTokens += prefillTokens;
    for (let k = 0; k < keys.length; k++) s.blocks.add(keys[k]);
  }

  private argmin(ws: readonly Worker[], costs: number[]): number {
    let best = Infinity;
    let ties: number[] = [];
    for (let i = 0; i < costs.length; i++) {
      if (costs[i] < best - 1e-9) {
        best = costs[i];
        ties = [i];
      } else if (Math.abs(costs[i] - best) <= 1e-9) ties.push(i);
    }
    return this.breakTie(ws, ties);
  }

  /**
   * One of `ties` (indices into `ws`, equally good by the caller's criteria): the emptier cache
   * (fewer indexed blocks: placing there evicts the least), then at random (`draw`; without it,
   * the first — explanations do not draw). Never the lowest index by default: that would send
   * every tie to the same worker and load its cache with the most new blocks.
   */
  protected breakTie(ws: readonly Worker[], ties: readonly number[], draw = true, onDraw?: (group: number[]) => void): number {
    if (ties.length === 1) return ties[0];
    let fewest = Infinity;
    let emptiest: number[] = [];
    for (const i of ties) {
      const blocks = this.view.index.blocksOf(ws[i].id);
      if (blocks < fewest) {
        fewest = blocks;
        emptiest = [i];
      } else if (blocks === fewest) emptiest.push(i);
    }
    if (emptiest.length > 1) onDraw?.(emptiest);
    return emptiest.length === 1 || !draw ? emptiest[0] : emptiest[this.deps.rng.int(emptiest.length)];
  }

  private sample(costs: number[]): number {
    const min = Math.min(...costs);
    const span = Math.max(...costs) - min || 1;
    const weights = costs.map((c) => Math.exp(-((c - min) / span) / this.config.temperature));
    const total = weights.reduce((a, b) => a + b, 0);
    let r = this.deps.rng.next() * total;
    for (let i = 0; i < weights.length; i++) {
      r -= weights[i];
      if (r <= 0) return i;
    }
    return weights.length - 1;
  }

}

/**
 * Keys for in-flight block bookkeeping: 30 bits of each sequence hash, as a small integer.
 * A 100k-token prompt has ~6,000 blocks that are tracked when routed and released when done.
 * Map operations on bigint keys hash the bigint anew on every call, and numbers beyond 31 bits
 * are boxed (one allocation per key); small integers are neither, so the bookkeeping costs a
 * fraction of the event-loop time. Read straight from the hashes' bytes: no bigint is made.
 * Two blocks sharing a key (2^-30 per pair) would only blur a load estimate by one block.
 */
export function blockKeys(seq: BigUint64Array): Int32Array {
  // The low 32-bit word of each 64-bit hash (its first on little-endian hosts).
  const u32 = new Uint32Array(seq.buffer, seq.byteOffset, seq.length * 2);
  const low = LITTLE_ENDIAN ? 0 : 1;
  const out = new Int32Array(seq.length);
  for (let k = 0; k < seq.length; k++) out[k] = u32[2 * k + low] & 0x3fffffff;
  return out;
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
