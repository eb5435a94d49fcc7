import type { KvEvent } from './kv-events.js';
import { fmix32 } from '../core/hash.js';

/**
 * Paged KV cache with prefix caching, modelled on vLLM V1's BlockPool / FreeKVCacheBlockQueue:
 *
 * - `numBlocks` physical blocks of `blockSize` tokens. A block is either referenced by running
 *   requests (refCount > 0) or free. Free blocks sit in one LRU queue; allocation takes from its
 *   head, and a freed block is appended to its tail. A free block may still hold a cached
 *   (hashed) full block: allocating it evicts that cache entry (BlockRemoved).
 * - A full block is identified by a chained hash of (parent block hash, block tokens). A request
 *   that finds its leading block hashes in the cache reuses those blocks ("touch": refCount++,
 *   and out of the free queue if it was there) instead of recomputing them.
 * - Blocks referenced by a request are never evicted: only refCount-0 blocks are in the queue.
 *
 * Invariant checked by the tests: the set of hashes announced by BlockStored minus those
 * announced by BlockRemoved (and everything before an AllBlocksCleared) equals
 * {@link BlockPool.cachedHashes}.
 *
 * The pool is deliberately array-based (typed arrays, an intrusive doubly linked free list, an
 * open-addressing hash index) so that the policy lab can push millions of blocks through it
 * without per-block objects.
 */

/** GPU medium, as vLLM reports it in KV events. */
export const MEDIUM_GPU = 'GPU';

// ---------------------------------------------------------------------------------------------
// Block hashing: the engine's private 64-bit chained hash, computed as two 32-bit lanes
// (murmur3-style mixing with different constants, cross-mixed at finalisation).
// ---------------------------------------------------------------------------------------------

/** Parent "hash" of the first block of every sequence (NONE_HASH in vLLM terms). */
export const ROOT_HASH_HI = 0x6b76_6761; // "kvga"
export const ROOT_HASH_LO = 0x7465_7369; // "tesi"

/**
 * Hash of one full block: tokens[start, start+blockSize) chained to the parent (hi, lo).
 * Writes the result into out[0] (hi) and out[1] (lo).
 */
export function hashBlock(
  parentHi: number,
  parentLo: number,
  tokens: ArrayLike<number>,
  start: number,
  blockSize: number,
  out: Uint32Array,
): void {
  let h1 = (parentLo ^ 0x9e3779b9) | 0;
  let h2 = (parentHi ^ 0x7f4a7c15) | 0;
  const end = start + blockSize;
  for (let i = start; i < end; i++) {
    const t = tokens[i]! | 0;
    let k1 = Math.imul(t, 0xcc9e2d51);
    k1 = (k1 << 15) | (k1 >>> 17);
    k1 = Math.imul(k1, 0x1b873593);
    h1 ^= k1;
    h1 = (h1 << 13) | (h1 >>> 19);
    h1 = (Math.imul(h1, 5) + 0xe6546b64) | 0;

    let k2 = Math.imul(t ^ 0x5bd1e995, 0x2127599b);
    k2 = (k2 << 17) | (k2 >>> 15);
    k2 = Math.imul(k2, 0x165667b1);
    h2 ^= k2;
    h2 = (h2 << 11) | (h2 >>> 21);
    h2 = (Math.imul(h2, 9) + 0x27d4eb2f) | 0;
  }
  const lo = fmix32((h1 ^ blockSize ^ parentHi) >>> 0);
  const hi = fmix32((h2 ^ lo ^ Math.imul(parentLo, 0x9e3779b1)) >>> 0);
  out[0] = hi;
  out[1] = lo;
}

/** The 64-bit unsigned block hash as a bigint (what KV events carry). */
export function toBigHash(hi: number, lo: number): bigint {
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
}

/**
 * Open-addressing hash table (linear probing, backward-shift deletion) from a 64-bit block hash
 * (hi, lo) to a block id. Fixed capacity: at most `maxEntries` live entries, load <= 0.5.
 */
