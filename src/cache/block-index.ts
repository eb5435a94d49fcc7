/**
 * Exact prefix-cache index fed by engine KV events (vLLM / SGLang `BlockStored`,
 * `BlockRemoved`, `AllBlocksCleared`), after Dynamo's KV router (`RadixTree` in
 * ai-dynamo/dynamo `lib/kv-router`).
 *
 * Two kinds of block hash meet here:
 *  - LOCAL hashes, computed by the router: xxh3-64 (seed 1337) of one full block's tokens as
 *    u32 little-endian, exactly Dynamo's `LocalBlockHash`. They are content hashes, independent
 *    of position; the position of a block is its depth in the tree. The tree is keyed by them,
 *    so a request (hashed with {@link hashBlocks}) and an engine's blocks meet on the same path
 *    whatever hash function, seed or extra keys the engine uses.
 *  - ENGINE ("external") hashes, opaque u64 ids chosen by the engine. They are used only to find
 *    the parent of a stored run and the block a removal names, through a per-source map
 *    engineHash → node. They are never used for matching.
 *
 * Hybrid models (vLLM, one KV-cache group per attention kind, publishing the same block hashes
 * per group with `group_idx` / `kv_cache_spec_kind`): a source keys engine hashes by
 * (group, hash), so each group holds its own reference and one group's eviction never drops
 * another's; groups whose kind is not full attention (sliding window, Mamba) are ignored, since a
 * prefix is reusable only while the full-attention group holds it, and they never set or check
 * the block size.
 *
 * A source is one KV cache: a (worker, dp rank) pair, named by a string key such as
 * `http://host:8000@1`. Blocks stored in another medium (CPU_PINNED, DISK, ...) either are
 * ignored or live under the sub-source `<source>#<medium>`, which `match` leaves out unless
 * asked, so they never count as GPU hits.
 *
 * Representation and costs:
 *  - Hashing is one @node-rs/xxhash call per block (~200-250 ns, mostly call overhead), so a
 *    100k-token prompt costs a few milliseconds; with tokenizer threads (tokenize/pool.ts) the
 *    thread that computed the tokens also hashes them ({@link hashBlocksU64},
 *    {@link sequenceHashes}) and the event loop only matches.
 *  - A node holds its local hash (`key`), its parent, its children (`child` when it has exactly
 *    one, else the map `kids`: most of the tree is chains, and a one-entry Map costs ~10x a
 *    field), a last-touched clock for LRU pruning, a bit mask of the sources holding it and
 *    `ext`, the flattened list of the (sourceId, engineHash) pairs that map to it. A source
 *    holds the node iff it has a pair there (a source may map several engine hashes to one
 *    node; each is a reference).
 *    Invariant: pair (s, h) is in node.ext  ⇔  source s's map has h → node.
 *  - Sources are interned to small integer ids (reused after removeSource).
 *  - Maps are keyed by the bigint hashes directly: measured on Node 20, a 100k-entry Map is
 *    about as fast with bigint keys as with number keys (~50-60 ns/get, cache-miss bound), and
 *    turning a u64 into a number or string costs more than it saves. Matching does no bigint
 *    arithmetic: a step is one child lookup (a field compare for chain nodes) plus an AND of
 *    the still-matching source mask with the node's mask. With more than 30 source ids ever in
 *    use, it intersects id lists instead (stamping a per-source Int32Array, skipping nodes
 *    whose holder list equals the previous node's).
 *  - Memory bound: past `maxBlocks` nodes, least-recently-used LEAVES are pruned (min-heap over
 *    the clock of every leaf, pushing a parent when it becomes a leaf) down to
 *    `pruneTarget · maxBlocks`. Done in bulk, so it is amortised O(log n) per stored block.
 *    ~230 heap bytes per node with one engine-hash reference (see memoryBytes()).
 */

import { xxh3 } from '@node-rs/xxhash';
import type { KvCacheEvent } from '../events/types.js';

/** Dynamo's seed for local block hashes. */
export const LOCAL_HASH_SEED = 1337n;

const U64 = (1n << 64n) - 1n;

const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** Scratch buffer for one block (bytes = 4 · blockSize), reused across calls. */
let scratchBlockSize = 0;
let scratchBuf: Buffer = Buffer.alloc(0);
let scratchU32: Uint32Array = new Uint32Array(0);

function nativeHash(tokens: ArrayLike<number>, blockSize: number, n: number, seed: bigint): bigint[] {
  if (scratchBlockSize !== blockSize) {
    const ab = new ArrayBuffer(blockSize * 4);
    scratchBuf = Buffer.from(ab);
    scratchU32 = new Uint32Array(ab);
    scratchBlockSize = blockSize;
  }
  const buf = scratchBuf;
  const u32 = scratchU32;
  const out = new Array<bigint>(n);
  let off = 0;
  for (let b = 0; b < n; b++) {
    if (LITTLE_ENDIAN) {
      for (let j = 0; j < blockSize; j++) u32[j] = tokens[off + j];
    } else {
      for (let j = 0; j < blockSize; j++) buf.writeUInt32LE(tokens[off + j] >>> 0, j * 4);
    }
    out[b] = xxh3.xxh64(buf, seed);
    off += blockSize;
  }
  return out;
}

function blockCount(tokens: ArrayLike<number>, blockSize: number): number {
  if (!Number.isInteger(blockSize) || blockSize <= 0) throw new RangeError(`blockSize must be a positive integer, got ${blockSize}`);
  return Math.floor(tokens.length / blockSize);
}

