import type { MediumMode } from '../cache/block-index.js';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { PolicyOptions } from '../policies/factory.js';
import { LAB_DEFAULTS, runCluster, type LabEngineConfig } from './cluster.js';
import { PD_DEFAULTS, runPdCluster } from './pd-cluster.js';
import { markdownTable, summarise, type PolicyResult } from './report.js';
import type { Workload } from './workload.js';

export const POOLED = 'pooled LRU reference';

const pairLabel = (prefill: string, decode: string) => (prefill === decode ? prefill : `${prefill}→${decode}`);

/** Prefill/decode disaggregation rows, run next to the aggregated ones (see docs/lab.md). */
export interface BenchPdOptions {
  prefillWorkers: number;
  decodeWorkers: number;
  /** Prefill pool policy for every PD row (default: the policy under test). */
  prefillPolicy?: string;
  /** Decode pool policy for every PD row (default: the policy under test). */
  decodePolicy?: string;
  /** KV transfer time per block (ms); default PD_DEFAULTS.transferMsPerBlock. */
  transferMsPerBlock?: number;
}

export interface BenchOptions {
  workers: number;
  /** Also run each policy on a PD cluster, as extra rows. */
  pd?: BenchPdOptions;
  policies: string[];
  policyOptions?: PolicyOptions;
  engine: LabEngineConfig;
  seed: number;
  /** Delays of the router's view (KV events, engine metrics). */
  lab?: { kvEventDelayMs?: number; metricsIntervalMs?: number; metricsDelayMs?: number; kvMediums?: MediumMode };
  /** Router replicas behind a round-robin front (default 1), and their sync delay (ms) or 'off' (default 5). */
  routerReplicas?: number;
  replicaSyncDelayMs?: number | 'off';
  /** Rates to run at; one entry = a single run. */
  rates: number[];
  /** 'rate-scale' (trace time compressed by the factor) or 'rps' (generator arrival rate). */
  rateKind: 'rate-scale' | 'rps';
  /** Produce the workload for one rate. */
  workloadAt: (rate: number) => Workload;
  out?: string;
  progress?: (label: string, fraction: number) => void;
  /**
   * TTFT objective (ms): adds goodput columns (requests meeting it, their tokens/s) and is the
   * default objective of slo_aware's requests.
   */
  ttftSloMs?: number;
  /** Also find each policy's throughput at the objective (needs ttftSloMs). */
  maxRateAtSlo?: SloSearchOptions;
}

export interface SloSearchOptions {
  /** Share of requests that must meet the objective (0.9 = TTFT p90 within it). */
  attainment: number;
  /** Search bounds, as multiples of the starting rate; and the relative precision at which bisection stops. */
  minFactor: number;
  maxFactor: number;
  precision: number;
}

export const SLO_SEARCH_DEFAULTS: SloSearchOptions = { attainment: 0.9, minFactor: 1 / 64, maxFactor: 64, precision: 0.03 };

/** One run of the throughput-at-SLO search. */
export interface SloProbe {
  rate: number;
  attainment: number;
  ttftP90: number;
  hitRate: number;
}

/** A policy's throughput at SLO: the highest rate at which the attainment target was met. */
export interface ThroughputAtSlo {
  /** Highest rate found meeting the target (null: not even at the search's lowest rate). */
  rate: number | null;
  /** Lowest rate found missing it (null: not even the highest rate missed it). */
  failedAt: number | null;
  /** The run at `rate`. */
  attainment: number | null;
  ttftP90: number | null;
  hitRate: number | null;
  /** Requests per second at `rate` (served requests / arrival span). */
  requestsPerSec: number | null;
  probes: SloProbe[];
}

export interface BenchReport {
  kvgateVersion: string;
  workload: string;
  notes: string[];
  workers: number;
  /** Router replicas behind a round-robin front (the pooled LRU reference always runs with one). */
  router_replicas: number;
  /** Their replica sync delay (ms), or 'off' (replicas share nothing); 'off' with one replica. */
  replica_sync_delay_ms: number | 'off';
  seed: number;
  engine: LabEngineConfig;
  /** The PD cluster of the PD rows, if any. */
  pd?: Required<Omit<BenchPdOptions, 'prefillPolicy' | 'decodePolicy'>> & Pick<BenchPdOptions, 'prefillPolicy' | 'decodePolicy'>;
  rateKind: string;
  rates: number[];
  rows: PolicyResult[];
  /** Human-readable conclusions computed from the rows (e.g. cache_aware vs the pooled LRU reference). */
  findings: string[];
  /** TTFT objective of the goodput columns (ms), if any. */
  ttft_slo_ms?: number;
  /** --max-rate-at-slo: per policy, the highest rate meeting the objective for `attainment` of the requests. */
  throughput_at_slo?: { attainment: number; ttft_slo_ms: number; policies: Record<string, ThroughputAtSlo> };
}

