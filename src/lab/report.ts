import type { RequestRecord } from '../sim/engine.js';
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
  /**
   * Inter-token latency (ms), over requests with at least 2 output tokens, each counted once:
   * (finish − first token) / (output tokens − 1). NaN (null in JSON) when no request qualifies.
   */
  itlP50Ms: number;
  itlP90Ms: number;
  /** Output tokens per second of virtual time (first arrival to last finish). */
  outputTokensPerSec: number;
  /** Max over mean of per-engine busy time (1 = perfectly even). */
  imbalance: number;
  /** Mean engine utilisation: busy time / makespan. */
  utilisation: number;
  preemptions: number;
  /** 'aggregated': N engines that each prefill and decode; 'pd': prefill/decode disaggregation. */
  mode: 'aggregated' | 'pd';
  /** PD rows: the cluster and the hand-off. */
  pd?: PdSummary;
  /** Router replicas in front of the cluster (1 = one router). */
  routerReplicas: number;
  /** Replica sync traffic per finished request: bytes published on the bus (each message once); null without sync. */
  syncBytesPerRequest: number | null;
  /** For cache_aware: decisions by branch. */
  decisions: ClusterRun['decisions'];
  /** Virtual seconds simulated and wall seconds it took. */
  simulatedSecs: number;
  wallSecs: number;
  /** With a TTFT objective (--ttft-slo-ms): how many requests met it, and their output tokens/s. */
  slo?: SloScore;
  /** Sorted TTFTs in seconds, for the CDF chart (downsampled). */
  ttftCdf: Array<[number, number]>;
}

export interface SloScore {
  ttftMs: number;
  /** Requests whose TTFT was at most the objective... */
  met: number;
  /** ...as a share of the requests served (engine-refused requests are not in the rows). */
  attainment: number;
  /** Output tokens per second of virtual time of the requests that met it (goodput). */
  goodputTokensPerSec: number;
}

export interface PdSummary {
  prefillWorkers: number;
  decodeWorkers: number;
  prefillPolicy: string;
  decodePolicy: string;
  transferMsPerBlock: number;
  /** Mean KV transfer time per request (ms). */
  transferMsMean: number;
  /** Mean utilisation of the prefill engines and of the decode engines (busy time / makespan). */
  prefillUtilisation: number;
  decodeUtilisation: number;
}

/** Per-request inter-token latency (ms): (finish − first token) / (output tokens − 1); undefined below 2 tokens. */
export function interTokenLatencyMs(r: Pick<RequestRecord, 'outputTokens' | 'firstTokenMs' | 'finishMs'>): number | undefined {
  if (r.outputTokens < 2 || r.firstTokenMs < 0) return undefined;
  return (r.finishMs - r.firstTokenMs) / (r.outputTokens - 1);
}

export function quantile(sorted: ArrayLike<number>, q: number): number {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

export function summarise(run: ClusterRun, rate: number, ttftSloMs?: number): PolicyResult {
  const recs = run.records;
  let met = 0;
  let metOut = 0;
  let prompt = 0;
  let cached = 0;
  let out = 0;
  let first = Infinity;
  let last = 0;
  const ttft = new Float64Array(recs.length);
  const e2e = new Float64Array(recs.length);
  const itls: number[] = [];
  recs.forEach((r, i) => {
    const itl = interTokenLatencyMs(r);
    if (itl !== undefined) itls.push(itl);
    prompt += r.promptTokens;
    cached += r.cachedTokens;
    out += r.outputTokens;
    if (r.arrivalMs < first) first = r.arrivalMs;
    if (r.finishMs > last) last = r.finishMs;
    ttft[i] = r.ttftMs / 1000;
    if (ttftSloMs !== undefined && r.ttftMs >= 0 && r.ttftMs <= ttftSloMs) {
      met++;
      metOut += r.outputTokens;
    }
    e2e[i] = r.e2eMs / 1000;
  });
  ttft.sort();
  e2e.sort();
  const itl = Float64Array.from(itls).sort();
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
    itlP50Ms: quantile(itl, 0.5),
    itlP90Ms: quantile(itl, 0.9),
    outputTokensPerSec: out / span,
    imbalance: meanBusy > 0 ? Math.max(...busy) / meanBusy : 1,
    utilisation: meanBusy / 1000 / span,
    preemptions: run.preemptions,
    mode: run.pd ? 'pd' : 'aggregated',
    ...(run.pd ? { pd: pdSummary(run.pd, busy, span) } : {}),
    routerReplicas: run.replicas?.count ?? 1,
    syncBytesPerRequest: run.replicas?.sync && recs.length > 0 ? run.replicas.sync.bytes / recs.length : null,
    decisions: run.decisions,
    simulatedSecs: run.endMs / 1000,
    wallSecs: run.wallMs / 1000,
    ...(ttftSloMs !== undefined ? { slo: { ttftMs: ttftSloMs, met, attainment: recs.length ? met / recs.length : 0, goodputTokensPerSec: metOut / span } } : {}),
    ttftCdf: cdf,
  };
}

