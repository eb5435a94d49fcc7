// Shared set-up of the request-by-request slo_aware analyses (scripts/slo-hits.mjs,
// scripts/slo-hits-why.mjs): the workload and objective from the environment, the lab's policy
// options, and a hook on each slo_aware decision with the holder (the worker whose engine holds or
// is computing most of the request). Needs `npx tsc` first (reads dist/).
// Env: TRACE (default ../shared/data/mooncake/conversation_trace.jsonl), WINDOW (0:1800), SLO_MS (2000),
//      WORKLOAD (a generator spec instead of TRACE/WINDOW; the rate is then its req/s),
//      SLO (JSON of extra slo_aware options), SEED (1).
import { runCluster } from '../../dist/lab/cluster.js';
import { loadWorkload } from '../../dist/lab/workloads/index.js';
import { SloAwarePolicy } from '../../dist/policies/slo-aware.js';

export const seed = Number(process.env.SEED ?? 1);
export const sloMs = Number(process.env.SLO_MS ?? 2000);
const extra = process.env.SLO ? JSON.parse(process.env.SLO) : {};

/** The analysed workload at `rate` (a rate scale for traces, req/s for a WORKLOAD generator). */
export function analysisWorkload(rate) {
  const trace = process.env.TRACE ?? '../shared/data/mooncake/conversation_trace.jsonl';
  const [w0, w1] = (process.env.WINDOW ?? '0:1800').split(':').map(Number);
  return process.env.WORKLOAD
    ? loadWorkload(process.env.WORKLOAD, { seed, rps: rate })
    : loadWorkload(`mooncake:${trace}`, { seed, rateScale: rate, timeWindow: [w0, w1] });
}

/** Runs `policy` on 8 lab engines with the analyses' options (seed SEED, default 1). */
export function runAnalysis(requests, policy) {
  const options = { kvAware: { activeWeight: 0.1 }, sloAware: { ttftSloMs: sloMs, ...extra } };
  return runCluster(requests, { workers: 8, policy, engine: {}, seed, policyOptions: options });
}

/** Calls `fn(e, sc, ctx, held, holder)` after every slo_aware decision (`held`: blocks per worker). */
export function onSloDecision(fn) {
  const evaluate = SloAwarePolicy.prototype.evaluate;
  SloAwarePolicy.prototype.evaluate = function (healthy, sc, ctx, ...rest) {
    const e = evaluate.call(this, healthy, sc, ctx, ...rest);
    const held = sc.meta.map((c) => (c.fallback ? c.overlap : Math.max(c.indexed, c.pending)));
    let holder = 0;
    for (let k = 1; k < held.length; k++) if (held[k] > held[holder]) holder = k;
    fn(e, sc, ctx, held, holder);
    return e;
  };
}
