import type { ServerResponse } from 'node:http';
import { xxh3 } from '@node-rs/xxhash';
import type { DecisionNote } from '../metrics/gateway-metrics.js';
import type { PairExplanation, RouteExplanation } from '../policies/explain.js';
import type { EngineUsage } from '../upstream/response-tap.js';

/** One routing decision as the dashboard shows it. Filled in cheaply on the request path. */
export interface DecisionRecord {
  seq: number;
  /** Date.now() of the decision. */
  at: number;
  requestId: string;
  route: string;
  model: string;
  policy: string;
  /** The worker chosen (the decode worker in PD mode). */
  worker: string;
  prefillWorker?: string;
  /** 0 for the first attempt, 1… for retries. */
  attempt: number;
  note: DecisionNote;
  /** Present when the decision was explained (--explain-decisions, a watched dashboard, a sampled log line). */
  explanation?: RouteExplanation | PairExplanation;
  /** Prefix group (hash of the first PREFIX_GROUP_CHARS characters of the routing text). */
  group?: string;
}

/** How a routed request ended (sent to watchers as a `done` event). */
export interface DecisionOutcome {
  seq: number;
  status: number;
  ttftMs?: number;
  e2eMs?: number;
  usage?: EngineUsage;
}

/** Characters of the routing text that define a prefix group (a shared system prompt, a document). */
export const PREFIX_GROUP_CHARS = 256;
const MAX_GROUPS = 2048;
const SERIES_SECONDS = 120;

interface Group {
  /** Hex xxh3-64 of the group's head, computed once when the group is first seen. */
  id: string;
  preview: string;
  workers: Map<string, number>;
  lastAt: number;
}

/** What a front records of one decision (the feed adds seq, at and group). */
export type DecisionEntry = Omit<DecisionRecord, 'seq' | 'at' | 'group'>;

/** Every field of DecisionNote, once: adding a field there without adding it here does not compile. */
const NOTE_FIELD_SET = { matched: true, input: true, matchedBlocks: true, requestBlocks: true, fallback: true, kind: true, avoidableTokens: true } as const satisfies Record<keyof DecisionNote, true>;
type NoteField = keyof typeof NOTE_FIELD_SET;
const NOTE_FIELDS = Object.keys(NOTE_FIELD_SET) as NoteField[];
const emptyNote = (): Record<NoteField, DecisionNote[NoteField]> => Object.fromEntries(NOTE_FIELDS.map((k) => [k, undefined])) as Record<NoteField, DecisionNote[NoteField]>;

/**
 * One place in the ring: a decision's fields, overwritten in place by the decision 500 later.
 *
 * The ring holds each decision for the next `capacity` requests (~40 ms at 13,000 req/s). When it
 * held a new record object per decision (with its note), those objects were alive at one or two
 * young-generation collections, so V8 copied them and promoted most to the old generation, where
 * only full collections free them: 3.1–3.3 KB promoted per request under wrk, and GC CPU (pauses
 * plus V8's helper threads) of 15–21 µs per request, against 1.1–1.2 KB and 8.2–8.6 µs with the
 * fields copied into these long-lived slots (docs/benchmarks.md §3.1, "GC per request").
 */
class Slot {
  seq = 0;
  at = 0;
  requestId = '';
  route = '';
  model = '';
  policy = '';
  worker = '';
  prefillWorker: string | undefined = undefined;
  attempt = 0;
  explanation: RouteExplanation | PairExplanation | undefined = undefined;
  group: string | undefined = undefined;
  /** The note's fields, copied so the decider's note object itself dies young; every key present (stable shape). */
  readonly note: Record<NoteField, DecisionNote[NoteField]> = emptyNote();

  fill(seq: number, at: number, e: DecisionEntry, group: string | undefined): void {
    this.seq = seq;
    this.at = at;
    this.requestId = e.requestId;
    this.route = e.route;
    this.model = e.model;
    this.policy = e.policy;
    this.worker = e.worker;
    this.prefillWorker = e.prefillWorker;
    this.attempt = e.attempt;
    this.explanation = e.explanation;
    this.group = group;
    const from = e.note;
    const to = this.note as Record<NoteField, unknown>;
    for (const k of NOTE_FIELDS) to[k] = from[k];
  }

