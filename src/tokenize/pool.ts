import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { BlockHashes, RouteName } from '../core/context.js';
import { errors, GatewayError } from '../core/errors.js';
import type { PoolReply, PoolTask, PoolWorkerData, Prepared, PrepareTask } from './pool-worker.js';
import type { HfTokenizerOptions } from './hf.js';
import type { TokenCacheOptions } from './registry.js';

/**
 * Tokenization off the event loop: a few worker threads, each holding the `--tokenizer`
 * tokenizers, compute the token ids of requests for policies that need them (`kv_aware`,
 * `prefix_load`). A 100k-token chat costs hundreds of milliseconds of pure-JS BPE; on the main
 * thread that would stall every other request and every stream relayed meanwhile.
 *
 * Why not piscina: aborting a running piscina task terminates its thread, which would throw away
 * the loaded tokenizer (seconds to load) and its caches; and piscina has no task affinity. Here:
 * - each thread runs one task at a time; the queue is kept here, per thread, shortest prompt
 *   first (a long prompt waits for the --max-routing-ms budget, not a short one for a long one);
 * - a task goes to the thread chosen by a hash of its prompt's start (`affinity`), so the turns of
 *   a conversation meet the segment and whole-prompt caches of the thread that saw the earlier
 *   turns, unless that thread has 2 more tasks waiting than the least busy one;
 * - cancelling (the client left) drops a queued task, and stops a running one between the pieces
 *   of its encode (a shared flag the thread polls), keeping the thread and its caches.
 * - with `shortChars` (--short-tokenize-chars), one more thread, the short lane, takes the prompts
 *   up to that length and nothing else, so a short prompt never waits behind a running long one
 *   and the event loop needs no tokenizer of its own for them (when 3 are already in the lane, a
 *   shared thread with nothing queued or running takes the next short one);
 * A thread that dies fails its task (the caller then routes by text) and is started again.
 * One long prompt is encoded by all idle threads together (parallel-encode.ts), and on Linux the
 * threads may run below the event loop's priority (`nice`).
 */
export interface TokenizePoolOptions {
  threads: number;
  /** The --tokenizer entries (`PATH` or `MODEL=PATH`), loaded by every thread. */
  entries: readonly string[];
  /** Whole-prompt cache of each thread (false: none). */
  cache?: TokenCacheOptions | false;
  /**
   * Prompts at least this long (characters) are encoded by all idle threads together, cut where
   * the ids provably stay the same (parallel-encode.ts); default 32,768. 0 or Infinity: never.
   */
  parallelChars?: number;
  /**
   * Nice value of the threads (Linux, where it is per thread: the event loop keeps its own
   * priority); default 0. With the threads below the event loop, tokenizing can use every core
   * without delaying routing and relaying. Ignored elsewhere (it would apply to the process).
   */
  nice?: number;
  /** Options of the tokenizers the threads load (e.g. the word cache bound). */
  tokenizerOptions?: HfTokenizerOptions;
  /**
   * Prompts up to this many characters go to one more thread of their own (the short lane), which
   * longer prompts never use and which never joins a parallel encode: a short prompt never waits
   * behind a long one. It runs at nice 0 (it holds the event loop's short requests). 0: no lane
   * (default), short prompts share the threads with long ones (shortest first).
   */
  shortChars?: number;
}

export interface PoolRequest {
  route: RouteName;
  model: string;
  /** JSON bytes of the body (preferred: parsed in the thread), or the parsed body. */
  raw?: Uint8Array;
  body?: Record<string, unknown>;
  /** Text whose start picks the thread (the routing text). */
  affinity: string;
  /** Also hash the token ids' blocks with this block size and seed (kv_aware), in the thread. */
  blocks?: { blockSize: number; seed: bigint };
}

/** Token ids of a request, and their block hashes when asked for. */
export interface PoolResult {
  ids: Uint32Array;
  hashes?: BlockHashes;
}

/** A body to parse, validate and tokenize in a thread (--parse-off-loop-bytes). */
export interface PrepareRequest {
  route: RouteName;
  /** The body's bytes (copied to the thread: they stay here to be forwarded). */
  raw: Uint8Array;
  maxDepth: number;
  maxChars: number;
  blocks?: { blockSize: number; seed: bigint };
}

