/**
 * ZMQ subscriber for vLLM / SGLang KV events (docs reference §1.2–1.5, §1.7) with per-source
 * sequence tracking and gap repair through the engine's replay ROUTER.
 *
 * Two socket modes:
 *  - 'connect' (default, "pod discovery"): one SUB connected to one engine's (or DP rank's) PUB
 *    endpoint; every message belongs to `sourceKey`, repaired through `replayEndpoint`.
 *  - 'bind' ("centralized", llm-d): one SUB bound on `endpoint`; engines connect their PUB to it.
 *    ZMQ does not tell which peer sent a message, so a message's source is identified by its topic
 *    (frame 0) and the batch's dp rank: `resolveSource(topic, dpRank)` maps them to a source key
 *    and that source's replay endpoint (null → message ignored, counted `unroutable`). Engines
 *    must therefore use distinct topics (llm-d convention `kv@<pod-ip>:<port>@<model>`); the
 *    default resolver keys by topic and rank and has no replay.
 *
 * Sequence state machine, per source (all seqs are u64 bigints; "live" = read from the SUB):
 *  - First contact (no seq applied yet): seq 0 is applied as is. A seq > 0 means the engine has
 *    history we never saw: with a replay endpoint, request a replay from 0 (the engine returns what
 *    its buffer still holds, possibly from a later seq: normal at cold start, no reset), buffering
 *    live batches meanwhile; without one, start from that seq.
 *  - next seq (last + 1): applied.
 *  - seq ≤ last applied but above every live seq seen so far: a duplicate of a batch already applied
 *    from a replay → dropped (`duplicates`).
 *  - live seq ≤ the previous live seq: the live stream of one publisher only goes up, so the engine
 *    restarted → onReset(key, 'restart'), any replay in flight is abandoned, buffered batches are
 *    discarded, and the seq is handled as a first contact.
 *  - gap (seq > last + 1): with a replay endpoint, a DEALER sends ["", last+1 (8B BE)] and reads
 *    ["", seq, payload] until seq = 0xFFFFFFFFFFFFFFFF; while it runs, live batches are buffered;
 *    afterwards the buffer is applied through the same rules (duplicates dropped), so every batch is
 *    applied once and strictly in seq order. If the replay starts after last+1 (evicted from the
 *    engine's buffer) or returns nothing, onReset(key, 'replay-incomplete') and continue from the
 *    first seq available (the caller rebuilds the source's index from the new events).
 *    Without a replay endpoint, or when the replay fails / times out, the missing seqs are counted
 *    `lost` and the source is flagged `inaccurate` (the index may hold stale blocks or miss some);
 *    application continues. The flag is cleared by a reset or by an applied AllBlocksCleared.
 *  - A payload that cannot be decoded still consumes its seq (it is skipped, counted `malformed`,
 *    source flagged inaccurate), so it does not trigger replays over and over.
 *
 * Limits: a restart is seen only when the live seq goes backwards (a restarted engine whose seq
 * overtook ours while we were disconnected looks like a gap); live batches buffered during a replay
 * are bounded only by the replay timeout (per reply) times the event rate.
 *
 * A new subscriber assumes that the caller's index holds nothing for its sources.
 * Callbacks are called synchronously, in seq order, never after close(); an exception thrown by a
 * callback is logged and does not stop the stream.
 */
import * as zmq from 'zeromq';
import type { Logger } from 'pino';
import { systemClock, type Clock } from '../core/clock.js';
import { decodeKvEventBatch, decodeSeq } from './decode.js';
import type { KvEventBatch } from './types.js';

export type KvResetReason = 'restart' | 'replay-incomplete';

/** A source (one engine, or one DP rank of it) as identified in bind mode. */
export interface KvSourceInfo {
  key: string;
  /** The engine's replay ROUTER endpoint; absent/null = no replay for this source. */
  replayEndpoint?: string | null;
}

export type KvSubscriberLogger = Pick<Logger, 'debug' | 'info' | 'warn' | 'error'>;