  /** The decision as a record of its own (what watchers and `recent` get). */
  record(): DecisionRecord {
    const note: DecisionNote = {};
    for (const k of NOTE_FIELDS) if (this.note[k] !== undefined) (note as Record<NoteField, unknown>)[k] = this.note[k];
    const r: DecisionRecord = { seq: this.seq, at: this.at, requestId: this.requestId, route: this.route, model: this.model, policy: this.policy, worker: this.worker, attempt: this.attempt, note };
    if (this.prefillWorker !== undefined) r.prefillWorker = this.prefillWorker;
    if (this.explanation !== undefined) r.explanation = this.explanation;
    if (this.group !== undefined) r.group = this.group;
    return r;
  }
}

/**
 * Recent decisions for the live dashboard: a bounded ring of reused slots, prefix groups (which
 * workers served each prefix), per-second request and TTFT series, and server-sent-event watchers.
 *
 * The request path only copies fields into a slot (plus a counter bump and one short hash); record
 * objects are made when someone reads them (a watcher's backlog, the outbox while watched), and
 * formatting to JSON happens on a timer, only while someone watches, at most every `flushMs`.
 * Watchers are dropped when their connection closes or their socket falls behind (never buffered
 * without bound).
 */
export class DecisionFeed {
  private readonly ring: Slot[];
  /** Slots filled so far (up to capacity). */
  private filled = 0;
  private next = 0;
  private seq = 0;
  private readonly outbox: Array<{ kind: 'decision'; rec: DecisionRecord } | { kind: 'done'; out: DecisionOutcome }> = [];
  private readonly watchers = new Set<ServerResponse>();
  private timer: NodeJS.Timeout | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  /** Keyed by the head itself (a flat copy): a lookup hashes it natively, no per-request xxh3 call. */
  private readonly groups = new Map<string, Group>();
  /** Per-second series, indexed by second % SERIES_SECONDS. */
  private readonly series = Array.from({ length: SERIES_SECONDS }, () => ({ sec: -1, requests: 0, errors: 0, ttftSum: 0, ttftN: 0 }));

  constructor(
    readonly capacity = 500,
    private readonly flushMs = 250,
  ) {
    this.ring = Array.from({ length: capacity }, () => new Slot());
  }

  /** Someone watches: decisions are worth explaining. */
  get watched(): boolean {
    return this.watchers.size > 0;
  }

  get watcherCount(): number {
    return this.watchers.size;
  }

  /** Records a decision (its fields are copied; `e` is not kept); returns its sequence number (for `done`). */
  push(e: DecisionEntry, routingText: string): number {
    const seq = ++this.seq;
    const slot = this.ring[this.next]!;
    slot.fill(seq, Date.now(), e, routingText.length > 0 ? this.groupOf(routingText, e.worker) : undefined);
    this.next = (this.next + 1) % this.capacity;
    if (this.filled < this.capacity) this.filled++;
    if (this.watchers.size > 0) this.outbox.push({ kind: 'decision', rec: slot.record() });
    return seq;
  }

  /** A request ended: counts it in the series, tells watchers. */
  done(out: DecisionOutcome): void {
    const s = this.slot(Math.floor(Date.now() / 1000));
    s.requests++;
    if (out.status >= 400 || out.status === 0) s.errors++;
    if (out.ttftMs !== undefined) {
      s.ttftSum += out.ttftMs;
      s.ttftN++;
    }
    if (this.watchers.size > 0) this.outbox.push({ kind: 'done', out });
  }

  /** The most recent decisions (up to `limit`), oldest first, as records of their own. */
  recent(limit = this.capacity): DecisionRecord[] {
    const n = Math.max(0, Math.min(limit, this.filled));
    const out: DecisionRecord[] = [];
    for (let i = n; i > 0; i--) out.push(this.ring[(this.next - i + this.capacity) % this.capacity]!.record());
    return out;
  }

  /** Requests, errors and mean TTFT per second over the last `seconds` (oldest first). */
  seriesView(seconds = 60): Array<{ t: number; requests: number; errors: number; ttftMs: number | null }> {
    const now = Math.floor(Date.now() / 1000);
    const out = [];
    for (let t = now - seconds + 1; t <= now; t++) {
      const s = this.series[t % SERIES_SECONDS];
      const live = s.sec === t;
      out.push({ t, requests: live ? s.requests : 0, errors: live ? s.errors : 0, ttftMs: live && s.ttftN > 0 ? s.ttftSum / s.ttftN : null });
    }
    return out;
  }

