import * as vega from 'vega';
import * as vl from 'vega-lite';
import type { PolicyResult } from './report.js';

async function render(spec: vl.TopLevelSpec): Promise<string> {
  const compiled = vl.compile(spec).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  const svg = await view.toSVG();
  view.finalize();
  return svg;
}

const base = { $schema: 'https://vega.github.io/schema/vega-lite/v6.json', background: 'white' } as const;

/** Tableau-20: the palette every chart draws from. */
const PALETTE = [
  '#4c78a8', '#f58518', '#54a24b', '#e45756', '#72b7b2', '#eeca3b', '#b279a2', '#ff9da6', '#9d755d', '#bab0ac',
  '#1f77b4', '#aec7e8', '#ff7f0e', '#ffbb78', '#2ca02c', '#98df8a', '#d62728', '#ff9896', '#9467bd', '#c5b0d5',
];

/** Fixed colours of the known rows, so a policy has the same colour in every chart of every run. */
const FIXED: Record<string, string> = {
  'pooled LRU reference': '#bab0ac',
  round_robin: '#9d755d',
  random: '#ff9da6',
  power_of_two: '#b279a2',
  least_load: '#72b7b2',
  cache_aware: '#4c78a8',
  kv_aware: '#f58518',
  slo_aware: '#d62728',
  prefix_load: '#54a24b',
  least_kv_cache: '#e45756',
  least_waiting: '#eeca3b',
  manual: '#1f77b4',
};

/** A row's colour: fixed for known policies, else a stable hash of its name into the palette. */
export function policyColour(name: string): string {
  const fixed = FIXED[name];
  if (fixed) return fixed;
  let h = 2166136261;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 16777619) >>> 0;
  return PALETTE[10 + (h % 10)];
}

/** A colour encoding whose scale maps each row's name to its fixed colour. */
function colourOf(names: readonly string[], legend: boolean) {
  const domain = [...new Set(names)];
  return { field: 'policy', type: 'nominal', scale: { domain, range: domain.map(policyColour) }, ...(legend ? {} : { legend: null }) };
}

/** Bar chart: token-weighted prefix-cache hit rate per policy, axis scaled to the data, values on the bars. */
export function hitRateChart(rows: readonly PolicyResult[], title: string): Promise<string> {
  const values = rows.map((r) => ({ policy: r.policy, hit: r.hitRate, label: `${(100 * r.hitRate).toFixed(1)}%` }));
  const top = Math.min(1, Math.max(0.01, ...values.map((v) => v.hit)) * 1.15);
  const x = { field: 'policy', type: 'nominal', sort: null, axis: { labelAngle: -30 } };
  const y = { field: 'hit', type: 'quantitative', title: 'prefix-cache hit rate', axis: { format: '%' }, scale: { domain: [0, top], nice: false } };
  return render({
    ...base,
    title,
    width: 480,
    height: 260,
    data: { values },
    layer: [
      { mark: { type: 'bar', tooltip: true }, encoding: { x, y, color: colourOf(rows.map((r) => r.policy), false) } },
      { mark: { type: 'text', dy: -6, fontSize: 10 }, encoding: { x, y, text: { field: 'label', type: 'nominal' } } },
    ],
  } as vl.TopLevelSpec);
}

/** Empirical CDF of time to first token per policy (log x, ending just past the slowest request). */
export function ttftCdfChart(rows: readonly PolicyResult[], title: string): Promise<string> {
  const values = rows.flatMap((r) => r.ttftCdf.map(([t, q]) => ({ policy: r.policy, ttft: Math.max(t, 1e-3), q })));
  const ts = values.map((v) => v.ttft);
  const lo = ts.length ? Math.min(...ts) : 1e-3;
  const hi = ts.length ? Math.max(...ts) : 1;
  return render({
    ...base,
    title,
    width: 520,
    height: 300,
    data: { values },
    mark: { type: 'line', interpolate: 'step-after', clip: true },
    encoding: {
      x: { field: 'ttft', type: 'quantitative', title: 'time to first token (s, log)', scale: { type: 'log', domain: [lo / 1.1, hi * 1.1], nice: false } },
      y: { field: 'q', type: 'quantitative', title: 'fraction of requests', axis: { format: '%' } },
      color: colourOf(rows.map((r) => r.policy), true),
    },
  } as vl.TopLevelSpec);
}

/** TTFT p90 against request rate, one line per policy (sweeps). */
export function sweepChart(rows: readonly PolicyResult[], title: string, rateLabel: string): Promise<string> {
  return render({
    ...base,
    title,
    width: 520,
    height: 300,
    data: { values: rows.map((r) => ({ policy: r.policy, rate: r.rate, p90: Math.max(r.ttftP90, 1e-3) })) },
    mark: { type: 'line', point: true },
    encoding: {
      x: { field: 'rate', type: 'quantitative', title: rateLabel },
      y: { field: 'p90', type: 'quantitative', title: 'TTFT p90 (s, log)', scale: { type: 'log' } },
      color: colourOf(rows.map((r) => r.policy), true),
    },
  } as vl.TopLevelSpec);
}

/** Share of requests meeting the TTFT objective against rate, one line per policy (the throughput-at-SLO probes). */
export function attainmentChart(policies: Record<string, { probes: Array<{ rate: number; attainment: number }> }>, title: string, rateLabel: string, target: number): Promise<string> {
  const values = Object.entries(policies).flatMap(([policy, t]) => [...t.probes].sort((a, b) => a.rate - b.rate).map((p) => ({ policy, rate: p.rate, attainment: p.attainment })));
  return render({
    ...base,
    title,
    width: 520,
    height: 300,
    layer: [
      {
        data: { values },
        mark: { type: 'line', point: true },
        encoding: {
          x: { field: 'rate', type: 'quantitative', title: `${rateLabel} (log)`, scale: { type: 'log' } },
          y: { field: 'attainment', type: 'quantitative', title: 'requests within the objective', axis: { format: '%' } },
          color: colourOf(Object.keys(policies), true),
        },
      },
      { data: { values: [{ target }] }, mark: { type: 'rule', strokeDash: [4, 4] }, encoding: { y: { field: 'target', type: 'quantitative' } } },
    ],
  } as vl.TopLevelSpec);
}
