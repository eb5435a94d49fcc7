import { xxh3 } from '@node-rs/xxhash';
import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { describeAll, explainPairWith, explainWith, noneAvailable, type PairExplanation, type RouteExplanation } from './explain.js';
import { type PolicyDeps, type RequestOutcome, type RoutingPolicy, type WorkerPair } from './policy.js';

/** The SGLang router's (smg) routing-key header. */
export const ROUTING_KEY_HEADER = 'x-smg-routing-key';

/** A header's value as one string (the first when repeated), or undefined when absent or empty. */
export function headerValue(headers: RequestContext['headers'], name: string): string | undefined {
  const v = headers[name];
  const s = Array.isArray(v) ? v[0] : v;
  return s === undefined || s === '' ? undefined : s;
}

/**
 * Rendezvous (highest-random-weight) hashing: the available candidate with the largest
 * xxh3(key, worker id). A key stays on its worker while that worker is available; when a worker
 * joins, only the keys it now wins move to it; when one leaves or fails, only its keys move, each
 * to its next-highest worker. The choice depends only on the key and the candidate set.
 */
export function rendezvous(key: string, candidates: readonly Worker[]): Worker | undefined {
  let best: Worker | undefined;
  let bestWeight = -1n;
  for (const w of candidates) {
    if (!w.isAvailable()) continue;
    const weight = xxh3.xxh64(`${key}\u0000${w.id}`);
    if (weight > bestWeight || (weight === bestWeight && best !== undefined && w.id < best.id)) {
      best = w;
      bestWeight = weight;
    }
  }
  return best;
}

/**
 * `--policy manual`, as the SGLang router: a request carrying `X-SMG-Routing-Key` goes to the
 * worker that key hashes to (consistent hashing over the available candidates, minimal movement
 * when workers join or leave); a request without it goes to the fallback policy (random, as in
 * the SGLang router). Keeps no worker list and no per-key state: the mapping is the hash.
 */
export class ManualPolicy implements RoutingPolicy {
  readonly name = 'manual';
  readonly needsTokens?: boolean;

  constructor(
    deps: PolicyDeps,
    private readonly fallback: RoutingPolicy,
  ) {
    void deps;
    this.needsTokens = fallback.needsTokens;
  }

  blockHashing(ctx: RequestContext) {
    return headerValue(ctx.headers, ROUTING_KEY_HEADER) === undefined ? this.fallback.blockHashing?.(ctx) : undefined;
  }

  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined {
    const key = headerValue(ctx.headers, ROUTING_KEY_HEADER);
    if (key === undefined) return this.fallback.selectWorker(candidates, ctx);
    return rendezvous(key, candidates);
  }

  selectPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): WorkerPair | undefined {
    const key = headerValue(ctx.headers, ROUTING_KEY_HEADER);
    if (key === undefined) return this.fallback.selectPair(prefill, decode, ctx);
    const p = rendezvous(key, prefill);
    const d = rendezvous(key, decode);
    return p && d ? { prefill: p, decode: d } : undefined;
  }

  /** With a routing key: its rendezvous worker (deterministic); without: the fallback's explanation. */
  explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
    const key = headerValue(ctx.headers, ROUTING_KEY_HEADER);
    if (key === undefined) {
      const e = explainWith(this.fallback, candidates, ctx);
      return { ...e, policy: this.name, detail: `no ${ROUTING_KEY_HEADER} header: ${e.policy} decides (${e.detail})` };
    }
    return explainKey(this.name, key, candidates);
  }

  explainPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): PairExplanation {
    const key = headerValue(ctx.headers, ROUTING_KEY_HEADER);
    if (key === undefined) return explainPairWith(this.fallback, prefill, decode, ctx);
    return { prefill: explainKey(this.name, key, prefill), decode: explainKey(this.name, key, decode) };
  }

  onFirstToken(worker: Worker, ctx: RequestContext): void {
    this.fallback.onFirstToken?.(worker, ctx);
  }

  onRequestComplete(worker: Worker, ctx: RequestContext, outcome: RequestOutcome): void {
    this.fallback.onRequestComplete?.(worker, ctx, outcome);
  }

  onWorkerRemoved(worker: Worker): void {
    this.fallback.onWorkerRemoved?.(worker);
  }

  close(): void {
    this.fallback.close?.();
  }
}

function explainKey(policy: string, key: string, candidates: readonly Worker[]): RouteExplanation {
  const described = describeAll(candidates);
  const w = rendezvous(key, candidates);
  if (!w) return noneAvailable(policy, described);
  return { policy, chosen: w.id, rule: 'routing_key', detail: `${ROUTING_KEY_HEADER} hashed over the available workers (rendezvous hashing)`, deterministic: true, candidates: described };
}
