// slo_aware's predictions in the lab against what the engines did: for every request, the TTFT the
// routing decision predicted (and its rule) next to the TTFT observed, then the misses split by
// whether they were predicted. Usage (after `npx tsc`):
//   node scripts/slo-predictions.mjs RATE_SCALE
// Env: TRACE (default ../shared/data/mooncake/conversation_trace.jsonl), WINDOW (0:1800), SLO_MS (2000).
import { runCluster } from '../dist/lab/cluster.js';
import { loadWorkload } from '../dist/lab/workloads/index.js';
import { SloAwarePolicy } from '../dist/policies/slo-aware.js';
import { Engine } from '../dist/sim/engine.js';
import { LatencyPredictor } from '../dist/policies/latency-predictor.js';
import { DEFAULT_COST_MODEL } from '../dist/engine/cost-model.js';

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
let policy;
const select = SloAwarePolicy.prototype.selectWorker;
SloAwarePolicy.prototype.selectWorker = function (candidates, ctx) {
  const w = select.call(this, candidates, ctx);
  policy = this;
  if (this.lastSlo?.requestId === ctx.requestId) decided.set(ctx.requestId, this.lastSlo);
  return w;
};
// The prefill backlog the predictor assumed ahead of each request (ms of model work).
const assumed = new Map();
const routed = LatencyPredictor.prototype.routed;
LatencyPredictor.prototype.routed = function (id, requestId, nowMs, arrivalMs, p) {
  assumed.set(requestId, p.backlogWorkMs);
  return routed.call(this, id, requestId, nowMs, arrivalMs, p);
};
// The engine each request was submitted to, as it stood then: KV blocks referenced by requests
// (vLLM's usage), sequences running (the limit is maxNumSeqs) and requests already waiting.
const atSubmit = new Map();
const submit = Engine.prototype.submit;
Engine.prototype.submit = function (req) {
  const st = this.stats();
  atSubmit.set(req.id, { kvUsage: st.kvUsage, running: st.running, waiting: st.waiting, seqsFull: st.running >= this.config.maxNumSeqs, pendingTokens: st.pendingTokens });
  return submit.call(this, req);
};
const run = runCluster(wl.requests, { workers: 8, policy: 'slo_aware', engine: {}, seed: 1, policyOptions: { kvAware: { activeWeight: 0.1 }, sloAware: { ttftSloMs: slo } } });
const n = run.records.length;
const pct = (x, d = n) => `${((100 * x) / d).toFixed(2)}%`;
const rules = {};
let within25 = 0;
let seen = 0;
const miss = { predictedMet: 0, predictedMissed: 0, queueHeavy: 0, memFull: 0, seqsFull: 0, waitingAhead: 0 };
const all = { memFull: 0, seqsFull: 0, waitingAhead: 0 };
const FULL = 0.9;
const under = [];
// Backlog the predictor assumed, in prefill tokens, against the tokens the engine still had to compute
// (running requests' remainder + waiting requests' prompts, cache hits not subtracted: an upper bound).
const ratioMiss = [];
const ratioAll = [];
const engPendMiss = [];
const assumedMiss = [];
for (const r of run.records) {
  const d = decided.get(r.id);
  if (!d || r.ttftMs < 0) continue;
  seen++;
  rules[d.rule] = (rules[d.rule] ?? 0) + 1;
  if (Math.abs(d.predictedTtftMs - r.ttftMs) <= 0.25 * r.ttftMs) within25++;
  const e = atSubmit.get(r.id);
  if (e?.kvUsage > FULL) all.memFull++;
  if (e?.seqsFull) all.seqsFull++;
  if (e?.waiting > 0) all.waitingAhead++;
  const ratio = e && e.pendingTokens > 0 ? assumed.get(r.id) / DEFAULT_COST_MODEL.prefillTokenMs / e.pendingTokens : undefined;
  if (ratio !== undefined) ratioAll.push(ratio);
  if (r.ttftMs > slo) {
    if (d.predictedTtftMs <= slo) {
      miss.predictedMet++;
      under.push(r.ttftMs - d.predictedTtftMs);
      if (r.queueMs > 0.5 * r.ttftMs) miss.queueHeavy++;
      if (e?.kvUsage > FULL) miss.memFull++;
      if (e?.seqsFull) miss.seqsFull++;
      if (e?.waiting > 0) miss.waitingAhead++;
      if (ratio !== undefined) ratioMiss.push(ratio);
      if (e) engPendMiss.push(e.pendingTokens);
      assumedMiss.push(assumed.get(r.id) / DEFAULT_COST_MODEL.prefillTokenMs);
    } else miss.predictedMissed++;
  }
}
under.sort((a, b) => a - b);
const q = (p) => (under.length ? under[Math.min(under.length - 1, Math.floor(p * under.length))].toFixed(0) : '–');
console.log(`rate ${rate}, objective ${slo} ms: ${n} served, ${seen} with a decision; rules: ${Object.entries(rules).map(([k, v]) => `${k} ${pct(v, seen)}`).join(', ')}`);
console.log(`predicted within 25%: ${pct(within25, seen)}`);
console.log(`misses predicted to meet the objective: ${miss.predictedMet} (${pct(miss.predictedMet)}), of which waiting > half their TTFT before the engine first scheduled them: ${miss.queueHeavy}; under-prediction p50 ${q(0.5)} ms, p90 ${q(0.9)} ms`);
console.log(`  at submission, their engine had KV usage > ${FULL * 100}%: ${miss.memFull} (all requests: ${pct(all.memFull, seen)}); ${'max'}NumSeqs running: ${miss.seqsFull} (all: ${pct(all.seqsFull, seen)}); requests already waiting: ${miss.waitingAhead} (all: ${pct(all.waitingAhead, seen)})`);
const med = (a) => (a.length ? a.sort((x, y) => x - y)[Math.floor(a.length / 2)].toFixed(2) : '–');
console.log(`  predicted backlog / engine's pending tokens at submission (engine busy): median ${med(ratioMiss)} for these misses, ${med(ratioAll)} for all requests`);
const pq = (a, p) => (a.length ? a.sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor(p * a.length))].toFixed(0) : '–');
console.log(`  for these misses, in prefill tokens: predicted backlog p50 ${pq(assumedMiss, 0.5)}, p90 ${pq(assumedMiss, 0.9)}; engine's pending tokens at submission p50 ${pq(engPendMiss, 0.5)}, p90 ${pq(engPendMiss, 0.9)}`);
if (policy) {
  const now = run.records.reduce((a, r) => Math.max(a, r.finishMs), 0);
  console.log(`  learned per worker at the end (slowness, fixed ms, observations): ${[...policy.predictor.workerIds()].map((id) => { const st = policy.predictor.stats(id, now); return `${st.slowness.toFixed(2)}/${st.fixedMs.toFixed(0)}/${st.observations}`; }).join(' ')}`);
}
console.log(`misses predicted as misses: ${miss.predictedMissed} (${pct(miss.predictedMissed)})`);
