// Where the tokens a peer hit and slo_aware did not came from (docs/benchmarks.md §10.13.1): for
// every request the peer got more cached prompt tokens on, takes the first block slo_aware's engine
// lacked and finds the last earlier request that computed it; says whether slo_aware's router
// believed the chosen engine held it (lost between routing and admission) or not (the engine held
// less at routing: evicted, or computed elsewhere), and where that earlier request went (the same
// worker — evicted since — or another, by which rule). Also: over all requests, the cache the
// router believed the chosen engine held but the engine no longer had at admission, and slo_aware's
// rule mix. Usage (after `npx tsc`): node scripts/slo-hits-why.mjs RATE_SCALE PEER
// Env as scripts/slo-hits.mjs (TRACE, WINDOW, SLO_MS, WORKLOAD, SLO).
import { hashBlocks } from '../dist/cache/block-index.js';
import { analysisWorkload, onSloDecision, runAnalysis, sloMs as slo } from './lib/slo-analysis.mjs';

const rate = Number(process.argv[2]);
const peer = process.argv[3];
const wl = analysisWorkload(rate);
const decided = new Map();
onSloDecision((e, sc, ctx, held, holder) => {
  decided.set(ctx.requestId, { rule: e.rule, chosen: e.i, holder, held: held.slice(), heldChosen: held[e.i] * sc.bs, heldHolder: held[holder] * sc.bs, predChosen: e.preds[e.i].ttftMs, preds: e.preds.map((p) => p.ttftMs), costs: sc.costs.slice(), feasible: e.feasible.slice() });
});
const run = (policy) => runAnalysis(wl.requests, policy);
const S = run('slo_aware');
const P = run(peer);
const sBy = new Map(S.records.map((r) => [r.id, r]));
const pBy = new Map(P.records.map((r) => [r.id, r]));
const bs = 16;
const reqs = wl.requests;
const hashes = reqs.map((r) => hashBlocks(r.promptTokens, bs));
const order = new Map(reqs.map((r, i) => [r.id, i]));
const cls = {};
let promptTot = 0;
for (const r of S.records) promptTot += r.promptTokens;
const cls2 = {};
const add2 = (k, t) => { const c = (cls2[k] ??= { n: 0, t: 0 }); c.n++; c.t += t; };
const add = (k, t) => { const c = (cls[k] ??= { n: 0, t: 0 }); c.n++; c.t += t; };
for (let i = 0; i < reqs.length; i++) {
  const id = reqs[i].id;
  const s = sBy.get(id), p = pBy.get(id), d = decided.get(id);
  if (!s || !p || !d) continue;
  const diff = p.cachedTokens - s.cachedTokens;
  if (diff <= 0) continue;
  const b = Math.floor(s.cachedTokens / bs);
  const h = hashes[i][b];
  let j = i - 1;
  for (; j >= 0; j--) if (hashes[j].length > b && hashes[j][b] === h) break;
  if (j < 0) { add('no earlier request has the block', diff); continue; }
  const rid = reqs[j].id;
  const sp = S.placement.get(rid), ss = sBy.get(rid), dp = decided.get(rid);
  const here = S.placement.get(id);
  const arrival = s.arrivalMs;
  const prevStillPrefilling = ss && ss.firstTokenMs > arrival;
  const believed = d.heldChosen >= p.cachedTokens ? 'router believed chosen held the peer hit (lost before admission)' : (d.heldChosen > s.cachedTokens ? 'believed more than got, less than peer' : 'held less at routing');
  add2(believed, diff);
  const leftHolder = d.chosen !== d.holder && d.heldChosen < d.heldHolder;
  const myKind = leftHolder ? (d.feasible[d.holder] ? 'R left a feasible holder' : 'R left an infeasible holder') : 'R went to holder';
  const prevKind = sp === here ? 'prev on same worker' : `prev elsewhere (prev rule ${dp?.rule})`;
  add(`${myKind} | ${prevKind}${prevStillPrefilling ? ' | prev still prefilling' : ''}`, diff);
}
console.log(`slo_aware ${(100 * S.records.reduce((a, r) => a + r.cachedTokens, 0) / promptTot).toFixed(2)}% vs ${peer} ${(100 * P.records.reduce((a, r) => a + r.cachedTokens, 0) / promptTot).toFixed(2)}%`);
for (const [k, c] of Object.entries(cls).sort((a, b) => b[1].t - a[1].t)) console.log(`  ${k}: ${c.n} req, ${(100 * c.t / promptTot).toFixed(2)} pts`);
for (const [k, c] of Object.entries(cls2).sort((a, b) => b[1].t - a[1].t)) console.log(`  * ${k}: ${c.n} req, ${(100 * c.t / promptTot).toFixed(2)} pts`);
let lost = 0; for (const r of S.records) { const d = decided.get(r.id); if (d && d.heldChosen > r.cachedTokens) lost += Math.min(d.heldChosen, r.promptTokens) - r.cachedTokens; }
console.log(`all requests: slo_aware's chosen worker held at routing but engine had not at admission: ${(100 * lost / promptTot).toFixed(2)} pts`);
// rule mix of slo_aware decisions, and for headroom: holder held 0?
const mix = {};
for (const d of decided.values()) { const k = `${d.rule}${d.rule === 'slo_headroom' ? (d.heldHolder === 0 ? ' (nobody holds)' : d.chosen === d.holder ? ' (to holder)' : ' (holder left)') : ''}`; mix[k] = (mix[k] ?? 0) + 1; }
console.log(mix);
