import { CacheAwarePolicy, defaultCacheAwareConfig, type CacheAwareConfig } from './cache-aware.js';
import { LeastLoadPolicy } from './least-load.js';
import type { PolicyDeps, RoutingPolicy } from './policy.js';
import { PowerOfTwoPolicy } from './power-of-two.js';
import { RandomPolicy } from './random.js';
import { RoundRobinPolicy } from './round-robin.js';

export const POLICY_NAMES = ['random', 'round_robin', 'power_of_two', 'least_load', 'cache_aware'] as const;
export type PolicyName = (typeof POLICY_NAMES)[number];

export interface PolicyOptions {
  cacheAware?: Partial<CacheAwareConfig>;
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
    default:
      throw new Error(`unknown policy '${name}' (expected one of: ${POLICY_NAMES.join(', ')})`);
  }
}
