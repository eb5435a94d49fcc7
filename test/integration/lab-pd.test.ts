import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { POOLED, runBench } from '../../src/lab/bench.js';
import type { ClusterRun } from '../../src/lab/cluster.js';
import { runPdCluster, type PdClusterConfig } from '../../src/lab/pd-cluster.js';
import { interTokenLatencyMs, markdownTable, quantile, summarise } from '../../src/lab/report.js';
import { loadWorkload } from '../../src/lab/workloads/index.js';
import type { RequestRecord } from '../../src/sim/engine.js';

const SHARED = 'shared-prefix:groups=8,system=2000,users=8,question=100,output=20,fresh=1,n=400';

function pd(spec: string, rps: number, cfg: Partial<PdClusterConfig> = {}, seed = 1): ClusterRun {
  const wl = loadWorkload(spec, { seed, rps });
  return runPdCluster(wl.requests, { prefillWorkers: 2, decodeWorkers: 2, policy: 'round_robin', engine: {}, seed, ...cfg });
}

/** The run without wall-clock time, in a comparable form. */
function fingerprint(run: ClusterRun): string {
  return JSON.stringify({
    records: run.records,
    rejected: run.rejected,
    busy: run.engineBusyMs,
    placement: [...run.placement],
    handoffs: [...run.pd!.handoffs],
    stats: run.pd!.engineStats,
    decisions: run.decisions,
    endMs: run.endMs,
    steps: run.steps,
  });
}

