// Why requests miss a TTFT objective in the lab: for each policy, splits the misses into those whose
// own prefill (with the cache hit they actually got) takes longer than the objective on an idle
// engine — no routing can save them — and the rest (queueing, contention).
// Usage: node scripts/slo-misses.mjs RATE_SCALE POLICY... (after `npx tsc`; conversation trace, first 30 min, 8 engines)
// Env: TRACE (default ../shared/data/mooncake/conversation_trace.jsonl), WINDOW (0:1800), SLO_MS (2000).
import { runCluster } from '../dist/lab/cluster.js';
import { loadWorkload } from '../dist/lab/workloads/index.js';
import { DEFAULT_COST_MODEL as C, prefillPairs } from '../dist/engine/cost-model.js';

const rate = Number(process.argv[2]);
const policies = process.argv.slice(3);
const trace = process.env.TRACE ?? '../shared/data/mooncake/conversation_trace.jsonl';
const [w0, w1] = (process.env.WINDOW ?? '0:1800').split(':').map(Number);
const slo = Number(process.env.SLO_MS ?? 2000);
if (!(rate > 0) || policies.length === 0) {
  console.error('usage: node scripts/slo-misses.mjs RATE_SCALE POLICY...');
  process.exit(2);
}
const wl = loadWorkload(`mooncake:${trace}`, { seed: 1, rateScale: rate, timeWindow: [w0, w1] });
/** TTFT of a request alone on an idle engine of the default model: 8,192-token chunks after `cached` tokens. */
const alone = (cached, n) => {
  let t = 0;
  let done = cached;
  for (let left = n - cached; left > 0; ) {
    const c = Math.min(8192, left);
    t += C.overheadMs + C.prefillTokenMs * c + C.prefillAttentionMs * prefillPairs(done, c);
    done += c;
    left -= c;
  }
  return t;
};
let cold = 0;
for (const r of wl.requests) if (alone(0, r.promptTokens.length) > slo) cold++;
const pct = (x, n) => `${((100 * x) / n).toFixed(2)}%`;
console.log(`rate ${rate}: ${wl.requests.length} requests; longer than ${slo} ms alone on an idle engine with nothing cached: ${cold} (${pct(cold, wl.requests.length)})`);
for (const policy of policies) {
  // The bench's defaults (kvgate serve's): --kv-active-weight 0.1; slo_aware's objective = the SLO.
  const run = runCluster(wl.requests, { workers: 8, policy, engine: {}, seed: 1, policyOptions: { kvAware: { activeWeight: 0.1 }, sloAware: { ttftSloMs: slo } } });
  let miss = 0;
  let structural = 0;
  for (const r of run.records) {
    if (r.ttftMs <= slo) continue;
    miss++;
    if (alone(r.cachedTokens, r.promptTokens) > slo) structural++;
  }
  const n = run.records.length;
  console.log(`${policy}: ${n} served, misses ${miss} (${pct(miss, n)}): own prefill alone > ${slo} ms with the cache it got ${structural} (${pct(structural, n)}), queueing/contention ${miss - structural} (${pct(miss - structural, n)})`);
}
