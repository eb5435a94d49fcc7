import type { Logger } from 'pino';
import { ServiceDiscovery } from '../discovery/service-discovery.js';
import type { RoutingCore } from '../server/routing-core.js';
import type { PoolSpec } from './inference-pool.js';

/**
 * The endpoints of an InferencePool (`kvgate epp --pool-name`): its pods, found by the same pod
 * watcher as `kvgate serve --service-discovery` (src/discovery), in the pool's namespace with its
 * selector, one worker per Ready pod IP and target port (several ports = several workers per pod,
 * e.g. data-parallel ranks). Workers are registered through the routing core as the admin API
 * registers them. Called again on every change of the pool: the previous watch stops and the
 * workers it added leave; `undefined` (pool deleted) leaves no pool endpoints.
 * Returns a function that stops whatever it started.
 */
export function startPoolEndpoints(pool: PoolSpec | undefined, core: RoutingCore, log: Logger): () => void {
  if (!pool) {
    log.warn('InferencePool absent: no pool endpoints');
    return () => undefined;
  }
  const c = core.config;
  const discovery = new ServiceDiscovery(
    {
      serviceDiscoveryNamespace: pool.namespace,
      serviceDiscoveryPort: pool.targetPorts[0],
      serviceDiscoveryPorts: pool.targetPorts,
      selector: Object.entries(pool.selector).map(([k, v]) => `${k}=${v}`),
      prefillSelector: [],
      decodeSelector: [],
      pdDisaggregation: false,
      modelIdFrom: c.modelIdFrom,
      modelId: c.modelId,
    },
    {
      registry: core.registry,
      registerWorker: (t) => core.registerWorker({ ...t, apiKey: c.workerApiKey }),
      removeWorker: (url) => void core.workers.remove(url),
    },
    log,
  );
  void discovery.start().catch((e: Error) => log.error({ err: e.message, pool: pool.name }, 'InferencePool: cannot watch its pods'));
  log.info({ pool: pool.name, namespace: pool.namespace, selector: pool.selector, targetPorts: pool.targetPorts }, 'InferencePool: watching its pods');
  return () => void discovery.stop(true);
}
