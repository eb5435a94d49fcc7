import { createHash, randomBytes } from 'node:crypto';
import { Decoder, Encoder } from '@msgpack/msgpack';
import type { Clock } from '../core/clock.js';
import type { WorkerRegistry } from '../core/registry.js';
import type { Worker } from '../core/worker.js';
import type { PeerRoutingEvent, RoutedRecord, RoutingPolicy, RoutingShare } from '../policies/policy.js';
import { ChunkDictionary, type EncodedText, type EncodedTokens } from './chunks.js';
import { RecentlyPublished } from './recently-published.js';
import type { SyncTransport } from './transport.js';

/**
 * Active-active replicas: every kvgate replica publishes what it did and applies what its peers
 * did, so each one routes on the cluster's state, not only its own.
 *
 * What is shared:
 *  - routing history: each policy's tree inserts (what was routed where), prompts sent as
 *    chunk references plus the new suffix (chunks.ts);
 *  - in-flight load: each replica's own load per worker (absolute, so a lost message heals with
 *    the next), and kv_aware's in-flight requests (blocks, pending prefill; first token; end);
 *  - worker registry changes made through the admin API (last writer wins per URL);
 *  - per-key rate-limit consumption (hashed keys).
 *
 * It is off the request path: policies report through RoutingShare and the load observer, which
 * only queue; a timer flushes the queue every `flushMs` as one message. Peers' events are
 * applied as they arrive; a policy never waits for the network.
 *
 * Membership and repair: every message carries the sender's id, incarnation and a sequence
 * number; an empty message is sent at least every `heartbeatMs`. A peer silent for
 * `peerExpiryMs` is dropped, with its in-flight contribution. A receiver that sees a new peer or
 * a gap in a peer's numbers asks it for its full state ('need'); the peer answers with its loads
 * and in-flight requests. A joining replica asks for a snapshot of the shared history (one peer
 * that has its own state answers) before it reports ready. Messages of another format version
 * are refused and counted, loudly.
 */

/** Version of the wire format; a replica refuses messages of any other. */
export const SYNC_FORMAT_VERSION = 1;

export interface ReplicaSyncOptions {
  replicaId: string;
  /** Subject prefix: replicas of one cluster share it. */
  subject: string;
  flushMs: number;
  heartbeatMs: number;
  peerExpiryMs: number;
  /** Longest a joining replica waits for a snapshot before it routes on what it has. */
  snapshotTimeoutMs: number;
  /** Routed records queued before the oldest ones lose their text (in-flight accounting is kept). */
  maxPendingRecords: number;
  /** Chunk dictionary bound (UTF-16 units or tokens). */
  dictionaryUnits: number;
  /**
   * A prompt this replica routed to the same worker (same policy, model) and published within
   * this many ms is not published again: its peers already hold it, and a refresh of its recency
   * that is at most this late changes nothing (trees are evicted every `--eviction-interval-secs`).
   * In-flight accounting is still sent. 0 publishes every prompt.
   */
  repeatWindowMs: number;
}

export const defaultReplicaSyncOptions: Omit<ReplicaSyncOptions, 'replicaId'> = {
  subject: 'kvgate',
  flushMs: 10,
  heartbeatMs: 1000,
  peerExpiryMs: 3000,
  snapshotTimeoutMs: 3000,
  maxPendingRecords: 20_000,
  dictionaryUnits: 32 * 1024 * 1024,
  repeatWindowMs: 1000,
};

/** Slots of the table that remembers recently published prompts (RecentlyPublished). */
const RECENT_PROMPT_SLOTS = 65_536;

/** A worker registry change made through the admin API. */
export interface AdminChange {
  op: 'add' | 'remove';
  url: string;
  /** Wall-clock ms when it was made (last writer wins). */
  at: number;
  origin: string;
  /** For 'add': what to register (the admin API's fields). */
  spec?: Record<string, unknown>;
}

export interface SyncLogger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

export interface ReplicaSyncDeps {
  registry: WorkerRegistry;
  /** The policies whose state is shared, by role ('main', 'decode'). */
  policies: ReadonlyMap<string, RoutingPolicy>;
  clock: Clock;
  /** Wall-clock ms (ages, last-writer-wins); Date.now by default. */
  wallNow?: () => number;
  /** One-shot and periodic timers on `clock` (real timers in the server, the event queue in the lab). */
  timers: { once(ms: number, fn: () => void): () => void; every(ms: number, fn: () => void): () => void };
  log?: SyncLogger;
  /** Applies a peer's admin change to this replica's registry. */
  applyAdmin?(change: AdminChange): void;
  /** Charges a peer's rate-limit use to a (hashed) key. */
  consumeRateLimit?(keyHash: string, n: number): void;
}

