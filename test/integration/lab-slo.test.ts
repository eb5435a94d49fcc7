import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { runBench, SLO_SEARCH_DEFAULTS } from '../../src/lab/bench.js';
import { loadWorkload } from '../../src/lab/workloads/index.js';

const SPEC = 'shared-prefix:groups=16,system=1500,users=8,question=100,output=20,n=300';
const wl = (rate: number) => loadWorkload(SPEC, { seed: 1, rps: rate });

describe('policy lab: latency objectives and peer baselines', () => {
  it('scores goodput against the TTFT objective: requests within it and their tokens/s', async () => {
    const { report, markdown } = await runBench(
      { workers: 4, policies: ['kv_aware', 'slo_aware', 'peer_dynamo', 'peer_llmd', 'peer_aibrix'], engine: { numGpuBlocks: 800 }, seed: 1, rates: [30], rateKind: 'rps', workloadAt: wl, ttftSloMs: 300 },
      'test',
    );
    expect(report.ttft_slo_ms).toBe(300);
    expect(report.rows.map((r) => r.policy)).toEqual(['pooled LRU reference', 'round_robin', 'kv_aware', 'slo_aware', 'peer_dynamo', 'peer_llmd', 'peer_aibrix']);
    for (const r of report.rows) {
      const s = r.slo!;
      expect(s.ttftMs).toBe(300);
      expect(s.attainment).toBeCloseTo(s.met / r.requests, 9);
      // Goodput is a part of the output rate, and all of it when every request met the objective.
      expect(s.goodputTokensPerSec).toBeLessThanOrEqual(r.outputTokensPerSec + 1e-9);
      if (s.met === r.requests) expect(s.goodputTokensPerSec).toBeCloseTo(r.outputTokensPerSec, 6);
      // The share within 300 ms agrees with the TTFT quantiles.
      if (r.ttftP90 < 0.3) expect(s.attainment).toBeGreaterThanOrEqual(0.9);
      if (r.ttftP50 > 0.3) expect(s.attainment).toBeLessThanOrEqual(0.5);
    }
    expect(markdown).toContain('| TTFT ≤ 0.300 s | goodput tok/s |');
  });

  it('finds the throughput at SLO by doubling then bisection, and every probe brackets it', async () => {
    const { report, markdown } = await runBench(
      {
        workers: 4,
        policies: ['kv_aware'],
        engine: { numGpuBlocks: 800 },
        seed: 1,
        rates: [10],
        rateKind: 'rps',
        workloadAt: (rate) => loadWorkload('shared-prefix:groups=16,system=1500,users=8,question=100,output=20,n=600', { seed: 1, rps: rate }),
        ttftSloMs: 120,
        maxRateAtSlo: { ...SLO_SEARCH_DEFAULTS, precision: 0.1 },
      },
      'test',
    );
    const t = report.throughput_at_slo!;
    expect(t.attainment).toBe(0.9);
    for (const name of ['round_robin', 'kv_aware']) {
      const x = t.policies[name];
      expect(x.probes.length).toBeGreaterThan(1);
      expect(x.rate).not.toBeNull();
      expect(x.attainment!).toBeGreaterThanOrEqual(0.9);
      // Every probe at or below the rate found met the target; the first miss is above it and within the precision.
      for (const p of x.probes) if (p.rate <= x.rate!) expect(p.attainment).toBeGreaterThanOrEqual(0.9);
      expect(x.failedAt).not.toBeNull();
      if (x.failedAt !== null) {
        expect(x.failedAt).toBeGreaterThan(x.rate!);
        expect(x.failedAt / x.rate!).toBeLessThanOrEqual(1.1 + 1e-9);
        expect(x.probes.find((p) => p.rate === x.failedAt)!.attainment).toBeLessThan(0.9);
      }
    }
    // Cache affinity is worth capacity here: kv_aware sustains more than round_robin at the objective.
    expect(t.policies.kv_aware.rate!).toBeGreaterThan(t.policies.round_robin.rate!);
    expect(markdown).toContain('### Throughput at SLO');
  });

  it('kvgate bench --ttft-slo-ms --max-rate-at-slo writes throughput_at_slo and the attainment chart; refuses the search without an objective', () => {
    const out = mkdtempSync(join(tmpdir(), 'kvgate-slo-'));
    const stdout = execFileSync(
      process.execPath,
      ['dist/cli/main.js', 'bench', '--workload', 'shared-prefix:groups=8,system=800,users=4,question=50,output=10,n=120', '--rps', '20', '--workers', '2', '--num-gpu-blocks', '400', '--policies', 'slo_aware,peer_aibrix', '--ttft-slo-ms', '500', '--max-rate-at-slo', '--slo-search-precision', '0.2', '--quiet', '--out', out],
      { encoding: 'utf8' },
    );
    expect(stdout).toContain('Throughput at SLO');
    const report = JSON.parse(readFileSync(join(out, 'report.json'), 'utf8'));
    expect(Object.keys(report.throughput_at_slo.policies)).toEqual(['round_robin', 'slo_aware', 'peer_aibrix']);
    expect(existsSync(join(out, 'slo-attainment-vs-rate.svg'))).toBe(true);
    let err = '';
    try {
      execFileSync(process.execPath, ['dist/cli/main.js', 'bench', '--workload', 'random:n=10', '--max-rate-at-slo', '--quiet'], { encoding: 'utf8', stdio: 'pipe' });
    } catch (e) {
      err = String((e as { stderr: string }).stderr);
    }
    expect(err).toContain('--max-rate-at-slo needs --ttft-slo-ms');
  });
});
