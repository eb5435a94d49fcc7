import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { PolicyOptions } from '../policies/factory.js';
import { hitRateChart, sweepChart, ttftCdfChart } from './charts.js';
import { runCluster, type LabEngineConfig } from './cluster.js';
import { markdownTable, summarise, type PolicyResult } from './report.js';
import type { Workload } from './workload.js';

export const POOLED = 'pooled-cache bound';

export interface BenchOptions {
  workers: number;
  policies: string[];
  policyOptions?: PolicyOptions;
  engine: LabEngineConfig;
  seed: number;
  /** Delays of the router's view (KV events, engine metrics). */
  lab?: { kvEventDelayMs?: number; metricsIntervalMs?: number; metricsDelayMs?: number };
  /** Rates to run at; one entry = a single run. */
  rates: number[];
  /** 'rate-scale' (trace time compressed by the factor) or 'rps' (generator arrival rate). */
  rateKind: 'rate-scale' | 'rps';
  /** Produce the workload for one rate. */
  workloadAt: (rate: number) => Workload;
  out?: string;
  progress?: (label: string, fraction: number) => void;
}

export interface BenchReport {
  kvgateVersion: string;
  workload: string;
  notes: string[];
  workers: number;
  seed: number;
  engine: LabEngineConfig;
  rateKind: string;
  rates: number[];
  rows: PolicyResult[];
  /** Human-readable conclusions computed from the rows (e.g. cache_aware vs bound). */
  findings: string[];
}

/**
 * Runs every policy (plus the pooled-cache bound and round_robin, always) on the same
 * workload and cluster at each rate, deterministically, and returns the report.
 */
export async function runBench(o: BenchOptions, version: string): Promise<{ report: BenchReport; markdown: string }> {
  const policies = [...new Set(['round_robin', ...o.policies])];
  const rows: PolicyResult[] = [];
  const names = new Map<number, string>();
  let notes: string[] = [];
  for (const rate of o.rates) {
    const wl = o.workloadAt(rate);
    names.set(rate, wl.name);
    notes = wl.notes;
    for (const p of [POOLED, ...policies]) {
      const label = `${p}${o.rates.length > 1 ? ` @ ${rate}` : ''}`;
      const run = runCluster(wl.requests, {
        workers: o.workers,
        policy: p === POOLED ? 'round_robin' : p,
        pooled: p === POOLED,
        policyOptions: o.policyOptions,
        engine: o.engine,
        seed: o.seed,
        ...o.lab,
        onProgress: o.progress ? (f) => o.progress!(label, f) : undefined,
      });
      rows.push(summarise(run, rate));
    }
  }
  const findings = computeFindings(rows, o.rates);
  const sections: string[] = [];
  for (const rate of o.rates) {
    const at = rows.filter((r) => r.rate === rate);
    const bound = at.find((r) => r.policy === POOLED)!.hitRate;
    const title = `${names.get(rate)} — ${o.workers} engines, seed ${o.seed}`;
    sections.push(`### ${title}\n\n${markdownTable(at, { showRate: false, pooledHitRate: bound })}`);
  }
  const markdown = [...sections, findings.length ? `\n${findings.map((f) => `- ${f}`).join('\n')}` : ''].join('\n\n');
  const report: BenchReport = {
    kvgateVersion: version,
    workload: names.get(o.rates[0])!.replace(/ rateScale=[\d.]+| rps=[\d.]+/g, ''),
    notes,
    workers: o.workers,
    seed: o.seed,
    engine: o.engine,
    rateKind: o.rateKind,
    rates: o.rates,
    rows,
    findings,
  };
  if (o.out) await writeOutputs(o.out, report, markdown);
  return { report, markdown };
}

function computeFindings(rows: PolicyResult[], rates: number[]): string[] {
  const out: string[] = [];
  for (const rate of rates) {
    const at = rows.filter((r) => r.rate === rate);
    const bound = at.find((r) => r.policy === POOLED)!;
    const rr = at.find((r) => r.policy === 'round_robin')!;
    const suffix = rates.length > 1 ? ` (rate ${rate})` : '';
    out.push(`round_robin engines are ${(100 * rr.utilisation).toFixed(0)}% busy on average${suffix}.`);
    for (const r of at) {
      if (r.policy === POOLED || r.policy === 'round_robin') continue;
      const ofBound = bound.hitRate > 0 ? r.hitRate / bound.hitRate : NaN;
      const ttftGain = r.ttftP90 > 0 ? rr.ttftP90 / r.ttftP90 : NaN;
      out.push(
        `${r.policy}: hit rate ${(100 * r.hitRate).toFixed(1)}% = ${(100 * ofBound).toFixed(1)}% of the pooled-cache bound; TTFT p90 ${ttftGain.toFixed(2)}x ${ttftGain >= 1 ? 'better' : 'worse'} than round_robin${suffix}.`,
      );
    }
    const rejected = Math.max(...at.map((r) => r.rejected));
    if (rejected > 0) out.push(`${rejected} requests were refused by the engines (longer than the model length) and are not in the figures${suffix}.`);
  }
  return out;
}

async function writeOutputs(dir: string, report: BenchReport, markdown: string): Promise<void> {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'report.json'), JSON.stringify(report, null, 2) + '\n');
  writeFileSync(join(dir, 'report.md'), markdown + '\n');
  const last = report.rates[report.rates.length - 1];
  const at = report.rows.filter((r) => r.rate === last);
  const suffix = report.rates.length > 1 ? ` (${report.rateKind} ${last})` : '';
  writeFileSync(join(dir, 'hit-rate.svg'), await hitRateChart(at, `Prefix-cache hit rate — ${report.workload}${suffix}`));
  writeFileSync(join(dir, 'ttft-cdf.svg'), await ttftCdfChart(at, `Time to first token — ${report.workload}${suffix}`));
  if (report.rates.length > 1) {
    writeFileSync(join(dir, 'ttft-p90-vs-rate.svg'), await sweepChart(report.rows, `TTFT p90 against load — ${report.workload}`, report.rateKind));
  }
}
