import { ManualClock } from '../core/clock.js';
import type { RequestContext } from '../core/context.js';
import { WorkerRegistry } from '../core/registry.js';
import { SeededRng } from '../core/rng.js';
import { Worker, type LoadGuard, type WorkerType } from '../core/worker.js';
import { createLabPolicy } from './peer-policies.js';
import type { PolicyObserver, RoutingPolicy, WorkerPair } from '../policies/policy.js';
import { Engine, EngineRequestError, type EngineOptions, type EngineStats, type RequestRecord } from '../sim/engine.js';
import { kvEventFeed, LAB_DEFAULTS, labContext, usesKvEvents, type ClusterConfig, type ClusterRun, type Ev } from './cluster.js';
import { EventQueue, queueScheduler, runEventLoop, scheduleEngineMetrics } from './event-queue.js';
import type { LabRequest } from './workload.js';

/**
 * KV transfer time per block, prefill → decode (ms). A Llama-3-8B block of 16 tokens is
 * 2 (K, V) × 32 layers × 8 KV heads × 128 dims × 2 bytes × 16 tokens = 2 MiB; at ~25 GB/s
 * (RDMA / NVLink-class effective bandwidth) that is 2 MiB / 25 GB/s ≈ 0.084 ms.
 */
export const PD_DEFAULTS = { transferMsPerBlock: 0.08 } as const;

export interface PdClusterConfig extends Omit<ClusterConfig, 'workers' | 'pooled' | 'policy'> {
  prefillWorkers: number;
  decodeWorkers: number;
  /** Policy of both pools unless overridden below. */
  policy: string;
  /** Policy for the prefill pool (default: `policy`). */
  prefillPolicy?: string;
  /** Policy for the decode pool (default: `policy`). */
  decodePolicy?: string;
  /** KV transfer: this many ms per KV block of the prompt (default PD_DEFAULTS.transferMsPerBlock). */
  transferMsPerBlock?: number;
}

/** How one request went through the PD cluster (all times in virtual ms). */
export interface PdHandoff {
  /** Engine indices (into the run's engine list: prefill engines first). */
  prefillEngine: number;
  decodeEngine: number;
  /** End of the prefill step that produced the prefill engine's (only) token. */
  prefillDoneMs: number;
  /** transferMsPerBlock × ceil(prompt / blockSize). */
  transferMs: number;
  /** Submission to the decode engine (prefillDoneMs + transferMs). */
  decodeSubmitMs: number;
  /** Prompt tokens the decode engine already held in its prefix cache at admission. */
  decodeCachedTokens: number;
}

export interface PdRunInfo {
  prefillWorkers: number;
  decodeWorkers: number;
  prefillPolicy: string;
  decodePolicy: string;
  transferMsPerBlock: number;
  /** Final stats of every engine, prefill engines first (prefillTokensComputed: prompt compute). */
  engineStats: EngineStats[];
  /** Per engine: decode steps of requests (Σ decode sequences of its step plans). */
  decodeSeqsStepped: number[];
  /** Per finished request. */
  handoffs: Map<string, PdHandoff>;
}

interface InFlight {
  req: LabRequest;
  ctx: RequestContext;
  prefill: LoadGuard;
  decode: LoadGuard;
  pi: number;
  di: number;
  prefillRec?: RequestRecord;
  handoff?: Omit<PdHandoff, 'decodeCachedTokens'>;
}

/**
 * Prefill/decode disaggregation in virtual time: `prefillWorkers` prefill engines and
 * `decodeWorkers` decode engines (all with the same engine config) behind the real router.
 *
 * Per request:
 *  1. at arrival the router picks a (prefill, decode) pair: with one policy for both pools, its
 *     `selectPair(prefill pool, decode pool, ctx)`; with different prefill and decode policies,
 *     each policy's `selectWorker` on its own pool. Both workers' load guards are taken now;
 *  2. the prefill engine runs the prompt with maxTokens 1; its token marks the end of prefill
 *     (the prefill policy's onFirstToken is called then);
 *  3. the KV cache moves to the decode engine in transferMsPerBlock × ceil(prompt / blockSize);
 *  4. the request is submitted to the decode engine with `prefilled: true` and the request's
 *     output length: no prompt compute there, its first token comes from its first decode step.
 *     That token is the client's first token (SGLang and vLLM PD both stream from the decode
 *     engine), so TTFT = decode first token − arrival and E2E = decode finish − arrival;
 *  5. at the decode finish both guards are released and onRequestComplete is called for both
 *     workers, as the gateway does when the response ends.
 *
 * Records carry the prefill engine's prefix-cache hit (where the prompt is computed), so the
 * report's hit rate for PD rows is the prefill engines' hit rate.
 */
