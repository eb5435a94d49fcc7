// slo_aware's predictions in the lab against what the engines did: for every request, the TTFT the
// routing decision predicted (and its rule) next to the TTFT observed, then the misses split by
// whether they were predicted. Usage (after `npx tsc`):
//   node scripts/slo-predictions.mjs RATE_SCALE
// Env: TRACE (default ../shared/data/mooncake/conversation_trace.jsonl), WINDOW (0:1800), SLO_MS (2000).
import { runCluster } from '../dist/lab/cluster.js';
import { loadWorkload } from '../dist/lab/workloads/index.js';
import { SloAwarePolicy } from '../dist/policies/slo-aware.js';

const rate = Number(process.argv[2]);
const trace = process.env.TRACE ?? '../shared/data/mooncake/conversation_trace.jsonl';
const [w0, w1] = (process.env.WINDOW ?? '0:1800').split(':').map(Number);
const slo = Number(process.env.SLO_MS ?? 2000);
if (!(rate > 0)) {
  console.error('usage: node scripts/slo-predictions.mjs RATE_SCALE');
  process.exit(2);
}
const wl = loadWorkload(`mooncake:${trace}`, { seed: 1, rateScale: rate, timeWindow: [w0, w1] });
// Record each decision as it is made (the policy keeps only the last one).
const decided = new Map();
const select = SloAwarePolicy.prototype.selectWorker;
SloAwarePolicy.prototype.selectWorker = function (candidates, ctx) {
  const w = select.call(this, candidates, ctx);
  if (this.lastSlo?.requestId === ctx.requestId) decided.set(ctx.requestId, this.lastSlo);
  return w;
};
const run = runCluster(wl.requests, { workers: 8, policy: 'slo_aware', engine: {}, seed: 1, policyOptions: { kvAware: { activeWeight: 0.1 }, sloAware: { ttftSloMs: slo } } });
const n = run.records.length;
const pct = (x, d = n) => `${((100 * x) / d).toFixed(2)}%`;
const rules = {};
let within25 = 0;
let seen = 0;
const miss = { predictedMet: 0, predictedMissed: 0, queueHeavy: 0 };
const under = [];
for (const r of run.records) {
  const d = decided.get(r.id);
  if (!d || r.ttftMs < 0) continue;
  seen++;
  rules[d.rule] = (rules[d.rule] ?? 0) + 1;
  if (Math.abs(d.predictedTtftMs - r.ttftMs) <= 0.25 * r.ttftMs) within25++;
  if (r.ttftMs > slo) {
    if (d.predictedTtftMs <= slo) {
      miss.predictedMet++;
      under.push(r.ttftMs - d.predictedTtftMs);
      if (r.queueMs > 0.5 * r.ttftMs) miss.queueHeavy++;
    } else miss.predictedMissed++;
  }
}
under.sort((a, b) => a - b);
const q = (p) => (under.length ? under[Math.min(under.length - 1, Math.floor(p * under.length))].toFixed(0) : '–');
console.log(`rate ${rate}, objective ${slo} ms: ${n} served, ${seen} with a decision; rules: ${Object.entries(rules).map(([k, v]) => `${k} ${pct(v, seen)}`).join(', ')}`);
console.log(`predicted within 25%: ${pct(within25, seen)}`);
console.log(`misses predicted to meet the objective: ${miss.predictedMet} (${pct(miss.predictedMet)}), of which waiting > half their TTFT before the engine first scheduled them: ${miss.queueHeavy}; under-prediction p50 ${q(0.5)} ms, p90 ${q(0.9)} ms`);
console.log(`misses predicted as misses: ${miss.predictedMissed} (${pct(miss.predictedMissed)})`);