/**
 * Local (router-side) hashes of every FULL block of `tokens`: xxh3-64 (@node-rs/xxhash) with
 * `seed` (default 1337) over the block's tokens encoded as u32 little-endian. A trailing partial
 * block is ignored. Identical to Dynamo's `LocalBlockHash` (`compute_block_hash_for_seq` without
 * multimodal info). Tokens are coerced to u32 the way a Uint32Array stores them; the seed is
 * taken modulo 2^64. Throws RangeError if blockSize is not a positive integer.
 */
export function hashBlocks(tokens: ArrayLike<number>, blockSize: number, seed: bigint = LOCAL_HASH_SEED): bigint[] {
  const n = blockCount(tokens, blockSize);
  return n === 0 ? [] : nativeHash(tokens, blockSize, n, seed === LOCAL_HASH_SEED ? seed : BigInt.asUintN(64, seed));
}

/**
 * {@link hashBlocks} into a BigUint64Array (transferable between threads, no BigInt objects per
 * block): the same values.
 */
export function hashBlocksU64(tokens: ArrayLike<number>, blockSize: number, seed: bigint = LOCAL_HASH_SEED): BigUint64Array {
  const n = blockCount(tokens, blockSize);
  const out = new BigUint64Array(n);
  if (n === 0) return out;
  const hashes = nativeHash(tokens, blockSize, n, seed === LOCAL_HASH_SEED ? seed : BigInt.asUintN(64, seed));
  for (let i = 0; i < n; i++) out[i] = hashes[i];
  return out;
}

const seqBuf = Buffer.alloc(16);

/**
 * Chained sequence hashes (position-aware) of a request's local block hashes: the first is the
 * first local hash, then xxh3-64 (seed 1337) of (previous, local) as two u64 little-endian. Used
 * by kv_aware to deduplicate the blocks of requests in flight.
 */
export function sequenceHashes(local: ArrayLike<bigint>): BigUint64Array {
  const out = new BigUint64Array(local.length);
  let prev = 0n;
  for (let i = 0; i < local.length; i++) {
    seqBuf.writeBigUInt64LE(prev, 0);
    seqBuf.writeBigUInt64LE(local[i], 8);
    prev = i === 0 ? local[0] : xxh3.xxh64(seqBuf, LOCAL_HASH_SEED);
    out[i] = prev;
  }
  return out;
}

const loraSeeds = new Map<string, bigint>();

/**
 * Hash seed for blocks computed under a LoRA adapter: `1337 wrapping_add xxh3_64(utf8(name))`
 * (the convention of a Dynamo-compatible reimplementation; current Dynamo passes the LoRA name
 * in its hash options). null/empty name → 1337. Blocks of different adapters, or of an adapter
 * and the base model, therefore never share a path.
 */
export function loraSeed(loraName: string | null | undefined): bigint {
  if (loraName == null || loraName === '') return LOCAL_HASH_SEED;
  let s = loraSeeds.get(loraName);
  if (s === undefined) {
    s = (LOCAL_HASH_SEED + xxh3.xxh64(Buffer.from(loraName, 'utf8'), 0n)) & U64;
    if (loraSeeds.size < 4096) loraSeeds.set(loraName, s);
  }
  return s;
}

/** KV-cache group kinds whose blocks alone make a reusable prefix (vLLM's KVCacheSpecKind values). */
const PREFIX_KINDS: ReadonlySet<string> = new Set(['full_attention', 'mla_attention', 'sink_full_attention']);

/**
 * A source's key for an engine hash: the hash itself for group 0 or no group (single-group
 * engines), else (group + 1) << 64 | hash. Each KV-cache group of a hybrid model then holds its
 * own reference to a block (they publish the same hashes), so one group's removal never drops
 * another's.
 */
function groupKey(group: number | null, h: bigint): bigint {
  return group === null || group === 0 ? h : (BigInt(group + 1) << 64n) | h;
}

/** Shared empty pair list; never mutated (see Node.ext). */
const EMPTY: Array<number | bigint> = [];

/**
 * Source ids below this get a bit in Node.mask (30 bits keep masks Smis). While every id in use
 * is below it, match() is pure bit arithmetic; otherwise it intersects id lists.
 */
const MASK_BITS = 30;

class Node {
  /** Sole child when the node has exactly one and `kids` is null. */
  child: Node | null = null;
  /** Children by local hash when there are two or more (then `child` is null). */
  kids: Map<bigint, Node> | null = null;
  /**
   * Flattened (sourceId, engineHash) pairs mapping to this node. Copy-on-write: every change
   * installs a new array of exact size (push would over-allocate ~17 slots per node).
   */
  ext: Array<number | bigint> = EMPTY;
  /** Bit i set iff source id i (< MASK_BITS) holds the node. */
  mask = 0;
  constructor(
    /** Local (content) hash of the block; 0n for the root. */
    public readonly key: bigint,
    public parent: Node | null,
    /** Clock of the last store or match that walked through the node. */
    public touch: number,
  ) {}
}

/** Storage tier of a KV medium: GPU (HBM), host memory, or disk/remote storage. */
export type KvTier = 'gpu' | 'host' | 'disk';