/** What the thread found in the body; ids (and hashes) when it tokenized. */
export interface PrepareResult {
  prepared: Prepared;
  ids?: Uint32Array;
  hashes?: BlockHashes;
}

interface Task {
  id: number;
  /** Prompt length: the queue is shortest first. */
  size: number;
  msg: PoolTask | PrepareTask;
  resolve(r: PoolResult | PrepareResult | undefined): void;
  reject(e: Error): void;
  signal?: AbortSignal;
  onAbort?: () => void;
}

interface Slot {
  /** The short lane's thread (`shortChars`): short prompts only. */
  short: boolean;
  worker: Worker;
  cancel: Int32Array;
  running: Task | undefined;
  queue: Task[];
}

/** Result of a cancelled task. */
export class TokenizeCancelled extends Error {
  constructor() {
    super('tokenization cancelled');
    this.name = 'TokenizeCancelled';
  }
}

function workerScript(): URL {
  const beside = new URL('./pool-worker.js', import.meta.url);
  if (existsSync(fileURLToPath(beside))) return beside;
  // Run from sources (tests): use the built thread script.
  return new URL('../../dist/tokenize/pool-worker.js', import.meta.url);
}

let poolCount = 0;
/** Tasks in the short lane (running and waiting) from which a short prompt may go to an idle shared thread instead. */
const LANE_BACKLOG = 3;

export class TokenizePool {
  private readonly slots: Slot[] = [];
  private nextId = 1;
  private closed = false;
  private counters = { tasks: 0, cancelled: 0, failed: 0, restarts: 0, laneOverflow: 0 };
  /** The threads' BroadcastChannel (one per pool: several pools may live in one process). */
  private readonly channel = `kvgate-tokenize-${process.pid}-${++poolCount}`;

  private constructor(private readonly opts: TokenizePoolOptions) {}

  /** Starts the threads and waits until each has loaded the tokenizers (rejects if one cannot). */
  static async start(opts: TokenizePoolOptions): Promise<TokenizePool> {
    if (!(opts.threads >= 1)) throw new RangeError('threads must be >= 1');
    const pool = new TokenizePool(opts);
    try {
      const lane = (opts.shortChars ?? 0) > 0 ? 1 : 0;
      await Promise.all(Array.from({ length: opts.threads + lane }, (_, i) => pool.spawn(i)));
    } catch (e) {
      await pool.close();
      throw e;
    }
    return pool;
  }

  /** Threads started (the short lane's included). */
  get threads(): number {
    return this.slots.length;
  }

  /** Characters up to which a prompt goes to the short lane (0: no lane). */
  get shortChars(): number {
    return this.opts.shortChars ?? 0;
  }

  /** Tasks running or waiting. */
  get pending(): number {
    let n = 0;
    for (const s of this.slots) n += s.queue.length + (s.running ? 1 : 0);
    return n;
  }

  /** `laneOverflow`: short prompts a shared thread took because the short lane was backed up. */
  stats(): { tasks: number; cancelled: number; failed: number; restarts: number; laneOverflow: number; pending: number } {
    return { ...this.counters, pending: this.pending };
  }

  /**
   * Token ids of a request, as `tokenizeRequest` computes them in the thread (undefined when it
   * cannot be reproduced). Rejects with the request's 400 GatewayError for malformed fields, with
   * TokenizeCancelled when `signal` aborts first, or with another error when a thread failed.
   */
  tokenize(req: PoolRequest, signal?: AbortSignal): Promise<Uint32Array | undefined> {
    return this.encode(req, signal).then((r) => r?.ids);
  }

  /** `tokenize`, with the block hashes of the ids when `req.blocks` asks for them. */
  encode(req: PoolRequest, signal?: AbortSignal): Promise<PoolResult | undefined> {
    const msg = (id: number): PoolTask => ({ id, route: req.route, model: req.model, raw: req.raw, body: req.raw ? undefined : req.body, blocks: req.blocks });
    return this.submit(msg, req.affinity.length, hashChars(req.affinity), signal) as Promise<PoolResult | undefined>;
  }