class HashIndex {
  private readonly mask: number;
  private readonly keyHi: Uint32Array;
  private readonly keyLo: Uint32Array;
  /** Block id, or -1 for an empty slot. */
  private readonly val: Int32Array;

  constructor(maxEntries: number) {
    let cap = 16;
    while (cap < maxEntries * 2) cap *= 2;
    this.mask = cap - 1;
    this.keyHi = new Uint32Array(cap);
    this.keyLo = new Uint32Array(cap);
    this.val = new Int32Array(cap).fill(-1);
  }

  private slot(hi: number, lo: number): number {
    return ((lo ^ Math.imul(hi, 0x9e3779b1)) >>> 0) & this.mask;
  }

  get(hi: number, lo: number): number {
    for (let i = this.slot(hi, lo); ; i = (i + 1) & this.mask) {
      const v = this.val[i]!;
      if (v < 0) return -1;
      if (this.keyLo[i] === lo && this.keyHi[i] === hi) return v;
    }
  }

  /** Insert; the key must be absent. */
  set(hi: number, lo: number, block: number): void {
    let i = this.slot(hi, lo);
    while (this.val[i]! >= 0) i = (i + 1) & this.mask;
    this.keyHi[i] = hi;
    this.keyLo[i] = lo;
    this.val[i] = block;
  }

  delete(hi: number, lo: number): void {
    const mask = this.mask;
    let i = this.slot(hi, lo);
    for (;;) {
      const v = this.val[i]!;
      if (v < 0) return;
      if (this.keyLo[i] === lo && this.keyHi[i] === hi) break;
      i = (i + 1) & mask;
    }
    // Backward-shift: move later entries of the probe run into the hole when allowed.
    let hole = i;
    for (let j = (i + 1) & mask; this.val[j]! >= 0; j = (j + 1) & mask) {
      const home = this.slot(this.keyHi[j]!, this.keyLo[j]!);
      // Entry j may move to `hole` if its home is not cyclically in (hole, j].
      const inRange = hole <= j ? home > hole && home <= j : home > hole || home <= j;
      if (!inRange) {
        this.keyHi[hole] = this.keyHi[j]!;
        this.keyLo[hole] = this.keyLo[j]!;
        this.val[hole] = this.val[j]!;
        hole = j;
      }
    }
    this.val[hole] = -1;
  }

  clear(): void {
    this.val.fill(-1);
  }
}

// ---------------------------------------------------------------------------------------------

/** Host (CPU) medium, as vLLM's OffloadingConnector reports it in KV events. */
export const MEDIUM_CPU = 'CPU';

/**
 * Simulated CPU-offload tier (off unless `--cpu-offload-blocks N` > 0), after vLLM's
 * OffloadingConnector with its CPU backend: every block cached on the GPU is also written to a
 * bounded host LRU of N blocks (write-through, keyed by the same block hash), which emits
 * `BlockStored` with medium "CPU", no parent and EMPTY token ids (as vLLM's connector does: a
 * router resolves those blocks through the GPU events it already has), and `BlockRemoved`
 * "CPU" when its LRU evicts. A request whose next prefix blocks are missing on the GPU but held
 * here loads them (priced per block by the cost model's hostLoadBlockMs) instead of recomputing.
 */
export class HostCache {
  /** Block hash → true, in LRU order (first = least recently used). */
  private readonly lru = new Map<bigint, true>();

  constructor(
    readonly capacity: number,
    private readonly emit: ((e: KvEvent) => void) | null,
  ) {}

  get size(): number {
    return this.lru.size;
  }

  has(h: bigint): boolean {
    return this.lru.has(h);
  }

  /** Marks blocks as just used (they are loaded back to the GPU). */
  touch(h: bigint): void {
    if (this.lru.delete(h)) this.lru.set(h, true);
  }