/**
 * Tier of a `medium` string as engines report it: null/"GPU" → gpu; "CPU", "CPU_PINNED",
 * "CPU_TIER1", "HOST", ... (vLLM's OffloadingConnector, SGLang HiCache's host pool) → host;
 * anything else ("DISK", "STORAGE", "EXTERNAL", "CPU_TIER2" = SGLang HiCache's storage layer,
 * LMCache backends) → disk.
 */
export function mediumTier(medium: string | null | undefined): KvTier {
  if (isGpu(medium)) return 'gpu';
  const m = (medium as string).toUpperCase();
  if (m === 'CPU_TIER2') return 'disk';
  if (m.startsWith('CPU') || m === 'HOST' || m === 'DRAM') return 'host';
  return 'disk';
}

/** Weights of blocks held only in host memory or on disk, next to a GPU block's 1 (kv_aware). */
export interface TierWeights {
  host: number;
  disk: number;
}

/**
 * The key an adapter's blocks are hashed under: its name, or `lora_id:<n>` when the engine sends
 * only the integer id (never matched by a request, which names adapters; but kept apart from the
 * base model's blocks). null = base model.
 */
export function loraKeyOf(loraName: string | null | undefined, loraId?: number | null): string | null {
  if (typeof loraName === 'string' && loraName !== '') return loraName;
  if (typeof loraId === 'number' && loraId > 0) return `lora_id:${loraId}`;
  return null;
}

interface SourceState {
  name: string;
  id: number;
  /** A `<source>#<medium>` sub-source: left out of match() by default. */
  medium: boolean;
  /** The source this (sub-)source belongs to: its own name for a GPU source. */
  base: string;
  tier: KvTier;
  /** Engine hash → node. */
  map: Map<bigint, Node>;
  /** Distinct nodes holding the source. */
  blocks: number;
}

export type MediumMode = 'gpu-only' | 'separate';

export interface BlockIndexOptions {
  /**
   * Tokens per block. When set, stored events with another block size are skipped and counted
   * (`blockSizeMismatch`); when omitted, the first valid stored event fixes it.
   */
  blockSize?: number;
  /** Non-GPU media (CPU_PINNED, DISK, ...): ignore them (default) or index them as `<source>#<medium>`. */
  mediums?: MediumMode;
  /** Upper bound on tree nodes (distinct block paths); default 1,000,000. */
  maxBlocks?: number;
  /** When over maxBlocks, prune LRU leaves down to floor(pruneTarget · maxBlocks); default 0.8. */
  pruneTarget?: number;
}

export interface MatchOptions {
  /** Also report `<source>#<medium>` sub-sources (default false: GPU caches only). */
  mediums?: boolean;
  /** false: a read-only look (explanations): the LRU stamps of the matched path stay as they are. */
  touch?: boolean;
}

export interface BlockIndexStats {
  /** Tree nodes (excluding the root). */
  nodes: number;
  /** Distinct blocks held per source key (sub-sources included). */
  blocksPerSource: Map<string, number>;
  /** Stored events whose parent engine hash the source had not stored (event skipped). */
  unknownParent: number;
  /** Removed block hashes the source did not hold (or that were pruned). */
  unknownRemoved: number;
  /** Events that failed validation: sizes, non-bigint hashes, self references, unknown type. */
  malformed: number;
  /** Stored events whose blockSize differs from the index's (skipped; also not in `malformed`). */
  blockSizeMismatch: number;
  /** Stored events with no token ids (e.g. CPU-offload stores), skipped. */
  noTokens: number;
  /** Stored/removed events in a non-GPU medium that the index ignored ('gpu-only'). */
  ignoredMedium: number;
  /**
   * Events of a KV-cache group that does not serve prefix reuse on its own (sliding-window,
   * Mamba: vLLM hybrid models), ignored: they neither add blocks nor remove the full-attention
   * group's, and never set or check the block size.
   */
  ignoredGroup: number;
  /** Nodes dropped by LRU pruning. */
  pruned: number;
  /** Rough heap footprint, see {@link BlockIndex.memoryBytes}. */
  memoryBytes: number;
}

/**
 * Approximate V8 heap costs on 64-bit Node without pointer compression (the default build),
 * calibrated with scripts/bench-index.mjs (heap growth / nodes): Node object 80 B + local-hash
 * BigInt 24 B + its `ext` array (JSArray 32 B + FixedArray header 16 B).
 */
const NODE_BYTES = 80 + 24 + 48;
/** One (source, engine hash) reference: 2 ext slots, the engine-hash BigInt, the source-map entry. */
const REF_BYTES = 16 + 24 + 40;
/** A children Map (nodes with ≥ 2 children), and each of its entries. */
const KIDS_MAP_BYTES = 160;
const KID_ENTRY_BYTES = 40;

function isGpu(medium: string | null | undefined): boolean {
  return medium == null || medium === 'GPU' || (typeof medium === 'string' && medium.toUpperCase() === 'GPU');
}

export class BlockIndex {
  private readonly root = new Node(0n, null, 0);
  private bs: number | null;
  private readonly mediumMode: MediumMode;
  private readonly maxBlocks: number;
  private readonly pruneTarget: number;

  private readonly byName = new Map<string, SourceState>();
  private readonly byId: Array<SourceState | undefined> = [];
  private readonly freeIds: number[] = [];
  /** Mask bits of the GPU (non-medium) sources. */
  private gpuMask = 0;

