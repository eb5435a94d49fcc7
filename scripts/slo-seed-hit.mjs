// Hit rate and share of requests within the objective of one policy at one rate in the lab, with
// the request-by-request analyses' set-up (scripts/lib/slo-analysis.mjs: TRACE, WINDOW, SLO_MS,
// WORKLOAD, SLO, SEED), plus slo_aware's decisions per rule and the per-engine prefill tokens.
// Usage (after `npx tsc`): SEED=2 SLO='{"unreachableSink":0.25}' node scripts/slo-seed-hit.mjs RATE [POLICY]
import { analysisWorkload, onSloDecision, runAnalysis, seed, sloMs } from './lib/slo-analysis.mjs';

const rate = Number(process.argv[2] ?? 1);
const policy = process.argv[3] ?? 'slo_aware';
const rules = {};
onSloDecision((e) => {
  rules[e.rule] = (rules[e.rule] ?? 0) + 1;
});
const t0 = Date.now();
const r = runAnalysis(analysisWorkload(rate).requests, policy);
let c = 0;
let p = 0;
let ok = 0;
const prefill = new Map();
for (const x of r.records) {
  c += x.cachedTokens;
  p += x.promptTokens;
  if (x.ttftMs >= 0 && x.ttftMs <= sloMs) ok++;
  const w = r.placement.get(x.id);
  prefill.set(w, (prefill.get(w) ?? 0) + x.promptTokens - x.cachedTokens);
}
const per = [...prefill.entries()].sort((a, b) => a[0] - b[0]).map(([, v]) => v / 1e6);
const mean = per.reduce((a, b) => a + b, 0) / per.length;
const cv = Math.sqrt(per.reduce((a, b) => a + (b - mean) ** 2, 0) / per.length) / mean;
console.log(JSON.stringify({ policy, seed, rate, slo: process.env.SLO ?? '', hit: +(100 * c / p).toFixed(2), within: +(100 * ok / r.records.length).toFixed(2), prefillM: per.map((v) => +v.toFixed(2)), cv: +cv.toFixed(3), rules, secs: Math.round((Date.now() - t0) / 1000) }));
