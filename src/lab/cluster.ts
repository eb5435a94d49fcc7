import { BlockIndex, type MediumMode } from '../cache/block-index.js';
import { ManualClock } from '../core/clock.js';
import type { KvCacheEvent } from '../events/types.js';
import type { RequestContext } from '../core/context.js';
import { SeededRng } from '../core/rng.js';
import type { LoadGuard } from '../core/worker.js';
import type { PolicyOptions } from '../policies/factory.js';
import { createLabPolicy } from './peer-policies.js';
import type { PolicyObserver, RoutingPolicy } from '../policies/policy.js';
import type { CostModelConfig } from '../engine/cost-model.js';
import type { KvEvent, KvEventSink } from '../sim/kv-events.js';
import { Engine, EngineRequestError, type EngineOptions, type RequestRecord } from '../sim/engine.js';
import { EventQueue, queueScheduler, runEventLoop, scheduleEngineMetrics, stepStarter, type LabEvent } from './event-queue.js';
import type { PdRunInfo } from './pd-cluster.js';
import { buildRouterReplicas, type RouterReplica } from './replicas.js';
import type { LabRequest } from './workload.js';

/** Engine settings shared by every engine of a simulated cluster (the `kvgate sim` flags). */
export type LabEngineConfig = Omit<EngineOptions, 'clock' | 'rng' | 'kvEventSink' | 'cost'> & { cost?: Partial<CostModelConfig> };

export interface ClusterConfig {
  workers: number;
  policy: string;
  policyOptions?: PolicyOptions;
  engine: LabEngineConfig;
  seed: number;
  /**
   * Pooled LRU reference: ONE engine with the whole cluster's KV capacity, sequence slots and
   * token budget, and N times the compute (every step 1/N as long). Every request sees every
   * other request's cache, but under one global LRU: it is a reference, not an upper bound, since
   * a router that partitions prefixes (one group per engine) can protect them from eviction by
   * other groups' traffic better than a global LRU does, and then exceeds it.
   */
  pooled?: boolean;
  /** Called every `progressEvery` arrivals with the fraction done. */
  onProgress?: (fraction: number) => void;
  /** KV events reach the router's index this long after the engine step that produced them (ms). */
  kvEventDelayMs?: number;
  /** CPU/disk-tier events: ignored by the router's index (default) or indexed apart ('separate'). */
  kvMediums?: MediumMode;
  /** Engine metrics (running, waiting, KV usage) are sampled this often (ms)... */
  metricsIntervalMs?: number;
  /** ...and seen by the router this long after sampling (ms). */
  metricsDelayMs?: number;
  /** Router replicas behind a round-robin front (replicas.ts); default 1. */
  routerReplicas?: number;
  /** Their replica sync's delivery delay (ms), or 'off': the replicas share nothing. Default 5. */
  replicaSyncDelayMs?: number | 'off';
}

/** Policies that read the KV-event index (the lab feeds it from the engines only for them). */
export function usesKvEvents(policy: string): boolean {
  return policy === 'kv_aware' || policy === 'slo_aware' || policy.startsWith('peer_');
}

export const LAB_DEFAULTS = { kvEventDelayMs: 50, metricsIntervalMs: 1000, metricsDelayMs: 50, routerReplicas: 1, replicaSyncDelayMs: 5 } as const;

/** What the router sees of a lab request: the context the gateway would build (text built lazily). */
export function labContext(req: LabRequest, nowMs: number): RequestContext {
  return {
    requestId: req.id,
    route: 'completions',
    model: 'lab',
    get routingText() {
      return req.text();
    },
    tokenIds: req.promptTokens,
    headers: {},
    stream: true,
    maxOutputTokens: req.outputTokens,
    arrivalMs: nowMs,
  };
}

/**
 * KV events as the router receives them: each engine step's batch reaches the shared block index
 * `delayMs` after the step, and the time it arrived is kept per source (kv_aware's freshness).
 */
export function kvEventFeed(queue: EventQueue<Ev>, clock: { now(): number }, delayMs: number, mediums?: MediumMode) {
  const index = new BlockIndex({ mediums });
  const lastEventAt = new Map<string, number>();
  const sinkFor = (source: string): KvEventSink => (events) => {
    const batch = normalise(events);
    queue.push(clock.now() + delayMs, {
      kind: 'deliver',
      fn: () => {
        index.apply(source, batch);
        lastEventAt.set(source, clock.now());
      },
    });
  };
  const view = { index, lastEventAtMs: (id: string) => lastEventAt.get(id), isAccurate: () => true, resetCount: () => 0 };
  return { index, view, sinkFor };
}

