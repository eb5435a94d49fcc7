import type { Logger } from 'pino';
import type { RoutingCore } from '../server/routing-core.js';
import type { PoolSpec } from './inference-pool.js';

/**
 * MERGE SEAM (pod discovery). `kvgate epp --pool-name` reads the InferencePool
 * (inference-pool.ts) and hands its selector and target ports here. This must start (or
 * re-target, on every change) the pod watcher of src/discovery with:
 *   namespace = pool.namespace, selector = pool.selector (matchLabels),
 *   ports = pool.targetPorts (one worker per Ready pod IP and port: http://<podIP>:<port>),
 * registering workers through `core.registerWorker` and removing them through
 * `core.workers.remove`, and stop it when the pool is deleted (pool undefined).
 * Until that module is merged, this logs that pool endpoints are not discovered; static
 * --worker-urls and POST /workers still work.
 * Returns a function that stops whatever it started.
 */
export function startPoolEndpoints(pool: PoolSpec | undefined, core: RoutingCore, log: Logger): () => void {
  void core;
  if (!pool) {
    log.warn('InferencePool absent: no pool endpoints');
    return () => undefined;
  }
  log.error(
    { namespace: pool.namespace, selector: pool.selector, targetPorts: pool.targetPorts },
    'InferencePool read, but pod discovery is not part of this build: pool endpoints are not registered (use --worker-urls or POST /workers)',
  );
  return () => undefined;
}