interface KvEventSubscriberCommonOptions {
  /** SUB endpoint: connected to (connect mode) or bound (bind mode, "*" ports allowed). */
  endpoint: string;
  /** Subscription prefix on the topic frame; default "" (everything). */
  topicPrefix?: string;
  /** Called once per batch, in seq order per source. */
  onBatch: (sourceKey: string, batch: KvEventBatch) => void;
  /** The source's index must be cleared; subsequent batches rebuild it. */
  onReset: (sourceKey: string, reason: KvResetReason) => void;
  /** Monotonic ms clock for `lastBatchAt` / staleness; default systemClock. */
  clock?: Clock;
  /** Wall clock, ms since the epoch, for event lag against the batch ts; default Date.now. */
  epochMs?: () => number;
  /** A source is `stale` when no live message arrived for this long (never stale when unset). */
  staleAfterMs?: number;
  /** Max wait for each replay reply (and for sending the request); default 5000 ms. */
  replayTimeoutMs?: number;
  logger?: KvSubscriberLogger;
}

export type KvEventSubscriberOptions = KvEventSubscriberCommonOptions &
  (
    | { mode?: 'connect'; sourceKey: string; replayEndpoint?: string | null }
    | { mode: 'bind'; resolveSource?: (topic: string, dpRank: number | null) => KvSourceInfo | null }
  );

export interface KvSourceStats {
  /** Live messages read for this source (including duplicates and buffered ones). */
  received: number;
  /** Batches handed to onBatch (live and replayed). */
  applied: number;
  /** Of `applied`, batches that came from a replay. */
  replayed: number;
  replayRequests: number;
  /** Replays that timed out or failed on the socket. */
  replayFailures: number;
  /** duplicates + lost. */
  dropped: number;
  /** Batches with a seq already applied (live copies of replayed batches). */
  duplicates: number;
  /** Seqs never applied: gaps without replay, failed replays. */
  lost: number;
  /** Malformed events skipped + undecodable batches skipped. */
  malformed: number;
  restarts: number;
  /** onReset calls (all reasons). */
  resets: number;
  /** Live batches buffered while a replay is in flight. */
  pending: number;
  replaying: boolean;
  /** Last applied (or skipped-undecodable) seq. */
  lastSeq: bigint | null;
  /** now − ts of the last live batch, in seconds. */
  lastEventLagS: number | null;
  /** clock.now() when the last live message arrived. */
  lastBatchAt: number | null;
  stale: boolean;
  /** Events were lost without a reset: the index may differ from the engine. */
  inaccurate: boolean;
}

export interface KvSubscriberStats {
  sources: Record<string, KvSourceStats>;
  /** Live messages that could not be decoded (wrong frame count, bad seq frame, bad payload). */
  undecodable: number;
  /** Bind mode: messages for which resolveSource returned null. */
  unroutable: number;
}

/** vLLM's END_SEQ: (-1).to_bytes(8, "big", signed=True). */
const END_SEQ = 0xffff_ffff_ffff_ffffn;
const EMPTY = Buffer.alloc(0);
const DEFAULT_REPLAY_TIMEOUT_MS = 5000;

interface Item {
  seq: bigint;
  /** null: the payload could not be decoded (the seq is still consumed). */
  batch: KvEventBatch | null;
}

type ReplayKind = 'first-contact' | 'gap';

class Source {
  last: bigint | null = null;
  lastLive: bigint | null = null;
  pending: Item[] = [];
  pendingHead = 0;
  /** Bumped on restart: replies of an older replay are then ignored. */
  generation = 0;
  dealer: zmq.Dealer | null = null;
  inaccurate = false;
  lastBatchAt: number | null = null;
  lastEventLagS: number | null = null;
  readonly c = {
    received: 0,
    applied: 0,
    replayed: 0,
    replayRequests: 0,
    replayFailures: 0,
    duplicates: 0,
    lost: 0,
    malformed: 0,
    restarts: 0,
    resets: 0,
  };

