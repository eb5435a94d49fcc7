import type { Logger } from 'pino';
import { BlockIndex, type MediumMode } from '../cache/block-index.js';
import type { Clock } from '../core/clock.js';
import type { KvIndexView } from '../policies/kv-aware.js';
import { KvEventSubscriber, type KvSourceInfo, type KvSourceStats } from './subscriber.js';
import type { KvEventBatch } from './types.js';

export interface KvEventHubOptions {
  clock: Clock;
  logger: Logger;
  mediums: MediumMode;
  /** Bound SUB that engines connect to (centralised mode), instead of / besides per-worker SUBs. */
  bind?: string;
  /** Bind mode: which worker id a (topic, dp rank) belongs to. */
  resolveSource?: (topic: string, dpRank: number | null) => KvSourceInfo | null;
  maxBlocks?: number;
  /**
   * The workers to watch for silent subscriptions (see {@link KvEventHub.checkSilence}), checked
   * every `silenceCheckMs` (default 1000; 0 = only when called).
   */
  workers?: () => Iterable<WatchedWorker>;
  silenceCheckMs?: number;
  /** A subscription is silent after this many requests completed without events (default 5)... */
  silentAfterCompletions?: number;
  /** ...and, once events have arrived, after the last one is older than this (ms, default 5000). */
  staleAfterMs?: number;
}

/** What the silence check reads of a worker, and where it writes its verdict (shown in GET /workers). */
export interface WatchedWorker {
  readonly id: string;
  /** Requests finished on the worker (any outcome). */
  readonly processed: number;
  kvEvents?: object;
}

/** A worker's KV-event subscription as `GET /workers` shows it (`kv_events`). */
export interface KvEventsStatus {
  subscribed: boolean;
  /** `connect` (a SUB per worker) or `bind` (engines connect to --kv-events-bind). */
  mode: 'connect' | 'bind';
  endpoint: string | null;
  /** Milliseconds since the last event batch was applied; null if none ever. */
  last_event_age_ms: number | null;
  /** Requests finished on the worker since its last event batch (or since subscribing). */
  completions_without_events: number;
  /** Requests keep completing but no events arrive: a misconfigured publisher/subscriber pair. */
  silent: boolean;
}

interface SilenceState {
  /** worker.processed when the last event batch was seen (or at subscription). */
  baseline: number;
  /** lastAt when baseline was taken. */
  seenAt: number | undefined;
  warned: boolean;
  silent: boolean;
}

export interface KvHubCounters {
  batches: number;
  events: number;
  resets: number;
}

/**
 * The KV-event side of the gateway: one block index fed by every engine's events, through one
 * ZMQ subscriber per worker (or data-parallel rank), or one bound subscriber engines connect to.
 * Source keys are worker ids (`url` or `url@rank`). Implements what kv_aware reads.
 */
export class KvEventHub implements KvIndexView {
  readonly index: BlockIndex;
  private readonly subs = new Map<string, KvEventSubscriber>();
  private bound: KvEventSubscriber | undefined;
  private readonly lastAt = new Map<string, number>();
  private readonly resets = new Map<string, number>();
  readonly counters: KvHubCounters = { batches: 0, events: 0, resets: 0 };
  private readonly endpoints = new Map<string, string>();
  private readonly silence = new Map<string, SilenceState>();
  private silenceTimer: NodeJS.Timeout | undefined;

  constructor(private readonly opts: KvEventHubOptions) {
    this.index = new BlockIndex({ mediums: opts.mediums, maxBlocks: opts.maxBlocks });
    const every = opts.silenceCheckMs ?? 1000;
    if (opts.workers && every > 0) {
      this.silenceTimer = setInterval(() => this.checkSilence(), every);
      this.silenceTimer.unref();
    }
  }

  /**
   * Finds subscriptions that deliver nothing while their worker completes requests: a worker
   * with a subscription (its own, or the bound SUB) that finished `silentAfterCompletions`
   * requests since its last event batch (or since subscribing), with no batch for
   * `staleAfterMs`, is silent. Logs one warning per worker (again only after it recovered),
   * and writes each watched worker's {@link KvEventsStatus}. Returns the silent worker ids.
   */
  checkSilence(workers: Iterable<WatchedWorker> | undefined = this.opts.workers?.()): string[] {
    const out: string[] = [];
    if (!workers) return out;
    const now = this.opts.clock.now();
    const threshold = this.opts.silentAfterCompletions ?? 5;
    const staleMs = this.opts.staleAfterMs ?? 5000;
    for (const w of workers) {
      const own = this.subs.has(w.id);
      if (!own && !this.bound) {
        if (w.kvEvents) w.kvEvents = undefined;
        continue;
      }
      const last = this.lastAt.get(w.id);
      let st = this.silence.get(w.id);
      if (!st) this.silence.set(w.id, (st = { baseline: w.processed, seenAt: last, warned: false, silent: false }));
      if (last !== st.seenAt) {
        st.baseline = w.processed;
        st.seenAt = last;
      }
      const without = Math.max(0, w.processed - st.baseline);
      const silent = without >= threshold && (last === undefined || now - last > staleMs);
      const endpoint = own ? (this.endpoints.get(w.id) ?? null) : (this.bound?.boundEndpoint ?? this.opts.bind ?? null);
      if (silent && !st.warned) {
        st.warned = true;
        this.opts.logger.warn(
          { worker: w.id, endpoint, mode: own ? 'connect' : 'bind', completions: without, lastEventAgeMs: last === undefined ? null : now - last },
          own
            ? `KV events: no events from ${w.id} while ${without} requests completed there. kvgate CONNECTS its SUB to ${endpoint}: the engine's publisher must BIND it (vLLM/SGLang bind when the endpoint has '*', e.g. --kv-events-config '{"endpoint":"tcp://*:5557",...}'). If both sides connect to an address, nobody binds and nothing arrives. Also check enable_kv_cache_events and the port (rank r of a DP engine publishes on port + r). Routing to it falls back to approximate.`
            : `KV events: no events from ${w.id} while ${without} requests completed there. kvgate BINDS ${endpoint} (--kv-events-bind): the engine's publisher must CONNECT to it (an endpoint without '*', e.g. "tcp://<kvgate-host>:<port>") and its topic must name the worker (kv@<host>:<port>@<model>). If both sides bind or both connect, nothing arrives. Routing to it falls back to approximate.`,
        );
      } else if (!silent && st.warned && last !== undefined && now - last <= staleMs) {
        st.warned = false;
        this.opts.logger.info({ worker: w.id }, 'KV events: events arriving again');
      }
      st.silent = silent;
      w.kvEvents = {
        subscribed: true,
        mode: own ? 'connect' : 'bind',
        endpoint,
        last_event_age_ms: last === undefined ? null : Math.max(0, now - last),
        completions_without_events: without,
        silent,
      };
      if (silent) out.push(w.id);
    }
    return out;
  }

