import type { TextTreeStats } from '../cache/trees-by-model.js';
import type { Clock } from '../core/clock.js';
import type { RequestContext } from '../core/context.js';
import type { Rng } from '../core/rng.js';
import type { Worker } from '../core/worker.js';
import type { PairExplanation, RouteExplanation } from './explain.js';

/** Runs `fn` every `everyMs` on the policy's clock; returns a cancel function. */
export type Scheduler = (everyMs: number, fn: () => void) => () => void;

/** Optional hooks a policy calls so the host (server metrics, lab report) can count its decisions. */
export interface PolicyObserver {
  cacheHit?(worker: Worker, matchedChars: number, inputChars: number): void;
  cacheMiss?(inputChars: number): void;
  loadBalanced?(worker: Worker): void;
  /** kv_aware chose `worker`, holding `overlapBlocks` of the request's `requestBlocks`. */
  kvDecision?(worker: Worker, overlapBlocks: number, requestBlocks: number, fallback: boolean): void;
  /**
   * The chosen worker must recompute prompt tokens that another available worker held at decision
   * time: `tokens` when the policy counts tokens (kv_aware, prefix_load), else `chars` of
   * `inputChars` (cache_aware's character tree; the host converts, see docs/operations.md).
   */
  avoidablePrefill?(worker: Worker, ctx: RequestContext, est: { tokens?: number; chars?: number; inputChars?: number }): void;
}

/**
 * One routed request, as another kvgate replica needs it to mirror this replica's routing state
 * (replica sync). A policy fills in what its own state holds.
 */
export type { TextTreeStats };

export interface RoutedRecord {
  model: string;
  workerId: string;
  /** Set when the policy tracks the request while in flight (a first token and a completion follow). */
  requestId?: string;
  /** Text inserted into a character tree of routing history. */
  text?: string;
  /**
   * When set, `text` is `textParts[0] + textParts[1]` not yet read (a peer's decoded prompt: its
   * known prefix and the rest sent with it). Trees insert the two parts (CharTree.insertParts)
   * rather than read `text`, which would first copy the whole prompt into one string.
   */
  textParts?: readonly [string, string];
  /** Token ids inserted into a token tree of routing history. */
  tokens?: ArrayLike<number>;
  /** In-flight accounting (kv_aware): blocks the request occupies... */
  blocks?: number;
  /** ...and prompt tokens it still has to prefill on the worker. */
  prefillTokens?: number;
  /** Estimated cost charged to the worker (prefix_load's ledger), ms. */
  costMs?: number;
}

/** Where a policy reports what it recorded about its requests, so that replicas can share it. */
export interface RoutingShare {
  routed(rec: RoutedRecord): void;
  firstToken(workerId: string, requestId: string): void;
  completed(workerId: string, requestId: string): void;
}

/** Another replica's routing event, applied to this policy's state (it routes nothing). */
export type PeerRoutingEvent =
  | { kind: 'routed'; rec: RoutedRecord }
  | { kind: 'first_token'; workerId: string; requestId: string }
  | { kind: 'completed'; workerId: string; requestId: string };

export interface PolicyDeps {
  clock: Clock;
  rng: Rng;
  /** Told what the policy recorded per request (replica sync); absent in a lone router. */
  share?: RoutingShare;
  /** Periodic background work (tree eviction). The server passes unref'd timers, the lab its event queue. */
  schedule?: Scheduler;
  observer?: PolicyObserver;
}

export interface WorkerPair {
  prefill: Worker;
  decode: Worker;
}

export type RequestOutcome = 'success' | 'error' | 'aborted' | 'timeout';

/**
 * The one interface every routing policy implements, in every mode.
 *
 * Candidates come from the WorkerRegistry on each call (the workers of the request's model
 * and type); a policy never keeps its own worker list. Implementations must skip workers that
 * are not `isAvailable()` and return undefined when none is.
 */
/** What `RoutingPolicy.blockHashing` asks a tokenizer thread for. */
export interface BlockHashing {
  blockSize: number;
  seed: bigint;
}