  private nodeCount = 0;
  /** `<source>#<medium>` sub-sources known. */
  private mediumSources = 0;
  private refCount = 0;
  private multiKid = 0;
  private multiKidEntries = 0;
  private clock = 0;

  /** Per-source stamps for match(); `stamp` increases per node visited. */
  private seen = new Int32Array(64);
  private stamp = 0;
  private readonly active: number[] = [];

  private unknownParent = 0;
  private unknownRemoved = 0;
  private malformed = 0;
  private blockSizeMismatch = 0;
  private ignoredGroup = 0;
  /** Per source: KV-cache groups known (from their stored events' kind) not to be full attention. */
  private readonly nonPrefixGroups = new Map<string, Set<number>>();
  private noTokens = 0;
  private ignoredMedium = 0;
  private pruned = 0;

  constructor(options: BlockIndexOptions = {}) {
    const bs = options.blockSize;
    this.bs = bs !== undefined && Number.isInteger(bs) && bs > 0 ? bs : null;
    this.mediumMode = options.mediums === 'separate' ? 'separate' : 'gpu-only';
    const max = options.maxBlocks;
    this.maxBlocks = max !== undefined && max >= 1 ? Math.floor(max) : 1_000_000;
    const target = options.pruneTarget;
    this.pruneTarget = target !== undefined && target >= 0 && target < 1 ? target : 0.8;
  }

  /** Tokens per block, or null while unknown (no blockSize option and no stored event yet). */
  get blockSize(): number | null {
    return this.bs;
  }

  // ---------------------------------------------------------------------------------------
  // Events

  /** Applies one source's events in order. Never throws: bad events are counted and skipped. */
  apply(source: string, events: readonly KvCacheEvent[]): void {
    if (!Array.isArray(events)) {
      this.malformed++;
      return;
    }
    for (let i = 0; i < events.length; i++) {
      const ev = events[i];
      try {
        if (ev === null || typeof ev !== 'object') this.malformed++;
        else if (ev.type === 'stored') {
          this.applyStored(source, ev);
          if (this.nodeCount > this.maxBlocks) this.prune(Math.floor(this.maxBlocks * this.pruneTarget));
        } else if (ev.type === 'removed') this.applyRemoved(source, ev);
        else if (ev.type === 'cleared') this.clearSource(source);
        else this.malformed++;
      } catch {
        this.malformed++;
      }
    }
  }

  private applyStored(source: string, ev: Extract<KvCacheEvent, { type: 'stored' }>): void {
    const hashes = ev.blockHashes;
    const tokens = ev.tokenIds;
    const bs = ev.blockSize;
    if (!Array.isArray(hashes) || !Array.isArray(tokens) || !Number.isInteger(bs) || bs <= 0) {
      this.malformed++;
      return;
    }
    const n = hashes.length;
    const parentHash = ev.parentBlockHash;
    if (parentHash != null && typeof parentHash !== 'bigint') {
      this.malformed++;
      return;
    }
    for (let i = 0; i < n; i++) {
      const h = hashes[i];
      if (typeof h !== 'bigint' || h === parentHash) {
        this.malformed++;
        return;
      }
    }
    if (hasDuplicate(hashes)) {
      this.malformed++;
      return;
    }
    const group = ev.groupIdx ?? null;
    if (group !== null && typeof ev.kvCacheSpecKind === 'string') {
      // Learn the group's kind (BlockRemoved carries only group_idx).
      let non = this.nonPrefixGroups.get(source);
      if (!PREFIX_KINDS.has(ev.kvCacheSpecKind)) {
        if (!non) this.nonPrefixGroups.set(source, (non = new Set()));
        non.add(group);
        this.ignoredGroup++;
        return;
      }
      non?.delete(group);
    }
    let st: SourceState;
    if (isGpu(ev.medium)) st = this.state(source, false);
    else if (this.mediumMode === 'separate' && typeof ev.medium === 'string') st = this.state(`${source}#${ev.medium}`, true);
    else {
      this.ignoredMedium++;
      return;
    }
    if (n === 0) return;
    if (tokens.length === 0) {
      // CPU/disk-offload stores (vLLM's OffloadingConnector) carry no tokens: the blocks are
      // ones this worker already stored, found by their engine hashes (llm-d's dual keys).
      if (st.medium && this.storeByEngineHash(source, st, group, hashes)) return;
      this.noTokens++;
      return;
    }
    if (tokens.length !== n * bs) {
      this.malformed++;
      return;
    }
    if (this.bs === null) this.bs = bs;
    else if (bs !== this.bs) {
      this.blockSizeMismatch++;
      return;
    }
    let node: Node | undefined = this.root;
    if (parentHash != null) {
      const pk = groupKey(group, parentHash);
      node = st.map.get(pk);
      // A tier's run may continue a block another tier of the same worker holds (same path).
      if (node === undefined && this.mediumSources > 0) for (const f of this.family(source)) if ((node = f.map.get(pk)) !== undefined) break;
      if (node === undefined) {
        this.unknownParent++;
        return;
      }
    }
    const lora = loraKeyOf(ev.loraName, ev.loraId);
    const local = hashBlocks(tokens, bs, lora === null ? LOCAL_HASH_SEED : loraSeed(lora));
    const t = ++this.clock;
    node.touch = t;
    for (let i = 0; i < n; i++) {
      node = this.childOrCreate(node, local[i], t);
      this.addRef(node, st, groupKey(group, hashes[i]));
    }
  }

