import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { available, BasePolicy, leastLoaded, type PolicyDeps } from './policy.js';

export interface EngineLoadPolicyConfig {
  /**
   * Engine metrics older than this (ms, on the policy clock) are stale. `worker.engineLoad`
   * is stamped by the EngineMetricsScraper with ITS clock: give the scraper and the policy the
   * same Clock (systemClock in the server, the virtual clock in the lab). An `updatedAtMs` in
   * the future of the policy clock means the clocks differ, and counts as stale too.
   */
  staleAfterMs: number;
}

/** Default: a few scrape intervals of the scraper's default 1 s. */
export const defaultEngineLoadPolicyConfig: Readonly<EngineLoadPolicyConfig> = Object.freeze({ staleAfterMs: 5000 });

export function validateEngineLoadPolicyConfig(name: string, c: EngineLoadPolicyConfig): void {
  if (typeof c.staleAfterMs !== 'number' || !(c.staleAfterMs >= 0)) {
    throw new RangeError(`${name}: staleAfterMs must be a number >= 0 (got ${String(c.staleAfterMs)})`);
  }
}

/** Whether `w` has engine metrics no older than `staleAfterMs` at `nowMs`. */
export function hasFreshEngineLoad(w: Worker, nowMs: number, staleAfterMs: number): boolean {
  const e = w.engineLoad;
  if (!e) return false;
  const age = nowMs - e.updatedAtMs;
  return age >= 0 && age <= staleAfterMs;
}

/**
 * `least_kv_cache`: the available worker whose engine reports the lowest KV-cache usage
 * (`engineLoad.kvUsage`, scraped from vllm:kv_cache_usage_perc / sglang:token_usage).
 *
 * Exactly:
 *  1. Among available workers with fresh engine metrics: lowest kvUsage; ties by fewest in-flight
 *     (`load`), then candidate order.
 *  2. Available workers without fresh metrics are only used when no available worker has fresh
 *     metrics: then fewest in-flight, ties by fewest processed, then candidate order (the
 *     `least_load` rule). So a worker whose /metrics cannot be read gets no traffic while others
 *     report, and the policy degrades to least_load when no worker reports.
 */
export class LeastKvCachePolicy extends BasePolicy {
  readonly name = 'least_kv_cache';
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
      if (!best) {
        best = w;
        continue;
      }
      const a = w.engineLoad!.kvUsage;
      const b = best.engineLoad!.kvUsage;
      if (a < b || (a === b && w.load < best.load)) best = w;
    }
    return best ?? leastLoaded(healthy);
  }
}
