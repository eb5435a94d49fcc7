import { BlockPool, hashBlock, ROOT_HASH_HI, ROOT_HASH_LO, toBigHash } from './kv-cache.js';
import { prefillPairs, type StepWork } from '../engine/cost-model.js';

/**
 * Continuous-batching scheduler modelled on vLLM V1's `Scheduler.schedule()` (FCFS policy,
 * chunked prefill, prefix caching, recompute preemption):
 *
 * 1. Running requests first, in running order. Each gets the tokens it still needs
 *    (1 for a decode, the rest of its prompt for a prefill in progress), capped by the step's
 *    remaining token budget. If its blocks cannot be allocated, the last running request
 *    (lowest priority = most recently admitted) is preempted: its blocks are freed, it loses
 *    all computed tokens and goes back to the FRONT of the waiting queue. This repeats until
 *    the allocation succeeds or the request preempts itself.
 * 2. Then, only if nothing was preempted in this step, waiting requests in FIFO order while
 *    the budget lasts and fewer than maxNumSeqs are running. On admission the longest cached
 *    prefix of full blocks is reused (at most promptLen-1 tokens: the last token is always
 *    recomputed to produce logits). If the blocks for the chunk cannot be allocated, admission
 *    stops (head-of-line blocking, as in vLLM).
 * 3. Full blocks whose tokens are all known are hashed into the prefix cache as soon as they
 *    are scheduled (vLLM caches at allocation time).
 *
 * After the step's duration the engine calls {@link Scheduler.update}: each scheduled request
 * advances its computed tokens; a request whose whole known sequence is now computed samples one
 * new token (its first token if it was prefilling), and finishes when it reaches maxTokens.
 */

export type RequestState = 'waiting' | 'running' | 'finished' | 'aborted';

/** One request inside the engine. Fields are read-only outside the sim package. */
export class SimRequest {
  /** All known tokens: prompt, then generated. Capacity = prompt + maxTokens. */
  readonly tokens: Uint32Array;
  readonly numPromptTokens: number;
  numTokens: number;
  numOutputTokens = 0;
  /** Tokens whose KV is in the cache (computed or prefix hit). */
  numComputed = 0;
  /** Physical blocks held, in sequence order. */
  blocks: number[] = [];
  /** Chained hashes of the sequence's full blocks (numHashed of them are computed). */
  readonly hashHi: Uint32Array;
  readonly hashLo: Uint32Array;
  numHashed = 0;
  /** Leading blocks already offered to the prefix cache. */
  numCachedBlocks = 0;
  state: RequestState = 'waiting';
  /** Tokens scheduled in the current step (0 if not scheduled). */
  scheduledTokens = 0;

  /** Prefix-cache hit (tokens) at the first admission. -1 until admitted. */
  cachedTokens = -1;
  firstScheduledMs = -1;
  firstTokenMs = -1;
  finishMs = -1;
  preemptions = 0;
  /**
   * The prompt's KV arrives complete from a prefill engine (PD disaggregation): at admission the
   * prompt is marked computed without prefill work and the request starts decoding. Cleared on
   * preemption, after which the request is recomputed locally like any other.
   */
  prefilled = false;
  /** Submitted with prefilled KV (stays true after a preemption cleared {@link prefilled}). */
  submittedPrefilled = false;
  /** Tokens of this request priced as prefill work (recomputation after preemption included). */
  prefillTokensComputed = 0;
  /** Prompt tokens imported without compute at a prefilled admission (not counting prefix hits). */
  importedTokens = 0;
  /** Keep the physical block ids in the finish record (PD prefill side). */
  reportBlockIds = false;
  /** Block ids held when the request finished (only with reportBlockIds). */
  finalBlockIds: number[] | null = null;

  constructor(
    readonly id: string,
    readonly seq: number,
    promptTokens: ArrayLike<number>,
    readonly maxTokens: number,
    readonly arrivalMs: number,
    blockSize: number,
  ) {
    const cap = promptTokens.length + maxTokens;
    this.tokens = new Uint32Array(cap);
    for (let i = 0; i < promptTokens.length; i++) this.tokens[i] = promptTokens[i]! >>> 0;
    this.numPromptTokens = promptTokens.length;
    this.numTokens = promptTokens.length;
    const maxBlocks = Math.floor(cap / blockSize);
    this.hashHi = new Uint32Array(maxBlocks);
    this.hashLo = new Uint32Array(maxBlocks);
  }