  /**
   * A tokenless store in a sub-source: each engine hash is looked up in the worker's other
   * (sub-)sources; found ones are referenced by `st` too. False when none was found.
   */
  private storeByEngineHash(source: string, st: SourceState, group: number | null, hashes: readonly bigint[]): boolean {
    const family = this.family(source).filter((f) => f !== st);
    let found = 0;
    const t = ++this.clock;
    for (const h of hashes) {
      const key = groupKey(group, h);
      let node: Node | undefined;
      for (const f of family) if ((node = f.map.get(key)) !== undefined) break;
      if (node === undefined) continue;
      node.touch = t;
      this.addRef(node, st, key);
      found++;
    }
    if (found < hashes.length) this.unknownParent += hashes.length - found;
    return found > 0;
  }

  private applyRemoved(source: string, ev: Extract<KvCacheEvent, { type: 'removed' }>): void {
    const hashes = ev.blockHashes;
    if (!Array.isArray(hashes)) {
      this.malformed++;
      return;
    }
    const group = ev.groupIdx ?? null;
    if (group !== null && this.nonPrefixGroups.get(source)?.has(group)) {
      this.ignoredGroup++;
      return;
    }
    let name = source;
    if (!isGpu(ev.medium)) {
      if (this.mediumMode === 'separate' && typeof ev.medium === 'string') name = `${source}#${ev.medium}`;
      else {
        this.ignoredMedium++;
        return;
      }
    }
    const st = this.byName.get(name);
    for (let i = 0; i < hashes.length; i++) {
      const h = hashes[i];
      if (typeof h !== 'bigint') {
        this.malformed++;
        continue;
      }
      const key = groupKey(group, h);
      const node = st?.map.get(key);
      if (st === undefined || node === undefined) {
        this.unknownRemoved++;
        continue;
      }
      st.map.delete(key);
      this.dropPair(node, st, key);
      this.pruneUp(node);
    }
  }

  /** Drops every block of `source` and of its `<source>#<medium>` sub-sources; they stay known. */
  clearSource(source: string): void {
    for (const st of this.family(source)) this.clearState(st);
  }

  /** Forgets `source` and its `<source>#<medium>` sub-sources entirely. */
  removeSource(source: string): void {
    this.nonPrefixGroups.delete(source);
    for (const st of this.family(source)) {
      this.clearState(st);
      this.byName.delete(st.name);
      if (st.medium) this.mediumSources--;
      this.byId[st.id] = undefined;
      this.freeIds.push(st.id);
      if (st.id < MASK_BITS) this.gpuMask &= ~(1 << st.id);
    }
  }

  /** Known source keys (sub-sources included), in first-seen order. */
  /** The engine block hashes a source is known to hold (for checks against the engine's own state). */
  engineHashesOf(source: string): Set<bigint> {
    // Keys of groups > 0 carry the group above bit 64 (groupKey): report the engine hash alone.
    return new Set([...(this.byName.get(source)?.map.keys() ?? [])].map((k) => BigInt.asUintN(64, k)));
  }

  sources(): string[] {
    return [...this.byName.keys()];
  }

  /** Distinct blocks (tree nodes) held by `source`; 0 if unknown. Dynamo's `tree_sizes`. */
  blocksOf(source: string): number {
    return this.byName.get(source)?.blocks ?? 0;
  }

  // ---------------------------------------------------------------------------------------
  // Matching

  /**
   * For each source holding at least the first block, the number of CONSECUTIVE leading blocks
   * of `localHashes` it holds (Dynamo's `find_matches` scores). Sources with no match are absent.
   * Sub-sources `<source>#<medium>` are left out unless `options.mediums`. Touches the matched
   * path for LRU.
   */
  match(localHashes: ArrayLike<bigint>, options?: MatchOptions): Map<string, number> {
    const out = new Map<string, number>();
    const n = localHashes.length;
    if (n === 0 || this.nodeCount === 0) return out;
    let node = childOf(this.root, localHashes[0]);
    if (node === undefined) return out;
    const withMediums = options?.mediums === true;
    const touch = options?.touch !== false;
    if (this.byId.length <= MASK_BITS) return this.matchMasked(localHashes, node, withMediums, out, touch);
    const byId = this.byId;
    const active = this.active;
    active.length = 0;
    let stamp = this.nextStamp();
    let seen = this.seen;
    let ext = node.ext;
    for (let k = 0; k < ext.length; k += 2) {
      const sid = ext[k] as number;
      if (seen[sid] === stamp) continue;
      seen[sid] = stamp;
      if (withMediums || !byId[sid]!.medium) active.push(sid);
    }
    let nActive = active.length;
    if (nActive === 0) return out;
    const t = touch ? ++this.clock : 0;
    if (touch) node.touch = t;
    let depth = 1;
    while (depth < n) {
      const next = childOf(node, localHashes[depth]);
      if (next === undefined) break;
      const nextExt = next.ext;
      // Fast path: the same holders, in the same order, as the previous node (long chains stored
      // by the same sources): the still-matching set, a subset of them, cannot change.
      if (nextExt.length === ext.length && sameSources(nextExt, ext)) {
        if (touch) next.touch = t;
        node = next;
        depth++;
        continue;
      }
      ext = nextExt;
      stamp = this.nextStamp();
      seen = this.seen;
      for (let k = 0; k < ext.length; k += 2) seen[ext[k] as number] = stamp;
      // (Setting active.length every step is a slow builtin call: keep the count apart.)
      let w = 0;
      for (let r = 0; r < nActive; r++) {
        const sid = active[r];
        if (seen[sid] === stamp) active[w++] = sid;
        else out.set(byId[sid]!.name, depth);
      }
      nActive = w;
      if (w === 0) return out;
      if (touch) next.touch = t;
      node = next;
      depth++;
    }
    for (let r = 0; r < nActive; r++) out.set(byId[active[r]]!.name, depth);
    return out;
  }