export type SyncState = 'connecting' | 'syncing' | 'synced' | 'disconnected' | 'closed';

export interface SyncStats {
  messagesSent: number;
  bytesSent: number;
  messagesReceived: number;
  bytesReceived: number;
  routedSent: number;
  routedReceived: number;
  /** Gaps seen in peers' sequence numbers (each triggers a state request). */
  gaps: number;
  /** Messages refused: another format version. */
  refusedVersion: number;
  malformed: number;
  /** Messages that could not be sent (not connected). */
  unsent: number;
  /** Routed records whose text was dropped because the send queue was full. */
  droppedText: number;
  peersExpired: number;
  /** Prompts not published again: routed to the same worker and published within repeatWindowMs. */
  repeatsSuppressed: number;
}

interface LocalActive {
  role: string;
  workerId: string;
  requestId: string;
  blocks: number;
  prefillTokens: number;
}

interface Peer {
  id: string;
  incarnation: string;
  lastSeq: number;
  lastSeenMs: number;
  /** Its own in-flight count per worker. */
  loads: Map<string, number>;
  /** Its in-flight requests that policies track, by role + request id. */
  actives: Map<string, LocalActive>;
  /** It said it has its snapshot (so it answers snapshot requests). */
  synced: boolean;
}

type Rec = [string, RoutedRecord];

interface Pending {
  routed: Rec[];
  firstTokens: Array<[string, string, string]>;
  completed: Array<[string, string, string]>;
  loads: Set<string>;
  admin: AdminChange[];
  rate: Map<string, number>;
}

// Wire records (msgpack arrays keep them compact).
type WireRouted = [string, string, string, string | null, EncodedText | null, EncodedTokens | null, number, number, number];
type WireActive = [string, string, string, number, number];

interface WireMessage {
  v: number;
  k: 'b' | 'st' | 'n' | 'bye' | 'sr' | 'sp';
  o: string;
  i?: string;
  s?: number;
  t?: number;
  l?: Array<[string, number]>;
  r?: WireRouted[];
  f?: Array<[string, string, string]>;
  c?: Array<[string, string, string]>;
  w?: AdminChange[];
  q?: Array<[string, number]>;
  a?: WireActive[];
  of?: string;
  to?: string;
  h?: Array<[string, string, string, EncodedText | null, EncodedTokens | null]>;
  last?: boolean;
  /** The sender has its snapshot (it can answer snapshot requests). */
  sy?: boolean;
}

interface SnapshotWait {
  inbox: string;
  cancel: () => void;
  entries: number;
  done: () => void;
  /** The peer asked, and when. */
  asked: string | undefined;
  askedAt: number;
}

const activeKey = (role: string, requestId: string) => `${role}\u0000${requestId}`;

export class ReplicaSync {
  readonly options: ReplicaSyncOptions;
  readonly incarnation = randomBytes(6).toString('hex');
  readonly stats: SyncStats = {
    messagesSent: 0,
    bytesSent: 0,
    messagesReceived: 0,
    bytesReceived: 0,
    routedSent: 0,
    routedReceived: 0,
    gaps: 0,
    refusedVersion: 0,
    malformed: 0,
    unsent: 0,
    droppedText: 0,
    peersExpired: 0,
    repeatsSuppressed: 0,
  };
  private readonly dict: ChunkDictionary;
  /** Prompts published recently, by this replica or a peer, and for which worker (repeatWindowMs). */
  private readonly published = new RecentlyPublished(RECENT_PROMPT_SLOTS);
  /** One encoder and decoder for every message (they keep their buffers; sync is single-threaded). */
  private readonly encoder = new Encoder({ ignoreUndefined: true });
  private readonly decoder = new Decoder();
  private readonly peers = new Map<string, Peer>();
  /** Sum of peers' loads per worker id (kept for workers not registered here yet). */
  private readonly peerLoadTotals = new Map<string, number>();
  private readonly localActive = new Map<string, LocalActive>();
  private readonly adminLog = new Map<string, AdminChange>();
  private pending: Pending = emptyPending();
  private seq = 0;
  private flushTimer: (() => void) | undefined;
  private lastSentMs = -Infinity;
  private readonly cancels: Array<() => void> = [];
  private state: SyncState = 'connecting';
  private snapshotInfo: { from: string; entries: number; receivedAtWall: number; sentAtWall: number } | undefined;
  private snapshotWait: SnapshotWait | undefined;
  private readyResolve: (() => void) | undefined;
  readonly ready: Promise<void>;
  private isReady = false;
  private lastNeed = new Map<string, number>();
  private lastStateSentMs = -Infinity;
  private stateTimer: (() => void) | undefined;
  private readonly refusedFrom = new Set<string>();
  private warnedDisconnected = false;
  private readonly wallNow: () => number;

