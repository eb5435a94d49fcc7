import type { Clock } from '../core/clock.js';
import { SeededRng, type Rng } from '../core/rng.js';
import { DEFAULT_COST_MODEL, stepDurationMs, validateCostModel, type CostModelConfig, type StepWork } from '../engine/cost-model.js';
import { BlockPool, DEFAULT_NUM_GPU_BLOCKS } from './kv-cache.js';
import type { KvEvent, KvEventSink } from './kv-events.js';
import { Scheduler, SimRequest } from './scheduler.js';

/**
 * Simulated LLM engine: a vLLM-V1-like paged KV cache with prefix caching, a continuous-batching
 * scheduler with chunked prefill and recompute preemption, and a step-time cost model.
 *
 * Pure library: no timers, no I/O. Time comes from the injected Clock, randomness (the pseudo
 * generated tokens) from the injected Rng. The same object runs under the real-time driver
 * (driver.ts, HTTP server) and under a discrete-event simulator in virtual time.
 *
 * ## Step contract
 *
 * The engine executes one step at a time, in two calls:
 *
 *   const plan = engine.step();          // at time t0 = max(clock.now(), end of previous step)
 *   // ... the caller lets plan.durationMs pass (advances its clock to plan.endMs) ...
 *   const result = engine.completeStep(); // applies the step, stamped at plan.endMs
 *
 * - `step()` returns null when there is nothing to do. Otherwise it schedules the batch
 *   (admissions, prefix-cache hits, block allocation, preemptions) at t0 and prices it. From
 *   then on `stats()` shows the new batch (running/waiting/kv usage).
 * - Nothing becomes visible to clients before `completeStep()`: the tokens produced by the step
 *   (a first token when a prefill completes, one token per decoding request), the requests that
 *   finished (their {@link RequestRecord}: cached tokens, queue time, TTFT, finish time) and the
 *   step's KV events (delivered to the sink as ONE batch, as vLLM publishes once per step).
 * - The prefix-cache hit of a request is decided when it is admitted (inside `step()`); it is
 *   reported in its record and by {@link Engine.requestInfo}.
 * - A request submitted with `prefilled: true` (PD decode side) imports its prompt's KV at
 *   admission: no prefill work is priced, its first token comes from its first decode step.
 * - `submit()`, `abort()` and `reset()` may be called at any time, including between `step()`
 *   and `completeStep()`. A request submitted during a step joins the next one. Aborting a
 *   request frees its blocks immediately; if it was in the running step it produces nothing.
 */

export interface EngineConfig {
  /** Tokens per KV block (vLLM default 16). */
  blockSize: number;
  /** KV cache capacity in blocks (default: Llama-3-8B on one H100 80 GB, see kv-cache.ts). */
  numGpuBlocks: number;
  /** Max running requests (vLLM default 256). */
  maxNumSeqs: number;
  /** Token budget per step (vLLM default 8192 with chunked prefill). */
  maxNumBatchedTokens: number;
  /** Max prompt + output tokens of one request (Llama-3.1-8B: 131072). */
  maxModelLen: number;
  /** Generated pseudo tokens are uniform in [0, vocabSize). Llama 3: 128256. */
  vocabSize: number;
  /**
   * Blocks of the simulated CPU-offload tier (0 = none; see HostCache in kv-cache.ts). vLLM's
   * `--kv-transfer-config '{"kv_connector":"OffloadingConnector",...,"cpu_bytes_to_use":…}'`.
   */
  cpuOffloadBlocks: number;
  cost: CostModelConfig;
}

export const DEFAULT_ENGINE_CONFIG: Readonly<Omit<EngineConfig, 'cost'>> = Object.freeze({
  blockSize: 16,
  numGpuBlocks: DEFAULT_NUM_GPU_BLOCKS,
  maxNumSeqs: 256,
  maxNumBatchedTokens: 8192,
  maxModelLen: 131_072,
  vocabSize: 128_256,
  cpuOffloadBlocks: 0,
});

export interface EngineOptions extends Partial<Omit<EngineConfig, 'cost'>> {
  clock: Clock;
  /** Source of the generated tokens; default SeededRng(0). */
  rng?: Rng;
  /** Receives one batch of KV events per step that produced any. */
  kvEventSink?: KvEventSink;
  cost?: Partial<CostModelConfig>;
}