  /** match() while every source id has a mask bit: intersect bit sets along the path. */
  private matchMasked(localHashes: ArrayLike<bigint>, first: Node, withMediums: boolean, out: Map<string, number>, touch: boolean): Map<string, number> {
    const n = localHashes.length;
    let active = withMediums ? first.mask : first.mask & this.gpuMask;
    if (active === 0) return out;
    const t = touch ? ++this.clock : 0;
    if (touch) first.touch = t;
    let node = first;
    let depth = 1;
    while (depth < n) {
      const next = childOf(node, localHashes[depth]);
      if (next === undefined) break;
      const still = active & next.mask;
      if (still !== active) {
        this.emitBits(out, active ^ still, depth);
        active = still;
        if (still === 0) return out;
      }
      if (touch) next.touch = t;
      node = next;
      depth++;
    }
    this.emitBits(out, active, depth);
    return out;
  }

  private emitBits(out: Map<string, number>, bits: number, depth: number): void {
    while (bits !== 0) {
      const low = bits & -bits;
      out.set(this.byId[31 - Math.clz32(low)]!.name, depth);
      bits ^= low;
    }
  }

  /**
   * Overlap over every tier a worker's blocks live in: for each GPU source (worker), the longest
   * run of leading blocks of `localHashes` that it holds in ANY tier (GPU, or its
   * `<source>#<medium>` sub-sources), each block counted by the best tier holding it (GPU 1,
   * host `weights.host`, disk `weights.disk`). A block held only in a tier of weight 0 ends the
   * run. With no sub-sources (or both weights 0) this is match() restricted to GPU sources.
   * Sources with nothing matched are absent. Dynamo's tiered overlap (its host/disk hit weights)
   * and llm-d's per-tier block weights, over the union of tiers.
   */
  matchTiered(localHashes: ArrayLike<bigint>, weights: TierWeights, options?: MatchOptions): Map<string, number> {
    if (this.mediumSources === 0 || (weights.host <= 0 && weights.disk <= 0)) return this.match(localHashes, options);
    const touch = options?.touch !== false;
    const out = new Map<string, number>();
    const n = localHashes.length;
    if (n === 0 || this.nodeCount === 0) return out;
    const byId = this.byId;
    const weightOf = (tier: KvTier) => (tier === 'gpu' ? 1 : tier === 'host' ? weights.host : weights.disk);
    /** Still-matching workers (base source names) and their weighted overlap so far. */
    let alive: Map<string, number> | null = null;
    const t = ++this.clock;
    let node: Node | undefined = this.root;
    for (let depth = 0; depth < n; depth++) {
      node = childOf(node, localHashes[depth]);
      if (node === undefined) break;
      if (touch) node.touch = t;
      const best = new Map<string, number>();
      const ext = node.ext;
      for (let k = 0; k < ext.length; k += 2) {
        const st = byId[ext[k] as number]!;
        const w = weightOf(st.tier);
        if (w <= 0) continue;
        if (alive !== null && !alive.has(st.base)) continue;
        if ((best.get(st.base) ?? 0) < w) best.set(st.base, w);
      }
      const next = new Map<string, number>();
      if (alive === null) for (const [b, w] of best) next.set(b, w);
      else
        for (const [b, score] of alive) {
          const w = best.get(b);
          if (w === undefined) out.set(b, score);
          else next.set(b, score + w);
        }
      alive = next;
      if (alive.size === 0) break;
    }
    if (alive !== null) for (const [b, score] of alive) out.set(b, score);
    return out;
  }

  /** hashBlocks(tokens, blockSize, loraSeed(loraName)) then match(); empty while blockSize is unknown. */
  matchTokens(tokens: ArrayLike<number>, loraName?: string | null, options?: MatchOptions): Map<string, number> {
    if (this.bs === null) return new Map();
    return this.match(hashBlocks(tokens, this.bs, loraSeed(loraName)), options);
  }

  // ---------------------------------------------------------------------------------------
  // Stats and memory

  /**
   * Rough heap bytes of the tree and the engine-hash maps: per node, per (source, engine hash)
   * reference and per multi-child map (constants calibrated against measured heap growth).
   */
  memoryBytes(): number {
    return (
      this.nodeCount * NODE_BYTES +
      this.refCount * REF_BYTES +
      this.multiKid * KIDS_MAP_BYTES +
      this.multiKidEntries * KID_ENTRY_BYTES +
      this.byName.size * 256
    );
  }

  /** Number of tree nodes (excluding the root). */
  get size(): number {
    return this.nodeCount;
  }

  stats(): BlockIndexStats {
    const blocksPerSource = new Map<string, number>();
    for (const st of this.byName.values()) blocksPerSource.set(st.name, st.blocks);
    return {
      nodes: this.nodeCount,
      blocksPerSource,
      unknownParent: this.unknownParent,
      unknownRemoved: this.unknownRemoved,
      malformed: this.malformed,
      blockSizeMismatch: this.blockSizeMismatch,
      ignoredGroup: this.ignoredGroup,
      noTokens: this.noTokens,
      ignoredMedium: this.ignoredMedium,
      pruned: this.pruned,
      memoryBytes: this.memoryBytes(),
    };
  }