  constructor(
    private readonly transport: SyncTransport,
    private readonly deps: ReplicaSyncDeps,
    options: Partial<ReplicaSyncOptions> & { replicaId: string },
  ) {
    this.options = { ...defaultReplicaSyncOptions, ...options };
    this.dict = new ChunkDictionary(this.options.dictionaryUnits);
    this.wallNow = deps.wallNow ?? Date.now;
    this.ready = new Promise((r) => (this.readyResolve = r));
  }

  // ---- Wiring -------------------------------------------------------------------------------

  /** Subscribes, starts heartbeats, asks for a snapshot; `ready` resolves when it is applied (or timed out). */
  start(): void {
    const { registry } = this.deps;
    const observe = (w: Worker) => {
      w.loadObserver = (x) => this.loadChanged(x);
      w.peerLoad = this.peerLoadTotals.get(w.id) ?? 0;
    };
    for (const w of registry.all()) observe(w);
    registry.on('added', observe);
    this.cancels.push(() => registry.off('added', observe));

    const s = this.options.subject;
    this.cancels.push(this.transport.subscribe(`${s}.events`, (d) => this.receive(d)));
    this.cancels.push(this.transport.subscribe(this.snapshotSubject(this.options.replicaId), (d) => this.receive(d)));
    this.cancels.push(this.deps.timers.every(this.options.heartbeatMs, () => this.tick()));
    this.transport.onStatus((up) => this.onTransportStatus(up));
    if (this.transport.connected) this.onTransportStatus(true);
    else {
      this.state = 'disconnected';
      // Never hold start-up hostage to the network: route on local state after the timeout.
      this.cancels.push(
        this.deps.timers.once(this.options.snapshotTimeoutMs, () => {
          if (!this.transport.connected && !this.warnedDisconnected) {
            this.warnedDisconnected = true;
            this.deps.log?.warn({ replica: this.options.replicaId }, 'replica sync: cannot reach the sync bus (NATS); routing on local state until it can');
          }
          this.markReady();
        }),
      );
    }
  }

  /** Routing events of the policy that has `role` (PolicyDeps.share). */
  shareFor(role: string): RoutingShare {
    return {
      routed: (rec) => {
        const p = this.pending;
        if (rec.requestId !== undefined) {
          this.localActive.set(activeKey(role, rec.requestId), {
            role,
            workerId: rec.workerId,
            requestId: rec.requestId,
            blocks: rec.blocks ?? 0,
            prefillTokens: rec.prefillTokens ?? 0,
          });
        }
        p.routed.push([role, rec]);
        if (p.routed.length > this.options.maxPendingRecords) {
          // Keep the accounting, shed the text of the oldest record that still has one.
          for (const r of p.routed) {
            if (r[1].text !== undefined || r[1].tokens !== undefined) {
              r[1] = { ...r[1], text: undefined, tokens: undefined };
              this.stats.droppedText++;
              break;
            }
          }
        }
        this.schedule();
      },
      firstToken: (workerId, requestId) => {
        const a = this.localActive.get(activeKey(role, requestId));
        if (a) a.prefillTokens = 0;
        this.pending.firstTokens.push([role, workerId, requestId]);
        this.schedule();
      },
      completed: (workerId, requestId) => {
        this.localActive.delete(activeKey(role, requestId));
        this.pending.completed.push([role, workerId, requestId]);
        this.schedule();
      },
    };
  }

  /** A change this replica's admin API made (shared with the peers, last writer wins). */
  announceAdmin(change: Omit<AdminChange, 'at' | 'origin'>): void {
    const c: AdminChange = { ...change, at: this.wallNow(), origin: this.options.replicaId };
    this.adminLog.set(c.url, c);
    this.pending.admin.push(c);
    this.schedule();
  }

  /** One rate-limit token taken here for a (hashed) key. */
  rateLimitTaken(keyHash: string): void {
    this.pending.rate.set(keyHash, (this.pending.rate.get(keyHash) ?? 0) + 1);
    this.schedule();
  }

  /** Says goodbye (peers drop this replica at once) and stops. */
  async close(): Promise<void> {
    if (this.state === 'closed') return;
    this.flush();
    this.send(`${this.options.subject}.events`, { v: SYNC_FORMAT_VERSION, k: 'bye', o: this.options.replicaId, i: this.incarnation });
    this.state = 'closed';
    this.flushTimer?.();
    this.stateTimer?.();
    this.snapshotWait?.cancel();
    for (const c of this.cancels) c();
    for (const w of this.deps.registry.all()) w.loadObserver = undefined;
    await this.transport.close();
    this.markReady();
  }