  constructor(
    readonly key: string,
    public replayEndpoint: string | null,
    readonly since: number,
  ) {}

  get replaying(): boolean {
    return this.dealer !== null;
  }
}

function seqBytes(seq: bigint): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(seq);
  return b;
}

function defaultResolveSource(topic: string, dpRank: number | null): KvSourceInfo {
  return { key: dpRank === null ? topic : `${topic}@dp${dpRank}` };
}

export class KvEventSubscriber {
  private readonly opts: KvEventSubscriberOptions;
  private readonly bindMode: boolean;
  private readonly clock: Clock;
  private readonly epochMs: () => number;
  private readonly replayTimeoutMs: number;
  private readonly log: KvSubscriberLogger | undefined;
  private readonly resolve: (topic: string, dpRank: number | null) => KvSourceInfo | null;
  private readonly single: Source | null;
  private readonly sources = new Map<string, Source>();

  private sub: zmq.Subscriber | null = null;
  private readLoop: Promise<void> | null = null;
  private readonly replayTasks = new Set<Promise<void>>();
  /** Serializes start / pause / resume / close. */
  private ops: Promise<void> = Promise.resolve();
  private started = false;
  private paused = false;
  private closed = false;
  private closePromise: Promise<void> | null = null;
  private bindAddress: string | null = null;
  private undecodable = 0;
  private unroutable = 0;

  constructor(opts: KvEventSubscriberOptions) {
    if (!opts.endpoint) throw new Error('KvEventSubscriber: endpoint is required');
    if (typeof opts.onBatch !== 'function' || typeof opts.onReset !== 'function') {
      throw new TypeError('KvEventSubscriber: onBatch and onReset are required');
    }
    this.opts = opts;
    this.clock = opts.clock ?? systemClock;
    this.epochMs = opts.epochMs ?? Date.now;
    this.replayTimeoutMs = opts.replayTimeoutMs ?? DEFAULT_REPLAY_TIMEOUT_MS;
    if (!(this.replayTimeoutMs > 0)) throw new RangeError('KvEventSubscriber: replayTimeoutMs must be > 0');
    this.log = opts.logger;
    if (opts.mode === 'bind') {
      this.bindMode = true;
      this.resolve = opts.resolveSource ?? defaultResolveSource;
      this.single = null;
    } else {
      if (!opts.sourceKey) throw new Error('KvEventSubscriber: sourceKey is required in connect mode');
      this.bindMode = false;
      this.resolve = () => null;
      this.single = new Source(opts.sourceKey, opts.replayEndpoint || null, this.clock.now());
      this.sources.set(opts.sourceKey, this.single);
    }
  }

  /** Opens the SUB (connect, or bind) and starts reading. Idempotent. */
  start(): Promise<void> {
    if (this.started) return this.ops;
    this.started = true;
    return this.enqueue(() => this.open());
  }

  /**
   * Closes the SUB socket (the publisher then drops what it sends us) until resume(). Replays in
   * flight continue. For tests that need missed events; a no-op when not started or closed.
   */
  pause(): Promise<void> {
    return this.enqueue(async () => {
      if (!this.sub) return;
      this.paused = true;
      await this.shutSub();
    });
  }

  /** Reopens the SUB after pause() (same endpoint; in bind mode the same resolved port). */
  resume(): Promise<void> {
    return this.enqueue(async () => {
      if (!this.paused) return;
      this.paused = false;
      await this.open();
    });
  }