  /**
   * Full consistency check (O(size)); returns a list of violated invariants, empty when sound.
   * For tests and debugging.
   */
  verify(): string[] {
    const errs: string[] = [];
    let nodes = 0;
    let refs = 0;
    const held = new Map<number, number>();
    const stack: Node[] = [this.root];
    while (stack.length > 0) {
      const node = stack.pop()!;
      if (node !== this.root) nodes++;
      if (node.child !== null && node.kids !== null) errs.push('node with both child and kids');
      if (node.kids !== null && node.kids.size < 2) errs.push('kids map with < 2 entries');
      for (const c of children(node)) {
        if (c.parent !== node) errs.push('bad parent link');
        stack.push(c);
      }
      if (node !== this.root && node.ext.length === 0 && node.child === null && node.kids === null) errs.push('empty leaf not pruned');
      const distinct = new Set<number>();
      for (let k = 0; k < node.ext.length; k += 2) {
        const sid = node.ext[k] as number;
        const h = node.ext[k + 1] as bigint;
        refs++;
        distinct.add(sid);
        const st = this.byId[sid];
        if (st === undefined) errs.push(`pair for freed source id ${sid}`);
        else if (st.map.get(h) !== node) errs.push(`pair (${st.name}, ${h}) not mirrored in the source map`);
      }
      for (const sid of distinct) held.set(sid, (held.get(sid) ?? 0) + 1);
      let mask = 0;
      for (const sid of distinct) if (sid < MASK_BITS) mask |= 1 << sid;
      if (mask !== node.mask) errs.push(`mask ${node.mask} != ${mask}`);
    }
    if (nodes !== this.nodeCount) errs.push(`nodeCount ${this.nodeCount} != ${nodes}`);
    if (refs !== this.refCount) errs.push(`refCount ${this.refCount} != ${refs}`);
    let mapped = 0;
    for (const st of this.byName.values()) {
      mapped += st.map.size;
      if ((held.get(st.id) ?? 0) !== st.blocks) errs.push(`blocks of ${st.name}: ${st.blocks} != ${held.get(st.id) ?? 0}`);
      for (const [h, node] of st.map) {
        if (indexOfPair(node.ext, st.id, h) < 0) errs.push(`map entry (${st.name}, ${h}) without pair`);
        let up: Node | null = node;
        while (up !== null && up !== this.root) up = up.parent;
        if (up !== this.root) errs.push(`map entry (${st.name}, ${h}) points to a detached node`);
      }
    }
    if (mapped !== this.refCount) errs.push(`map entries ${mapped} != refCount ${this.refCount}`);
    return errs;
  }

  // ---------------------------------------------------------------------------------------
  // Internals

  private nextStamp(): number {
    if (this.stamp >= 0x3fffffff) {
      this.seen.fill(0);
      this.stamp = 0;
    }
    return ++this.stamp;
  }

  private state(name: string, medium: boolean): SourceState {
    let st = this.byName.get(name);
    if (st === undefined) {
      const id = this.freeIds.length > 0 ? this.freeIds.pop()! : this.byId.length;
      const hash = medium ? name.lastIndexOf('#') : -1;
      const base = hash > 0 ? name.slice(0, hash) : name;
      st = { name, id, medium, base, tier: medium ? mediumTier(name.slice(hash + 1)) : 'gpu', map: new Map(), blocks: 0 };
      if (medium) this.mediumSources++;
      this.byName.set(name, st);
      this.byId[id] = st;
      if (!medium && id < MASK_BITS) this.gpuMask |= 1 << id;
      if (id >= this.seen.length) {
        const grown = new Int32Array(Math.max(this.seen.length * 2, id + 1));
        grown.set(this.seen);
        this.seen = grown;
      }
    }
    return st;
  }

  private family(source: string): SourceState[] {
    const out: SourceState[] = [];
    const prefix = `${source}#`;
    for (const st of this.byName.values()) if (st.name === source || (st.medium && st.name.startsWith(prefix))) out.push(st);
    return out;
  }

  private clearState(st: SourceState): void {
    for (const [h, node] of st.map) {
      this.dropPair(node, st, h);
      this.pruneUp(node);
    }
    st.map.clear();
  }

  private childOrCreate(node: Node, key: bigint, t: number): Node {
    let c = childOf(node, key);
    if (c === undefined) {
      c = new Node(key, node, t);
      if (node.kids !== null) {
        node.kids.set(key, c);
        this.multiKidEntries++;
      } else if (node.child === null) node.child = c;
      else {
        node.kids = new Map([
          [node.child.key, node.child],
          [key, c],
        ]);
        node.child = null;
        this.multiKid++;
        this.multiKidEntries += 2;
      }
      this.nodeCount++;
    } else c.touch = t;
    return c;
  }