/**
 * Runs every policy (plus the pooled LRU reference and round_robin, always) on the same
 * workload and cluster at each rate, deterministically, and returns the report. With `pd`,
 * every policy also runs on the prefill/decode cluster, as extra rows after the aggregated ones.
 */
export async function runBench(o: BenchOptions, version: string): Promise<{ report: BenchReport; markdown: string }> {
  const policies = [...new Set(['round_robin', ...o.policies])];
  const replicas = o.routerReplicas ?? LAB_DEFAULTS.routerReplicas;
  const syncDelay = replicas > 1 ? (o.replicaSyncDelayMs ?? LAB_DEFAULTS.replicaSyncDelayMs) : 'off';
  if (replicas > 1 && o.pd) {
    throw new RangeError('router replicas are not modelled on PD clusters yet: use --router-replicas 1 with --prefill-workers/--decode-workers');
  }
  const pd = o.pd && { ...o.pd, transferMsPerBlock: o.pd.transferMsPerBlock ?? PD_DEFAULTS.transferMsPerBlock };
  if (o.maxRateAtSlo && o.ttftSloMs === undefined) throw new RangeError('the throughput-at-SLO search needs a TTFT objective (--ttft-slo-ms)');
  o = { ...o, policyOptions: withSloDefault(o.policyOptions, o.ttftSloMs) };
  const rows: PolicyResult[] = [];
  /** PD row → the aggregated policy it is compared with (the policy under test). */
  const pdAgainst = new Map<PolicyResult, string>();
  const names = new Map<number, string>();
  let notes: string[] = [];
  for (const rate of o.rates) {
    const wl = o.workloadAt(rate);
    names.set(rate, wl.name);
    notes = wl.notes;
    for (const p of [POOLED, ...policies]) {
      const label = `${p}${o.rates.length > 1 ? ` @ ${rate}` : ''}`;
      const run = runLabCluster(o, wl.requests, p === POOLED ? 'round_robin' : p, label, replicas, syncDelay, p === POOLED);
      rows.push(summarise(run, rate, o.ttftSloMs));
      // Let the run's replica syncs finish closing (their close() resolves on the next turns),
      // so the next run does not start while they still hold their trees and dictionaries.
      await new Promise((r) => setImmediate(r));
    }
    if (pd) {
      // One PD row per distinct (prefill, decode) policy pair, in the order of the policies.
      const seen = new Set<string>();
      for (const p of policies) {
        const prefillPolicy = pd.prefillPolicy ?? p;
        const decodePolicy = pd.decodePolicy ?? p;
        const key = `${prefillPolicy}\n${decodePolicy}`;
        if (seen.has(key)) continue;
        seen.add(key);
        const run = runPdCluster(wl.requests, {
          prefillWorkers: pd.prefillWorkers,
          decodeWorkers: pd.decodeWorkers,
          policy: p,
          prefillPolicy,
          decodePolicy,
          transferMsPerBlock: pd.transferMsPerBlock,
          policyOptions: o.policyOptions,
          engine: o.engine,
          seed: o.seed,
          ...o.lab,
          onProgress: o.progress ? (f) => o.progress!(`${pairLabel(prefillPolicy, decodePolicy)} PD${o.rates.length > 1 ? ` @ ${rate}` : ''}`, f) : undefined,
        });
        rows.push(summarise(run, rate, o.ttftSloMs));
        pdAgainst.set(rows[rows.length - 1], p);
      }
    }
  }
  const findings = computeFindings(rows, o.rates, pdAgainst);
  const sections: string[] = [];
  for (const rate of o.rates) {
    const at = rows.filter((r) => r.rate === rate);
    const pooled = at.find((r) => r.policy === POOLED)!.hitRate;
    const cluster = pd
      ? `${o.workers} aggregated engines vs PD ${pd.prefillWorkers} prefill + ${pd.decodeWorkers} decode engines (KV transfer ${pd.transferMsPerBlock} ms/block)`
      : `${o.workers} engines${replicas > 1 ? `, ${replicasLabel(replicas, syncDelay)}` : ''}`;
    const title = `${names.get(rate)} — ${cluster}, seed ${o.seed}`;
    sections.push(`### ${title}\n\n${markdownTable(at, { showRate: false, pooledHitRate: pooled, showSync: replicas > 1 && syncDelay !== 'off' })}`);
  }
  let throughputAtSlo: BenchReport['throughput_at_slo'];
  if (o.maxRateAtSlo) {
    const policiesAtSlo: Record<string, ThroughputAtSlo> = {};
    for (const p of policies) policiesAtSlo[p] = await findThroughputAtSlo(p, o, replicas, syncDelay);
    throughputAtSlo = { attainment: o.maxRateAtSlo.attainment, ttft_slo_ms: o.ttftSloMs!, policies: policiesAtSlo };
    sections.push(throughputAtSloTable(throughputAtSlo, o.rateKind, names.get(o.rates[0])!));
  }
  const markdown = [...sections, findings.length ? `\n${findings.map((f) => `- ${f}`).join('\n')}` : ''].join('\n\n');
  const report: BenchReport = {
    kvgateVersion: version,
    workload: names.get(o.rates[0])!.replace(/ rateScale=[\d.]+| rps=[\d.]+/g, ''),
    notes,
    workers: o.workers,
    router_replicas: replicas,
    replica_sync_delay_ms: syncDelay,
    seed: o.seed,
    engine: o.engine,
    ...(pd ? { pd } : {}),
    rateKind: o.rateKind,
    rates: o.rates,
    rows,
    findings,
    ...(o.ttftSloMs !== undefined ? { ttft_slo_ms: o.ttftSloMs } : {}),
    ...(throughputAtSlo ? { throughput_at_slo: throughputAtSlo } : {}),
  };
  if (o.out) await writeOutputs(o.out, report, markdown);
  return { report, markdown };
}

