import type { ClusterRun } from './cluster.js';

export interface PolicyResult {
  policy: string;
  /** Rate scale (or rps) this row was measured at. */
  rate: number;
  requests: number;
  rejected: number;
  /** Σ cached prompt tokens / Σ prompt tokens. */
  hitRate: number;
  ttftP50: number;
  ttftP90: number;
  ttftP99: number;
  e2eP50: number;
  e2eP99: number;
  /** Output tokens per second of virtual time (first arrival to last finish). */
  outputTokensPerSec: number;
  /** Max over mean of per-engine busy time (1 = perfectly even). */
  imbalance: number;
  /** Mean engine utilisation: busy time / makespan. */
  utilisation: number;
  preemptions: number;
  /** For cache_aware: decisions by branch. */
  decisions: ClusterRun['decisions'];
  /** Virtual seconds simulated and wall seconds it took. */
  simulatedSecs: number;
  wallSecs: number;
  /** Sorted TTFTs in seconds, for the CDF chart (downsampled). */
  ttftCdf: Array<[number, number]>;
}

export function quantile(sorted: ArrayLike<number>, q: number): number {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

export function summarise(run: ClusterRun, rate: number): PolicyResult {
  const recs = run.records;
  let prompt = 0;
  let cached = 0;
  let out = 0;
  let first = Infinity;
  let last = 0;
  const ttft = new Float64Array(recs.length);
  const e2e = new Float64Array(recs.length);
  recs.forEach((r, i) => {
    prompt += r.promptTokens;
    cached += r.cachedTokens;
    out += r.outputTokens;
    if (r.arrivalMs < first) first = r.arrivalMs;
    if (r.finishMs > last) last = r.finishMs;
    ttft[i] = r.ttftMs / 1000;
    e2e[i] = r.e2eMs / 1000;
  });
  ttft.sort();
  e2e.sort();
  const span = Math.max(1e-9, (last - first) / 1000);
  const busy = run.engineBusyMs;
  const meanBusy = busy.reduce((a, b) => a + b, 0) / busy.length;
  const cdf: Array<[number, number]> = [];
  const points = Math.min(200, ttft.length);
  for (let k = 0; k < points; k++) {
    const q = points === 1 ? 1 : k / (points - 1);
    cdf.push([round(quantile(ttft, q), 4), round(q, 4)]);
  }
  return {
    policy: run.policy,
    rate,
    requests: recs.length,
    rejected: run.rejected.length,
    hitRate: prompt ? cached / prompt : 0,
    ttftP50: quantile(ttft, 0.5),
    ttftP90: quantile(ttft, 0.9),
    ttftP99: quantile(ttft, 0.99),
    e2eP50: quantile(e2e, 0.5),
    e2eP99: quantile(e2e, 0.99),
    outputTokensPerSec: out / span,
    imbalance: meanBusy > 0 ? Math.max(...busy) / meanBusy : 1,
    utilisation: meanBusy / 1000 / span,
    preemptions: run.preemptions,
    decisions: run.decisions,
    simulatedSecs: run.endMs / 1000,
    wallSecs: run.wallMs / 1000,
    ttftCdf: cdf,
  };
}

function round(x: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
const secs = (x: number) => (Number.isNaN(x) ? '–' : x < 10 ? x.toFixed(3) : x.toFixed(1));

/** One Markdown table of every row, in the order given. */
export function markdownTable(rows: readonly PolicyResult[], opts: { showRate: boolean; pooledHitRate?: number }): string {
  const head = [
    ...(opts.showRate ? ['rate'] : []),
    'policy',
    'hit rate',
    ...(opts.pooledHitRate !== undefined ? ['of bound'] : []),
    'TTFT p50 (s)',
    'TTFT p90 (s)',
    'TTFT p99 (s)',
    'E2E p50 (s)',
    'E2E p99 (s)',
    'out tok/s',
    'imbalance',
    'busy',
    'preempt',
  ];
  const lines = [`| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`];
  for (const r of rows) {
    const cells = [
      ...(opts.showRate ? [String(r.rate)] : []),
      r.policy,
      pct(r.hitRate),
      ...(opts.pooledHitRate !== undefined ? [opts.pooledHitRate > 0 ? pct(r.hitRate / opts.pooledHitRate) : '–'] : []),
      secs(r.ttftP50),
      secs(r.ttftP90),
      secs(r.ttftP99),
      secs(r.e2eP50),
      secs(r.e2eP99),
      r.outputTokensPerSec.toFixed(0),
      r.imbalance.toFixed(2),
      pct(r.utilisation),
      String(r.preemptions),
    ];
    lines.push(`| ${cells.join(' | ')} |`);
  }
  return lines.join('\n');
}
