// Where slo_aware's hit rate goes, request by request, against a peer baseline in the lab: runs
// slo_aware and each peer on the same workload and engines, and for every request on which the peer
// got more cached prompt tokens than slo_aware, says what slo_aware decided and why — whether it
// left the worker whose engine held most of the request (the holder), and whether the holder was
// predicted to meet the objective when it was left. Tokens lost are counted per class, so the
// classes add up to the hit-rate gap. Usage (after `npx tsc`):
//   node scripts/slo-hits.mjs RATE_SCALE PEER...
// Env: TRACE (default ../shared/data/mooncake/conversation_trace.jsonl), WINDOW (0:1800), SLO_MS (2000),
//      WORKLOAD (a generator spec instead of TRACE/WINDOW, e.g. shared-prefix:...; RATE_SCALE is then its req/s),
//      SLO (JSON of extra slo_aware options, e.g. '{"holdMargin":0.5}').
import { analysisWorkload, onSloDecision, runAnalysis, sloMs as slo } from './lib/slo-analysis.mjs';

const rate = Number(process.argv[2]);
const peers = process.argv.slice(3);
if (!(rate > 0) || peers.length === 0) {
  console.error('usage: node scripts/slo-hits.mjs RATE_SCALE PEER...');
  process.exit(2);
}
const wl = analysisWorkload(rate);

// slo_aware's decision per request: the holder (most blocks the engine holds or is computing), the
// home (most overlap, routing history included), the chosen worker, the rule, the predictions.
const decided = new Map();
onSloDecision((e, sc, ctx, held, holder) => {
  let home = 0;
  for (let k = 1; k < held.length; k++) if (sc.meta[k].overlap > sc.meta[home].overlap) home = k;
  decided.set(ctx.requestId, {
    rule: e.rule,
    chosen: e.i,
    holder,
    home,
    heldChosen: held[e.i] * sc.bs,
    heldHolder: held[holder] * sc.bs,
    predChosen: e.preds[e.i].ttftMs,
    predHolder: e.preds[holder].ttftMs,
    holderFeasible: e.feasible[holder],
    costChosen: sc.costs[e.i],
    costHolder: sc.costs[holder],
  });
});
const run = (policy) => runAnalysis(wl.requests, policy);
const summary = (r) => {
  let c = 0;
  let p = 0;
  let ok = 0;
  for (const x of r.records) {
    c += x.cachedTokens;
    p += x.promptTokens;
    if (x.ttftMs >= 0 && x.ttftMs <= slo) ok++;
  }
  return { hit: c / p, prompt: p, within: ok / r.records.length };
};
const slor = run('slo_aware');
const sloBy = new Map(slor.records.map((r) => [r.id, r]));
const s = summary(slor);
const pct = (x) => `${(100 * x).toFixed(2)}%`;
console.log(`rate ${rate}, objective ${slo} ms, ${wl.requests.length} requests; slo_aware${process.env.SLO ? ` ${process.env.SLO}` : ''}: hit ${pct(s.hit)}, within objective ${pct(s.within)}`);
const rules = {};
let left = 0;
let leftFeasible = 0;
for (const d of decided.values()) {
  rules[d.rule] = (rules[d.rule] ?? 0) + 1;
  if (d.chosen !== d.holder && d.heldChosen < d.heldHolder) {
    left++;
    if (d.holderFeasible) leftFeasible++;
  }
}
console.log(`  decisions: ${Object.entries(rules).map(([k, v]) => `${k} ${v}`).join(', ')}; left the holder for less cache: ${left} (holder predicted to meet the objective in ${leftFeasible})`);
for (const peer of peers) {
  const pr = run(peer);
  const ps = summary(pr);
  const cls = {};
  const add = (k, tokens, extraInfo) => {
    const c = (cls[k] ??= { n: 0, tokens: 0, margin: [] });
    c.n++;
    c.tokens += tokens;
    if (extraInfo !== undefined) c.margin.push(extraInfo);
  };
  let gained = 0;
  for (const r of pr.records) {
    const m = sloBy.get(r.id);
    if (!m) continue;
    const diff = r.cachedTokens - m.cachedTokens;
    if (diff < 0) gained -= diff;
    if (diff <= 0) continue;
    const d = decided.get(r.id);
    if (!d) add('no decision', diff);
    else if (d.chosen === d.holder || d.heldChosen >= d.heldHolder) add('slo_aware went to the holder (its cache held less than the peer’s engine did)', diff);
    else if (d.holderFeasible) add(`left the holder although predicted to meet the objective (${d.rule})`, diff, d.predHolder / slo);
    else add(`left the holder, predicted to miss (${d.rule})`, diff, d.predHolder / slo);
  }
  console.log(`${peer}: hit ${pct(ps.hit)} (gap ${((100 * (ps.hit - s.hit))).toFixed(2)} points), within objective ${pct(ps.within)}; tokens the peer hit and slo_aware did not, by slo_aware's decision (points of hit rate):`);
  for (const [k, c] of Object.entries(cls).sort((a, b) => b[1].tokens - a[1].tokens)) {
    const m = c.margin.sort((a, b) => a - b);
    const q = (p) => m[Math.min(m.length - 1, Math.floor(p * m.length))].toFixed(2);
    console.log(`  ${k}: ${c.n} requests, ${(100 * c.tokens / s.prompt).toFixed(2)} points${m.length ? `; holder's predicted TTFT / objective p10 ${q(0.1)} p50 ${q(0.5)} p90 ${q(0.9)}` : ''}`);
  }
  console.log(`  and slo_aware hit more than the peer: ${(100 * gained / s.prompt).toFixed(2)} points`);
}