export interface SubmitRequest {
  id: string;
  promptTokens: ArrayLike<number>;
  /** Tokens to generate (>= 1). The simulator never samples EOS: it always generates maxTokens. */
  maxTokens: number;
  /** Accepted for API symmetry; the simulator ignores EOS anyway. */
  ignoreEos?: boolean;
  /**
   * Prefill/decode disaggregation, decode side: the prompt's KV arrives complete from a prefill
   * engine. At admission the request still reuses prefix-cache hits; the other prompt blocks are
   * allocated and (full ones) hashed and cached like computed blocks, with BlockStored events as
   * usual, but no prefill work is priced: the request enters decode directly and its first token
   * comes from its first decode step. If blocks are short it waits like any request. A
   * preempted prefilled request loses the imported KV and is recomputed locally like any other.
   */
  prefilled?: boolean;
  /** Keep the physical block ids in the finish record ({@link RequestRecord.blockIds}). */
  reportBlockIds?: boolean;
}

export type FinishReason = 'length' | 'abort';

/** Everything measured about one request, available when it ends. Times in clock ms. */
export interface RequestRecord {
  id: string;
  promptTokens: number;
  outputTokens: number;
  /** Prefix-cache hit (tokens) at first admission; 0 if never admitted. */
  cachedTokens: number;
  arrivalMs: number;
  /** First admission into the running batch (-1 if never). */
  firstScheduledMs: number;
  /** End of the step that produced the first token (-1 if none). */
  firstTokenMs: number;
  finishMs: number;
  /** firstScheduledMs - arrivalMs (-1 if never scheduled). */
  queueMs: number;
  /** firstTokenMs - arrivalMs (-1 if no token). */
  ttftMs: number;
  e2eMs: number;
  preemptions: number;
  finishReason: FinishReason;
  /** Present (true) when the request was submitted with `prefilled: true`. */
  prefilled?: boolean;
  /**
   * Tokens of this request priced as prefill work (prompt chunks, recomputation after
   * preemption). 0 for a prefilled request that was never preempted.
   */
  prefillTokensComputed?: number;
  /** Physical blocks held at the end (only when submitted with `reportBlockIds`). */
  blockIds?: number[];
}

/** One generated token, visible at the end of the step that produced it. */
export interface TokenOutput {
  id: string;
  token: number;
  /** 0 for the first token of the request. */
  index: number;
  finished: boolean;
  /** On the first token (index 0): its time to first token (ms); -1 on later tokens. */
  ttftMs: number;
}

export interface StepPlan {
  startMs: number;
  durationMs: number;
  endMs: number;
  /** Requests in the batch. */
  numScheduled: number;
  prefillTokens: number;
  decodeSeqs: number;
  /** Requests preempted while building this batch. */
  preempted: number;
}

export interface StepResult {
  endMs: number;
  outputs: TokenOutput[];
  finished: RequestRecord[];
}

export interface EngineStats {
  running: number;
  waiting: number;
  /** Fraction of KV blocks referenced by requests (vLLM kv_cache_usage_perc). */
  kvUsage: number;
  numGpuBlocks: number;
  freeBlocks: number;
  cachedBlocks: number;
  /** Tokens looked up / found in the prefix cache at admissions (vLLM prefix_cache_*). */
  prefixCacheQueries: number;
  prefixCacheHits: number;
  /** Prompt tokens of requests that produced their first token. */
  promptTokens: number;
  generationTokens: number;
  preemptions: number;
  finishedRequests: number;
  abortedRequests: number;
  steps: number;
  /** Sum of step durations (ms). */
  busyMs: number;
  /** Tokens of work queued: prompt tokens not yet computed + decodes (for load reporting). */
  pendingTokens: number;
  /** Tokens priced as prefill work, over all steps (Σ StepPlan.prefillTokens). */
  prefillTokensComputed: number;
  /** Admissions of prefilled requests (PD decode side). */
  prefilledAdmissions: number;
  /** Prompt tokens imported by those admissions instead of computed (prefix hits excluded). */
  importedTokens: number;
}