/** The simulated engine's events in the router's normalised form (what the ZMQ decoder yields). */
export function normalise(events: readonly KvEvent[]): KvCacheEvent[] {
  return events.map((e): KvCacheEvent => {
    switch (e.type) {
      case 'BlockStored':
        return { type: 'stored', blockHashes: e.blockHashes, parentBlockHash: e.parentBlockHash, tokenIds: e.tokenIds, blockSize: e.blockSize, medium: e.medium, loraName: e.loraName, loraId: e.loraId };
      case 'BlockRemoved':
        return { type: 'removed', blockHashes: e.blockHashes, medium: e.medium };
      case 'AllBlocksCleared':
        return { type: 'cleared' };
    }
  });
}

export interface ClusterRun {
  policy: string;
  workers: number;
  records: RequestRecord[];
  /** Requests the engines refused (e.g. longer than the model length), with the reason. */
  rejected: Array<{ id: string; reason: string }>;
  engineBusyMs: number[];
  preemptions: number;
  /** Engine that served each request (index into the cluster). */
  placement: Map<string, number>;
  decisions: { cacheHits: number; cacheMisses: number; loadBalanced: number };
  /** Virtual time of the last finish (ms). */
  endMs: number;
  /** Wall-clock time the simulation took (ms). */
  wallMs: number;
  /** Engine steps simulated. */
  steps: number;
  /**
   * Prefill/decode disaggregation runs only (runPdCluster). Then `placement` holds the prefill
   * engine of each request, engines [0, prefillWorkers) are the prefill engines and the rest the
   * decode engines, and each record is the request as the client sees it (see pd-cluster.ts).
   */
  pd?: PdRunInfo;
  /** Router replicas of the run (1 unless --router-replicas). */
  replicas?: ReplicaRunInfo;
}

export interface ReplicaRunInfo {
  count: number;
  /** Sync bus delay (ms), or 'off'. */
  syncDelayMs: number | 'off';
  /** Sync traffic published on the bus until the last request finished (each message counted once, not per receiver). */
  sync?: { messages: number; bytes: number; routedRecords: number };
}

/** @internal Events of the lab's discrete-event loops. */
export type Ev = LabEvent;

/**
 * A discrete-event simulation, in virtual time, of a router in front of N simulated engines.
 * The router is the real policy code (the same objects `kvgate serve` uses), fed with the real
 * worker registry and load guards; the engines are the real engine model. What the router sees
 * matches the live system: requests on arrival, in-flight load going down as responses end.
 * Same seed, same result.
 */