  /** Compute chained hashes for every full block of the known tokens. */
  ensureHashes(blockSize: number, scratch: Uint32Array): void {
    const full = Math.floor(this.numTokens / blockSize);
    for (let i = this.numHashed; i < full; i++) {
      const pHi = i === 0 ? ROOT_HASH_HI : this.hashHi[i - 1]!;
      const pLo = i === 0 ? ROOT_HASH_LO : this.hashLo[i - 1]!;
      hashBlock(pHi, pLo, this.tokens, i * blockSize, blockSize, scratch);
      this.hashHi[i] = scratch[0]!;
      this.hashLo[i] = scratch[1]!;
    }
    if (full > this.numHashed) this.numHashed = full;
  }
}

/** Double-ended queue (ring buffer) for the waiting queue: O(1) at both ends. */
export class Deque<T> {
  private buf: (T | undefined)[] = new Array<T | undefined>(16);
  private head = 0;
  private size = 0;

  get length(): number {
    return this.size;
  }

  peekFront(): T | undefined {
    return this.size === 0 ? undefined : this.buf[this.head];
  }

  at(i: number): T {
    return this.buf[(this.head + i) & (this.buf.length - 1)] as T;
  }

  pushBack(x: T): void {
    if (this.size === this.buf.length) this.grow();
    this.buf[(this.head + this.size) & (this.buf.length - 1)] = x;
    this.size++;
  }

  pushFront(x: T): void {
    if (this.size === this.buf.length) this.grow();
    this.head = (this.head - 1) & (this.buf.length - 1);
    this.buf[this.head] = x;
    this.size++;
  }

  popFront(): T | undefined {
    if (this.size === 0) return undefined;
    const x = this.buf[this.head];
    this.buf[this.head] = undefined;
    this.head = (this.head + 1) & (this.buf.length - 1);
    this.size--;
    return x;
  }

  /** Remove the first element equal to x (O(n)); true if found. */
  remove(x: T): boolean {
    for (let i = 0; i < this.size; i++) {
      if (this.at(i) === x) {
        for (let j = i; j < this.size - 1; j++) {
          this.buf[(this.head + j) & (this.buf.length - 1)] = this.at(j + 1);
        }
        this.buf[(this.head + this.size - 1) & (this.buf.length - 1)] = undefined;
        this.size--;
        return true;
      }
    }
    return false;
  }

  *[Symbol.iterator](): IterableIterator<T> {
    for (let i = 0; i < this.size; i++) yield this.at(i);
  }

  private grow(): void {
    const old = this.buf;
    const next = new Array<T | undefined>(old.length * 2);
    for (let i = 0; i < this.size; i++) next[i] = old[(this.head + i) & (old.length - 1)];
    this.buf = next;
    this.head = 0;
  }
}

export interface SchedulerLimits {
  blockSize: number;
  maxNumSeqs: number;
  maxNumBatchedTokens: number;
}

/** Per-step counters the engine exposes. */
export interface SchedulerCounters {
  prefixCacheQueries: number;
  prefixCacheHits: number;
  preemptions: number;
  /** Admissions of prefilled requests (KV imported from a prefill engine). */
  prefilledAdmissions: number;
  /** Prompt tokens imported at those admissions (prefix hits excluded). */
  importedTokens: number;
  /** Tokens priced as prefill work, over all steps. */
  prefillTokensComputed: number;
  /** Prompt tokens loaded from the CPU-offload tier instead of recomputed (0 without one). */
  hostHitTokens: number;
}