  // ---- Status -------------------------------------------------------------------------------

  /** The first sync attempt is over (snapshot applied, nobody to ask, or timed out). */
  get initialSyncDone(): boolean {
    return this.isReady;
  }

  get syncState(): SyncState {
    return this.state;
  }

  get connected(): boolean {
    return this.transport.connected;
  }

  get peerCount(): number {
    return this.peers.size;
  }

  /** Chunk references that could not be resolved here (a text shared before this replica knew its chunks). */
  get unresolvedTexts(): number {
    return this.dict.unresolved;
  }

  /** For /readiness and the admin API. */
  status(): Record<string, unknown> {
    const now = this.deps.clock.now();
    return {
      state: this.state,
      replica_id: this.options.replicaId,
      connected: this.transport.connected,
      peers: [...this.peers.values()].map((p) => ({
        id: p.id,
        last_seen_ms_ago: Math.round(now - p.lastSeenMs),
        in_flight: sum(p.loads.values()),
      })),
      snapshot: this.snapshotInfo
        ? {
            from: this.snapshotInfo.from,
            entries: this.snapshotInfo.entries,
            age_ms: Math.max(0, this.wallNow() - this.snapshotInfo.sentAtWall),
          }
        : null,
      refused_replicas: [...this.refusedFrom],
      // Every routed request counts, published or suppressed as a repeat.
      bytes_per_routed_request: this.stats.routedSent + this.stats.repeatsSuppressed === 0 ? null : Math.round(this.stats.bytesSent / (this.stats.routedSent + this.stats.repeatsSuppressed)),
      repeats_suppressed: this.stats.repeatsSuppressed,
    };
  }

  // ---- Sending ------------------------------------------------------------------------------

  private loadChanged(w: Worker): void {
    this.pending.loads.add(w.id);
    this.schedule();
  }

  private schedule(): void {
    if (this.flushTimer || this.state === 'closed') return;
    this.flushTimer = this.deps.timers.once(this.options.flushMs, () => {
      this.flushTimer = undefined;
      this.flush();
    });
  }

  /** Sends what is queued as one or more batches. */
  flush(): void {
    const p = this.pending;
    this.pending = emptyPending();
    const { registry } = this.deps;
    const loads: Array<[string, number]> = [];
    for (const id of p.loads) loads.push([id, registry.get(id)?.localLoad ?? 0]);
    const budget = Math.floor(this.transport.maxPayload * 0.8);
    let msg = this.batch();
    let bytes = 64;
    const cut = () => {
      this.publishEvents(msg);
      msg = this.batch();
      bytes = 64;
    };
    if (loads.length > 0) msg.l = loads;
    const now = this.deps.clock.now();
    for (const [role, rec] of p.routed) {
      // Name the prompt first (cut and hash it), and encode it only if it is news to the peers.
      const preparedText = rec.text !== undefined ? this.dict.prepareText(rec.text) : undefined;
      const preparedTokens = rec.tokens !== undefined ? this.dict.prepareTokens(rec.tokens) : undefined;
      let text: EncodedText | null = null;
      let tokens: EncodedTokens | null = null;
      if (preparedText || preparedTokens) {
        const fingerprint = (preparedText?.fingerprint ?? 0) + (preparedTokens?.fingerprint ?? 0);
        if (this.seenRecently(fingerprint, role, rec.model, rec.workerId, now)) {
          this.stats.repeatsSuppressed++;
          // Nothing else to tell (no in-flight accounting, no cost): the record is not sent at all.
          if (rec.requestId === undefined && !rec.costMs) continue;
        } else {
          this.markSeen(fingerprint, role, rec.model, rec.workerId, now);
          if (preparedText) text = this.dict.encodePreparedText(preparedText);
          if (preparedTokens) tokens = this.dict.encodePreparedTokens(preparedTokens);
        }
      }
      const wire: WireRouted = [role, rec.model, rec.workerId, rec.requestId ?? null, text, tokens, rec.blocks ?? 0, rec.prefillTokens ?? 0, rec.costMs ?? 0];
      const size = 48 + rec.model.length + rec.workerId.length + (wire[4] ? wire[4][2].length * 3 : 0) + (wire[5] ? wire[5][2].byteLength : 0);
      if (bytes + size > budget && bytes > 64) cut();
      (msg.r ??= []).push(wire);
      bytes += size;
      this.stats.routedSent++;
    }
    if (p.firstTokens.length > 0) msg.f = p.firstTokens;
    if (p.completed.length > 0) msg.c = p.completed;
    if (p.admin.length > 0) msg.w = p.admin;
    if (p.rate.size > 0) msg.q = [...p.rate];
    this.publishEvents(msg);
  }