/** slo_aware's default objective is the bench's TTFT objective unless set otherwise. */
function withSloDefault(po: PolicyOptions | undefined, ttftSloMs: number | undefined): PolicyOptions | undefined {
  if (ttftSloMs === undefined || po?.sloAware?.ttftSloMs !== undefined) return po;
  return { ...po, sloAware: { ...po?.sloAware, ttftSloMs } };
}

/**
 * The highest rate at which `attainment` of the requests meet the TTFT objective: doubling (or
 * halving) from the first rate of the bench until the outcome flips, then geometric bisection
 * to the precision. Assumes attainment falls as the rate grows (each probe is recorded, so a
 * non-monotone policy shows in the probes).
 */
async function findThroughputAtSlo(policy: string, o: BenchOptions, replicas: number, syncDelay: number | 'off'): Promise<ThroughputAtSlo> {
  const search = o.maxRateAtSlo!;
  const probes: SloProbe[] = [];
  const rows = new Map<number, PolicyResult>();
  const probe = async (rate: number): Promise<boolean> => {
    const wl = o.workloadAt(rate);
    const run = runLabCluster(o, wl.requests, policy, `${policy} SLO @ ${round4(rate)}`, replicas, syncDelay);
    const row = summarise(run, rate, o.ttftSloMs);
    rows.set(rate, row);
    probes.push({ rate, attainment: row.slo!.attainment, ttftP90: row.ttftP90, hitRate: row.hitRate });
    await new Promise((r) => setImmediate(r));
    return row.slo!.attainment >= search.attainment;
  };
  let lo: number | undefined;
  let hi: number | undefined;
  let r = o.rates[0] > 0 ? o.rates[0] : 1;
  const minRate = r * search.minFactor;
  const maxRate = r * search.maxFactor;
  if (await probe(r)) {
    lo = r;
    while (hi === undefined && r * 2 <= maxRate) {
      r *= 2;
      if (await probe(r)) lo = r;
      else hi = r;
    }
  } else {
    hi = r;
    while (lo === undefined && r / 2 >= minRate) {
      r /= 2;
      if (await probe(r)) lo = r;
      else hi = r;
    }
  }
  while (lo !== undefined && hi !== undefined && hi / lo > 1 + search.precision) {
    const mid = Math.sqrt(lo * hi);
    if (await probe(mid)) lo = mid;
    else hi = mid;
  }
  const at = lo !== undefined ? rows.get(lo)! : undefined;
  return {
    rate: lo ?? null,
    failedAt: hi ?? null,
    attainment: at?.slo?.attainment ?? null,
    ttftP90: at?.ttftP90 ?? null,
    hitRate: at?.hitRate ?? null,
    requestsPerSec: at ? at.requests / Math.max(1e-9, spanSecs(o.workloadAt(lo!))) : null,
    probes,
  };
}