export class Scheduler {
  readonly waiting = new Deque<SimRequest>();
  running: SimRequest[] = [];
  /** Requests scheduled in the current step, in scheduling order. */
  readonly scheduled: SimRequest[] = [];
  readonly counters: SchedulerCounters = {
    prefixCacheQueries: 0,
    prefixCacheHits: 0,
    preemptions: 0,
    prefilledAdmissions: 0,
    importedTokens: 0,
    prefillTokensComputed: 0,
    hostHitTokens: 0,
  };
  private readonly scratch = new Uint32Array(2);
  private readonly hitBlocks: number[] = [];

  constructor(
    readonly pool: BlockPool,
    private readonly limits: SchedulerLimits,
  ) {}

  /**
   * Choose the next step's batch. Fills `work` with what it costs; returns the number of
   * requests preempted. `nowMs` stamps first-scheduled times.
   */
  schedule(work: StepWork, nowMs: number): number {
    const { blockSize, maxNumSeqs } = this.limits;
    let budget = this.limits.maxNumBatchedTokens;
    const scheduled = this.scheduled;
    scheduled.length = 0;
    work.prefillTokens = 0;
    work.prefillPairs = 0;
    work.decodeSeqs = 0;
    work.decodeContextTokens = 0;
    work.hostLoadBlocks = 0;
    let preempted = 0;

    // 1. Running requests.
    const running = this.running;
    for (let i = 0; i < running.length && budget > 0; i++) {
      const req = running[i]!;
      const numNew = Math.min(req.numTokens - req.numComputed, budget);
      if (numNew <= 0) continue;
      let selfPreempted = false;
      while (!this.allocateSlots(req, numNew)) {
        const victim = running.pop()!;
        this.preempt(victim);
        preempted++;
        if (victim === req) {
          selfPreempted = true;
          break;
        }
      }
      if (selfPreempted) break;
      this.commit(req, numNew, work);
      budget -= numNew;
    }

    // 2. Waiting requests (not in a step that had to preempt).
    if (preempted === 0) {
      while (budget > 0 && running.length < maxNumSeqs && this.waiting.length > 0) {
        const req = this.waiting.peekFront()!;
        req.ensureHashes(blockSize, this.scratch);
        // Longest cached prefix, leaving at least one token to compute.
        const hits = this.hitBlocks;
        hits.length = 0;
        const maxHit = Math.min(Math.floor((req.numTokens - 1) / blockSize), req.numHashed);
        let evictableHits = 0;
        for (let b = 0; b < maxHit; b++) {
          const blk = this.pool.lookup(req.hashHi[b]!, req.hashLo[b]!);
          if (blk < 0) break;
          hits.push(blk);
          if (this.pool.isFree(blk)) evictableHits++;
        }
        // Then the blocks the CPU-offload tier holds: loaded back instead of recomputed.
        let hostHits = 0;
        const host = this.pool.host;
        if (host !== null && !req.prefilled) {
          while (hits.length + hostHits < maxHit && host.has(toBigHash(req.hashHi[hits.length + hostHits]!, req.hashLo[hits.length + hostHits]!))) hostHits++;
        }
        const gpuHitTokens = hits.length * blockSize;
        const hitTokens = gpuHitTokens + hostHits * blockSize;
        // A prefilled request imports the KV of every prompt token but the last, which is
        // scheduled as a decode-like 1-token step that samples the first output token (vLLM's
        // NIXL path does the same: a fully loaded prompt has its last token recomputed).
        const base = req.prefilled ? req.numTokens - 1 : hitTokens;
        const numNew = req.prefilled ? 1 : Math.min(req.numTokens - hitTokens, budget);
        // (needBlocks includes the host-loaded blocks: they get fresh GPU blocks.)
        const needBlocks = Math.ceil((base + numNew) / blockSize) - hits.length;
        if (needBlocks + evictableHits > this.pool.numFree) break;
        for (const blk of hits) this.pool.touch(blk);
        req.blocks.push(...hits);
        req.numComputed = base;
        req.numCachedBlocks = hits.length;
        if (hostHits > 0) {
          for (let b = hits.length; b < hits.length + hostHits; b++) host!.touch(toBigHash(req.hashHi[b]!, req.hashLo[b]!));
          work.hostLoadBlocks = (work.hostLoadBlocks ?? 0) + hostHits;
          this.counters.hostHitTokens += hostHits * blockSize;
        }
        if (req.prefilled) {
          req.importedTokens += base - hitTokens;
          this.counters.prefilledAdmissions++;
          this.counters.importedTokens += base - hitTokens;
        }
        if (!this.pool.allocate(needBlocks, req.blocks)) throw new Error('allocation failed after capacity check');
        this.waiting.popFront();
        req.state = 'running';
        if (req.firstScheduledMs < 0) {
          req.firstScheduledMs = nowMs;
          req.cachedTokens = hitTokens;
        }
        this.counters.prefixCacheQueries += req.numTokens;
        this.counters.prefixCacheHits += gpuHitTokens;
        running.push(req);
        this.commit(req, numNew, work);
        budget -= numNew;
      }
    }
    return preempted;
  }