function pdSummary(pd: NonNullable<ClusterRun['pd']>, busy: readonly number[], spanSecs: number): PdSummary {
  const mean = (xs: readonly number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);
  let transfer = 0;
  for (const h of pd.handoffs.values()) transfer += h.transferMs;
  return {
    prefillWorkers: pd.prefillWorkers,
    decodeWorkers: pd.decodeWorkers,
    prefillPolicy: pd.prefillPolicy,
    decodePolicy: pd.decodePolicy,
    transferMsPerBlock: pd.transferMsPerBlock,
    transferMsMean: pd.handoffs.size ? transfer / pd.handoffs.size : 0,
    prefillUtilisation: mean(busy.slice(0, pd.prefillWorkers)) / 1000 / spanSecs,
    decodeUtilisation: mean(busy.slice(pd.prefillWorkers)) / 1000 / spanSecs,
  };
}

function round(x: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
const secs = (x: number) => (Number.isNaN(x) ? '–' : x < 10 ? x.toFixed(3) : x.toFixed(1));
const millis = (x: number) => (Number.isNaN(x) ? '–' : x < 100 ? x.toFixed(2) : x.toFixed(0));

/** One Markdown table of every row, in the order given. */
export function markdownTable(rows: readonly PolicyResult[], opts: { showRate: boolean; pooledHitRate?: number; showSync?: boolean }): string {
  const head = [
    ...(opts.showRate ? ['rate'] : []),
    'policy',
    'hit rate',
    ...(opts.pooledHitRate !== undefined ? ['of pooled LRU'] : []),
    'TTFT p50 (s)',
    'TTFT p90 (s)',
    'TTFT p99 (s)',
    'E2E p50 (s)',
    'E2E p99 (s)',
    'ITL p50 (ms)',
    'ITL p90 (ms)',
    'out tok/s',
    'imbalance',
    'busy',
    'preempt',
    ...(opts.showSync ? ['sync B/req'] : []),
    ...(rows[0]?.slo ? [`TTFT ≤ ${secs(rows[0].slo.ttftMs / 1000)} s`, 'goodput tok/s'] : []),
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
      millis(r.itlP50Ms),
      millis(r.itlP90Ms),
      r.outputTokensPerSec.toFixed(0),
      r.imbalance.toFixed(2),
      pct(r.utilisation),
      String(r.preemptions),
      ...(opts.showSync ? [r.syncBytesPerRequest === null ? '–' : r.syncBytesPerRequest.toFixed(0)] : []),
      ...(rows[0]?.slo ? (r.slo ? [pct(r.slo.attainment), r.slo.goodputTokensPerSec.toFixed(0)] : ['–', '–']) : []),
    ];
    lines.push(`| ${cells.join(' | ')} |`);
  }
  return lines.join('\n');
}