  /**
   * Whether this prompt (text and/or tokens, by fingerprint) went to the same worker, for the
   * same policy and model, in a record published — by this replica or a peer, so every replica
   * holds it — less than repeatWindowMs ago.
   */
  private seenRecently(fingerprint: number, role: string, model: string, workerId: string, now: number): boolean {
    const window = this.options.repeatWindowMs;
    return window > 0 && this.published.seen(fingerprint, role, model, workerId, now, window);
  }

  /** Remembers a prompt as published now, for this worker. */
  private markSeen(fingerprint: number, role: string, model: string, workerId: string, now: number): void {
    if (this.options.repeatWindowMs > 0) this.published.mark(fingerprint, role, model, workerId, now);
  }

  /** Forgets what was published (a peer joined or restarted, or a message was lost): the next record of every prompt is sent in full. */
  private forgetPublished(): void {
    this.published.clear();
  }

  private batch(): WireMessage {
    return { v: SYNC_FORMAT_VERSION, k: 'b', o: this.options.replicaId, i: this.incarnation };
  }

  /** Numbers and sends a batch or state message on the shared subject. */
  private publishEvents(msg: WireMessage): void {
    msg.s = ++this.seq;
    msg.t = this.wallNow();
    msg.sy = this.isReady;
    this.lastSentMs = this.deps.clock.now();
    this.send(`${this.options.subject}.events`, msg);
  }

  private send(subject: string, msg: WireMessage): boolean {
    const data = this.encoder.encode(msg);
    const ok = this.transport.publish(subject, data);
    if (ok) {
      this.stats.messagesSent++;
      this.stats.bytesSent += data.byteLength;
    } else {
      this.stats.unsent++;
      this.forgetPublished();
    }
    return ok;
  }

  /** This replica's whole own state: loads of every worker and in-flight requests. */
  private sendState(): void {
    this.stateTimer = undefined;
    this.lastStateSentMs = this.deps.clock.now();
    this.flush();
    const msg: WireMessage = { v: SYNC_FORMAT_VERSION, k: 'st', o: this.options.replicaId, i: this.incarnation };
    msg.l = this.deps.registry.all().filter((w) => w.localLoad !== 0).map((w): [string, number] => [w.id, w.localLoad]);
    msg.a = [...this.localActive.values()].map((a): WireActive => [a.role, a.workerId, a.requestId, a.blocks, a.prefillTokens]);
    this.publishEvents(msg);
  }

  /** Answers state requests at most every 100 ms (several peers may ask at once). */
  private stateRequested(): void {
    if (this.stateTimer) return;
    const wait = Math.max(0, this.lastStateSentMs + 100 - this.deps.clock.now());
    this.stateTimer = this.deps.timers.once(wait, () => this.sendState());
  }

  private need(origin: string): void {
    const now = this.deps.clock.now();
    if (now - (this.lastNeed.get(origin) ?? -Infinity) < 500) return;
    this.lastNeed.set(origin, now);
    this.send(`${this.options.subject}.events`, { v: SYNC_FORMAT_VERSION, k: 'n', o: this.options.replicaId, of: origin });
  }

  private tick(): void {
    const now = this.deps.clock.now();
    if (now - this.lastSentMs >= this.options.heartbeatMs * 0.9) this.publishEvents(this.batch());
    for (const p of [...this.peers.values()]) {
      if (now - p.lastSeenMs > this.options.peerExpiryMs) {
        this.stats.peersExpired++;
        this.deps.log?.warn({ peer: p.id, silentMs: Math.round(now - p.lastSeenMs) }, 'replica sync: peer stopped heartbeating; its in-flight load is expired');
        this.dropPeer(p);
      }
    }
  }

  // ---- Connection and snapshot ----------------------------------------------------------------

  private onTransportStatus(up: boolean): void {
    if (this.state === 'closed') return;
    if (!up) {
      this.state = 'disconnected';
      this.forgetPublished();
      if (!this.warnedDisconnected) {
        this.warnedDisconnected = true;
        this.deps.log?.warn({ replica: this.options.replicaId }, 'replica sync: disconnected; routing on local state until it returns');
      }
      return;
    }
    if (this.warnedDisconnected) this.deps.log?.info({ replica: this.options.replicaId }, 'replica sync: connected again; re-syncing');
    this.warnedDisconnected = false;
    this.requestSnapshot();
    this.sendState();
  }