  /**
   * Prefix groups seen recently: per worker, the groups it served most (its share of the
   * groups), and the groups themselves (most recent first, up to `limit`).
   */
  groupsView(limit = 20): { total: number; split: number; share: Record<string, number>; groups: Array<{ id: string; preview: string; workers: Record<string, number>; lastAt: number }> } {
    const share: Record<string, number> = {};
    let split = 0;
    for (const g of this.groups.values()) {
      let best: string | undefined;
      let bestN = -1;
      for (const [w, n] of g.workers) if (n > bestN) [best, bestN] = [w, n];
      if (best !== undefined) share[best] = (share[best] ?? 0) + 1;
      if (g.workers.size > 1) split++;
    }
    const groups = [...this.groups.values()]
      .sort((a, b) => b.lastAt - a.lastAt)
      .slice(0, limit)
      .map((g) => ({ id: g.id, preview: g.preview, workers: Object.fromEntries(g.workers), lastAt: g.lastAt }));
    return { total: this.groups.size, split, share, groups };
  }

  /** Forgets a worker that left (its prefix-group counts). */
  forgetWorker(id: string): void {
    for (const [k, g] of this.groups) {
      g.workers.delete(id);
      if (g.workers.size === 0) this.groups.delete(k);
    }
  }

  /**
   * Streams decisions to `res` as server-sent events (`decision`, `done`), starting with the
   * last `backlog` decisions. The watcher is removed when the connection closes.
   */
  watch(res: ServerResponse, backlog = 50): void {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no' });
    res.write(`retry: 2000\n\n`);
    for (const rec of this.recent(backlog)) res.write(`event: decision\ndata: ${JSON.stringify(rec)}\n\n`);
    this.watchers.add(res);
    const drop = () => this.unwatch(res);
    res.once('close', drop);
    res.once('error', drop);
    if (!this.timer) {
      this.timer = setInterval(() => this.flush(), this.flushMs);
      this.timer.unref();
      // A comment every 15 s keeps proxies from closing an idle stream.
      this.heartbeat = setInterval(() => {
        for (const w of this.watchers) w.write(': keep-alive\n\n');
      }, 15_000);
      this.heartbeat.unref();
    }
  }

  /** Ends every watcher's stream (shutdown). */
  close(): void {
    for (const w of [...this.watchers]) {
      w.end();
      this.unwatch(w);
    }
  }

  private unwatch(res: ServerResponse): void {
    if (!this.watchers.delete(res)) return;
    if (this.watchers.size === 0) {
      clearInterval(this.timer);
      clearInterval(this.heartbeat);
      this.timer = undefined;
      this.heartbeat = undefined;
      this.outbox.length = 0;
    }
  }

  /** Formats what happened since the last flush once, and writes it to every watcher. */
  private flush(): void {
    if (this.outbox.length === 0) return;
    let text = '';
    for (const item of this.outbox) {
      text += item.kind === 'decision' ? `event: decision\ndata: ${JSON.stringify(item.rec)}\n\n` : `event: done\ndata: ${JSON.stringify(item.out)}\n\n`;
    }
    this.outbox.length = 0;
    for (const w of [...this.watchers]) {
      if (w.destroyed) {
        this.unwatch(w);
        continue;
      }
      // A watcher that cannot keep up (1 MiB unsent) is cut rather than buffered without bound.
      if (w.writableLength > 1 << 20) {
        w.destroy();
        this.unwatch(w);
        continue;
      }
      w.write(text);
    }
  }

  private groupOf(text: string, worker: string): string {
    const head = text.length > PREFIX_GROUP_CHARS ? text.slice(0, PREFIX_GROUP_CHARS) : text;
    let g = this.groups.get(head);
    if (!g) {
      if (this.groups.size >= MAX_GROUPS) this.dropOldestGroups();
      // Flat copies, so the group never keeps the request's whole text alive.
      const key = (head + '\0').slice(0, -1);
      g = { id: xxh3.xxh64(key).toString(16).padStart(16, '0'), preview: Buffer.from(head.slice(0, 48), 'utf8').toString('utf8'), workers: new Map(), lastAt: 0 };
      this.groups.set(key, g);
    }
    g.workers.set(worker, (g.workers.get(worker) ?? 0) + 1);
    g.lastAt = Date.now();
    return g.id;
  }

  /** Forgets the least recently seen eighth of the groups (amortised: once per MAX_GROUPS / 8 new groups). */
  private dropOldestGroups(): void {
    const byAge = [...this.groups].sort((a, b) => a[1].lastAt - b[1].lastAt);
    for (const [k] of byAge.slice(0, Math.max(1, MAX_GROUPS >> 3))) this.groups.delete(k);
  }

  private slot(sec: number) {
    const s = this.series[sec % SERIES_SECONDS];
    if (s.sec !== sec) {
      s.sec = sec;
      s.requests = 0;
      s.errors = 0;
      s.ttftSum = 0;
      s.ttftN = 0;
    }
    return s;
  }
}
