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

export const POLICY_NAMES = [
  'random',
  'round_robin',
  'power_of_two',
  'least_load',
  'cache_aware',
  'kv_aware',
  'prefix_load',
  'least_kv_cache',
  'least_waiting',
] as const;
export type PolicyName = (typeof POLICY_NAMES)[number];

export interface PolicyOptions {
  cacheAware?: Partial<CacheAwareConfig>;
  kvAware?: Partial<KvAwareConfig>;
  /** The KV-event index kv_aware reads. Required for kv_aware. */
  kvIndex?: KvIndexView;
  prefixLoad?: PrefixLoadOptions;
  engineLoad?: Partial<EngineLoadPolicyConfig>;
}

export function isPolicyName(name: string): name is PolicyName {
  return (POLICY_NAMES as readonly string[]).includes(name);
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
    case 'prefix_load':
      return new PrefixLoadPolicy(deps, { outputTokens: (ctx) => ctx.maxOutputTokens, ...options.prefixLoad });
    case 'least_kv_cache':
      return new LeastKvCachePolicy(deps, options.engineLoad);
    case 'least_waiting':
      return new LeastWaitingPolicy(deps, options.engineLoad);
    default:
      throw new Error(`unknown policy '${name}' (expected one of: ${POLICY_NAMES.join(', ')})`);
  }
}