  /**
   * Apply the scheduled step: advance computed tokens and sample. `sample` returns the next
   * token for a request; `onToken` is told about every generated token.
   */
  update(sample: (req: SimRequest) => number, onToken: (req: SimRequest, token: number) => void): void {
    const blockSize = this.limits.blockSize;
    for (const req of this.scheduled) {
      const n = req.scheduledTokens;
      req.scheduledTokens = 0;
      if (req.state !== 'running') continue; // aborted while the step ran
      req.numComputed += n;
      if (req.numComputed < req.numTokens) continue; // chunked prefill in progress
      const token = sample(req);
      req.tokens[req.numTokens] = token;
      req.numTokens++;
      req.numOutputTokens++;
      onToken(req, token);
      if (req.numTokens % blockSize === 0) req.ensureHashes(blockSize, this.scratch);
    }
  }

  /** Remove finished/aborted requests from the running list (keeps order). */
  compactRunning(): void {
    let w = 0;
    const r = this.running;
    for (let i = 0; i < r.length; i++) {
      if (r[i]!.state === 'running') r[w++] = r[i]!;
    }
    r.length = w;
  }

  /** Release a request's blocks (finish or abort). */
  release(req: SimRequest): void {
    if (req.reportBlockIds) req.finalBlockIds = req.blocks.slice();
    this.pool.free(req.blocks);
    req.blocks = [];
  }

  private preempt(req: SimRequest): void {
    this.release(req);
    req.numComputed = 0;
    req.numCachedBlocks = 0;
    req.scheduledTokens = 0;
    // Recompute preemption drops the imported KV too: the request comes back as a normal one
    // and recomputes its prompt locally (prefix hits permitting), as vLLM would.
    req.prefilled = false;
    req.state = 'waiting';
    req.preemptions++;
    this.counters.preemptions++;
    this.waiting.pushFront(req);
  }

  /** Make sure the request holds blocks for tokens [0, numComputed + numNew). */
  private allocateSlots(req: SimRequest, numNew: number): boolean {
    const need = Math.ceil((req.numComputed + numNew) / this.limits.blockSize) - req.blocks.length;
    if (need <= 0) return true;
    return this.pool.allocate(need, req.blocks);
  }

  /** Record the request in this step's batch, price it, and cache newly full blocks. */
  private commit(req: SimRequest, numNew: number, work: StepWork): void {
    const blockSize = this.limits.blockSize;
    req.scheduledTokens = numNew;
    this.scheduled.push(req);
    if ((req.numOutputTokens > 0 || req.prefilled) && numNew === 1 && req.numComputed === req.numTokens - 1) {
      work.decodeSeqs++;
      work.decodeContextTokens += req.numTokens;
    } else {
      work.prefillTokens += numNew;
      work.prefillPairs += prefillPairs(req.numComputed, numNew);
      req.prefillTokensComputed += numNew;
      this.counters.prefillTokensComputed += numNew;
    }
    const full = Math.floor((req.numComputed + numNew) / blockSize);
    if (full > req.numCachedBlocks) {
      req.ensureHashes(blockSize, this.scratch);
      this.pool.cacheBlocks(req.blocks, req.hashHi, req.hashLo, req.tokens, req.numCachedBlocks, full);
      req.numCachedBlocks = full;
    }
  }
}
