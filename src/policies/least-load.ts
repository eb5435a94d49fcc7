import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { describeAll, noneAvailable, type RouteExplanation } from './explain.js';
import { BasePolicy, leastLoaded } from './policy.js';

/** Fewest in-flight requests; ties by fewest processed, then registration order. */
export class LeastLoadPolicy extends BasePolicy {
  readonly name = 'least_load';
  selectWorker(candidates: readonly Worker[], _ctx: RequestContext): Worker | undefined {
    return leastLoaded(candidates);
  }

  explain(candidates: readonly Worker[], _ctx: RequestContext): RouteExplanation {
    return explainLeastLoaded(this.name, candidates, 'fewest in-flight requests (ties: fewest processed, then order)');
  }
}

/** The explanation of a least-loaded choice over `candidates`. */
export function explainLeastLoaded(policy: string, candidates: readonly Worker[], detail: string, rule = 'least_loaded'): RouteExplanation {
  const described = describeAll(candidates);
  const w = leastLoaded(candidates);
  if (!w) return noneAvailable(policy, described);
  return { policy, chosen: w.id, rule, detail, deterministic: true, candidates: described };
}