  /** Where a replica takes snapshot requests (ids may hold any character; subjects may not). */
  private snapshotSubject(replicaId: string): string {
    return `${this.options.subject}.snapshot.${createHash('sha256').update(replicaId).digest('hex').slice(0, 16)}`;
  }

  /**
   * Asks a peer for the shared history: the first peer heard from that has its own state (its
   * messages say so) is asked directly. With no such peer within 1.5 heartbeats this replica
   * is alone (or starting with others) and goes on; otherwise it waits for the last page, or
   * `snapshotTimeoutMs`.
   */
  private requestSnapshot(): void {
    this.snapshotWait?.cancel();
    this.state = 'syncing';
    const inbox = `${this.options.subject}.inbox.${this.incarnation}.${randomBytes(4).toString('hex')}`;
    const unsub = this.transport.subscribe(inbox, (d) => this.receive(d));
    const stop = () => {
      unsub();
      cancelTimeout();
      cancelAlone();
      this.snapshotWait = undefined;
    };
    const finish = () => {
      stop();
      if (this.state === 'syncing') this.state = this.transport.connected ? 'synced' : 'disconnected';
      this.markReady();
    };
    const wait: SnapshotWait = { inbox, cancel: stop, entries: 0, done: finish, askedAt: -Infinity, asked: undefined };
    const cancelTimeout = this.deps.timers.once(this.options.snapshotTimeoutMs, () => {
      if (this.snapshotWait !== wait) return;
      this.deps.log?.warn({ peers: this.peers.size, asked: wait.asked ?? null }, 'replica sync: no snapshot within the timeout; routing on what this replica has');
      finish();
    });
    const cancelAlone = this.deps.timers.once(this.options.heartbeatMs * 1.5, () => {
      if (this.snapshotWait === wait && wait.asked === undefined) finish();
    });
    this.snapshotWait = wait;
    for (const p of this.peers.values()) if (p.synced) return this.askSnapshot(p.id);
  }

  /** Sends the snapshot request to one peer (again to another if the first stays silent for a heartbeat). */
  private askSnapshot(peerId: string): void {
    const wait = this.snapshotWait;
    if (!wait) return;
    const now = this.deps.clock.now();
    if (wait.asked !== undefined && (wait.entries > 0 || now - wait.askedAt < this.options.heartbeatMs)) return;
    wait.asked = peerId;
    wait.askedAt = now;
    this.send(this.snapshotSubject(peerId), { v: SYNC_FORMAT_VERSION, k: 'sr', o: this.options.replicaId, to: wait.inbox });
  }

  /** Sends the shared history (every policy's trees and the admin changes) to a joining replica. */
  private serveSnapshot(to: string): void {
    const dict = new ChunkDictionary(Number.MAX_SAFE_INTEGER); // self-contained: each chunk once
    const budget = Math.floor(this.transport.maxPayload * 0.8);
    let page: WireMessage = { v: SYNC_FORMAT_VERSION, k: 'sp', o: this.options.replicaId, h: [], t: this.wallNow() };
    let bytes = 64;
    const known = new Set(this.deps.registry.all().map((w) => w.id));
    for (const [role, policy] of this.deps.policies) {
      if (!policy.exportHistory) continue;
      for (const rec of policy.exportHistory()) {
        if (!known.has(rec.workerId)) continue;
        const text = rec.text !== undefined ? dict.encodeText(rec.text) : null;
        const tokens = rec.tokens !== undefined ? dict.encodeTokens(rec.tokens) : null;
        const size = 32 + rec.model.length + rec.workerId.length + (text ? text[2].length * 3 : 0) + (tokens ? tokens[2].byteLength : 0);
        if (bytes + size > budget && page.h!.length > 0) {
          this.send(to, page);
          page = { v: SYNC_FORMAT_VERSION, k: 'sp', o: this.options.replicaId, h: [], t: this.wallNow() };
          bytes = 64;
        }
        page.h!.push([role, rec.model, rec.workerId, text, tokens]);
        bytes += size;
      }
    }
    page.w = [...this.adminLog.values()];
    page.last = true;
    this.send(to, page);
  }