  /** Writes blocks to the host tier (LRU-evicting beyond capacity), with their events. */
  offload(hashes: readonly bigint[], blockSize: number): void {
    let stored: bigint[] | null = null;
    for (const h of hashes) {
      if (this.lru.delete(h)) {
        this.lru.set(h, true);
        continue;
      }
      this.lru.set(h, true);
      (stored ??= []).push(h);
    }
    if (stored && this.emit) this.emit({ type: 'BlockStored', blockHashes: stored, parentBlockHash: null, tokenIds: [], blockSize, loraId: null, medium: MEDIUM_CPU, loraName: null });
    let removed: bigint[] | null = null;
    while (this.lru.size > this.capacity) {
      const oldest = this.lru.keys().next().value as bigint;
      this.lru.delete(oldest);
      (removed ??= []).push(oldest);
    }
    if (removed && this.emit) this.emit({ type: 'BlockRemoved', blockHashes: removed, medium: MEDIUM_CPU });
  }

  clear(): void {
    this.lru.clear();
  }
}

export class BlockPool {
  readonly numBlocks: number;
  readonly blockSize: number;

  private readonly refCount: Int32Array;
  private readonly hashed: Uint8Array;
  private readonly hashHi: Uint32Array;
  private readonly hashLo: Uint32Array;
  /** Free queue links (-1 = none) and membership. */
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  private readonly inFree: Uint8Array;
  private head = -1;
  private tail = -1;
  private freeCount = 0;
  private hashedCount = 0;
  /** Block hash → block id of every cached block. */
  private readonly cache: HashIndex;

  /** Events produced since the last {@link takeEvents}; only collected when enabled. */
  private events: KvEvent[] = [];

  /** The CPU-offload tier, when the engine has one (`hostBlocks` > 0). */
  readonly host: HostCache | null;

  constructor(
    numBlocks: number,
    blockSize: number,
    private readonly eventsEnabled: boolean,
    hostBlocks = 0,
  ) {
    this.host = hostBlocks > 0 ? new HostCache(hostBlocks, eventsEnabled ? (e) => this.events.push(e) : null) : null;
    this.numBlocks = numBlocks;
    this.blockSize = blockSize;
    this.refCount = new Int32Array(numBlocks);
    this.hashed = new Uint8Array(numBlocks);
    this.hashHi = new Uint32Array(numBlocks);
    this.hashLo = new Uint32Array(numBlocks);
    this.prev = new Int32Array(numBlocks);
    this.next = new Int32Array(numBlocks);
    this.inFree = new Uint8Array(numBlocks);
    this.cache = new HashIndex(numBlocks);
    for (let b = 0; b < numBlocks; b++) this.appendFree(b);
  }

  /** Blocks allocatable right now (free, cached or not). */
  get numFree(): number {
    return this.freeCount;
  }

  /** Blocks referenced by at least one request. */
  get numUsed(): number {
    return this.numBlocks - this.freeCount;
  }

  /** Blocks holding a cached (hashed) full block, used or free. */
  get numCached(): number {
    return this.hashedCount;
  }

  /** Fraction of blocks referenced by requests (vLLM's kv_cache_usage_perc). */
  usage(): number {
    return this.numUsed / this.numBlocks;
  }

  /** Block id caching the given hash, or -1. */
  lookup(hi: number, lo: number): number {
    return this.cache.get(hi >>> 0, lo >>> 0);
  }

  /** True if the block is free (refCount 0), i.e. taking a reference removes it from the queue. */
  isFree(block: number): boolean {
    return this.inFree[block] === 1;
  }

  /** Take a reference on a cached block found by {@link lookup}. */
  touch(block: number): void {
    if (this.inFree[block] === 1) this.removeFree(block);
    this.refCount[block]!++;
  }

