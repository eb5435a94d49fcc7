import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { headerValue } from './manual.js';
import { explainPairWith, explainWith, type PairExplanation, type RouteExplanation } from './explain.js';
import type { PeerRoutingEvent, PolicyDeps, RequestOutcome, RoutedRecord, RoutingPolicy, WorkerPair } from './policy.js';

export interface SessionAffinityConfig {
  /** Request header naming the session (lower-case), e.g. `x-session-id`. */
  header: string;
  /** A session's binding expires this long after its last request. */
  ttlMs: number;
  /** Most sessions remembered; the least recently used go first beyond it. */
  maxSessions?: number;
}

interface Binding {
  workerId: string;
  prefillId?: string;
  lastMs: number;
}

/**
 * Session affinity on top of any policy (`--session-affinity-header`, `--session-affinity-ttl-secs`):
 * the first request of a session is routed by the inner policy and the session is bound to the
 * worker chosen; later requests of the session go to that worker while it is among the available
 * candidates and the binding is younger than the TTL (each request renews it). If the bound worker
 * is gone or unavailable, the inner policy chooses again and the session is re-bound. Requests
 * without the header are the inner policy's. It remembers worker ids per session only, never a
 * worker list: the worker is looked up among the candidates of each request.
 */
export class SessionAffinityPolicy implements RoutingPolicy {
  readonly name: string;
  readonly needsTokens?: boolean;
  /** Session → binding, in least-recently-used order (Map insertion order, refreshed on use). */
  private readonly sessions = new Map<string, Binding>();
  private readonly maxSessions: number;

  constructor(
    private readonly deps: PolicyDeps,
    private readonly inner: RoutingPolicy,
    private readonly config: SessionAffinityConfig,
  ) {
    this.name = inner.name;
    this.needsTokens = inner.needsTokens;
    this.maxSessions = config.maxSessions ?? 1_000_000;
  }
  predictionFor(requestId: string) {
    return this.inner.predictionFor?.(requestId);
  }
  blockHashing(ctx: RequestContext) {
    return this.inner.blockHashing?.(ctx);
  }


  /** Live sessions (expired ones are dropped when looked up or when the map is full). */
  get size(): number {
    return this.sessions.size;
  }

  private lookup(session: string, now: number): Binding | undefined {
    const b = this.sessions.get(session);
    if (!b) return undefined;
    if (now - b.lastMs > this.config.ttlMs) {
      this.sessions.delete(session);
      return undefined;
    }
    return b;
  }

  private bind(session: string, b: Binding): void {
    this.sessions.delete(session);
    this.sessions.set(session, b);
    if (this.sessions.size > this.maxSessions) {
      const now = this.deps.clock.now();
      for (const [k, v] of this.sessions) {
        if (this.sessions.size <= this.maxSessions && now - v.lastMs <= this.config.ttlMs) break;
        this.sessions.delete(k);
      }
    }
  }

  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined {
    const session = headerValue(ctx.headers, this.config.header);
    if (session === undefined) return this.inner.selectWorker(candidates, ctx);
    const now = this.deps.clock.now();
    const b = this.lookup(session, now);
    if (b) {
      const w = candidates.find((c) => c.id === b.workerId);
      if (w && w.isAvailable()) {
        this.bind(session, { ...b, lastMs: now });
        return w;
      }
    }
    const chosen = this.inner.selectWorker(candidates, ctx);
    if (chosen) this.bind(session, { workerId: chosen.id, lastMs: now });
    return chosen;
  }

  selectPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): WorkerPair | undefined {
    const session = headerValue(ctx.headers, this.config.header);
    if (session === undefined) return this.inner.selectPair(prefill, decode, ctx);
    const now = this.deps.clock.now();
    const b = this.lookup(session, now);
    if (b) {
      const p = prefill.find((c) => c.id === b.prefillId);
      const d = decode.find((c) => c.id === b.workerId);
      if (p?.isAvailable() && d?.isAvailable()) {
        this.bind(session, { ...b, lastMs: now });
        return { prefill: p, decode: d };
      }
    }
    const pair = this.inner.selectPair(prefill, decode, ctx);
    if (pair) this.bind(session, { workerId: pair.decode.id, prefillId: pair.prefill.id, lastMs: now });
    return pair;
  }

  /** A live binding to an available candidate decides; else the inner policy's explanation. Never renews a binding. */
  explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
    const e = explainWith(this.inner, candidates, ctx);
    const session = headerValue(ctx.headers, this.config.header);
    if (session === undefined) return e;
    const b = this.peek(session);
    const w = b && candidates.find((c) => c.id === b.workerId);
    if (w && w.isAvailable()) return { ...e, chosen: w.id, rule: 'session', detail: `session bound to ${w.id} by ${this.config.header}`, deterministic: true };
    return { ...e, detail: `${b ? 'session bound to an unavailable worker' : 'new session'}: ${e.detail}` };
  }

  explainPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): PairExplanation {
    const e = explainPairWith(this.inner, prefill, decode, ctx);
    const session = headerValue(ctx.headers, this.config.header);
    const b = session === undefined ? undefined : this.peek(session);
    const p = b && prefill.find((c) => c.id === b.prefillId);
    const d = b && decode.find((c) => c.id === b.workerId);
    if (!p?.isAvailable() || !d?.isAvailable()) return e;
    const bound = (x: RouteExplanation, id: string): RouteExplanation => ({ ...x, chosen: id, rule: 'session', detail: `session bound by ${this.config.header}`, deterministic: true });
    return { prefill: bound(e.prefill, p.id), decode: bound(e.decode, d.id) };
  }

  /** A live binding, without renewing or dropping it. */
  private peek(session: string): Binding | undefined {
    const b = this.sessions.get(session);
    return b && this.deps.clock.now() - b.lastMs <= this.config.ttlMs ? b : undefined;
  }

  onFirstToken(worker: Worker, ctx: RequestContext): void {
    this.inner.onFirstToken?.(worker, ctx);
  }

  onRequestComplete(worker: Worker, ctx: RequestContext, outcome: RequestOutcome): void {
    this.inner.onRequestComplete?.(worker, ctx, outcome);
  }

  onWorkerRemoved(worker: Worker): void {
    for (const [k, v] of this.sessions) if (v.workerId === worker.id || v.prefillId === worker.id) this.sessions.delete(k);
    this.inner.onWorkerRemoved?.(worker);
  }

  applyPeer(origin: string, event: PeerRoutingEvent): void {
    this.inner.applyPeer?.(origin, event);
  }

  forgetPeer(origin: string): void {
    this.inner.forgetPeer?.(origin);
  }

  exportHistory(): Iterable<RoutedRecord> {
    return this.inner.exportHistory?.() ?? [];
  }

  close(): void {
    this.inner.close?.();
  }
}