/** One aggregated cluster run with the bench's engines, options and replicas (progress under `label`). */
function runLabCluster(o: BenchOptions, requests: Workload['requests'], policy: string, label: string, replicas: number, syncDelay: number | 'off', pooled = false) {
  return runCluster(requests, {
    workers: o.workers,
    policy,
    pooled,
    policyOptions: o.policyOptions,
    engine: o.engine,
    seed: o.seed,
    ...o.lab,
    routerReplicas: replicas,
    replicaSyncDelayMs: syncDelay,
    onProgress: o.progress ? (f) => o.progress!(label, f) : undefined,
  });
}

function spanSecs(wl: Workload): number {
  const rs = wl.requests;
  return rs.length > 1 ? (rs[rs.length - 1].arrivalMs - rs[0].arrivalMs) / 1000 : 1;
}

const round4 = (x: number) => Math.round(x * 1e4) / 1e4;

/** The throughput-at-SLO table: one row per policy, with its ratio to round_robin's. */
export function throughputAtSloTable(t: NonNullable<BenchReport['throughput_at_slo']>, rateKind: string, workload: string): string {
  const rr = t.policies.round_robin?.rate ?? null;
  const head = ['policy', `max ${rateKind} at SLO`, 'vs round_robin', 'req/s', `TTFT p90 (s)`, `TTFT ≤ ${t.ttft_slo_ms / 1000} s`, 'hit rate', 'first miss at', 'runs'];
  const lines = [
    `### Throughput at SLO — ${workload.replace(/ rateScale=[\d.]+| rps=[\d.]+/g, '')}: highest ${rateKind} with ≥ ${(100 * t.attainment).toFixed(0)}% of requests at TTFT ≤ ${t.ttft_slo_ms} ms`,
    '',
    `| ${head.join(' | ')} |`,
    `|${head.map(() => '---').join('|')}|`,
  ];
  for (const [policy, x] of Object.entries(t.policies)) {
    const f = (v: number | null, d = 3) => (v === null ? '–' : v.toFixed(d));
    lines.push(
      `| ${policy} | ${x.rate === null ? `< ${f(x.failedAt)}` : f(x.rate)} | ${x.rate !== null && rr ? `${(x.rate / rr).toFixed(2)}×` : '–'} | ${f(x.requestsPerSec, 2)} | ${f(x.ttftP90)} | ${x.attainment === null ? '–' : `${(100 * x.attainment).toFixed(1)}%`} | ${x.hitRate === null ? '–' : `${(100 * x.hitRate).toFixed(1)}%`} | ${f(x.failedAt)} | ${x.probes.length} |`,
    );
  }
  return lines.join('\n');
}

/** "4 router replicas (sync delay 5 ms)" / "4 router replicas (no sync)". */
export function replicasLabel(replicas: number, syncDelay: number | 'off'): string {
  return `${replicas} router replica${replicas === 1 ? '' : 's'} (${syncDelay === 'off' ? 'no sync' : `sync delay ${syncDelay} ms`})`;
}

