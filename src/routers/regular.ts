import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Clock } from '../core/clock.js';
import type { RequestContext, RouteName } from '../core/context.js';
import { errors } from '../core/errors.js';
import type { WorkerRegistry } from '../core/registry.js';
import type { GatewayMetrics } from '../metrics/gateway-metrics.js';
import type { RoutingPolicy } from '../policies/policy.js';
import { forwardHeaders, proxyRequest } from '../upstream/proxy.js';
import type { UpstreamPools } from '../upstream/pools.js';
import { sendError } from '../server/http-util.js';
import { routingTextOf } from '../server/routing-text.js';

export interface RegularRouterDeps {
  registry: WorkerRegistry;
  policy: RoutingPolicy;
  pools: UpstreamPools;
  metrics: GatewayMetrics;
  clock: Clock;
  requestTimeoutMs: number;
}

export interface RoutedRequest {
  req: IncomingMessage;
  res: ServerResponse;
  route: RouteName;
  path: string;
  requestId: string;
  rawBody: Buffer;
  body: Record<string, unknown>;
}

/**
 * Regular mode: request → context → policy → worker → proxy. Load is held by a guard from
 * the moment the worker is chosen until the response ends, whatever ends it.
 * Resolves with the status sent to the client (0 if the client left first).
 */
export class RegularRouter {
  constructor(private readonly deps: RegularRouterDeps) {}

  /** Which model a request is for: its `model`, or the only one served. */
  resolveModel(body: Record<string, unknown>): string {
    const { registry } = this.deps;
    const requested = body.model;
    if (requested !== undefined && requested !== null) {
      if (typeof requested !== 'string') throw errors.badRequest("'model' must be a string", 'invalid_type', 'model');
      if (registry.forModel(requested).length > 0) return requested;
      // Workers whose model is not yet known might serve it: that is unavailability, not a 404.
      if (registry.all().some((w) => w.modelId === undefined)) throw errors.noHealthyWorkers(requested);
      throw errors.modelNotFound(requested);
    }
    const models = registry.models();
    if (models.length === 1) return models[0];
    if (models.length === 0) throw errors.noHealthyWorkers(undefined);
    throw errors.badRequest(`'model' is required: this gateway serves ${models.length} models (${models.join(', ')})`, 'missing_field', 'model');
  }

  async handle(r: RoutedRequest): Promise<number> {
    const { registry, policy, pools, metrics, clock } = this.deps;
    const model = this.resolveModel(r.body);
    const routing = routingTextOf(r.route, r.body);
    if (r.body.stream !== undefined && typeof r.body.stream !== 'boolean') throw errors.badRequest("'stream' must be a boolean", 'invalid_type', 'stream');
    const ctx: RequestContext = {
      requestId: r.requestId,
      route: r.route,
      model,
      routingText: routing.text,
      tokenIds: routing.tokenIds,
      headers: r.req.headers,
      stream: r.body.stream === true,
      arrivalMs: clock.now(),
    };
    const worker = policy.selectWorker(registry.forModel(model), ctx);
    if (!worker) throw errors.noHealthyWorkers(model);
    metrics.decisions.inc({ policy: policy.name, worker: worker.id });

    const guard = worker.acquire();
    let outcome: Awaited<ReturnType<typeof proxyRequest>> | undefined;
    try {
      outcome = await proxyRequest({
        pool: pools.get(worker.url),
        path: r.path,
        headers: forwardHeaders(r.req.headers, r.requestId),
        body: r.rawBody,
        res: r.res,
        extraResponseHeaders: { 'x-request-id': r.requestId, 'x-kvgate-worker': worker.id },
        timeoutMs: this.deps.requestTimeoutMs,
      });
    } finally {
      guard.release();
      metrics.processed.inc({ worker: worker.id });
      policy.onRequestComplete?.(worker, ctx, outcome?.outcome ?? 'error');
    }
    if (outcome.failure) metrics.upstreamErrors.inc({ worker: worker.id, kind: outcome.failure });
    if (outcome.outcome === 'aborted') metrics.clientAborts.inc({ route: r.route });
    if (outcome.error) {
      sendError(r.res, outcome.error, { 'x-request-id': r.requestId, 'x-kvgate-worker': worker.id });
      return outcome.error.status;
    }
    return outcome.status;
  }
}
