import { ManualPolicy } from './manual.js';
import { SessionAffinityPolicy } from './session-affinity.js';
import { CacheAwarePolicy, defaultCacheAwareConfig, type CacheAwareConfig } from './cache-aware.js';
import { defaultKvAwareConfig, KvAwarePolicy, type KvAwareConfig, type KvIndexView } from './kv-aware.js';
import { LeastKvCachePolicy, type EngineLoadPolicyConfig } from './least-kv-cache.js';
import { LeastLoadPolicy } from './least-load.js';
import { LeastWaitingPolicy } from './least-waiting.js';
import type { PolicyDeps, RoutingPolicy } from './policy.js';
import { PowerOfTwoPolicy } from './power-of-two.js';
import { PrefixLoadPolicy, type PrefixLoadOptions } from './prefix-load.js';
import { RandomPolicy } from './random.js';
import { RoundRobinPolicy } from './round-robin.js';
import { defaultSloAwareConfig, SLO_OVERLAP_WEIGHT, SloAwarePolicy, type SloAwareConfig } from './slo-aware.js';

export const POLICY_NAMES = [
  'random',
  'round_robin',
  'power_of_two',
  'least_load',
  'cache_aware',
  'kv_aware',
  'slo_aware',
  'prefix_load',
  'least_kv_cache',
  'least_waiting',
  'manual',
] as const;
export type PolicyName = (typeof POLICY_NAMES)[number];

export interface PolicyOptions {
  cacheAware?: Partial<CacheAwareConfig>;
  kvAware?: Partial<KvAwareConfig>;
  /** The KV-event index kv_aware reads. Required for kv_aware. */
  kvIndex?: KvIndexView;
  /**
   * slo_aware: objectives, margins, predictor, and its own overlap weight (default
   * SLO_OVERLAP_WEIGHT, not kvAware's); the rest of its kv_aware part comes from kvAware.
   */
  sloAware?: Partial<Omit<SloAwareConfig, keyof KvAwareConfig>> & { overlapWeight?: number };
  prefixLoad?: PrefixLoadOptions;
  engineLoad?: Partial<EngineLoadPolicyConfig>;
}

export function isPolicyName(name: string): name is PolicyName {
  return (POLICY_NAMES as readonly string[]).includes(name);
}

/**
 * Wraps a policy in session affinity when a header is configured (`--session-affinity-header`):
 * usable on top of any policy.
 */
export function withSessionAffinity(policy: RoutingPolicy, deps: PolicyDeps, header: string | undefined, ttlSecs: number): RoutingPolicy {
  if (!header) return policy;
  return new SessionAffinityPolicy(deps, policy, { header: header.toLowerCase(), ttlMs: ttlSecs * 1000 });
}

/** Builds a policy by its CLI name. */
export function createPolicy(name: string, deps: PolicyDeps, options: PolicyOptions = {}): RoutingPolicy {
  switch (name) {
    case 'random':
      return new RandomPolicy(deps);
    case 'round_robin':
      return new RoundRobinPolicy(deps);
    case 'power_of_two':
      return new PowerOfTwoPolicy(deps);
    case 'least_load':
      return new LeastLoadPolicy(deps);
    case 'cache_aware':
      return new CacheAwarePolicy(deps, { ...defaultCacheAwareConfig, ...options.cacheAware });
    case 'kv_aware':
      if (!options.kvIndex) throw new Error('kv_aware needs a KV-event index (the host must provide one)');
      return new KvAwarePolicy(deps, options.kvIndex, { ...defaultKvAwareConfig, ...options.kvAware });
    case 'slo_aware':
      if (!options.kvIndex) throw new Error('slo_aware needs a KV-event index (the host must provide one)');
      return new SloAwarePolicy(deps, options.kvIndex, { ...defaultSloAwareConfig, ...defined(options.kvAware), overlapWeight: SLO_OVERLAP_WEIGHT, ...defined(options.sloAware) });
    case 'prefix_load':
      return new PrefixLoadPolicy(deps, { outputTokens: (ctx) => ctx.maxOutputTokens, ...options.prefixLoad });
    case 'least_kv_cache':
      return new LeastKvCachePolicy(deps, options.engineLoad);
    case 'least_waiting':
      return new LeastWaitingPolicy(deps, options.engineLoad);
    case 'manual':
      // X-SMG-Routing-Key → consistent hash; no header → random, as the SGLang router.
      return new ManualPolicy(deps, new RandomPolicy(deps));
    default:
      throw new Error(`unknown policy '${name}' (expected one of: ${POLICY_NAMES.join(', ')})`);
  }
}

/** The keys of `o` whose value is not undefined (so that unset options keep their defaults). */
function defined<T extends object>(o: T | undefined): Partial<T> {
  const out: Partial<T> = {};
  if (o) for (const [k, v] of Object.entries(o)) if (v !== undefined) (out as Record<string, unknown>)[k] = v;
  return out;
}
