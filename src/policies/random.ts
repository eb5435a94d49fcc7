import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { describeAll, noneAvailable, type RouteExplanation } from './explain.js';
import { available, BasePolicy } from './policy.js';

/** Uniform choice over available workers. */
export class RandomPolicy extends BasePolicy {
  readonly name = 'random';
  selectWorker(candidates: readonly Worker[], _ctx: RequestContext): Worker | undefined {
    const ws = available(candidates);
    if (ws.length === 0) return undefined;
    return ws[this.deps.rng.int(ws.length)];
  }

  /** Loads only: the choice is a uniform draw (no draw is made here). */
  explain(candidates: readonly Worker[], _ctx: RequestContext): RouteExplanation {
    const described = describeAll(candidates, this.deps.clock.now());
    const n = described.filter((c) => !c.excluded).length;
    if (n === 0) return noneAvailable(this.name, described);
    for (const c of described) if (!c.excluded) c.probability = 1 / n;
    return { policy: this.name, chosen: undefined, rule: 'random', detail: `uniform random choice among ${n} available workers`, deterministic: false, candidates: described };
  }
}