  /**
   * Allocate `n` blocks from the head of the free queue (evicting their cache entries) and
   * append them to `into`; return false without side effects if fewer than `n` are free.
   */
  allocate(n: number, into: number[]): boolean {
    if (n > this.freeCount) return false;
    let evicted: bigint[] | null = null;
    for (let i = 0; i < n; i++) {
      const b = this.head;
      this.removeFree(b);
      if (this.hashed[b] === 1) {
        if (this.eventsEnabled) (evicted ??= []).push(toBigHash(this.hashHi[b]!, this.hashLo[b]!));
        this.unhash(b);
      }
      this.refCount[b] = 1;
      into.push(b);
    }
    if (evicted) this.events.push({ type: 'BlockRemoved', blockHashes: evicted, medium: MEDIUM_GPU });
    return true;
  }

  /**
   * Drop one reference on each block. Blocks reaching refCount 0 are appended to the free
   * queue in reverse order, so a sequence's last blocks are evicted before its first ones.
   */
  free(blocks: readonly number[]): void {
    for (let i = blocks.length - 1; i >= 0; i--) {
      const b = blocks[i]!;
      const rc = --this.refCount[b]!;
      if (rc === 0) this.appendFree(b);
      else if (rc < 0) throw new Error(`block ${b} freed more often than referenced`);
    }
  }

  /**
   * Register blocks [from, to) of a sequence as cached, given the sequence's chained hashes.
   * Blocks already hashed are skipped; a block whose hash another block already caches stays
   * private (unhashed), so each hash maps to exactly one block. One BlockStored event is
   * produced per run of consecutive newly cached blocks.
   */
  cacheBlocks(
    blocks: readonly number[],
    hashHi: Uint32Array,
    hashLo: Uint32Array,
    tokens: ArrayLike<number>,
    from: number,
    to: number,
  ): void {
    let runFirst = -1;
    let runHashes: bigint[] | null = null;
    for (let i = from; i < to; i++) {
      const b = blocks[i]!;
      const hi = hashHi[i]!;
      const lo = hashLo[i]!;
      if (this.hashed[b] === 1 || this.cache.get(hi, lo) >= 0) {
        // Already cached (a prefix hit), or another block caches the same content.
        if (runHashes) this.storedEvent(runFirst, runHashes, hashHi, hashLo, tokens);
        runHashes = null;
        continue;
      }
      this.cache.set(hi, lo, b);
      this.hashed[b] = 1;
      this.hashHi[b] = hi;
      this.hashLo[b] = lo;
      this.hashedCount++;
      if (this.eventsEnabled) {
        if (!runHashes) {
          runFirst = i;
          runHashes = [];
        }
        runHashes.push(toBigHash(hi, lo));
      }
    }
    if (runHashes) this.storedEvent(runFirst, runHashes, hashHi, hashLo, tokens);
    if (this.host !== null && to > from) {
      // Write-through to the host tier (after the GPU events, so a router knows the blocks).
      const hashes: bigint[] = [];
      for (let i = from; i < to; i++) hashes.push(toBigHash(hashHi[i]!, hashLo[i]!));
      this.host.offload(hashes, this.blockSize);
    }
  }

  private storedEvent(
    first: number,
    hashes: bigint[],
    hashHi: Uint32Array,
    hashLo: Uint32Array,
    tokens: ArrayLike<number>,
  ): void {
    const start = first * this.blockSize;
    const end = start + hashes.length * this.blockSize;
    const tokenIds = new Array<number>(end - start);
    for (let i = start; i < end; i++) tokenIds[i - start] = tokens[i]!;
    this.events.push({
      type: 'BlockStored',
      blockHashes: hashes,
      parentBlockHash: first === 0 ? null : toBigHash(hashHi[first - 1]!, hashLo[first - 1]!),
      tokenIds,
      blockSize: this.blockSize,
      loraId: null,
      medium: MEDIUM_GPU,
      loraName: null,
    });
  }

  /** Forget every cached hash (blocks in use stay allocated). Emits AllBlocksCleared. */
  clearCache(): void {
    for (let b = 0; b < this.numBlocks; b++) this.hashed[b] = 0;
    this.cache.clear();
    this.hashedCount = 0;
    this.host?.clear();
    if (this.eventsEnabled) this.events.push({ type: 'AllBlocksCleared' });
  }

