import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { POOLED, runBench } from '../../src/lab/bench.js';
import { policyColour } from '../../src/lab/charts.js';
import { loadWorkload } from '../../src/lab/workloads/index.js';
import type { LabEngineConfig } from '../../src/lab/cluster.js';

const FIXTURE = 'test/fixtures/mooncake_synthetic_head.jsonl';
const allPolicies = ['round_robin', 'random', 'power_of_two', 'least_load', 'cache_aware'];

async function bench(spec: string, opts: { engine?: LabEngineConfig; rate?: number; seed?: number; workers?: number } = {}) {
  const generated = !/^(mooncake|azure):/.test(spec);
  const { report } = await runBench(
    {
      workers: opts.workers ?? 8,
      policies: allPolicies,
      engine: opts.engine ?? {},
      seed: opts.seed ?? 1,
      rates: [opts.rate ?? 1],
      rateKind: generated ? 'rps' : 'rate-scale',
      workloadAt: (rate) => loadWorkload(spec, { seed: opts.seed ?? 1, ...(generated ? { rps: rate } : { rateScale: rate }) }),
    },
    'test',
  );
  return report;
}

describe('policy lab', () => {
  it('is deterministic: same seed, identical report', async () => {
    const strip = (r: Awaited<ReturnType<typeof bench>>) => JSON.stringify(r.rows.map(({ wallSecs: _w, ...rest }) => rest));
    const a = await bench(`mooncake:${FIXTURE}`, { rate: 4 });
    const b = await bench(`mooncake:${FIXTURE}`, { rate: 4 });
    expect(strip(a)).toBe(strip(b));
    const c = await bench(`mooncake:${FIXTURE}`, { rate: 4, seed: 2 });
    expect(strip(c)).not.toBe(strip(a)); // the seed matters (random / power_of_two choices)
  });

  it('reports every policy plus the pooled LRU reference, which holds the best hit rate on this roomy workload', async () => {
    const r = await bench('shared-prefix:groups=16,system=1500,users=8,question=100,output=20,n=300', { rate: 30, engine: { numGpuBlocks: 800 } });
    expect(r.rows.map((x) => x.policy)).toEqual([POOLED, ...allPolicies]);
    const bound = r.rows[0].hitRate;
    expect(bound).toBeGreaterThan(0.5);
    expect(Math.min(...r.rows.map((x) => x.hitRate))).toBeLessThan(bound - 0.1);
    // A pooled LRU cache is the best any router can do up to timing effects of a fraction of a point.
    for (const row of r.rows) expect(row.hitRate).toBeLessThanOrEqual(bound + 0.01);
    for (const row of r.rows) {
      expect(row.requests + row.rejected).toBe(300);
      expect(row.ttftP50).toBeLessThanOrEqual(row.ttftP90);
      expect(row.ttftP90).toBeLessThanOrEqual(row.ttftP99);
    }
  });

  it('gives every policy a near-zero hit rate when nothing is shared', async () => {
    const r = await bench('random:input=2000,output=20,n=300', { rate: 20 });
    for (const row of r.rows) expect(row.hitRate).toBeLessThan(0.01);
  });

  it('cache_aware beats round_robin on shared-prefix with 8 groups and 8 engines', async () => {
    // Each engine holds ~4 system prompts: round robin spreads every group over every engine and thrashes.
    const r = await bench('shared-prefix:groups=8,system=2000,users=8,question=100,output=20,n=400', { rate: 20, engine: { numGpuBlocks: 600 } });
    const rr = r.rows.find((x) => x.policy === 'round_robin')!;
    const ca = r.rows.find((x) => x.policy === 'cache_aware')!;
    expect(ca.hitRate).toBeGreaterThan(rr.hitRate + 0.2);
    expect(ca.hitRate).toBeGreaterThan(0.8);
  });

  it('kvgate bench writes the table, report.json and the SVG charts', () => {
    const out = mkdtempSync(join(tmpdir(), 'kvgate-bench-'));
    const stdout = execFileSync(process.execPath, ['dist/cli/main.js', 'bench', '--workload', `mooncake:${FIXTURE}`, '--workers', '4', '--policies', 'cache_aware,least_load', '--sweep', '2,4', '--out', out, '--quiet'], { encoding: 'utf8' });
    expect(stdout).toMatch(/\| pooled LRU reference \|/);
    expect(stdout).toMatch(/\| cache_aware \|/);
    const report = JSON.parse(readFileSync(join(out, 'report.json'), 'utf8'));
    expect(report.rows).toHaveLength(2 * 4);
    // Every rate of the sweep gets its charts.
    for (const f of ['hit-rate-2.svg', 'hit-rate-4.svg', 'ttft-cdf-2.svg', 'ttft-cdf-4.svg', 'ttft-p90-vs-rate.svg', 'report.md']) expect(existsSync(join(out, f))).toBe(true);
    const svg = readFileSync(join(out, 'hit-rate-4.svg'), 'utf8');
    expect(svg).toMatch(/^<svg/);
    // Values on the bars, the axis scaled to the data (not 0–100%), one fixed colour per policy in every chart.
    const at4 = report.rows.filter((r: any) => r.rate === 4);
    for (const r of at4) expect(svg).toContain(`>${(100 * r.hitRate).toFixed(1)}%</text>`);
    if (Math.max(...at4.map((r: any) => r.hitRate)) < 0.8) expect(svg).not.toContain('>100%</text>');
    for (const f of ['hit-rate-2.svg', 'hit-rate-4.svg', 'ttft-cdf-2.svg', 'ttft-p90-vs-rate.svg']) {
      const text = readFileSync(join(out, f), 'utf8');
      expect(text).toContain(policyColour('cache_aware'));
      expect(text).toContain(policyColour('least_load'));
    }
    expect(policyColour('cache_aware')).not.toBe(policyColour('least_load'));
    let err = '';
    try {
      execFileSync(process.execPath, ['dist/cli/main.js', 'bench', '--workload', 'nosuch:x'], { encoding: 'utf8', stdio: 'pipe' });
    } catch (e) {
      err = String((e as { stderr: string }).stderr);
    }
    expect(err).toMatch(/kvgate bench: .*nosuch/);
  });
});