  private applySnapshotPage(m: WireMessage): void {
    const wait = this.snapshotWait;
    if (!wait) return;
    for (const [role, model, workerId, text, tokens] of m.h ?? []) {
      const policy = this.deps.policies.get(role);
      const rec: RoutedRecord = { model, workerId };
      if (text) setDecodedText(rec, this.dict.decodeTextParts(text));
      if (tokens) rec.tokens = this.dict.decodeTokens(tokens);
      wait.entries++;
      if (!policy?.applyPeer || !this.deps.registry.get(workerId)) continue;
      if (rec.text === undefined && rec.tokens === undefined) continue;
      policy.applyPeer(m.o, { kind: 'routed', rec });
    }
    for (const c of m.w ?? []) this.applyAdmin(c);
    if (m.last) {
      this.snapshotInfo = { from: m.o, entries: wait.entries, receivedAtWall: this.wallNow(), sentAtWall: m.t ?? this.wallNow() };
      this.deps.log?.info({ from: m.o, entries: wait.entries }, 'replica sync: snapshot applied');
      wait.done();
    }
  }

  private markReady(): void {
    if (this.isReady) return;
    this.isReady = true;
    this.readyResolve?.();
  }

  // ---- Receiving ----------------------------------------------------------------------------

  /** @internal Applies one message from the transport. */
  receive(data: Uint8Array): void {
    if (this.state === 'closed') return;
    let m: WireMessage;
    try {
      m = this.decoder.decode(data) as WireMessage;
      if (typeof m !== 'object' || m === null || typeof m.o !== 'string') throw new Error('not a sync message');
    } catch {
      this.stats.malformed++;
      return;
    }
    if (m.o === this.options.replicaId) return; // our own
    this.stats.messagesReceived++;
    this.stats.bytesReceived += data.byteLength;
    if (m.v !== SYNC_FORMAT_VERSION) {
      this.stats.refusedVersion++;
      if (!this.refusedFrom.has(m.o)) {
        this.refusedFrom.add(m.o);
        this.deps.log?.error(
          { peer: m.o, theirVersion: m.v, ourVersion: SYNC_FORMAT_VERSION },
          'replica sync: refusing a replica that runs another state format version; upgrade all replicas to one version',
        );
      }
      return;
    }
    try {
      switch (m.k) {
        case 'b':
        case 'st':
          this.applyEvents(m);
          return;
        case 'n':
          if (m.of === this.options.replicaId) this.stateRequested();
          return;
        case 'bye': {
          const p = this.peers.get(m.o);
          if (p && p.incarnation === m.i) {
            this.deps.log?.info({ peer: m.o }, 'replica sync: peer left');
            this.dropPeer(p);
          }
          return;
        }
        case 'sr':
          if (typeof m.to === 'string') this.serveSnapshot(m.to);
          return;
        case 'sp':
          this.applySnapshotPage(m);
          return;
      }
    } catch (e) {
      this.stats.malformed++;
      this.deps.log?.warn({ peer: m.o, err: (e as Error).message }, 'replica sync: malformed message ignored');
    }
  }

  private applyEvents(m: WireMessage): void {
    const now = this.deps.clock.now();
    let p = this.peers.get(m.o);
    if (p && p.incarnation !== m.i) {
      // The peer restarted: what its old incarnation had in flight is gone.
      this.dropPeer(p);
      p = undefined;
    }
    if (!p) {
      p = { id: m.o, incarnation: String(m.i), lastSeq: 0, lastSeenMs: now, loads: new Map(), actives: new Map(), synced: false };
      this.peers.set(m.o, p);
      this.forgetPublished();
      if (m.k !== 'st') this.need(m.o);
      // Introduce ourselves at once: a joining peer learns who can answer its snapshot request.
      this.stateRequested();
    } else if (m.k === 'b' && typeof m.s === 'number' && m.s !== p.lastSeq + 1) {
      this.stats.gaps++;
      this.need(m.o);
    }
    if (typeof m.s === 'number') p.lastSeq = m.s;
    p.lastSeenMs = now;
    p.synced = m.sy === true;
    if (p.synced && this.snapshotWait) this.askSnapshot(p.id);

    if (m.k === 'st') {
      this.replaceState(p, m);
      return;
    }
    for (const [id, n] of m.l ?? []) this.setPeerLoad(p, id, n);
    for (const w of m.r ?? []) this.applyRouted(p, w);
    for (const [role, workerId, requestId] of m.f ?? []) {
      const a = p.actives.get(activeKey(role, requestId));
      if (a) a.prefillTokens = 0;
      this.deps.policies.get(role)?.applyPeer?.(p.id, { kind: 'first_token', workerId, requestId });
    }
    for (const [role, workerId, requestId] of m.c ?? []) {
      p.actives.delete(activeKey(role, requestId));
      this.deps.policies.get(role)?.applyPeer?.(p.id, { kind: 'completed', workerId, requestId });
    }
    for (const c of m.w ?? []) this.applyAdmin(c);
    if (this.deps.consumeRateLimit) for (const [key, n] of m.q ?? []) this.deps.consumeRateLimit(key, n);
  }