  /** Events collected since the last call (empty when events are disabled). */
  takeEvents(): KvEvent[] {
    if (this.events.length === 0) return EMPTY;
    const e = this.events;
    this.events = [];
    return e;
  }

  /** The cached block hashes (for tests and diagnostics; allocates). */
  cachedHashes(): Set<bigint> {
    const s = new Set<bigint>();
    for (let b = 0; b < this.numBlocks; b++) {
      if (this.hashed[b] === 1) s.add(toBigHash(this.hashHi[b]!, this.hashLo[b]!));
    }
    return s;
  }

  /** Free-queue order, head (next evicted) first (for tests). */
  freeQueue(): number[] {
    const out: number[] = [];
    for (let b = this.head; b !== -1; b = this.next[b]!) out.push(b);
    return out;
  }

  refCountOf(block: number): number {
    return this.refCount[block]!;
  }

  private unhash(b: number): void {
    this.cache.delete(this.hashHi[b]!, this.hashLo[b]!);
    this.hashed[b] = 0;
    this.hashedCount--;
  }

  private appendFree(b: number): void {
    this.prev[b] = this.tail;
    this.next[b] = -1;
    if (this.tail === -1) this.head = b;
    else this.next[this.tail] = b;
    this.tail = b;
    this.inFree[b] = 1;
    this.freeCount++;
  }

  private removeFree(b: number): void {
    const p = this.prev[b]!;
    const n = this.next[b]!;
    if (p === -1) this.head = n;
    else this.next[p] = n;
    if (n === -1) this.tail = p;
    else this.prev[n] = p;
    this.prev[b] = -1;
    this.next[b] = -1;
    this.inFree[b] = 0;
    this.freeCount--;
  }
}

const EMPTY: KvEvent[] = [];
Object.freeze(EMPTY);

/**
 * KV-cache sizing of the default engine: Llama-3-8B (bf16, 32 layers, 8 KV heads of dim 128)
 * on one H100 80 GB at gpu-memory-utilization 0.9.
 *
 *   KV bytes per token = 2 (K and V) × 32 layers × 8 heads × 128 dims × 2 bytes = 131 072 (128 KiB)
 *   per 16-token block = 2 MiB
 *   memory budget      = 0.9 × 81 559 MiB (79.6 GiB, what an H100 80 GB HBM3 reports) = 71.7 GiB
 *   − weights          = 8.03e9 params × 2 bytes = 14.96 GiB
 *   − activations etc. = 3.5 GiB (assumed: vLLM's profiled peak of a max_num_batched_tokens=8192
 *                        forward pass, CUDA graphs and non-torch memory)
 *   = 53.2 GiB for KV → 27 251 blocks of 16 tokens = 436 016 tokens.
 */
export const LLAMA3_8B_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2;

export function kvBlocksFor(opts: {
  gpuMemoryMiB: number;
  gpuMemoryUtilization: number;
  weightsGiB: number;
  activationsGiB: number;
  kvBytesPerToken: number;
  blockSize: number;
}): number {
  const budget = opts.gpuMemoryMiB * 1024 * 1024 * opts.gpuMemoryUtilization;
  const kvBytes = budget - (opts.weightsGiB + opts.activationsGiB) * 1024 ** 3;
  return Math.floor(kvBytes / (opts.kvBytesPerToken * opts.blockSize));
}

/** 27 251 blocks (436 016 tokens): see the derivation above. */
export const DEFAULT_NUM_GPU_BLOCKS = kvBlocksFor({
  gpuMemoryMiB: 81_559,
  gpuMemoryUtilization: 0.9,
  weightsGiB: (8.03e9 * 2) / 1024 ** 3,
  activationsGiB: 3.5,
  kvBytesPerToken: LLAMA3_8B_KV_BYTES_PER_TOKEN,
  blockSize: 16,
});
