import { describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import type { RequestContext } from '../../src/core/context.js';
import { SeededRng } from '../../src/core/rng.js';
import { Worker } from '../../src/core/worker.js';
import type { PolicyDeps, PolicyObserver, Scheduler } from '../../src/policies/policy.js';
import {
  decodeCostMs,
  defaultPrefixLoadConfig,
  prefillCostMs,
  PrefixLoadPolicy,
  type PrefixLoadOptions,
} from '../../src/policies/prefix-load.js';
import { DEFAULT_COST_MODEL } from '../../src/engine/cost-model.js';

const C = DEFAULT_COST_MODEL;
const range = (from: number, n: number): number[] => Array.from({ length: n }, (_, i) => from + i);

function mkWorkers(n: number): Worker[] {
  return Array.from({ length: n }, (_, i) => {
    const w = new Worker({ url: `http://w${i}:8000`, modelId: 'm' });
    w.healthy = true;
    return w;
  });
}

let seq = 0;
function ctx(tokens: number[] | undefined, text = '', model = 'm'): RequestContext {
  return { requestId: `r${seq++}`, route: 'generate', model, routingText: text, tokenIds: tokens, headers: {}, stream: false, arrivalMs: 0 };
}

function setup(opts: PrefixLoadOptions = {}, observer?: PolicyObserver) {
  const clock = new ManualClock();
  const deps: PolicyDeps = { clock, rng: new SeededRng(1), observer };
  const p = new PrefixLoadPolicy(deps, opts);
  return { clock, p, ws: mkWorkers(3) };
}

/** L of a worker after routing these prompts to it (each charged prefill of its miss + decode of avg 45). */
const full = (n: number, d = 45): number => prefillCostMs(C, n, 0) + decodeCostMs(C, n, d);

describe('prefix_load basics', () => {
  it('is named prefix_load, needs tokens, skips unavailable workers', () => {
    const { p, ws } = setup();
    expect(p.name).toBe('prefix_load');
    expect(p.needsTokens).toBe(true);
    ws[0].healthy = false;
    for (let i = 0; i < 20; i++) expect(p.selectWorker(ws, ctx(range(i * 100, 50)))).not.toBe(ws[0]);
    for (const w of ws) w.healthy = false;
    expect(p.selectWorker(ws, ctx([1, 2, 3]))).toBeUndefined();
    expect(p.selectWorker([], ctx([1, 2, 3]))).toBeUndefined();
  });

  it('cost helpers follow the engine cost model', () => {
    // prefill(u, m) = 0.05·u + 1e-6·(u·m + u(u+1)/2)
    expect(prefillCostMs(C, 1000, 0)).toBeCloseTo(0.05 * 1000 + 1e-6 * 500_500, 9);
    expect(prefillCostMs(C, 550, 450)).toBeCloseTo(0.05 * 550 + 1e-6 * (550 * 450 + (550 * 551) / 2), 9);
    expect(prefillCostMs(C, 0, 450)).toBe(0);
    // decode(n, D) = 0.03·D + 5e-5·(D·n + D(D+1)/2)
    expect(decodeCostMs(C, 1000, 45)).toBeCloseTo(0.03 * 45 + 5e-5 * (45 * 1000 + (45 * 46) / 2), 9);
    expect(decodeCostMs({ ...C, slowFactor: 2 }, 1000, 45)).toBeCloseTo(2 * decodeCostMs(C, 1000, 45), 9);
    expect(defaultPrefixLoadConfig).toMatchObject({ windowSecs: 180, matchThreshold: 0.5, rebalanceRatio: 1.5 });
  });

  it('rejects invalid configuration', () => {
    const deps: PolicyDeps = { clock: new ManualClock(), rng: new SeededRng(1) };
    expect(() => new PrefixLoadPolicy(deps, { windowSecs: 0 })).toThrow(RangeError);
    expect(() => new PrefixLoadPolicy(deps, { rebalanceRatio: -1 })).toThrow(RangeError);
    expect(() => new PrefixLoadPolicy(deps, { cost: { prefillTokenMs: -1 } })).toThrow(RangeError);
  });
});

describe('prefix_load exploit (match ratio > 0.5)', () => {
  it('sends a request to the holder of its long cached prefix, even when that worker is busier', () => {
    const { p, ws } = setup();
    const P = range(1, 1000);
    expect(p.selectWorker([ws[1]], ctx(P))).toBe(ws[1]);
    ws[1].load = 5; // in-flight does not matter for exploit among one holder
    expect(p.selectWorker(ws, ctx([...P, ...range(5000, 100)]))).toBe(ws[1]);
    expect(p.lastDecision).toMatchObject({ kind: 'exploit', matchedTokens: 1000, inputTokens: 1100, workerMatchedTokens: 1000 });
  });

  it('among several holders of the longest match, takes the lowest window load L', () => {
    const { p, ws } = setup();
    const P = range(1, 1000);
    p.selectWorker([ws[1]], ctx(P));
    p.selectWorker([ws[1]], ctx([...P, ...range(7000, 300)])); // ws[1]: two requests
    p.selectWorker([ws[2]], ctx(P)); // ws[2]: one
    expect(p.workerLoadMs(ws[1].id)).toBeGreaterThan(p.workerLoadMs(ws[2].id));
    expect(p.selectWorker(ws, ctx([...P, ...range(9000, 50)]))).toBe(ws[2]);
    expect(p.lastDecision?.kind).toBe('exploit');
  });

  it('a match of exactly half the prompt is not enough (strictly greater)', () => {
    const { p, ws } = setup();
    p.selectWorker([ws[2]], ctx(range(1, 500)));
    p.selectWorker(ws, ctx([...range(1, 500), ...range(10_000, 500)]));
    expect(p.lastDecision).toMatchObject({ kind: 'explore', matchedTokens: 500, inputTokens: 1000 });
  });
});

describe('prefix_load explore (cost = L + P)', () => {
  it('an unrelated request goes to the worker with the lowest window load', () => {
    const { p, ws } = setup();
    p.selectWorker([ws[0]], ctx(range(100_000, 2000)));
    p.selectWorker([ws[1]], ctx(range(200_000, 500)));
    expect(p.selectWorker(ws, ctx(range(300_000, 300)))).toBe(ws[2]);
    expect(p.lastDecision?.kind).toBe('explore');
    expect(p.workerLoadMs(ws[0].id)).toBeCloseTo(full(2000), 9);
    expect(p.workerLoadMs(ws[1].id)).toBeCloseTo(full(500), 9);
    expect(p.workerLoadMs(ws[2].id)).toBeCloseTo(full(300), 9);
  });

  it('a partial match lowers P: the cached worker wins although its L is higher', () => {
    const { p, ws } = setup();
    const two = ws.slice(0, 2);
    const Q = range(1, 450);
    p.selectWorker([two[0]], ctx([...Q, ...range(50_000, 300)])); // L0 = full(750)
    p.selectWorker([two[1]], ctx(range(80_000, 600))); // L1 = full(600)
    const L0 = p.workerLoadMs(two[0].id);
    const L1 = p.workerLoadMs(two[1].id);
    expect(L0).toBeCloseTo(full(750), 9);
    expect(L0).toBeGreaterThan(L1);

    const req = [...Q, ...range(90_000, 550)]; // n = 1000, w0 holds 450 (ratio 0.45 → explore)
    const cost0 = L0 + prefillCostMs(C, 550, 450);
    const cost1 = L1 + prefillCostMs(C, 1000, 0);
    expect(cost0).toBeLessThan(cost1);
    expect(p.selectWorker(two, ctx(req))).toBe(two[0]);
    expect(p.lastDecision).toMatchObject({ kind: 'explore', matchedTokens: 450, workerMatchedTokens: 450 });
    expect(p.lastDecision!.chargedMs).toBeCloseTo(prefillCostMs(C, 550, 450) + decodeCostMs(C, 1000, 45), 9);
    expect(p.workerLoadMs(two[0].id)).toBeCloseTo(L0 + p.lastDecision!.chargedMs, 9);
  });

  it('ties go to the fewest in-flight, then candidate order', () => {
    const { p, ws } = setup();
    ws[0].load = 2;
    ws[1].load = 1;
    ws[2].load = 1;
    expect(p.selectWorker(ws, ctx(range(1, 100)))).toBe(ws[1]);
  });

  it('uses outputTokens(ctx) for the decode estimate when given', () => {
    const { p, ws } = setup({ outputTokens: () => 1000 });
    p.selectWorker(ws, ctx(range(1, 200)));
    expect(p.lastDecision!.chargedMs).toBeCloseTo(prefillCostMs(C, 200, 0) + decodeCostMs(C, 200, 1000), 9);
  });
});

describe('prefix_load rebalance', () => {
  /** ws[0] holds P and carries most of the load; ws[1] has one small request; ws[2] is absent. */
  function skewed(opts: PrefixLoadOptions) {
    const s = setup(opts);
    const two = s.ws.slice(0, 2);
    const P = range(1, 1000);
    for (let i = 0; i < 4; i++) s.p.selectWorker([two[0]], ctx([...P, ...range(10_000 + i * 1000, 500)]));
    s.p.selectWorker([two[1]], ctx(range(500_000, 200)));
    return { ...s, two, P };
  }

  it('sends to the lightest worker when the heaviest L exceeds 1.5× the lightest', () => {
    const { p, two, P } = skewed({ rebalanceMinRequests: 0 });
    expect(p.workerLoadMs(two[0].id)).toBeGreaterThan(1.5 * p.workerLoadMs(two[1].id));
    expect(p.selectWorker(two, ctx([...P, ...range(90_000, 10)]))).toBe(two[1]);
    expect(p.lastDecision).toMatchObject({ kind: 'rebalance', matchedTokens: 1000, workerMatchedTokens: 0 });
  });

  it('does not rebalance below the ratio', () => {
    const { p, two, P } = skewed({ rebalanceMinRequests: 0, rebalanceRatio: 1000 });
    expect(p.selectWorker(two, ctx([...P, ...range(90_000, 10)]))).toBe(two[0]);
    expect(p.lastDecision?.kind).toBe('exploit');
  });

  it('does not rebalance while the window holds fewer than rebalanceMinRequests per worker (default 50)', () => {
    const { p, two, P } = skewed({});
    expect(p.selectWorker(two, ctx([...P, ...range(90_000, 10)]))).toBe(two[0]);
    expect(p.lastDecision?.kind).toBe('exploit');
    // 5 requests in the window over 2 workers: a gate of 2 per worker lets it through.
    const q = skewed({ rebalanceMinRequests: 2 });
    expect(q.p.selectWorker(q.two, ctx([...q.P, ...range(90_000, 10)]))).toBe(q.two[1]);
  });

  it('after a rebalance both workers hold the prefix and exploit shares it by L', () => {
    const { p, two, P } = skewed({ rebalanceMinRequests: 0 });
    const picks: string[] = [];
    const kinds: string[] = [];
    for (let i = 0; i < 60; i++) {
      picks.push(p.selectWorker(two, ctx([...P, ...range(200_000 + i * 1000, 10)]))!.id);
      kinds.push(p.lastDecision!.kind);
    }
    expect(picks[0]).toBe(two[1].id);
    expect(kinds[0]).toBe('rebalance');
    expect(kinds[1]).toBe('exploit'); // ws[1] holds P now and has the lower L
    expect(picks.slice(30)).toContain(two[0].id); // once L1 caught up, the two alternate
    expect(picks.slice(30)).toContain(two[1].id);
    const step = prefillCostMs(C, 10, 1000) + decodeCostMs(C, 1010, 45);
    expect(Math.abs(p.workerLoadMs(two[0].id) - p.workerLoadMs(two[1].id))).toBeLessThanOrEqual(step + 1e-6);
  });
});

describe('prefix_load sliding window', () => {
  it('history older than windowSecs stops attracting requests and stops counting as load', () => {
    const { p, ws, clock } = setup();
    const P = range(1, 1000);
    const req = () => ctx([...P, ...range(70_000, 100)]);
    p.selectWorker([ws[1]], ctx(P)); // t = 0
    clock.set(10_000);
    expect(p.selectWorker(ws, req())).toBe(ws[1]); // t = 10 s, exploit
    expect(p.lastDecision?.kind).toBe('exploit');

    clock.set(185_000); // the t=0 entry left the window, the t=10 s one did not
    expect(p.selectWorker(ws, req())).toBe(ws[1]);
    expect(p.lastDecision?.kind).toBe('exploit');
    expect(p.workerLoadMs(ws[1].id)).toBeCloseTo(
      prefillCostMs(C, 100, 1000) + decodeCostMs(C, 1100, 45) + prefillCostMs(C, 0, 1100) + decodeCostMs(C, 1100, 45),
      9,
    );

    clock.set(185_000 + 182_000); // everything left the window
    expect(p.workerLoadMs(ws[1].id)).toBe(0);
    expect(p.selectWorker(ws, req())).toBe(ws[0]); // explore, all L = 0 → candidate order
    expect(p.lastDecision).toMatchObject({ kind: 'explore', matchedTokens: 0 });
  });

  it('expire() releases the trees and ledgers', () => {
    const { p, ws, clock } = setup({ windowSecs: 10 });
    for (let i = 0; i < 50; i++) p.selectWorker(ws, ctx(range(i * 1000, 100)));
    expect([...p.treeStats().values()][0].nodes).toBeGreaterThan(0);
    clock.set(12_000);
    p.expire();
    expect(p.treeStats().size).toBe(0);
    for (const w of ws) expect(p.workerLoadMs(w.id)).toBe(0);
  });

  it('runs its expiry on deps.schedule when given, and close() cancels it', () => {
    let registered: { every: number; fn: () => void } | undefined;
    let cancelled = false;
    const schedule: Scheduler = (every, fn) => {
      registered = { every, fn };
      return () => {
        cancelled = true;
      };
    };
    const clock = new ManualClock();
    const p = new PrefixLoadPolicy({ clock, rng: new SeededRng(1), schedule }, { windowSecs: 1 });
    expect(registered?.every).toBe(1000);
    const ws = mkWorkers(2);
    p.selectWorker(ws, ctx(range(1, 10)));
    clock.set(5000);
    registered!.fn();
    expect(p.treeStats().size).toBe(0);
    p.close();
    expect(cancelled).toBe(true);
  });
});

describe('prefix_load inputs and state', () => {
  it('falls back to the code points of routingText when tokenIds are missing (separate tree)', () => {
    const { p, ws } = setup();
    const text = 'You are a helpful assistant. '.repeat(40);
    p.selectWorker([ws[2]], ctx(undefined, text));
    expect(p.selectWorker(ws, ctx(undefined, text + 'What is 2+2?'))).toBe(ws[2]);
    expect(p.lastDecision).toMatchObject({ kind: 'exploit', matchedTokens: text.length, inputTokens: text.length + 12 });
    // Token ids equal to those code points are matched in the token tree, not the char tree.
    const cps = Array.from(text, (c) => c.codePointAt(0)!);
    p.selectWorker(ws, ctx(cps));
    expect(p.lastDecision).toMatchObject({ kind: 'explore', matchedTokens: 0 });
  });

  it('keeps one tree per model', () => {
    const { p, ws } = setup();
    p.selectWorker([ws[2]], ctx(range(1, 100), '', 'a'));
    p.selectWorker(ws, ctx(range(1, 100), '', 'b'));
    expect(p.lastDecision?.matchedTokens).toBe(0);
    p.selectWorker(ws, ctx(range(1, 100), '', 'a'));
    expect(p.lastDecision).toMatchObject({ kind: 'exploit', workerId: ws[2].id });
  });

  it('onWorkerRemoved forgets the worker’s history and load', () => {
    const { p, ws } = setup();
    const P = range(1, 1000);
    p.selectWorker([ws[1]], ctx(P));
    p.onWorkerRemoved(ws[1]);
    expect(p.workerLoadMs(ws[1].id)).toBe(0);
    expect(p.treeStats().size).toBe(0);
    p.selectWorker(ws, ctx([...P, 5]));
    expect(p.lastDecision).toMatchObject({ kind: 'explore', matchedTokens: 0, workerId: ws[0].id });
  });

  it('reports decisions to the observer', () => {
    const calls: string[] = [];
    const observer: PolicyObserver = {
      cacheHit: (w, m, n) => calls.push(`hit ${w.id} ${m}/${n}`),
      cacheMiss: (n) => calls.push(`miss ${n}`),
      loadBalanced: (w) => calls.push(`balanced ${w.id}`),
    };
    const { p, ws } = setup({ rebalanceMinRequests: 0 }, observer);
    p.selectWorker([ws[0]], ctx(range(1, 10)));
    p.selectWorker([ws[0]], ctx(range(1, 12)));
    p.selectWorker(ws, ctx(range(1, 13))); // exploit on ws[0], but ws[1] has L = 0
    expect(calls).toEqual(['miss 10', `hit ${ws[0].id} 10/12`, `balanced ${ws[1].id}`]);
  });

  it('is deterministic for a clock and a candidate sequence', () => {
    const run = () => {
      const { p, ws, clock } = setup({ rebalanceMinRequests: 2 });
      const rng = new SeededRng(9);
      const out: string[] = [];
      for (let i = 0; i < 300; i++) {
        clock.advance(rng.int(2000));
        const prefix = range(rng.int(5) * 10_000, 400);
        out.push(p.selectWorker(ws, ctx([...prefix, ...range(100_000 + i * 100, 1 + rng.int(300))]))!.id);
      }
      return out;
    };
    const a = run();
    expect(run()).toEqual(a);
    expect(new Set(a).size).toBe(3);
  });

  it('picks a prefill/decode pair from the two pools', () => {
    const { p } = setup();
    const pre = mkWorkers(2);
    const dec = [1, 2].map((i) => {
      const d = new Worker({ url: `http://d${i}:8000`, modelId: 'm', type: 'decode' });
      d.healthy = true;
      return d;
    });
    const pair = p.selectPair(pre, dec, ctx(range(1, 10)))!;
    expect(pre).toContain(pair.prefill);
    expect(dec).toContain(pair.decode);
  });
});