export function runPdCluster(requests: readonly LabRequest[], cfg: PdClusterConfig): ClusterRun {
  const wallStart = performance.now();
  const np = cfg.prefillWorkers;
  const nd = cfg.decodeWorkers;
  if (!Number.isInteger(np) || np < 1 || !Number.isInteger(nd) || nd < 1) {
    throw new RangeError(`lab: a PD cluster needs at least one prefill and one decode engine (got ${np} + ${nd})`);
  }
  if ((cfg.routerReplicas ?? 1) > 1) throw new RangeError('lab: router replicas are not modelled on PD clusters yet (use one router replica)');
  const prefillName = cfg.prefillPolicy ?? cfg.policy;
  const decodeName = cfg.decodePolicy ?? cfg.policy;
  const perBlock = cfg.transferMsPerBlock ?? PD_DEFAULTS.transferMsPerBlock;
  if (!(perBlock >= 0)) throw new RangeError(`lab: transferMsPerBlock must be >= 0 (got ${perBlock})`);
  const clock = new ManualClock(0);
  const queue = new EventQueue<Ev>();
  const n = np + nd;
  const typeOf = (i: number): WorkerType => (i < np ? 'prefill' : 'decode');
  const urlOf = (i: number) => (i < np ? `http://prefill-${i}.lab` : `http://decode-${i - np}.lab`);

  const usesEvents = usesKvEvents(prefillName) || usesKvEvents(decodeName);
  const kv = kvEventFeed(queue, clock, cfg.kvEventDelayMs ?? LAB_DEFAULTS.kvEventDelayMs, cfg.kvMediums);
  const engines = Array.from({ length: n }, (_, i) => {
    const opts: EngineOptions = { ...cfg.engine, clock, rng: new SeededRng(cfg.seed * 1000 + i + 1), cost: { ...cfg.engine.cost } };
    if (usesEvents) opts.kvEventSink = kv.sinkFor(urlOf(i));
    return new Engine(opts);
  });
  const blockSize = engines[0].config.blockSize;

  const registry = new WorkerRegistry();
  const workers = engines.map((_, i) => {
    const w = new Worker({ url: urlOf(i), modelId: 'lab', type: typeOf(i) });
    w.healthy = true;
    return registry.add(w);
  });
  const engineOf = new Map<Worker, number>(workers.map((w, i) => [w, i]));

  const decisions = { cacheHits: 0, cacheMisses: 0, loadBalanced: 0 };
  const observer: PolicyObserver = {
    cacheHit: () => decisions.cacheHits++,
    cacheMiss: () => decisions.cacheMisses++,
    loadBalanced: () => decisions.loadBalanced++,
  };
  const makePolicy = (name: string, seed: number): RoutingPolicy =>
    createLabPolicy(
      name,
      {
        clock,
        rng: new SeededRng(seed),
        observer,
        schedule: queueScheduler(queue, clock),
      },
      {
        ...cfg.policyOptions,
        kvIndex: kv.view,
      },
    );
  // One policy for both pools: its selectPair (a policy may couple the two choices). Two
  // policies: each picks in its own pool, as a router with per-pool policies does.
  const single = prefillName === decodeName;
  const prefillPolicy = makePolicy(prefillName, cfg.seed);
  const decodePolicy = single ? prefillPolicy : makePolicy(decodeName, cfg.seed + 1_000_003);
  const policyOf = (w: Worker) => (w.type === 'prefill' ? prefillPolicy : decodePolicy);
  const pool = registry.forModel('lab', 'prefill');
  const dpool = registry.forModel('lab', 'decode');
  const selectPair = (ctx: RequestContext): WorkerPair | undefined => {
    if (single) return prefillPolicy.selectPair(pool, dpool, ctx);
    const prefill = prefillPolicy.selectWorker(pool, ctx);
    const decode = prefill && decodePolicy.selectWorker(dpool, ctx);
    return prefill && decode ? { prefill, decode } : undefined;
  };

  const metricsEvery = cfg.metricsIntervalMs ?? LAB_DEFAULTS.metricsIntervalMs;
  const metricsDelay = cfg.metricsDelayMs ?? LAB_DEFAULTS.metricsDelayMs;
  const metricNames = ['least_kv_cache', 'least_waiting'];
  const usesMetrics = metricNames.includes(prefillName) || metricNames.includes(decodeName);
  if (usesMetrics) scheduleEngineMetrics({ queue, clock, engines, workers, everyMs: metricsEvery, delayMs: metricsDelay });

  const inFlight = new Map<string, InFlight>();
  const placement = new Map<string, number>();
  const handoffs = new Map<string, PdHandoff>();
  const records: RequestRecord[] = [];
  const rejected: Array<{ id: string; reason: string }> = [];
  const decodeSeqsStepped = new Array<number>(n).fill(0);
  let pendingRequests = 0;
  let steps = 0;

  const startStep = (i: number) => {
    const e = engines[i];
    if (e.busy) return;
    const plan = e.step();
    if (!plan) return;
    decodeSeqsStepped[i] += plan.decodeSeqs;
    queue.push(plan.endMs, { kind: 'step', engine: i });
  };

  const refuse = (req: LabRequest, ctx: RequestContext, guards: LoadGuard[], reason: string) => {
    for (const g of guards) {
      g.release();
      policyOf(g.worker).onRequestComplete?.(g.worker, ctx, 'error');
    }
    rejected.push({ id: req.id, reason });
  };

  const arrive = (req: LabRequest) => {
    const ctx = labContext(req, clock.now());
    const pair = selectPair(ctx);
    if (!pair) throw new Error('lab: the policy chose no (prefill, decode) pair although every worker is healthy');
    const pi = engineOf.get(pair.prefill)!;
    const di = engineOf.get(pair.decode)!;
    const pg = pair.prefill.acquire();
    const dg = pair.decode.acquire();
    // The decode engine must take prompt + output; refuse up front, as the aggregated engine would.
    const p = req.promptTokens.length;
    const limit = engines[di].maxRequestTokens;
    if (p + req.outputTokens > limit) {
      refuse(req, ctx, [pg, dg], `prompt (${p} tokens) + max tokens (${req.outputTokens}) exceeds the engine's limit of ${limit} tokens`);
      return;
    }
    try {
      engines[pi].submit({ id: req.id, promptTokens: req.promptTokens, maxTokens: 1 });
    } catch (e) {
      if (e instanceof EngineRequestError) {
        refuse(req, ctx, [pg, dg], e.message);
        return;
      }
      throw e;
    }
    placement.set(req.id, pi);
    inFlight.set(req.id, { req, ctx, prefill: pg, decode: dg, pi, di });
    pendingRequests++;
    startStep(pi);
  };

  const handOff = (f: InFlight) => {
    try {
      engines[f.di].submit({ id: f.req.id, promptTokens: f.req.promptTokens, maxTokens: f.req.outputTokens, prefilled: true });
    } catch (e) {
      if (!(e instanceof EngineRequestError)) throw e;
      inFlight.delete(f.req.id);
      placement.delete(f.req.id);
      pendingRequests--;
      refuse(f.req, f.ctx, [f.prefill, f.decode], e.message);
      return;
    }
    startStep(f.di);
  };

  const finish = (f: InFlight, d: RequestRecord) => {
    const p = f.prefillRec!;
    const arrival = f.req.arrivalMs;
    records.push({
      id: f.req.id,
      promptTokens: p.promptTokens,
      outputTokens: d.outputTokens,
      cachedTokens: p.cachedTokens,
      arrivalMs: arrival,
      firstScheduledMs: p.firstScheduledMs,
      firstTokenMs: d.firstTokenMs,
      finishMs: d.finishMs,
      queueMs: p.queueMs,
      ttftMs: d.firstTokenMs >= 0 ? d.firstTokenMs - arrival : -1,
      e2eMs: d.finishMs - arrival,
      preemptions: p.preemptions + d.preemptions,
      finishReason: d.finishReason,
    });
    handoffs.set(f.req.id, { ...f.handoff!, decodeCachedTokens: d.cachedTokens });
    inFlight.delete(f.req.id);
    for (const g of [f.prefill, f.decode]) {
      g.release();
      policyOf(g.worker).onRequestComplete?.(g.worker, f.ctx, 'success');
    }
    pendingRequests--;
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
    const isPrefill = i < np;
    for (const o of res.outputs) {
      if (o.index !== 0) continue;
      const f = inFlight.get(o.id);
      if (!f) continue;
      const g = isPrefill ? f.prefill : f.decode;
      policyOf(g.worker).onFirstToken?.(g.worker, f.ctx);
    }
    for (const rec of res.finished) {
      const f = inFlight.get(rec.id);
      if (!f) continue;
      if (isPrefill) {
        // maxTokens 1: the step that produced the prefill token also finished it.
        f.prefillRec = rec;
        const transferMs = perBlock * Math.ceil(rec.promptTokens / blockSize);
        const at = clock.now() + transferMs;
        f.handoff = { prefillEngine: f.pi, decodeEngine: f.di, prefillDoneMs: clock.now(), transferMs, decodeSubmitMs: at };
        queue.push(at, { kind: 'deliver', fn: () => handOff(f) });
      } else {
        finish(f, rec);
      }
    }
    startStep(i);
    },
  });
  prefillPolicy.close?.();
  if (!single) decodePolicy.close?.();
  cfg.onProgress?.(1);

  const stats = engines.map((e) => e.stats());
  const pairLabel = single ? prefillName : `${prefillName}→${decodeName}`;
  return {
    policy: `${pairLabel} [PD ${np}P+${nd}D]`,
    workers: n,
    records,
    rejected,
    engineBusyMs: stats.map((s) => s.busyMs),
    preemptions: stats.reduce((s, e) => s + e.preemptions, 0),
    placement,
    decisions,
    endMs: clock.now(),
    wallMs: performance.now() - wallStart,
    steps,
    pd: {
      prefillWorkers: np,
      decodeWorkers: nd,
      prefillPolicy: prefillName,
      decodePolicy: decodeName,
      transferMsPerBlock: perBlock,
      engineStats: stats,
      decodeSeqsStepped,
      handoffs,
    },
  };
}