/** A request-level error from submit (bad input); the HTTP layer answers 400. */
export class EngineRequestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'EngineRequestError';
  }
}

export class Engine {
  readonly config: Readonly<EngineConfig>;
  private readonly clock: Clock;
  private readonly rng: Rng;
  private readonly sink: KvEventSink | undefined;
  private readonly pool: BlockPool;
  private readonly sched: Scheduler;
  private readonly requests = new Map<string, SimRequest>();
  private seq = 0;
  private lastEndMs = -Infinity;
  private inFlight: StepPlan | null = null;
  private readonly work: StepWork = { prefillTokens: 0, prefillPairs: 0, decodeSeqs: 0, decodeContextTokens: 0, hostLoadBlocks: 0 };
  private promptTokens = 0;
  private generationTokens = 0;
  private finishedCount = 0;
  private abortedCount = 0;
  private steps = 0;
  private busyMs = 0;

  constructor(opts: EngineOptions) {
    const cost: CostModelConfig = { ...DEFAULT_COST_MODEL };
    for (const [k, v] of Object.entries(opts.cost ?? {})) {
      if (v !== undefined) cost[k as keyof CostModelConfig] = v;
    }
    validateCostModel(cost);
    const config: EngineConfig = {
      blockSize: opts.blockSize ?? DEFAULT_ENGINE_CONFIG.blockSize,
      numGpuBlocks: opts.numGpuBlocks ?? DEFAULT_ENGINE_CONFIG.numGpuBlocks,
      maxNumSeqs: opts.maxNumSeqs ?? DEFAULT_ENGINE_CONFIG.maxNumSeqs,
      maxNumBatchedTokens: opts.maxNumBatchedTokens ?? DEFAULT_ENGINE_CONFIG.maxNumBatchedTokens,
      maxModelLen: opts.maxModelLen ?? DEFAULT_ENGINE_CONFIG.maxModelLen,
      vocabSize: opts.vocabSize ?? DEFAULT_ENGINE_CONFIG.vocabSize,
      cpuOffloadBlocks: opts.cpuOffloadBlocks ?? DEFAULT_ENGINE_CONFIG.cpuOffloadBlocks,
      cost,
    };
    for (const k of ['blockSize', 'numGpuBlocks', 'maxNumSeqs', 'maxNumBatchedTokens', 'maxModelLen', 'vocabSize'] as const) {
      const v = config[k];
      if (!Number.isInteger(v) || v < 1) throw new RangeError(`engine: ${k} must be a positive integer (got ${String(v)})`);
    }
    if (!Number.isInteger(config.cpuOffloadBlocks) || config.cpuOffloadBlocks < 0) throw new RangeError(`engine: cpuOffloadBlocks must be an integer >= 0 (got ${String(config.cpuOffloadBlocks)})`);
    this.config = Object.freeze(config);
    this.clock = opts.clock;
    this.rng = opts.rng ?? new SeededRng(0);
    this.sink = opts.kvEventSink;
    this.pool = new BlockPool(config.numGpuBlocks, config.blockSize, this.sink !== undefined, config.cpuOffloadBlocks);
    this.sched = new Scheduler(this.pool, config);
  }

  /** Largest prompt + maxTokens a request may have (model length and whole-cache capacity). */
  get maxRequestTokens(): number {
    return Math.min(this.config.maxModelLen, this.config.numGpuBlocks * this.config.blockSize);
  }

  /** Queue a request (FIFO). Throws EngineRequestError on invalid input or a duplicate id. */
  submit(req: SubmitRequest): void {
    const n = req.promptTokens.length;
    if (typeof req.id !== 'string' || req.id.length === 0) throw new EngineRequestError('request id must be a non-empty string');
    if (this.requests.has(req.id)) throw new EngineRequestError(`request id '${req.id}' is already in the engine`);
    if (n < 1) throw new EngineRequestError('prompt must contain at least one token');
    if (!Number.isInteger(req.maxTokens) || req.maxTokens < 1) {
      throw new EngineRequestError(`maxTokens must be a positive integer (got ${String(req.maxTokens)})`);
    }
    const limit = this.maxRequestTokens;
    if (n + req.maxTokens > limit) {
      throw new EngineRequestError(
        `prompt (${n} tokens) + max tokens (${req.maxTokens}) exceeds the engine's limit of ${limit} tokens`,
      );
    }
    const r = new SimRequest(req.id, this.seq++, req.promptTokens, req.maxTokens, this.clock.now(), this.config.blockSize);
    if (req.prefilled === true) {
      r.prefilled = true;
      r.submittedPrefilled = true;
    }
    if (req.reportBlockIds === true) r.reportBlockIds = true;
    this.requests.set(r.id, r);
    this.sched.waiting.pushBack(r);
  }

