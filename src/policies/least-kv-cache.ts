import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { describeAll, noneAvailable, type RouteExplanation } from './explain.js';
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
 * A policy that ranks available workers by the load their engines report. Only workers with
 * fresh metrics compete; when none has them, the least_load rule decides (fewest in-flight,
 * then fewest processed, then order). So a worker whose /metrics cannot be read gets no traffic
 * while others report, and the policy degrades to least_load when no worker reports.
 */
export abstract class EngineLoadPolicy extends BasePolicy {
  readonly config: EngineLoadPolicyConfig;

  constructor(
    readonly name: string,
    deps: PolicyDeps,
    config: Partial<EngineLoadPolicyConfig> = {},
  ) {
    super(deps);
    this.config = { ...defaultEngineLoadPolicyConfig, ...config };
    validateEngineLoadPolicyConfig(name, this.config);
  }

  /** Whether `a` (fresh metrics) is a better choice than `b` (fresh metrics). */
  protected abstract better(a: Worker, b: Worker): boolean;

  selectWorker(candidates: readonly Worker[], _ctx: RequestContext): Worker | undefined {
    const healthy = available(candidates);
    const now = this.deps.clock.now();
    let best: Worker | undefined;
    for (const w of healthy) {
      if (!hasFreshEngineLoad(w, now, this.config.staleAfterMs)) continue;
      if (!best || this.better(w, best)) best = w;
    }
    return best ?? leastLoaded(healthy);
  }

  /** Engine loads (fresh or stale), in-flight loads, and the same choice selectWorker makes. */
  explain(candidates: readonly Worker[], _ctx: RequestContext): RouteExplanation {
    const now = this.deps.clock.now();
    const described = describeAll(candidates, now, this.config.staleAfterMs);
    const healthy = available(candidates);
    if (healthy.length === 0) return noneAvailable(this.name, described);
    let best: Worker | undefined;
    for (const w of healthy) {
      if (!hasFreshEngineLoad(w, now, this.config.staleAfterMs)) continue;
      if (!best || this.better(w, best)) best = w;
    }
    if (best) {
      const fresh = healthy.filter((w) => hasFreshEngineLoad(w, now, this.config.staleAfterMs)).length;
      return { policy: this.name, chosen: best.id, rule: 'engine_load', detail: `best engine-reported load among ${fresh} workers with fresh metrics`, deterministic: true, candidates: described };
    }
    return {
      policy: this.name,
      chosen: leastLoaded(healthy)?.id,
      rule: 'least_loaded',
      detail: 'no worker has fresh engine metrics: fewest in-flight requests decides',
      deterministic: true,
      candidates: described,
    };
  }
}

/**
 * `least_kv_cache`: lowest engine-reported KV-cache usage (`engineLoad.kvUsage`, scraped from
 * vllm:kv_cache_usage_perc / sglang:token_usage); ties by fewest in-flight, then order.
 */
export class LeastKvCachePolicy extends EngineLoadPolicy {
  constructor(deps: PolicyDeps, config: Partial<EngineLoadPolicyConfig> = {}) {
    super('least_kv_cache', deps, config);
  }

  protected better(w: Worker, best: Worker): boolean {
    const a = w.engineLoad!.kvUsage;
    const b = best.engineLoad!.kvUsage;
    return a < b || (a === b && w.load < best.load);
  }
}