function computeFindings(rows: PolicyResult[], rates: number[], pdAgainst: ReadonlyMap<PolicyResult, string>): string[] {
  const out: string[] = [];
  const s = (x: number) => (Number.isNaN(x) ? '–' : x.toFixed(3));
  const ms = (x: number) => (Number.isNaN(x) ? '–' : x.toFixed(1));
  for (const rate of rates) {
    const all = rows.filter((r) => r.rate === rate);
    const at = all.filter((r) => r.mode === 'aggregated');
    const pooled = at.find((r) => r.policy === POOLED)!;
    const rr = at.find((r) => r.policy === 'round_robin')!;
    const suffix = rates.length > 1 ? ` (rate ${rate})` : '';
    out.push(`round_robin engines are ${(100 * rr.utilisation).toFixed(0)}% busy on average${suffix}.`);
    for (const r of at) {
      if (r.policy === POOLED || r.policy === 'round_robin') continue;
      const ofPooled = pooled.hitRate > 0 ? r.hitRate / pooled.hitRate : NaN;
      const ttftGain = r.ttftP90 > 0 ? rr.ttftP90 / r.ttftP90 : NaN;
      out.push(
        `${r.policy}: hit rate ${(100 * r.hitRate).toFixed(1)}% = ${(100 * ofPooled).toFixed(1)}% of the pooled LRU reference; TTFT p90 ${ttftGain.toFixed(2)}x ${ttftGain >= 1 ? 'better' : 'worse'} than round_robin${suffix}.`,
      );
    }
    for (const r of all) {
      if (r.mode !== 'pd' || !r.pd) continue;
      const agg = at.find((a) => a.policy === pdAgainst.get(r));
      const vs = agg
        ? ` vs ${s(agg.ttftP50)} / ${s(agg.ttftP90)} s for ${agg.policy} on ${r.pd.prefillWorkers + r.pd.decodeWorkers} aggregated engines`
        : '';
      const vsItl = agg ? ` vs ${ms(agg.itlP50Ms)} / ${ms(agg.itlP90Ms)} ms` : '';
      out.push(
        `${r.policy}: TTFT p50 / p90 ${s(r.ttftP50)} / ${s(r.ttftP90)} s${vs}; ITL p50 / p90 ${ms(r.itlP50Ms)} / ${ms(r.itlP90Ms)} ms${vsItl}; ` +
          `prefill hit rate ${(100 * r.hitRate).toFixed(1)}%${agg ? ` (aggregated ${(100 * agg.hitRate).toFixed(1)}%)` : ''}; ` +
          `prefill engines ${(100 * r.pd.prefillUtilisation).toFixed(0)}% busy, decode engines ${(100 * r.pd.decodeUtilisation).toFixed(0)}%; mean KV transfer ${r.pd.transferMsMean.toFixed(2)} ms${suffix}.`,
      );
    }
    const rejected = Math.max(...all.map((r) => r.rejected));
    if (rejected > 0) out.push(`${rejected} requests were refused by the engines (longer than the model length) and are not in the figures${suffix}.`);
  }
  return out;
}

async function writeOutputs(dir: string, report: BenchReport, markdown: string): Promise<void> {
  // Vega is loaded only when charts are written, so the commands that load this module for its
  // defaults (serve, sim, epp share the CLI's entry point) do not keep it in their heaps.
  const { attainmentChart, hitRateChart, sweepChart, ttftCdfChart } = await import('./charts.js');
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'report.json'), JSON.stringify(report, null, 2) + '\n');
  writeFileSync(join(dir, 'report.md'), markdown + '\n');
  // One hit-rate and one TTFT chart per rate: hit-rate.svg for a single rate, hit-rate-<rate>.svg for each rate of a sweep.
  for (const rate of report.rates) {
    const at = report.rows.filter((r) => r.rate === rate);
    const sweep = report.rates.length > 1;
    const suffix = sweep ? ` (${report.rateKind} ${rate})` : '';
    const file = (name: string) => join(dir, sweep ? `${name}-${rate}.svg` : `${name}.svg`);
    writeFileSync(file('hit-rate'), await hitRateChart(at, `Prefix-cache hit rate — ${report.workload}${suffix}`));
    writeFileSync(file('ttft-cdf'), await ttftCdfChart(at, `Time to first token — ${report.workload}${suffix}`));
  }
  if (report.throughput_at_slo) {
    writeFileSync(join(dir, 'slo-attainment-vs-rate.svg'), await attainmentChart(report.throughput_at_slo.policies, `Requests within TTFT ${report.throughput_at_slo.ttft_slo_ms} ms against load — ${report.workload}`, report.rateKind, report.throughput_at_slo.attainment));
  }
  if (report.rates.length > 1) {
    writeFileSync(join(dir, 'ttft-p90-vs-rate.svg'), await sweepChart(report.rows, `TTFT p90 against load — ${report.workload}`, report.rateKind));
  }
}