  /**
   * Remove a request wherever it is and free its blocks. Returns its record, or undefined if the
   * id is unknown (never submitted or already finished).
   */
  abort(id: string): RequestRecord | undefined {
    const r = this.requests.get(id);
    if (!r) return undefined;
    if (r.state === 'waiting') this.sched.waiting.remove(r);
    else if (r.state === 'running') {
      this.sched.release(r);
      const i = this.sched.running.indexOf(r);
      if (i >= 0) this.sched.running.splice(i, 1);
    }
    r.state = 'aborted';
    r.finishMs = Math.max(this.clock.now(), r.arrivalMs);
    this.requests.delete(id);
    this.abortedCount++;
    return recordOf(r, 'abort');
  }

  /** End of the last completed step (-Infinity before the first). While the driver dispatches a
   * step's outputs this is the time the tokens became visible. */
  get lastStepEndMs(): number {
    return this.lastEndMs;
  }

  /** True if a request is waiting or running. */
  hasWork(): boolean {
    return this.sched.waiting.length > 0 || this.sched.running.length > 0;
  }

  /** True between step() and completeStep(). */
  get busy(): boolean {
    return this.inFlight !== null;
  }

  /** The step in flight, if any. */
  get currentStep(): StepPlan | null {
    return this.inFlight;
  }

  /** Schedule and price the next step (see the step contract above). Null if idle. */
  step(): StepPlan | null {
    if (this.inFlight) throw new Error('engine.step() called while a step is in flight; call completeStep() first');
    if (!this.hasWork()) return null;
    const startMs = Math.max(this.clock.now(), this.lastEndMs);
    let preempted = this.sched.schedule(this.work, startMs);
    // An empty batch only happens when the running requests preempted one another away; the
    // next attempt admits from the waiting queue into a now-empty cache, which always fits
    // because submit() rejects requests larger than the whole cache.
    for (let attempt = 0; this.sched.scheduled.length === 0 && attempt < 2 && this.hasWork(); attempt++) {
      preempted += this.sched.schedule(this.work, startMs);
    }
    const numScheduled = this.sched.scheduled.length;
    if (numScheduled === 0) {
      if (this.hasWork()) throw new Error('engine: scheduler made no progress');
      this.flushEvents();
      return null;
    }
    const durationMs = stepDurationMs(this.config.cost, this.work);
    const plan: StepPlan = {
      startMs,
      durationMs,
      endMs: startMs + durationMs,
      numScheduled,
      prefillTokens: this.work.prefillTokens,
      decodeSeqs: this.work.decodeSeqs,
      preempted,
    };
    this.inFlight = plan;
    return plan;
  }

  /** Apply the step in flight at its end time and return what became visible. */
  completeStep(): StepResult {
    const plan = this.inFlight;
    if (!plan) throw new Error('engine.completeStep() called with no step in flight');
    const endMs = plan.endMs;
    const outputs: TokenOutput[] = [];
    const finished: RequestRecord[] = [];
    const vocab = this.config.vocabSize;
    this.sched.update(
      () => this.rng.int(vocab),
      (req, token) => {
        this.generationTokens++;
        const index = req.numOutputTokens - 1;
        if (index === 0 && req.firstTokenMs < 0) {
          req.firstTokenMs = endMs;
          this.promptTokens += req.numPromptTokens;
        }
        const done = req.numOutputTokens >= req.maxTokens;
        outputs.push({ id: req.id, token, index, finished: done, ttftMs: index === 0 ? req.firstTokenMs - req.arrivalMs : -1 });
        if (done) {
          req.state = 'finished';
          req.finishMs = endMs;
          this.sched.release(req);
          this.requests.delete(req.id);
          this.finishedCount++;
          finished.push(recordOf(req, 'length'));
        }
      },
    );
    this.sched.compactRunning();
    this.inFlight = null;
    this.lastEndMs = endMs;
    this.steps++;
    this.busyMs += plan.durationMs;
    this.flushEvents();
    return { endMs, outputs, finished };
  }