  /** Workers whose subscription is silent at the last check (for the metric). */
  silentSources(): Map<string, boolean> {
    const out = new Map<string, boolean>();
    for (const [id, st] of this.silence) out.set(id, st.silent);
    return out;
  }

  async start(): Promise<void> {
    if (!this.opts.bind) return;
    this.bound = new KvEventSubscriber({
      mode: 'bind',
      endpoint: this.opts.bind,
      resolveSource: this.opts.resolveSource,
      onBatch: (key, batch) => this.apply(key, batch),
      onReset: (key, reason) => this.reset(key, reason),
      clock: this.opts.clock,
      logger: this.opts.logger,
    });
    await this.bound.start();
    this.opts.logger.info({ endpoint: this.bound.boundEndpoint }, 'KV events: bound subscriber listening');
  }

  /** Subscribes to one worker's (or rank's) publisher. */
  async addSource(workerId: string, endpoint: string, replayEndpoint?: string): Promise<void> {
    if (this.subs.has(workerId)) await this.removeSource(workerId);
    const sub = new KvEventSubscriber({
      endpoint,
      sourceKey: workerId,
      replayEndpoint: replayEndpoint ?? null,
      onBatch: (key, batch) => this.apply(key, batch),
      onReset: (key, reason) => this.reset(key, reason),
      clock: this.opts.clock,
      logger: this.opts.logger,
    });
    this.subs.set(workerId, sub);
    this.endpoints.set(workerId, endpoint);
    // Completions are counted from now on (the silence check's baseline).
    let processed = 0;
    for (const w of this.opts.workers?.() ?? []) if (w.id === workerId) processed = w.processed;
    this.silence.set(workerId, { baseline: processed, seenAt: this.lastAt.get(workerId), warned: false, silent: false });
    await sub.start();
    this.opts.logger.info({ worker: workerId, endpoint, replayEndpoint }, 'KV events: subscribed');
  }

  async removeSource(workerId: string): Promise<void> {
    const sub = this.subs.get(workerId);
    this.subs.delete(workerId);
    this.endpoints.delete(workerId);
    this.silence.delete(workerId);
    await sub?.close();
    this.index.removeSource(workerId);
    this.lastAt.delete(workerId);
  }

  /** Stops reading a worker's events (ops and tests); events published meanwhile are missed and later repaired by replay. */
  async pauseSource(workerId: string): Promise<void> {
    await this.subs.get(workerId)?.pause();
  }

  async resumeSource(workerId: string): Promise<void> {
    await this.subs.get(workerId)?.resume();
  }

  hasSource(workerId: string): boolean {
    return this.subs.has(workerId) || this.lastAt.has(workerId);
  }

  lastEventAtMs(workerId: string): number | undefined {
    return this.lastAt.get(workerId);
  }

  isAccurate(workerId: string): boolean {
    return !this.sourceStats(workerId)?.inaccurate;
  }

  resetCount(workerId: string): number {
    return this.resets.get(workerId) ?? 0;
  }

  sourceStats(workerId: string): KvSourceStats | null {
    return this.subs.get(workerId)?.sourceStats(workerId) ?? this.bound?.sourceStats(workerId) ?? null;
  }

  /** Per-source subscriber statistics, for metrics. */
  allSourceStats(): Map<string, KvSourceStats> {
    const out = new Map<string, KvSourceStats>();
    for (const [id, sub] of this.subs) {
      const s = sub.sourceStats(id);
      if (s) out.set(id, s);
    }
    if (this.bound) for (const [id, s] of Object.entries(this.bound.stats().sources)) out.set(id, s);
    return out;
  }

  async close(): Promise<void> {
    if (this.silenceTimer) clearInterval(this.silenceTimer);
    const all = [...this.subs.values()];
    this.subs.clear();
    await Promise.all([...all.map((s) => s.close()), this.bound?.close()]);
  }

  private apply(key: string, batch: KvEventBatch): void {
    this.counters.batches++;
    this.counters.events += batch.events.length;
    this.index.apply(key, batch.events);
    if (batch.events.some((e) => e.type === 'cleared')) this.bumpReset(key);
    this.lastAt.set(key, this.opts.clock.now());
  }

  private reset(key: string, reason: string): void {
    this.opts.logger.warn({ worker: key, reason }, 'KV events: source reset, dropping its index entries');
    this.index.clearSource(key);
    this.bumpReset(key);
  }

  private bumpReset(key: string): void {
    this.counters.resets++;
    this.resets.set(key, (this.resets.get(key) ?? 0) + 1);
  }
}
