import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import type { RoutingPolicy } from './policy.js';

/**
 * Why a worker could not be chosen: not healthy (health checks), its circuit breaker is open,
 * an earlier attempt of this request failed on it (retry), or it serves another model.
 */
export type ExclusionReason = 'unhealthy' | 'breaker_open' | 'excluded_by_retry' | 'not_this_model';

/** What a policy weighed about one candidate worker. */
export interface CandidateExplanation {
  worker: string;
  /** Set when the worker could not be chosen. */
  excluded?: ExclusionReason;
  /** In-flight requests, cluster-wide (this replica's plus its peers'), and this replica's share. */
  load: number;
  localLoad: number;
  /** Requests finished on the worker (least_load's tie-break). */
  processed: number;
  /** The engine's own load (scraped), when known. */
  engine?: { running: number; waiting: number; kvUsage: number; ageMs: number; fresh: boolean };
  /** Prefix of the request held here: characters (cache_aware), tokens (prefix_load), blocks (kv_aware). */
  matchedChars?: number;
  matchedTokens?: number;
  matchedBlocks?: number;
  /** The policy's score (lower is better) when it computes one. */
  cost?: number;
  /** The terms of the score and other per-worker facts, named as the policy names them. */
  terms?: Record<string, number | string | boolean>;
  /** Probability of being chosen, for policies that choose at random. */
  probability?: number;
}

/** What a policy would choose for a request, and why. Built without changing any policy state. */
export interface RouteExplanation {
  policy: string;
  /** The worker the policy would choose now; undefined when none is available or the choice is random. */
  chosen: string | undefined;
  /** The rule that decided (prefix_match, least_loaded, imbalance, lowest_cost, random, cyclic, …). */
  rule: string;
  /** One sentence for people. */
  detail: string;
  /** False when the real decision is drawn at random (random, power_of_two, ties, temperature). */
  deterministic: boolean;
  /** Size of the request as the policy measured it. */
  input?: { chars?: number; tokens?: number; blocks?: number; blockSize?: number };
  candidates: CandidateExplanation[];
}

/** Explanations of a prefill/decode pair (PD mode). */
export interface PairExplanation {
  prefill: RouteExplanation;
  decode: RouteExplanation;
}

/** Why `w` is unavailable, if it is (health first, then breaker). */
export function exclusionOf(w: Worker): ExclusionReason | undefined {
  if (!w.healthy) return 'unhealthy';
  if (!w.isAvailable()) return 'breaker_open';
  return undefined;
}

/** The policy-independent facts about a candidate: availability, loads, engine load. */
export function describeCandidate(w: Worker, nowMs: number = performance.now(), staleAfterMs = 5000): CandidateExplanation {
  const c: CandidateExplanation = { worker: w.id, load: w.load, localLoad: w.localLoad, processed: w.processed };
  const ex = exclusionOf(w);
  if (ex) c.excluded = ex;
  const e = w.engineLoad;
  if (e) {
    const age = nowMs - e.updatedAtMs;
    c.engine = { running: e.running, waiting: e.waiting, kvUsage: e.kvUsage, ageMs: age, fresh: age >= 0 && age <= staleAfterMs };
  }
  return c;
}

/** describeCandidate for every candidate, in order. */
export function describeAll(candidates: readonly Worker[], nowMs?: number, staleAfterMs?: number): CandidateExplanation[] {
  return candidates.map((w) => describeCandidate(w, nowMs, staleAfterMs));
}

/** The explanation of a policy that found no available worker. */
export function noneAvailable(policy: string, candidates: CandidateExplanation[]): RouteExplanation {
  return { policy, chosen: undefined, rule: 'none_available', detail: `none of the ${candidates.length} candidates is available`, deterministic: true, candidates };
}

/**
 * Adds the workers a request could not use for reasons outside the policy: other models'
 * workers and those excluded by an earlier failed attempt (they were not passed to the policy).
 */
export function withOutsideExclusions(e: RouteExplanation, excludedByRetry: readonly Worker[], otherModel: readonly Worker[]): RouteExplanation {
  if (excludedByRetry.length === 0 && otherModel.length === 0) return e;
  const extra: CandidateExplanation[] = [];
  for (const w of excludedByRetry) extra.push({ ...describeCandidate(w), excluded: 'excluded_by_retry' });
  for (const w of otherModel) extra.push({ ...describeCandidate(w), excluded: 'not_this_model' });
  return { ...e, candidates: [...e.candidates, ...extra] };
}

/**
 * The compact one-line form (response header `x-kvgate-route`): policy, chosen worker, rule,
 * and the chosen worker's matched prefix / load / cost, e.g.
 * `policy=cache_aware; worker=http://10.0.0.1:8000; rule=prefix_match; matched_chars=812/1020; load=3; candidates=4; excluded=1`.
 * `actual` is the worker the request really went to (random choices differ from the explanation).
 */
export function compactSummary(e: RouteExplanation, actual?: string): string {
  const worker = actual ?? e.chosen;
  const c = e.candidates.find((x) => x.worker === worker);
  const parts = [`policy=${e.policy}`, `worker=${worker ?? '-'}`, `rule=${e.rule}`];
  if (c) {
    if (c.matchedChars !== undefined) parts.push(`matched_chars=${c.matchedChars}/${e.input?.chars ?? '?'}`);
    if (c.matchedTokens !== undefined) parts.push(`matched_tokens=${c.matchedTokens}/${e.input?.tokens ?? '?'}`);
    if (c.matchedBlocks !== undefined) parts.push(`matched_blocks=${c.matchedBlocks}/${e.input?.blocks ?? '?'}`);
    parts.push(`load=${c.load}`);
    if (c.engine) parts.push(`engine_waiting=${c.engine.waiting}`, `engine_kv=${round(c.engine.kvUsage)}`);
    if (c.cost !== undefined) parts.push(`cost=${round(c.cost)}`);
  }
  const excluded = e.candidates.filter((x) => x.excluded).length;
  parts.push(`candidates=${e.candidates.length}`);
  if (excluded > 0) parts.push(`excluded=${excluded}`);
  // Header values must be ASCII without control characters: worker ids are URLs, safe as they are.
  return parts.join('; ').replace(/[^\x20-\x7e]/g, '?');
}

export function round(x: number, digits = 3): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

/** `policy.explain`, or (a policy without one) the candidates' loads and no choice. */
export function explainWith(policy: RoutingPolicy, candidates: readonly Worker[], ctx: RequestContext): RouteExplanation {
  if (policy.explain) return policy.explain(candidates, ctx);
  return { policy: policy.name, chosen: undefined, rule: 'unexplained', detail: 'this policy does not explain its decisions', deterministic: false, candidates: describeAll(candidates) };
}

/** `policy.explainPair`, else explain() on each pool. */
export function explainPairWith(policy: RoutingPolicy, prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): PairExplanation {
  if (policy.explainPair) return policy.explainPair(prefill, decode, ctx);
  return { prefill: explainWith(policy, prefill, ctx), decode: explainWith(policy, decode, ctx) };
}
