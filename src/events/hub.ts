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

  constructor(private readonly opts: KvEventHubOptions) {
    this.index = new BlockIndex({ mediums: opts.mediums, maxBlocks: opts.maxBlocks });
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
    await sub.start();
    this.opts.logger.info({ worker: workerId, endpoint, replayEndpoint }, 'KV events: subscribed');
  }

  async removeSource(workerId: string): Promise<void> {
    const sub = this.subs.get(workerId);
    this.subs.delete(workerId);
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
