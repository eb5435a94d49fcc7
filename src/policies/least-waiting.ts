import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import {
  defaultEngineLoadPolicyConfig,
  hasFreshEngineLoad,
  validateEngineLoadPolicyConfig,
  type EngineLoadPolicyConfig,
} from './least-kv-cache.js';
import { available, BasePolicy, leastLoaded, type PolicyDeps } from './policy.js';

/**
 * `least_waiting`: the available worker whose engine reports the fewest queued requests
 * (`engineLoad.waiting`, scraped from vllm:num_requests_waiting / sglang:num_queue_reqs).
 *
 * Exactly:
 *  1. Among available workers with fresh engine metrics (see EngineLoadPolicyConfig): fewest
 *     waiting; ties by fewest running, then fewest in-flight (`load`), then candidate order.
 *  2. When no available worker has fresh metrics: fewest in-flight, ties by fewest processed,
 *     then candidate order (the `least_load` rule). Workers without fresh metrics are not
 *     considered while at least one available worker has them.
 */
export class LeastWaitingPolicy extends BasePolicy {
  readonly name = 'least_waiting';
  readonly config: EngineLoadPolicyConfig;

  constructor(deps: PolicyDeps, config: Partial<EngineLoadPolicyConfig> = {}) {
    super(deps);
    this.config = { ...defaultEngineLoadPolicyConfig, ...config };
    validateEngineLoadPolicyConfig(this.name, this.config);
  }

  selectWorker(candidates: readonly Worker[], _ctx: RequestContext): Worker | undefined {
    const healthy = available(candidates);
    const now = this.deps.clock.now();
    let best: Worker | undefined;
    for (const w of healthy) {
      if (!hasFreshEngineLoad(w, now, this.config.staleAfterMs)) continue;
      if (!best || better(w, best)) best = w;
    }
    return best ?? leastLoaded(healthy);
  }
}

function better(w: Worker, best: Worker): boolean {
  const a = w.engineLoad!;
  const b = best.engineLoad!;
  if (a.waiting !== b.waiting) return a.waiting < b.waiting;
  if (a.running !== b.running) return a.running < b.running;
  return w.load < best.load;
}
