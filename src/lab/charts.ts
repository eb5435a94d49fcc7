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

/** Bar chart: token-weighted prefix-cache hit rate per policy. */
export function hitRateChart(rows: readonly PolicyResult[], title: string): Promise<string> {
  return render({
    ...base,
    title,
    width: 480,
    height: 260,
    data: { values: rows.map((r) => ({ policy: r.policy, hit: r.hitRate })) },
    mark: { type: 'bar', tooltip: true },
    encoding: {
      x: { field: 'policy', type: 'nominal', sort: null, axis: { labelAngle: -30 } },
      y: { field: 'hit', type: 'quantitative', title: 'prefix-cache hit rate', axis: { format: '%' }, scale: { domain: [0, 1] } },
      color: { field: 'policy', type: 'nominal', legend: null },
    },
  } as vl.TopLevelSpec);
}

/** Empirical CDF of time to first token per policy (log x). */
export function ttftCdfChart(rows: readonly PolicyResult[], title: string): Promise<string> {
  const values = rows.flatMap((r) => r.ttftCdf.map(([t, q]) => ({ policy: r.policy, ttft: Math.max(t, 1e-3), q })));
  return render({
    ...base,
    title,
    width: 520,
    height: 300,
    data: { values },
    mark: { type: 'line', interpolate: 'step-after' },
    encoding: {
      x: { field: 'ttft', type: 'quantitative', title: 'time to first token (s, log)', scale: { type: 'log' } },
      y: { field: 'q', type: 'quantitative', title: 'fraction of requests', axis: { format: '%' } },
      color: { field: 'policy', type: 'nominal' },
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
      color: { field: 'policy', type: 'nominal' },
    },
  } as vl.TopLevelSpec);
}
