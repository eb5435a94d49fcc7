import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { BasePolicy, leastLoaded } from './policy.js';

/** Fewest in-flight requests; ties by fewest processed, then registration order. */
export class LeastLoadPolicy extends BasePolicy {
  readonly name = 'least_load';
  selectWorker(candidates: readonly Worker[], _ctx: RequestContext): Worker | undefined {
    return leastLoaded(candidates);
  }
}