describe('policy lab: prefill/decode disaggregation', () => {
  it('is deterministic: same seed, identical run; another seed, another run', () => {
    for (const policy of ['random', 'cache_aware', 'kv_aware']) {
      const a = pd(SHARED, 20, { policy });
      const b = pd(SHARED, 20, { policy });
      expect(fingerprint(a)).toBe(fingerprint(b));
    }
    const c = pd(SHARED, 20, { policy: 'random' }, 2);
    expect(fingerprint(c)).not.toBe(fingerprint(pd(SHARED, 20, { policy: 'random' })));
  });

  it('finishes every request exactly once, on one prefill and one decode engine', () => {
    const run = pd(SHARED, 20, { policy: 'least_load' });
    const ids = run.records.map((r) => r.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids.length).toBe(400);
    expect(run.rejected).toEqual([]);
    const stats = run.pd!.engineStats;
    expect(stats.slice(0, 2).reduce((s, e) => s + e.finishedRequests, 0)).toBe(400);
    expect(stats.slice(2).reduce((s, e) => s + e.finishedRequests, 0)).toBe(400);
    for (const r of run.records) {
      const h = run.pd!.handoffs.get(r.id)!;
      expect(run.placement.get(r.id)).toBe(h.prefillEngine);
      expect(h.prefillEngine).toBeLessThan(2);
      expect(h.decodeEngine).toBeGreaterThanOrEqual(2);
      expect(r.outputTokens).toBe(20);
      expect(r.finishReason).toBe('length');
      // prefill → transfer → decode → first token → last token, in that order
      expect(h.prefillDoneMs).toBeGreaterThan(r.arrivalMs);
      expect(h.decodeSubmitMs).toBeCloseTo(h.prefillDoneMs + h.transferMs, 9);
      expect(r.firstTokenMs).toBeGreaterThan(h.decodeSubmitMs);
      expect(r.finishMs).toBeGreaterThan(r.firstTokenMs);
      expect(r.ttftMs).toBeCloseTo(r.firstTokenMs - r.arrivalMs, 9);
      expect(r.e2eMs).toBeCloseTo(r.finishMs - r.arrivalMs, 9);
    }
  });

  it('prefill engines produce one token per request and decode engines compute no prompt tokens', () => {
    const run = pd(SHARED, 20, { policy: 'cache_aware' });
    expect(run.preemptions).toBe(0);
    const info = run.pd!;
    const perEngine = (k: number) => [...info.handoffs.values()].filter((h) => h.prefillEngine === k || h.decodeEngine === k).length;
    for (let i = 0; i < 4; i++) {
      const st = info.engineStats[i];
      if (i < 2) {
        // maxTokens 1: the prefill step's token ends the request there; no decode step ever.
        expect(st.generationTokens).toBe(perEngine(i));
        expect(info.decodeSeqsStepped[i]).toBe(0);
        expect(st.prefilledAdmissions).toBe(0);
        expect(st.prefillTokensComputed).toBeGreaterThan(0);
      } else {
        expect(st.prefillTokensComputed).toBe(0);
        expect(st.prefilledAdmissions).toBe(perEngine(i));
        expect(st.generationTokens).toBe(20 * perEngine(i));
        expect(info.decodeSeqsStepped[i]).toBe(20 * perEngine(i));
      }
    }
    // Hit rate = the prefill engines' prefix-cache hits.
    const cached = run.records.reduce((s, r) => s + r.cachedTokens, 0);
    const prompt = run.records.reduce((s, r) => s + r.promptTokens, 0);
    const hits = info.engineStats.slice(0, 2).reduce((s, e) => s + e.prefixCacheHits, 0);
    expect(cached).toBe(hits);
    expect(summarise(run, 20).hitRate).toBeCloseTo(cached / prompt, 12);
  });

  it('TTFT includes the KV transfer', () => {
    // Low load: requests rarely overlap, so the only change is the transfer.
    const spec = 'random:input=1000,output=10,n=60';
    const fast = pd(spec, 0.5, { policy: 'least_load', transferMsPerBlock: 0 });
    const slow = pd(spec, 0.5, { policy: 'least_load', transferMsPerBlock: 5 });
    const transfer = 5 * Math.ceil(1000 / 16);
    for (const h of slow.pd!.handoffs.values()) expect(h.transferMs).toBe(transfer);
    for (const h of fast.pd!.handoffs.values()) expect(h.transferMs).toBe(0);
    const ttft = (run: ClusterRun) => new Map(run.records.map((r) => [r.id, r.ttftMs]));
    const a = ttft(fast);
    const b = ttft(slow);
    const diffs = [...a].map(([id, t]) => b.get(id)! - t).sort((x, y) => x - y);
    expect(quantile(diffs, 0.5)).toBeCloseTo(transfer, 3);
    for (const d of diffs) expect(d).toBeGreaterThan(transfer - 5);
    const sf = summarise(fast, 0.5);
    const ss = summarise(slow, 0.5);
    expect(ss.ttftP50 - sf.ttftP50).toBeCloseTo(transfer / 1000, 2);
    expect(ss.pd!.transferMsMean).toBe(transfer);
    // The transfer delays the first token, not the tokens after it.
    expect(ss.itlP50Ms).toBeCloseTo(sf.itlP50Ms, 6);
  });

  it('cache_aware as the prefill policy keeps shared prefixes on one prefill engine', () => {
    // Four prefill engines that each hold ~2 system prompts: spreading a group over every
    // engine (round robin) thrashes their caches; cache_aware keeps each group on one engine.
    const spec = 'shared-prefix:groups=8,system=2000,users=8,question=100,output=20,fresh=1,n=400';
    const cfg = { prefillWorkers: 4, decodeWorkers: 2, decodePolicy: 'least_load', engine: { numGpuBlocks: 400 } };
    const ca = pd(spec, 20, { ...cfg, policy: 'cache_aware', prefillPolicy: 'cache_aware' });
    const rr = pd(spec, 20, { ...cfg, policy: 'round_robin', prefillPolicy: 'round_robin' });
    const hc = summarise(ca, 20).hitRate;
    const hr = summarise(rr, 20).hitRate;
    expect(hc).toBeGreaterThan(hr + 0.2);
    expect(hc).toBeGreaterThan(0.8);
    // Affinity: most requests of a group went to the group's most used prefill engine.
    const wl = loadWorkload(spec, { seed: 1, rps: 20 });
    const byGroup = new Map<string, Map<number, number>>();
    for (const r of wl.requests) {
      const g = r.group!.split('/')[0];
      const m = byGroup.get(g) ?? new Map<number, number>();
      const e = ca.placement.get(r.id)!;
      m.set(e, (m.get(e) ?? 0) + 1);
      byGroup.set(g, m);
    }
    for (const m of byGroup.values()) {
      const total = [...m.values()].reduce((a, b) => a + b, 0);
      expect(Math.max(...m.values()) / total).toBeGreaterThan(0.8);
    }
    expect(summarise(ca, 20).pd).toMatchObject({ prefillPolicy: 'cache_aware', decodePolicy: 'least_load', prefillWorkers: 4, decodeWorkers: 2 });
    expect(ca.policy).toBe('cache_aware→least_load [PD 4P+2D]');
  });

  it('refuses requests the decode engine cannot hold, before any work', () => {
    const run = pd('random:input=1000,output=100,n=20', 5, { policy: 'least_load', engine: { maxModelLen: 1050 } });
    expect(run.records).toHaveLength(0);
    expect(run.rejected).toHaveLength(20);
    expect(run.rejected[0].reason).toMatch(/exceeds the engine's limit of 1050 tokens/);
    expect(run.pd!.engineStats.every((s) => s.steps === 0)).toBe(true);
  });
});

describe('inter-token latency', () => {
  const rec = (id: string, outputTokens: number, firstTokenMs: number, finishMs: number): RequestRecord => ({
    id,
    promptTokens: 10,
    outputTokens,
    cachedTokens: 0,
    arrivalMs: 0,
    firstScheduledMs: 0,
    firstTokenMs,
    finishMs,
    queueMs: 0,
    ttftMs: firstTokenMs,
    e2eMs: finishMs,
    preemptions: 0,
    finishReason: 'length',
  });

  it('is (finish − first token) / (output tokens − 1), over requests with at least 2 tokens', () => {
    expect(interTokenLatencyMs(rec('a', 1, 10, 10))).toBeUndefined();
    expect(interTokenLatencyMs(rec('b', 2, 10, 30))).toBe(20);
    expect(interTokenLatencyMs(rec('c', 11, 100, 150))).toBe(5);
    const run: ClusterRun = {
      policy: 'crafted',
      workers: 1,
      // ITLs: 20, 5, 10, 40 ms (sorted 5, 10, 20, 40); the 1-token request does not count.
      records: [rec('a', 1, 10, 10), rec('b', 2, 10, 30), rec('c', 11, 100, 150), rec('d', 5, 50, 90), rec('e', 3, 20, 100)],
      rejected: [],
      engineBusyMs: [100],
      preemptions: 0,
      placement: new Map(),
      decisions: { cacheHits: 0, cacheMisses: 0, loadBalanced: 0 },
      endMs: 150,
      wallMs: 0,
      steps: 0,
    };
    const s = summarise(run, 1);
    expect(s.itlP50Ms).toBeCloseTo(15, 12); // between 10 and 20
    expect(s.itlP90Ms).toBeCloseTo(20 + 0.7 * 20, 12); // (4−1)·0.9 = 2.7: 20 + 0.7 × (40 − 20)
    expect(s.mode).toBe('aggregated');
    const md = markdownTable([s], { showRate: false });
    expect(md).toMatch(/\| ITL p50 \(ms\) \| ITL p90 \(ms\) \|/);
    expect(md).toMatch(/\| 15\.00 \| 34\.00 \|/);
    // No request with 2 tokens: no ITL (shown as –, null in JSON).
    const none = summarise({ ...run, records: [rec('a', 1, 10, 10)] }, 1);
    expect(none.itlP50Ms).toBeNaN();
    expect(JSON.parse(JSON.stringify(none)).itlP50Ms).toBeNull();
  });

  it('matches the decode steps of a request alone in a PD cluster', () => {
    const run = pd('random:input=500,output=50,n=1', 1, { policy: 'least_load' });
    const r = run.records[0];
    const s = summarise(run, 1);
    expect(s.itlP50Ms).toBeCloseTo((r.finishMs - r.firstTokenMs) / 49, 9);
    // Alone on its decode engine: 50 decode steps, the first of which produced the first token.
    const busy = run.engineBusyMs[run.pd!.handoffs.get(r.id)!.decodeEngine];
    expect(r.finishMs - r.firstTokenMs).toBeCloseTo(busy - (r.firstTokenMs - run.pd!.handoffs.get(r.id)!.decodeSubmitMs), 9);
  });
});

describe('kvgate bench with PD rows', () => {
  it('runBench adds a PD row per policy next to the aggregated rows', async () => {
    const { report, markdown } = await runBench(
      {
        workers: 4,
        pd: { prefillWorkers: 2, decodeWorkers: 2 },
        policies: ['cache_aware', 'least_load'],
        engine: {},
        seed: 1,
        rates: [20],
        rateKind: 'rps',
        workloadAt: (rate) => loadWorkload(SHARED, { seed: 1, rps: rate }),
      },
      'test',
    );
    expect(report.rows.map((r) => r.policy)).toEqual([
      POOLED,
      'round_robin',
      'cache_aware',
      'least_load',
      'round_robin [PD 2P+2D]',
      'cache_aware [PD 2P+2D]',
      'least_load [PD 2P+2D]',
    ]);
    expect(report.rows.map((r) => r.mode)).toEqual(['aggregated', 'aggregated', 'aggregated', 'aggregated', 'pd', 'pd', 'pd']);
    expect(report.pd).toEqual({ prefillWorkers: 2, decodeWorkers: 2, transferMsPerBlock: 0.08 });
    for (const r of report.rows) {
      expect(r.requests).toBe(400);
      expect(r.itlP50Ms).toBeGreaterThan(0);
      expect(r.itlP50Ms).toBeLessThanOrEqual(r.itlP90Ms);
    }
    expect(markdown).toMatch(/4 aggregated engines vs PD 2 prefill \+ 2 decode engines \(KV transfer 0\.08 ms\/block\)/);
    expect(markdown).toMatch(/\| cache_aware \[PD 2P\+2D\] \|/);
    expect(markdown).toMatch(/- cache_aware \[PD 2P\+2D\]: TTFT p50 \/ p90 .* for cache_aware on 4 aggregated engines; ITL p50 \/ p90/);
    // Both pools overridden: one PD row, whatever the policies under test.
    const one = await runBench(
      {
        workers: 4,
        pd: { prefillWorkers: 2, decodeWorkers: 2, prefillPolicy: 'cache_aware', decodePolicy: 'least_load', transferMsPerBlock: 0.2 },
        policies: ['cache_aware', 'least_load'],
        engine: {},
        seed: 1,
        rates: [20],
        rateKind: 'rps',
        workloadAt: (rate) => loadWorkload(SHARED, { seed: 1, rps: rate }),
      },
      'test',
    );
    expect(one.report.rows.filter((r) => r.mode === 'pd').map((r) => r.policy)).toEqual(['cache_aware→least_load [PD 2P+2D]']);
  });

  it('the CLI compares aggregated and PD clusters in one command', () => {
    const out = mkdtempSync(join(tmpdir(), 'kvgate-bench-pd-'));
    const stdout = execFileSync(
      process.execPath,
      ['dist/cli/main.js', 'bench', '--workload', 'shared-prefix:groups=4,system=1000,users=4,question=100,output=20,fresh=1,n=100', '--rps', '10', '--workers', '4', '--prefill-workers', '2', '--decode-workers', '2', '--policies', 'cache_aware', '--kv-transfer-ms-per-block', '0.1', '--out', out, '--quiet'],
      { encoding: 'utf8' },
    );
    expect(stdout).toMatch(/ITL p50 \(ms\) \| ITL p90 \(ms\)/);
    expect(stdout).toMatch(/\| cache_aware \|/);
    expect(stdout).toMatch(/\| cache_aware \[PD 2P\+2D\] \|/);
    const report = JSON.parse(readFileSync(join(out, 'report.json'), 'utf8'));
    expect(report.rows).toHaveLength(5);
    expect(report.pd).toEqual({ prefillWorkers: 2, decodeWorkers: 2, transferMsPerBlock: 0.1 });
    const pdRow = report.rows.find((r: { mode: string }) => r.mode === 'pd');
    expect(pdRow.pd.transferMsMean).toBeCloseTo(0.1 * Math.ceil(1100 / 16), 9);
    for (const [args, msg] of [
      [['--prefill-workers', '2'], /need both --prefill-workers and --decode-workers/],
      [['--prefill-policy', 'cache_aware'], /apply to PD rows/],
    ] as const) {
      let err = '';
      try {
        execFileSync(process.execPath, ['dist/cli/main.js', 'bench', '--workload', 'random:n=10', ...args], { encoding: 'utf8', stdio: 'pipe' });
      } catch (e) {
        err = String((e as { stderr: string }).stderr);
      }
      expect(err).toMatch(msg);
    }
  });
});