  /**
   * Flush the prefix cache (vLLM /reset_prefix_cache): every cached block hash is forgotten and
   * AllBlocksCleared is emitted. Blocks held by running requests stay allocated (their content
   * is simply no longer shareable). If a step is in flight the event is delivered with it, after
   * the step's own events.
   */
  reset(): void {
    this.pool.clearCache();
    if (!this.inFlight) this.flushEvents();
  }

  stats(): EngineStats {
    let pending = 0;
    for (const r of this.sched.running) pending += r.numTokens - r.numComputed;
    for (const r of this.sched.waiting) pending += r.prefilled ? 1 : r.numTokens - r.numComputed;
    return {
      running: this.sched.running.length,
      waiting: this.sched.waiting.length,
      kvUsage: this.pool.usage(),
      numGpuBlocks: this.config.numGpuBlocks,
      freeBlocks: this.pool.numFree,
      cachedBlocks: this.pool.numCached,
      prefixCacheQueries: this.sched.counters.prefixCacheQueries,
      prefixCacheHits: this.sched.counters.prefixCacheHits,
      promptTokens: this.promptTokens,
      generationTokens: this.generationTokens,
      preemptions: this.sched.counters.preemptions,
      finishedRequests: this.finishedCount,
      abortedRequests: this.abortedCount,
      steps: this.steps,
      busyMs: this.busyMs,
      pendingTokens: pending,
      prefillTokensComputed: this.sched.counters.prefillTokensComputed,
      prefilledAdmissions: this.sched.counters.prefilledAdmissions,
      importedTokens: this.sched.counters.importedTokens,
    };
  }

  /** Live view of a request still in the engine (undefined once finished or aborted). */
  requestInfo(
    id: string,
  ):
    | {
        state: 'waiting' | 'running';
        promptTokens: number;
        outputTokens: number;
        cachedTokens: number;
        preemptions: number;
        prefilled: boolean;
        prefillTokensComputed: number;
      }
    | undefined {
    const r = this.requests.get(id);
    if (!r || (r.state !== 'waiting' && r.state !== 'running')) return undefined;
    return {
      state: r.state,
      promptTokens: r.numPromptTokens,
      outputTokens: r.numOutputTokens,
      cachedTokens: Math.max(0, r.cachedTokens),
      preemptions: r.preemptions,
      prefilled: r.submittedPrefilled,
      prefillTokensComputed: r.prefillTokensComputed,
    };
  }

  /** Hashes of all blocks currently in the prefix cache (tests, diagnostics). */
  cachedBlockHashes(): Set<bigint> {
    return this.pool.cachedHashes();
  }

  private flushEvents(): void {
    const events: KvEvent[] = this.pool.takeEvents();
    if (events.length > 0 && this.sink) this.sink(events);
  }
}

function recordOf(r: SimRequest, finishReason: FinishReason): RequestRecord {
  const rec: RequestRecord = {
    id: r.id,
    promptTokens: r.numPromptTokens,
    outputTokens: r.numOutputTokens,
    cachedTokens: Math.max(0, r.cachedTokens),
    arrivalMs: r.arrivalMs,
    firstScheduledMs: r.firstScheduledMs,
    firstTokenMs: r.firstTokenMs,
    finishMs: r.finishMs,
    queueMs: r.firstScheduledMs >= 0 ? r.firstScheduledMs - r.arrivalMs : -1,
    ttftMs: r.firstTokenMs >= 0 ? r.firstTokenMs - r.arrivalMs : -1,
    e2eMs: r.finishMs - r.arrivalMs,
    preemptions: r.preemptions,
    finishReason,
    prefillTokensComputed: r.prefillTokensComputed,
  };
  if (r.submittedPrefilled) rec.prefilled = true;
  if (r.finalBlockIds) rec.blockIds = r.finalBlockIds;
  return rec;
}
