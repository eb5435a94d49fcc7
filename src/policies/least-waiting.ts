import type { Worker } from '../core/worker.js';
import { EngineLoadPolicy, type EngineLoadPolicyConfig } from './least-kv-cache.js';
import type { PolicyDeps } from './policy.js';

/**
 * `least_waiting`: fewest engine-reported queued requests (`engineLoad.waiting`, scraped from
 * vllm:num_requests_waiting / sglang:num_queue_reqs); ties by fewest running, then fewest
 * in-flight, then order. Freshness and fallback as in EngineLoadPolicy.
 */
export class LeastWaitingPolicy extends EngineLoadPolicy {
  constructor(deps: PolicyDeps, config: Partial<EngineLoadPolicyConfig> = {}) {
    super('least_waiting', deps, config);
  }

  protected better(w: Worker, best: Worker): boolean {
    const a = w.engineLoad!;
    const b = best.engineLoad!;
    if (a.waiting !== b.waiting) return a.waiting < b.waiting;
    if (a.running !== b.running) return a.running < b.running;
    return w.load < best.load;
  }
}