  /** Closes every socket and ends every loop; no callback after it resolves. Idempotent. */
  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closed = true;
    // Unblock whatever is waiting now, then wait for the queued ops and the loops.
    this.sub?.close();
    for (const s of this.sources.values()) this.abortReplay(s);
    this.closePromise = this.enqueue(async () => {
      await this.shutSub();
      while (this.replayTasks.size > 0) await Promise.all([...this.replayTasks]);
    });
    return this.closePromise;
  }

  /** Bind mode: the endpoint actually bound ("*" port resolved); null before start / connect mode. */
  get boundEndpoint(): string | null {
    return this.bindAddress;
  }

  stats(): KvSubscriberStats {
    const sources: Record<string, KvSourceStats> = {};
    for (const s of this.sources.values()) sources[s.key] = this.sourceStatsOf(s);
    return { sources, undecodable: this.undecodable, unroutable: this.unroutable };
  }

  /** Stats of one source; null when nothing was ever received for it (bind mode). */
  sourceStats(sourceKey: string): KvSourceStats | null {
    const s = this.sources.get(sourceKey);
    return s ? this.sourceStatsOf(s) : null;
  }

  private sourceStatsOf(s: Source): KvSourceStats {
    const staleAfter = this.opts.staleAfterMs;
    return {
      ...s.c,
      dropped: s.c.duplicates + s.c.lost,
      pending: s.pending.length - s.pendingHead,
      replaying: s.replaying,
      lastSeq: s.last,
      lastEventLagS: s.lastEventLagS,
      lastBatchAt: s.lastBatchAt,
      stale: staleAfter !== undefined && this.clock.now() - (s.lastBatchAt ?? s.since) > staleAfter,
      inaccurate: s.inaccurate,
    };
  }

  // ---------------------------------------------------------------------------------------------
  // Sockets

  private enqueue(op: () => Promise<void>): Promise<void> {
    const run = this.ops.then(op);
    this.ops = run.catch(() => undefined);
    return run;
  }

  private async open(): Promise<void> {
    if (this.closed) return;
    const sub = new zmq.Subscriber({ linger: 0, receiveHighWaterMark: 100_000 });
    try {
      if (this.bindMode) {
        await bindWithRetry(sub, this.bindAddress ?? this.opts.endpoint);
        this.bindAddress = sub.lastEndpoint ?? this.opts.endpoint;
      } else {
        sub.connect(this.opts.endpoint);
      }
      if (this.opts.topicPrefix) sub.subscribe(this.opts.topicPrefix);
      else sub.subscribe();
    } catch (err) {
      sub.close();
      throw err;
    }
    if (this.closed) {
      sub.close();
      return;
    }
    this.sub = sub;
    this.readLoop = this.read(sub);
  }

  private async shutSub(): Promise<void> {
    const sub = this.sub;
    this.sub = null;
    if (sub && !sub.closed) sub.close();
    if (this.readLoop) await this.readLoop;
    this.readLoop = null;
  }

  private async read(sub: zmq.Subscriber): Promise<void> {
    try {
      for await (const frames of sub) {
        if (this.closed || sub.closed) break;
        this.onMessage(frames);
      }
    } catch (err) {
      if (!sub.closed && !this.closed) this.log?.error({ err }, 'kv-events: SUB read loop failed');
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Live messages

  private onMessage(frames: Buffer[]): void {
    const now = this.clock.now();
    if (frames.length !== 3) {
      this.undecodable++;
      return;
    }
    const [topicFrame, seqFrame, payload] = frames as [Buffer, Buffer, Buffer];
    let seq: bigint;
    try {
      seq = decodeSeq(seqFrame);
    } catch {
      this.undecodable++;
      return;
    }
    let batch: KvEventBatch | null = null;
    try {
      batch = decodeKvEventBatch(seqFrame, payload);
    } catch (err) {
      this.undecodable++;
      this.log?.warn({ err, seq: String(seq) }, 'kv-events: undecodable batch');
    }
    let src = this.single;
    if (src === null) {
      // Bind mode: the dp rank lives inside the payload; without it the source is unknown. The
      // seq gap this leaves is repaired by the source's replay, which knows the source.
      if (batch === null) return;
      let info: KvSourceInfo | null = null;
      try {
        info = this.resolve(topicFrame.toString('utf8'), batch.dpRank);
      } catch (err) {
        this.log?.error({ err }, 'kv-events: resolveSource threw');
      }
      if (!info) {
        this.unroutable++;
        return;
      }
      src = this.sources.get(info.key) ?? null;
      if (src === null) {
        src = new Source(info.key, info.replayEndpoint || null, now);
        this.sources.set(info.key, src);
      } else {
        src.replayEndpoint = info.replayEndpoint || null;
      }
    }
    this.onLive(src, { seq, batch }, now);
  }

  private onLive(src: Source, item: Item, now: number): void {
    src.c.received++;
    src.lastBatchAt = now;
    if (item.batch !== null && Number.isFinite(item.batch.ts)) src.lastEventLagS = this.epochMs() / 1000 - item.batch.ts;
    if (src.lastLive !== null && item.seq <= src.lastLive) this.restart(src, item.seq);
    src.lastLive = item.seq;
    if (src.replaying) {
      src.pending.push(item);
      return;
    }
    if (this.process(src, item) === 'replay') src.pending.push(item);
  }

  /** Applies / drops `item`, or starts a replay that must precede it (the caller buffers it). */
  private process(src: Source, item: Item): 'done' | 'replay' {
    if (src.last === null) {
      if (item.seq === 0n || src.replayEndpoint === null) {
        this.apply(src, item, false);
        return 'done';
      }
      this.startReplay(src, 0n, 'first-contact');
      return 'replay';
    }
    if (item.seq <= src.last) {
      src.c.duplicates++;
      return 'done';
    }
    if (item.seq > src.last + 1n) {
      if (src.replayEndpoint !== null) {
        this.startReplay(src, src.last + 1n, 'gap');
        return 'replay';
      }
      this.lose(src, item.seq);
    }
    this.apply(src, item, false);
    return 'done';
  }

  /** Applies buffered live batches until the buffer is empty or another replay starts. */
  private drain(src: Source): void {
    while (!this.closed && !src.replaying && src.pendingHead < src.pending.length) {
      const item = src.pending[src.pendingHead]!;
      src.pendingHead++;
      if (this.process(src, item) === 'replay') {
        src.pendingHead--; // stays first in line behind the replay
        return;
      }
    }
    if (src.pendingHead >= src.pending.length) {
      src.pending = [];
      src.pendingHead = 0;
    }
  }

  private apply(src: Source, item: Item, fromReplay: boolean): void {
    src.last = item.seq;
    const batch = item.batch;
    if (batch === null) {
      src.c.malformed++;
      src.inaccurate = true;
      return;
    }
    src.c.applied++;
    if (fromReplay) src.c.replayed++;
    for (let i = 0; i < batch.events.length; i++) if (batch.events[i]!.type === 'cleared') src.inaccurate = false;
    if (batch.malformed > 0) {
      src.c.malformed += batch.malformed;
      src.inaccurate = true;
    }
    try {
      this.opts.onBatch(src.key, batch);
    } catch (err) {
      this.log?.error({ err, source: src.key, seq: String(item.seq) }, 'kv-events: onBatch threw');
    }
  }

  /** Seqs last+1 .. upTo-1 will never be applied; continue at upTo. */
  private lose(src: Source, upTo: bigint): void {
    const n = src.last === null ? 0n : upTo - src.last - 1n;
    if (n > 0n) {
      src.c.lost += Number(n);
      src.inaccurate = true;
      this.log?.warn({ source: src.key, from: String(src.last! + 1n), count: Number(n) }, 'kv-events: seq gap not recovered');
    }
    src.last = upTo - 1n;
  }

  private reset(src: Source, reason: KvResetReason): void {
    src.c.resets++;
    src.inaccurate = false;
    this.log?.info({ source: src.key, reason }, 'kv-events: source reset');
    try {
      this.opts.onReset(src.key, reason);
    } catch (err) {
      this.log?.error({ err, source: src.key }, 'kv-events: onReset threw');
    }
  }

  private restart(src: Source, seq: bigint): void {
    src.c.restarts++;
    src.generation++;
    this.abortReplay(src);
    src.pending = [];
    src.pendingHead = 0;
    src.last = null;
    src.lastLive = null;
    this.log?.info({ source: src.key, seq: String(seq) }, 'kv-events: publisher restarted (seq went backwards)');
    this.reset(src, 'restart');
  }

  // ---------------------------------------------------------------------------------------------
  // Replay

  private abortReplay(src: Source): void {
    const d = src.dealer;
    src.dealer = null;
    if (d && !d.closed) d.close();
  }

  private startReplay(src: Source, start: bigint, kind: ReplayKind): void {
    const dealer = new zmq.Dealer({ linger: 0, sendTimeout: this.replayTimeoutMs, receiveTimeout: this.replayTimeoutMs });
    src.dealer = dealer;
    src.c.replayRequests++;
    const task = this.runReplay(src, dealer, start, kind).finally(() => this.replayTasks.delete(task));
    this.replayTasks.add(task);
  }

  private async runReplay(src: Source, dealer: zmq.Dealer, start: bigint, kind: ReplayKind): Promise<void> {
    const gen = src.generation;
    const current = (): boolean => !this.closed && src.generation === gen && src.dealer === dealer;
    const lastBefore = src.last;
    let firstSeq: bigint | null = null;
    let ok = false;
    try {
      dealer.connect(src.replayEndpoint!);
      await dealer.send([EMPTY, seqBytes(start)]);
      for (;;) {
        const frames = await dealer.receive();
        if (!current()) return;
        // ["", seq, payload] from vLLM/SGLang; llm-d-inference-sim sends [topic, seq, payload].
        if (frames.length !== 3 || frames[1]!.length !== 8) {
          this.log?.warn({ source: src.key, frames: frames.length }, 'kv-events: malformed replay reply ignored');
          continue;
        }
        const seqFrame = frames[1]!;
        const seq = seqFrame.readBigUInt64BE(0);
        if (seq === END_SEQ) {
          ok = true;
          break;
        }
        if (firstSeq === null) {
          firstSeq = seq;
          if (kind === 'first-contact') {
            src.last = seq - 1n; // whatever the engine still has is our starting point
          } else if (seq > start) {
            this.reset(src, 'replay-incomplete');
            src.last = seq - 1n;
          }
        }
        let batch: KvEventBatch | null = null;
        try {
          batch = decodeKvEventBatch(seqFrame, frames[2]!);
        } catch (err) {
          this.log?.warn({ err, source: src.key, seq: String(seq) }, 'kv-events: undecodable replayed batch');
        }
        if (src.last !== null && seq <= src.last) {
          src.c.duplicates++;
          continue;
        }
        if (src.last !== null && seq > src.last + 1n) this.lose(src, seq);
        this.apply(src, { seq, batch }, true);
      }
    } catch (err) {
      if (!current()) return;
      src.c.replayFailures++;
      this.log?.warn({ err, source: src.key, start: String(start) }, 'kv-events: replay failed');
    } finally {
      if (!dealer.closed) dealer.close();
      if (src.dealer === dealer) src.dealer = null;
    }
    if (this.closed || src.generation !== gen) return;

    const next = src.pending[src.pendingHead];
    if (next !== undefined && (src.last === null || next.seq > src.last + 1n)) {
      // The replay did not reach the live batch that triggered it.
      if (src.last === null) {
        src.last = next.seq - 1n; // first contact, no history available: start live
      } else if (!ok) {
        this.lose(src, next.seq); // replay failed: the gap stays a gap
      } else if (src.last === lastBefore) {
        // Nothing usable came back: the start was evicted along with everything up to `next`.
        if (kind === 'gap') this.reset(src, 'replay-incomplete');
        src.last = next.seq - 1n;
      }
      // Otherwise it made progress and more was lost after its snapshot: drain replays again.
    }
    this.drain(src);
  }
}

/** Bind, retrying briefly: after pause() the port of the closed socket may not be free yet. */
async function bindWithRetry(sock: zmq.Subscriber, endpoint: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await sock.bind(endpoint);
      return;
    } catch (err) {
      if (attempt >= 20 || (err as { code?: string }).code !== 'EADDRINUSE') throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