export interface RoutingPolicy {
  readonly name: string;
  /** The policy reads ctx.tokenIds: the router must tokenize requests for it. */
  readonly needsTokens?: boolean;
  /**
   * The block size and hash seed this policy would hash the request's tokens with (kv_aware), so
   * that a tokenizer thread computes `ctx.blockHashes` along with the tokens, off the event loop.
   */
  blockHashing?(ctx: RequestContext): BlockHashing | undefined;
  /** Pick one worker for a request (regular mode). */
  selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined;
  /** Pick a (prefill, decode) pair (PD mode). */
  selectPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): WorkerPair | undefined;
  /** The first output token of a request routed to `worker` reached the router (prefill done). */
  onFirstToken?(worker: Worker, ctx: RequestContext): void;
  /** The request routed to `worker` finished, in any way. */
  onRequestComplete?(worker: Worker, ctx: RequestContext, outcome: RequestOutcome): void;
  /** A worker left the registry: drop any per-worker state. */
  onWorkerRemoved?(worker: Worker): void;
  /** Stop background timers. */
  close?(): void;
  /** Mirror a peer replica's routing event (tree insert, in-flight accounting). */
  applyPeer?(origin: string, event: PeerRoutingEvent): void;
  /** A peer replica is gone: drop what it still had in flight. */
  forgetPeer?(origin: string): void;
  /** The routing history a joining replica needs (tree contents), as records without request ids. */
  exportHistory?(): Iterable<RoutedRecord>;
  /**
   * What selectWorker would choose now and the components it weighed per candidate, without
   * changing any state (no tree insert, no LRU touch, no counter advance, no RNG draw). Costs
   * about as much as a decision: hosts call it only when asked (/debug/route, --explain-decisions,
   * a watched dashboard, a sampled decision log).
   */
  explain?(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation;
  /**
   * The latency the policy predicted for a request it routed (slo_aware), and whether some
   * worker was predicted to meet the request's objectives. Undefined for other policies.
   */
  predictionFor?(requestId: string): LatencyPrediction | undefined;
  /** explain() for a (prefill, decode) pair (PD mode). */
  explainPair?(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): PairExplanation;
  /**
   * The character trees the policy keeps (cache_aware's prefix tree, kv_aware's routing
   * history): characters per worker, and how often an insert trimmed a worker's share at once
   * (a quarter past --max-tree-size between eviction passes). For metrics.
   */
  textTrees?(): TextTreeStats;
}


export interface LatencyPrediction {
  ttftMs: number;
  tpotMs: number;
  feasible: boolean;
}

export function available(candidates: readonly Worker[]): Worker[] {
  const out: Worker[] = [];
  for (const w of candidates) if (w.isAvailable()) out.push(w);
  return out;
}

/** Fewest in-flight; ties by fewest processed, then candidate order. */
export function leastLoaded(workers: readonly Worker[]): Worker | undefined {
  let best: Worker | undefined;
  for (const w of workers) {
    if (!w.isAvailable()) continue;
    if (!best || w.load < best.load || (w.load === best.load && w.processed < best.processed)) best = w;
  }
  return best;
}

/**
 * Base class: a policy that picks single workers picks a pair by applying the same rule to
 * each pool. Policies that couple the two choices override selectPair.
 */
export abstract class BasePolicy implements RoutingPolicy {
  abstract readonly name: string;
  constructor(protected readonly deps: PolicyDeps) {}
  abstract selectWorker(candidates: readonly Worker[], ctx: RequestContext): Worker | undefined;
  abstract explain(candidates: readonly Worker[], ctx: RequestContext): RouteExplanation;

  explainPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): PairExplanation {
    return { prefill: this.explain(prefill, ctx), decode: this.explain(decode, ctx) };
  }

  selectPair(prefill: readonly Worker[], decode: readonly Worker[], ctx: RequestContext): WorkerPair | undefined {
    const p = this.selectWorker(prefill, ctx);
    if (!p) return undefined;
    const d = this.selectWorker(decode, ctx);
    if (!d) return undefined;
    return { prefill: p, decode: d };
  }
}