  /** Records engine hash h of source st → node (remapping it if it pointed elsewhere). */
  private addRef(node: Node, st: SourceState, h: bigint): void {
    const prev = st.map.get(h);
    if (prev === node) return;
    const ext = node.ext;
    let holds = false;
    for (let k = 0; k < ext.length; k += 2) {
      if (ext[k] === st.id) {
        holds = true;
        break;
      }
    }
    node.ext = ext.length === 0 ? [st.id, h] : ext.concat(st.id, h);
    this.refCount++;
    if (!holds) {
      st.blocks++;
      if (st.id < MASK_BITS) node.mask |= 1 << st.id;
    }
    st.map.set(h, node);
    if (prev !== undefined) {
      this.dropPair(prev, st, h);
      this.pruneUp(prev);
    }
  }

  /** Removes pair (st, h) from node (the caller keeps st.map in sync). */
  private dropPair(node: Node, st: SourceState, h: bigint): void {
    const ext = node.ext;
    const i = indexOfPair(ext, st.id, h);
    if (i < 0) return;
    const rest = ext.length === 2 ? EMPTY : ext.slice(0, i).concat(ext.slice(i + 2));
    node.ext = rest;
    this.refCount--;
    for (let k = 0; k < rest.length; k += 2) if (rest[k] === st.id) return;
    st.blocks--;
    if (st.id < MASK_BITS) node.mask &= ~(1 << st.id);
  }

  /** Deletes node if it is an empty leaf, then its ancestors while they become empty leaves. */
  private pruneUp(node: Node): void {
    let cur: Node = node;
    while (cur !== this.root && cur.ext.length === 0 && cur.child === null && cur.kids === null && cur.parent !== null) {
      const parent: Node = cur.parent;
      this.detach(cur);
      cur = parent;
    }
  }

  /** Unlinks a leaf from its parent. */
  private detach(leaf: Node): void {
    const parent = leaf.parent;
    if (parent === null) return;
    if (parent.child === leaf) parent.child = null;
    else if (parent.kids !== null && parent.kids.get(leaf.key) === leaf) {
      parent.kids.delete(leaf.key);
      this.multiKidEntries--;
      if (parent.kids.size === 1) {
        parent.child = parent.kids.values().next().value!;
        parent.kids = null;
        this.multiKid--;
        this.multiKidEntries--;
      }
    }
    leaf.parent = null;
    this.nodeCount--;
  }

  /**
   * Prunes least-recently-used leaves until at most `target` nodes remain. A pruned leaf loses
   * all its sources and their engine-hash mappings; a parent left childless becomes a candidate.
   */
  private prune(target: number): void {
    const heap = new LeafHeap();
    const stack: Node[] = [this.root];
    while (stack.length > 0) {
      const node = stack.pop()!;
      if (node.child !== null) stack.push(node.child);
      else if (node.kids !== null) for (const c of node.kids.values()) stack.push(c);
      else if (node !== this.root) heap.push(node);
    }
    while (this.nodeCount > target && heap.size > 0) {
      const leaf = heap.pop()!;
      if (leaf.parent === null || leaf.child !== null || leaf.kids !== null) continue;
      const ext = leaf.ext;
      for (let k = 0; k < ext.length; k += 2) {
        const st = this.byId[ext[k] as number]!;
        const h = ext[k + 1] as bigint;
        if (st.map.get(h) === leaf) st.map.delete(h);
        this.refCount--;
        let first = true;
        for (let j = 0; j < k; j += 2) if (ext[j] === ext[k]) first = false;
        if (first) st.blocks--;
      }
      leaf.ext = EMPTY;
      leaf.mask = 0;
      const parent = leaf.parent;
      this.detach(leaf);
      this.pruned++;
      if (parent !== this.root && parent.child === null && parent.kids === null) heap.push(parent);
    }
  }
}

function childOf(node: Node, key: bigint): Node | undefined {
  const c = node.child;
  if (c !== null) return c.key === key ? c : undefined;
  const kids = node.kids;
  return kids === null ? undefined : kids.get(key);
}

function sameSources(a: Array<number | bigint>, b: Array<number | bigint>): boolean {
  for (let k = 0; k < a.length; k += 2) if (a[k] !== b[k]) return false;
  return true;
}

function children(node: Node): Node[] {
  if (node.child !== null) return [node.child];
  return node.kids === null ? [] : [...node.kids.values()];
}

function indexOfPair(ext: Array<number | bigint>, sid: number, h: bigint): number {
  for (let k = 0; k < ext.length; k += 2) if (ext[k] === sid && ext[k + 1] === h) return k;
  return -1;
}

function hasDuplicate(hashes: readonly bigint[]): boolean {
  const n = hashes.length;
  if (n <= 32) {
    for (let i = 1; i < n; i++) for (let j = 0; j < i; j++) if (hashes[i] === hashes[j]) return true;
    return false;
  }
  return new Set(hashes).size !== n;
}

/** Binary min-heap of nodes by `touch`. */
class LeafHeap {
  private readonly a: Node[] = [];

  get size(): number {
    return this.a.length;
  }

  push(node: Node): void {
    const a = this.a;
    let i = a.length;
    a.push(node);
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (a[p].touch <= node.touch) break;
      a[i] = a[p];
      i = p;
    }
    a[i] = node;
  }

  pop(): Node | undefined {
    const a = this.a;
    if (a.length === 0) return undefined;
    const top = a[0];
    const last = a.pop()!;
    const n = a.length;
    if (n > 0) {
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= n) break;
        const r = l + 1;
        const c = r < n && a[r].touch < a[l].touch ? r : l;
        if (a[c].touch >= last.touch) break;
        a[i] = a[c];
        i = c;
      }
      a[i] = last;
    }
    return top;
  }
}