  /**
   * A body parsed, validated and tokenized in a thread, as the event loop would (the same
   * functions): rejects with its 400 GatewayError when it is not a JSON object (empty, not
   * UTF-8, too deep, not JSON), else resolves with what the event loop needs of it — its
   * top-level fields without the prompt, the routing text, stream flag and output limit (or the
   * 400 of a malformed field), and the ids and block hashes (or the 400 tokenizing raised).
   * Cancelled and failed as `encode`. The thread is chosen by the body's first bytes.
   */
  prepare(req: PrepareRequest, signal?: AbortSignal): Promise<PrepareResult> {
    const msg = (id: number): PrepareTask => ({ kind: 'prepare', id, route: req.route, raw: req.raw, maxDepth: req.maxDepth, maxChars: req.maxChars, blocks: req.blocks });
    return this.submit(msg, req.raw.length, hashBytes(req.raw), signal) as Promise<PrepareResult>;
  }

  private submit(make: (id: number) => PoolTask | PrepareTask, size: number, affinity: number, signal?: AbortSignal): Promise<PoolResult | PrepareResult | undefined> {
    if (this.closed) return Promise.reject(new Error('tokenizer pool closed'));
    if (signal?.aborted) return Promise.reject(new TokenizeCancelled());
    const id = this.nextId;
    this.nextId = this.nextId >= 0x7fffffff ? 1 : this.nextId + 1;
    this.counters.tasks++;
    return new Promise((resolve, reject) => {
      const task: Task = { id, size, msg: make(id), resolve, reject, signal };
      const slot = this.pick(size, affinity);
      if (signal) {
        task.onAbort = () => this.cancel(task);
        signal.addEventListener('abort', task.onAbort, { once: true });
      }
      // Shortest first: a short prompt does not wait behind queued long ones.
      let at = slot.queue.length;
      while (at > 0 && slot.queue[at - 1].size > task.size) at--;
      slot.queue.splice(at, 0, task);
      this.pump(slot);
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    const slots = this.slots.splice(0);
    for (const s of slots) {
      for (const t of [...(s.running ? [s.running] : []), ...s.queue]) this.finish(t, undefined, new Error('tokenizer pool closed'));
      s.queue = [];
      s.running = undefined;
    }
    await Promise.all(slots.map((s) => s.worker.terminate()));
  }

  // -------------------------------------------------------------------------------------------

  /**
   * A prompt of `size` characters up to `shortChars` goes to the short lane (the last slot);
   * others to the shared threads. `affinity`: hashChars or hashBytes of the request's start
   * (conversation turns meet their thread's caches).
   */
  private pick(size: number, affinity: number): Slot {
    const load = (s: Slot) => s.queue.length + (s.running ? 1 : 0);
    const n = this.opts.threads;
    const lane = this.slots.length > n ? this.slots[n] : undefined;
    if (lane && size <= this.shortChars) {
      // Backed up (a burst of short prompts): a shared thread with nothing to do takes one.
      if (load(lane) >= LANE_BACKLOG) {
        for (let i = 0; i < n; i++) {
          if (load(this.slots[i]) === 0) {
            this.counters.laneOverflow++;
            return this.slots[i];
          }
        }
      }
      return lane;
    }
    if (n === 1) return this.slots[0];
    const preferred = this.slots[affinity % n];
    let least = preferred;
    for (let i = 0; i < n; i++) if (load(this.slots[i]) < load(least)) least = this.slots[i];
    return load(preferred) >= load(least) + 2 ? least : preferred;
  }

  private pump(slot: Slot): void {
    if (slot.running || slot.queue.length === 0 || this.closed) return;
    const task = slot.queue.shift()!;
    slot.running = task;
    slot.worker.postMessage(task.msg);
  }

  private cancel(task: Task): void {
    this.counters.cancelled++;
    for (const slot of this.slots) {
      const at = slot.queue.indexOf(task);
      if (at >= 0) {
        slot.queue.splice(at, 1);
        this.finish(task, undefined, new TokenizeCancelled());
        return;
      }
      // Running: the thread stops between two pieces and answers 'cancelled'.
      if (slot.running === task) Atomics.store(slot.cancel, 0, task.id);
    }
  }

  private finish(task: Task, r: PoolResult | PrepareResult | undefined, err?: Error): void {
    if (task.onAbort) task.signal!.removeEventListener('abort', task.onAbort);
    if (err) task.reject(err);
    else task.resolve(r);
  }

  private spawn(index: number): Promise<void> {
    const cancel = new SharedArrayBuffer(4);
    const parallelChars = this.opts.parallelChars ?? 32_768;
    // The short lane: alone (threads 1: no parallel encodes, never a piece of a long prompt), at nice 0.
    const short = index >= this.opts.threads;
    const data: PoolWorkerData = {
      entries: [...this.opts.entries],
      cache: this.opts.cache ?? {},
      cancel,
      threads: short ? 1 : this.opts.threads,
      channel: short ? `${this.channel}-short` : this.channel,
      parallelChars: parallelChars > 0 ? parallelChars : Infinity,
      nice: short ? 0 : (this.opts.nice ?? 0),
      tokenizerOptions: this.opts.tokenizerOptions ?? {},
    };
    const worker = new Worker(workerScript(), { workerData: data });
    worker.unref();
    const slot: Slot = { short, worker, cancel: new Int32Array(cancel), running: undefined, queue: [] };
    return new Promise<void>((resolve, reject) => {
      let ready = false;
      worker.on('message', (m: PoolReply) => {
        if (m.type === 'ready') {
          ready = true;
          this.slots[index] = slot;
          resolve();
          return;
        }
        if (m.type === 'failed') {
          reject(new Error(`tokenizer thread could not load the tokenizers: ${m.message}`));
          void worker.terminate();
          return;
        }
        const task = slot.running;
        if (!task || task.id !== m.id) return;
        slot.running = undefined;
        if (m.type === 'done' || m.type === 'prepared') {
          const b = task.msg.blocks;
          const hashes = m.ids && b && m.local && m.seq ? { blockSize: b.blockSize, seed: b.seed, local: m.local, seq: m.seq } : undefined;
          if (m.type === 'prepared') this.finish(task, { prepared: m.prepared, ids: m.ids ?? undefined, hashes });
          else this.finish(task, m.ids ? { ids: m.ids, hashes } : undefined);
        }
        else if (m.type === 'cancelled') this.finish(task, undefined, new TokenizeCancelled());
        else {
          if (m.status >= 500) this.counters.failed++;
          this.finish(task, undefined, m.status < 500 ? new GatewayError(m.status, m.message, m.errType, m.code, m.param) : errors.internal(`tokenizer thread: ${m.message}`));
        }
        this.pump(slot);
      });
      worker.on('error', (e) => {
        if (!ready) reject(e);
      });
      worker.on('exit', () => {
        if (!ready || this.closed || this.slots[index] !== slot) return;
        // Died (out of memory, a bug): fail its tasks' wait, start another thread, move the queue there.
        this.counters.restarts++;
        const orphaned = [...(slot.running ? [slot.running] : []), ...slot.queue];
        slot.running = undefined;
        slot.queue = [];
        if (orphaned[0]) {
          this.counters.failed++;
          this.finish(orphaned[0], undefined, new Error('tokenizer thread exited'));
        }
        this.spawn(index).then(
          () => {
            const fresh = this.slots[index];
            fresh.queue.push(...orphaned.slice(1));
            this.pump(fresh);
          },
          (e: Error) => {
            for (const t of orphaned.slice(1)) this.finish(t, undefined, e);
          },
        );
      });
    });
  }
}

/** FNV-1a over the first 512 characters: the start of a conversation (system prompt, first turn). */
function hashChars(s: string): number {
  let h = 0x811c9dc5;
  const len = Math.min(s.length, 512);
  for (let i = 0; i < len; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** FNV-1a over the first 512 bytes of a body (its fields before and at the start of the prompt). */
function hashBytes(b: Uint8Array): number {
  let h = 0x811c9dc5;
  const len = Math.min(b.length, 512);
  for (let i = 0; i < len; i++) h = Math.imul(h ^ b[i], 0x01000193);
  return h >>> 0;
}