  private applyRouted(p: Peer, w: WireRouted): void {
    const [role, model, workerId, requestId, text, tokens, blocks, prefillTokens, costMs] = w;
    this.stats.routedReceived++;
    // Decode even for unknown workers: the dictionary must learn the chunks either way.
    const rec: RoutedRecord = { model, workerId };
    let fingerprint = 0;
    if (text) {
      setDecodedText(rec, this.dict.decodeTextParts(text));
      fingerprint = this.dict.lastFingerprint;
    }
    if (tokens) {
      rec.tokens = this.dict.decodeTokens(tokens);
      fingerprint = rec.tokens && (fingerprint || !text) ? fingerprint + this.dict.lastFingerprint : 0;
    }
    // Every replica has it now: none needs to publish it again for this worker within the window.
    if (fingerprint !== 0) this.markSeen(fingerprint, role, model, workerId, this.deps.clock.now());
    if (requestId !== null) {
      rec.requestId = requestId;
      rec.blocks = blocks;
      rec.prefillTokens = prefillTokens;
      p.actives.set(activeKey(role, requestId), { role, workerId, requestId, blocks, prefillTokens });
    }
    if (costMs) rec.costMs = costMs;
    if (!this.deps.registry.get(workerId)) return;
    this.deps.policies.get(role)?.applyPeer?.(p.id, { kind: 'routed', rec });
  }

  /** A peer's full state replaces what we knew of it; policies get the difference as events. */
  private replaceState(p: Peer, m: WireMessage): void {
    const loads = new Map(m.l ?? []);
    for (const id of [...p.loads.keys()]) if (!loads.has(id)) this.setPeerLoad(p, id, 0);
    for (const [id, n] of loads) this.setPeerLoad(p, id, n);
    const next = new Map<string, LocalActive>();
    for (const [role, workerId, requestId, blocks, prefillTokens] of m.a ?? []) {
      next.set(activeKey(role, requestId), { role, workerId, requestId, blocks, prefillTokens });
    }
    for (const [key, a] of p.actives) {
      const policy = this.deps.policies.get(a.role);
      const now = next.get(key);
      if (!now) policy?.applyPeer?.(p.id, { kind: 'completed', workerId: a.workerId, requestId: a.requestId });
      else if (a.prefillTokens > 0 && now.prefillTokens === 0) policy?.applyPeer?.(p.id, { kind: 'first_token', workerId: a.workerId, requestId: a.requestId });
    }
    for (const [key, a] of next) {
      if (p.actives.has(key)) continue;
      const ev: PeerRoutingEvent = {
        kind: 'routed',
        rec: { model: '', workerId: a.workerId, requestId: a.requestId, blocks: a.blocks, prefillTokens: a.prefillTokens },
      };
      this.deps.policies.get(a.role)?.applyPeer?.(p.id, ev);
    }
    p.actives = next;
  }

  private setPeerLoad(p: Peer, workerId: string, n: number): void {
    const before = p.loads.get(workerId) ?? 0;
    if (n === before) return;
    if (n === 0) p.loads.delete(workerId);
    else p.loads.set(workerId, n);
    const total = (this.peerLoadTotals.get(workerId) ?? 0) + n - before;
    if (total === 0) this.peerLoadTotals.delete(workerId);
    else this.peerLoadTotals.set(workerId, total);
    const w = this.deps.registry.get(workerId);
    if (w) w.peerLoad = total;
  }

  private dropPeer(p: Peer): void {
    for (const id of [...p.loads.keys()]) this.setPeerLoad(p, id, 0);
    for (const policy of new Set(this.deps.policies.values())) policy.forgetPeer?.(p.id);
    this.peers.delete(p.id);
  }

  private applyAdmin(c: AdminChange): void {
    if (typeof c?.url !== 'string' || (c.op !== 'add' && c.op !== 'remove')) return;
    const had = this.adminLog.get(c.url);
    if (had && (had.at > c.at || (had.at === c.at && had.origin >= c.origin))) return;
    this.adminLog.set(c.url, c);
    this.deps.applyAdmin?.(c);
  }
}

/** A decoded text on a record: as its two parts, and as their concatenation (not read here). */
function setDecodedText(rec: RoutedRecord, parts: [string, string] | undefined): void {
  if (parts === undefined) rec.text = undefined;
  else {
    rec.text = parts[0] + parts[1];
    rec.textParts = parts;
  }
}

function emptyPending(): Pending {
  return { routed: [], firstTokens: [], completed: [], loads: new Set(), admin: [], rate: new Map() };
}

function sum(values: Iterable<number>): number {
  let s = 0;
  for (const v of values) s += v;
  return s;
}