export function runCluster(requests: readonly LabRequest[], cfg: ClusterConfig): ClusterRun {
  const wallStart = performance.now();
  const clock = new ManualClock(0);
  const n = cfg.pooled ? 1 : cfg.workers;
  const queue = new EventQueue<Ev>();

  const engineOpts = (i: number): EngineOptions => {
    const base: EngineOptions = { ...cfg.engine, clock, rng: new SeededRng(cfg.seed * 1000 + i + 1), cost: { ...cfg.engine.cost } };
    if (!cfg.pooled) return base;
    const k = cfg.workers;
    const probe = new Engine({ ...base }); // resolves defaults
    return {
      ...base,
      numGpuBlocks: probe.config.numGpuBlocks * k,
      maxNumSeqs: probe.config.maxNumSeqs * k,
      maxNumBatchedTokens: probe.config.maxNumBatchedTokens * k,
      cost: { ...base.cost, slowFactor: probe.config.cost.slowFactor / k },
    };
  };
  const usesEvents = !cfg.pooled && usesKvEvents(cfg.policy);
  const kv = kvEventFeed(queue, clock, cfg.kvEventDelayMs ?? LAB_DEFAULTS.kvEventDelayMs, cfg.kvMediums);
  const engines = Array.from({ length: n }, (_, i) => {
    const opts = engineOpts(i);
    if (usesEvents) opts.kvEventSink = kv.sinkFor(`http://engine-${i}.lab`);
    return new Engine(opts);
  });

  const replicaCount = cfg.pooled ? 1 : (cfg.routerReplicas ?? LAB_DEFAULTS.routerReplicas);
  const syncDelayMs = cfg.replicaSyncDelayMs ?? LAB_DEFAULTS.replicaSyncDelayMs;
  const decisions = { cacheHits: 0, cacheMisses: 0, loadBalanced: 0 };
  const observer: PolicyObserver = {
    cacheHit: () => decisions.cacheHits++,
    cacheMiss: () => decisions.cacheMisses++,
    loadBalanced: () => decisions.loadBalanced++,
  };
  // KV events: every replica subscribes to every engine's events, so each would build the same
  // index from the same stream; one shared index (kv.view) is equivalent and cheaper.
  const routers = buildRouterReplicas({
    count: replicaCount,
    syncDelayMs,
    queue,
    clock,
    workerSpecs: engines.map((_, i) => ({ url: `http://engine-${i}.lab` })),
    makePolicy: (r, share): RoutingPolicy =>
      createLabPolicy(
        cfg.pooled ? 'round_robin' : cfg.policy,
        {
          clock,
          // Replica 0 draws from the run's seed (one replica = the run without replicas).
          rng: new SeededRng(r === 0 ? cfg.seed : cfg.seed + 7919 * r),
          observer,
          get share() {
            return share();
          },
          schedule: queueScheduler(queue, clock),
        },
        {
          ...cfg.policyOptions,
          kvIndex: kv.view,
        },
      ),
  });
  const firstTokens = routers.replicas[0].policy.onFirstToken !== undefined;

  // Engine metrics as a scraper would see them: sampled periodically, visible after a delay.
  const metricsEvery = cfg.metricsIntervalMs ?? LAB_DEFAULTS.metricsIntervalMs;
  const metricsDelay = cfg.metricsDelayMs ?? LAB_DEFAULTS.metricsDelayMs;
  const usesMetrics = !cfg.pooled && (cfg.policy === 'least_kv_cache' || cfg.policy === 'least_waiting' || cfg.policy === 'peer_llmd');
  if (usesMetrics) {
    // Every replica scrapes the engines; they see the same samples at the same time.
    const workers =
      routers.replicas.length === 1
        ? routers.replicas[0].workers
        : engines.map((_, i) => ({
            get engineLoad() {
              return routers.replicas[0].workers[i].engineLoad;
            },
            set engineLoad(v) {
              for (const r of routers.replicas) r.workers[i].engineLoad = v;
            },
          }));
    scheduleEngineMetrics({ queue, clock, engines, workers, everyMs: metricsEvery, delayMs: metricsDelay });
  }

  const guards = new Map<string, { guard: LoadGuard; ctx: RequestContext; router: RouterReplica }>();
  const placement = new Map<string, number>();
  const records: RequestRecord[] = [];
  const rejected: Array<{ id: string; reason: string }> = [];
  let pendingRequests = 0;
  let steps = 0;

  const startStep = stepStarter(engines, queue);

  let arrivals = 0;
  const arrive = (req: LabRequest) => {
    const ctx = labContext(req, clock.now());
    const router = routers.front(arrivals++);
    const policy = router.policy;
    const worker = policy.selectWorker(router.registry.forModel('lab'), ctx);
    if (!worker) throw new Error('lab: the policy chose no worker although every worker is healthy');
    const i = router.engineOf.get(worker)!;
    const guard = worker.acquire();
    try {
      engines[i].submit({ id: req.id, promptTokens: req.promptTokens, maxTokens: req.outputTokens });
    } catch (e) {
      guard.release();
      policy.onRequestComplete?.(worker, ctx, 'error');
      if (e instanceof EngineRequestError) {
        rejected.push({ id: req.id, reason: e.message });
        return;
      }
      throw e;
    }
    placement.set(req.id, i);
    guards.set(req.id, { guard, ctx, router });
    pendingRequests++;
    startStep(i);
  };

  runEventLoop({
    requests,
    queue,
    clock,
    arrive,
    pending: () => pendingRequests,
    onProgress: cfg.onProgress,
    stepEnd: (i) => {
    const res = engines[i].completeStep();
    steps++;
    // First tokens and completions go to the replica that routed the request.
    if (firstTokens) {
      for (const o of res.outputs) {
        if (o.index !== 0) continue;
        const g = guards.get(o.id);
        if (g) g.router.policy.onFirstToken?.(g.guard.worker, g.ctx);
      }
    }
    for (const rec of res.finished) {
      const g = guards.get(rec.id);
      if (g) {
        guards.delete(rec.id);
        g.guard.release();
        g.router.policy.onRequestComplete?.(g.guard.worker, g.ctx, 'success');
      }
      records.push(rec);
      pendingRequests--;
    }
    startStep(i);
    },
  });
  // The loop ends when the last request has finished (periodic timers such as the syncs'
  // heartbeats never keep it going); read the sync traffic, then stop every replica.
  const bus = routers.bus;
  const replicas: ReplicaRunInfo = {
    count: replicaCount,
    syncDelayMs: replicaCount > 1 ? syncDelayMs : 'off',
    ...(bus
      ? { sync: { messages: bus.messages, bytes: bus.bytes, routedRecords: routers.replicas.reduce((s, r) => s + (r.sync?.stats.routedSent ?? 0), 0) } }
      : {}),
  };
  routers.close();
  cfg.onProgress?.(1);

  return {
    policy: cfg.pooled ? 'pooled LRU reference' : cfg.policy,
    workers: cfg.workers,
    records,
    rejected,
    engineBusyMs: engines.map((e) => e.stats().busyMs),
    preemptions: engines.reduce((s, e) => s + e.stats().preemptions, 0),
    placement,
    decisions,
    endMs: clock.now(),
    wallMs: performance.now() - wallStart,
    steps,
    replicas,
  };
}
