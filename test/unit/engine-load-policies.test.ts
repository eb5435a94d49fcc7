import { describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import type { RequestContext } from '../../src/core/context.js';
import { SeededRng } from '../../src/core/rng.js';
import { Worker } from '../../src/core/worker.js';
import { defaultEngineLoadPolicyConfig, hasFreshEngineLoad, LeastKvCachePolicy } from '../../src/policies/least-kv-cache.js';
import { LeastWaitingPolicy } from '../../src/policies/least-waiting.js';
import type { PolicyDeps } from '../../src/policies/policy.js';

function mkWorkers(n: number): Worker[] {
  return Array.from({ length: n }, (_, i) => {
    const w = new Worker({ url: `http://w${i}:8000`, modelId: 'm' });
    w.healthy = true;
    return w;
  });
}

const ctx: RequestContext = { requestId: 'r', route: 'chat', model: 'm', routingText: 'x', headers: {}, stream: false, arrivalMs: 0 };

function setup(n = 3) {
  const clock = new ManualClock(10_000);
  const deps: PolicyDeps = { clock, rng: new SeededRng(1) };
  const ws = mkWorkers(n);
  const report = (w: Worker, running: number, waiting: number, kvUsage: number, at = clock.now()) => {
    w.engineLoad = { running, waiting, kvUsage, updatedAtMs: at };
  };
  return { clock, deps, ws, report };
}

describe('freshness', () => {
  it('fresh = updated no more than staleAfterMs ago on the policy clock; future stamps are stale', () => {
    const { ws, report } = setup(1);
    const w = ws[0];
    expect(hasFreshEngineLoad(w, 10_000, 1000)).toBe(false); // never scraped
    report(w, 0, 0, 0, 9_000);
    expect(hasFreshEngineLoad(w, 10_000, 1000)).toBe(true);
    expect(hasFreshEngineLoad(w, 10_001, 1000)).toBe(false);
    report(w, 0, 0, 0, 10_500); // another clock (e.g. Date.now vs performance.now)
    expect(hasFreshEngineLoad(w, 10_000, 1000)).toBe(false);
    expect(defaultEngineLoadPolicyConfig.staleAfterMs).toBe(5000);
  });
});

describe('least_kv_cache', () => {
  it('picks the lowest kvUsage among workers with fresh metrics', () => {
    const { deps, ws, report } = setup();
    const p = new LeastKvCachePolicy(deps, { staleAfterMs: 2000 });
    expect(p.name).toBe('least_kv_cache');
    report(ws[0], 1, 0, 0.7);
    report(ws[1], 9, 9, 0.2); // many requests, but the lowest KV usage
    report(ws[2], 0, 0, 0.5);
    expect(p.selectWorker(ws, ctx)).toBe(ws[1]);
  });

  it('ties by fewest in-flight, then candidate order', () => {
    const { deps, ws, report } = setup();
    const p = new LeastKvCachePolicy(deps);
    for (const w of ws) report(w, 0, 0, 0.3);
    ws[0].load = 2;
    ws[1].load = 1;
    ws[2].load = 1;
    expect(p.selectWorker(ws, ctx)).toBe(ws[1]);
    ws[1].load = 3;
    expect(p.selectWorker(ws, ctx)).toBe(ws[2]);
  });

  it('ignores workers without fresh metrics while any worker has them', () => {
    const { deps, ws, report, clock } = setup();
    const p = new LeastKvCachePolicy(deps, { staleAfterMs: 2000 });
    report(ws[0], 0, 0, 0.9);
    report(ws[1], 0, 0, 0.1, clock.now() - 2001); // stale, would win on kvUsage
    // ws[2] never scraped, and idle
    expect(p.selectWorker(ws, ctx)).toBe(ws[0]);
  });

  it('falls back to fewest in-flight (then processed, then order) when no worker has fresh metrics', () => {
    const { deps, ws, report, clock } = setup();
    const p = new LeastKvCachePolicy(deps, { staleAfterMs: 2000 });
    report(ws[0], 0, 0, 0.0, clock.now() - 5000);
    ws[0].load = 3;
    ws[1].load = 1;
    ws[2].load = 1;
    ws[1].processed = 10;
    ws[2].processed = 4;
    expect(p.selectWorker(ws, ctx)).toBe(ws[2]);
    clock.advance(10_000);
    report(ws[0], 0, 0, 0.99); // fresh again: only ws[0] qualifies
    expect(p.selectWorker(ws, ctx)).toBe(ws[0]);
  });

  it('skips unavailable workers and returns undefined when none is available', () => {
    const { deps, ws, report } = setup();
    const p = new LeastKvCachePolicy(deps);
    report(ws[0], 0, 0, 0.0);
    report(ws[1], 0, 0, 0.5);
    ws[0].healthy = false;
    expect(p.selectWorker(ws, ctx)).toBe(ws[1]);
    for (const w of ws) w.healthy = false;
    expect(p.selectWorker(ws, ctx)).toBeUndefined();
    expect(p.selectWorker([], ctx)).toBeUndefined();
  });

  it('validates staleAfterMs', () => {
    const { deps } = setup();
    expect(() => new LeastKvCachePolicy(deps, { staleAfterMs: -1 })).toThrow(RangeError);
    expect(() => new LeastWaitingPolicy(deps, { staleAfterMs: Number.NaN })).toThrow(RangeError);
  });
});

describe('least_waiting', () => {
  it('picks the fewest waiting, ties by running, then in-flight, then order', () => {
    const { deps, ws, report } = setup(4);
    const p = new LeastWaitingPolicy(deps, { staleAfterMs: 2000 });
    expect(p.name).toBe('least_waiting');
    report(ws[0], 0, 3, 0);
    report(ws[1], 8, 1, 0.9);
    report(ws[2], 2, 1, 0.9);
    report(ws[3], 2, 1, 0.9);
    expect(p.selectWorker(ws, ctx)).toBe(ws[2]); // waiting 1, running 2, first in order
    ws[2].load = 1;
    expect(p.selectWorker(ws, ctx)).toBe(ws[3]); // same engine numbers, fewer in-flight
    report(ws[1], 8, 0, 0.9);
    expect(p.selectWorker(ws, ctx)).toBe(ws[1]); // fewest waiting beats everything
  });

  it('uses only fresh workers, and least in-flight when none is fresh', () => {
    const { deps, ws, report, clock } = setup();
    const p = new LeastWaitingPolicy(deps, { staleAfterMs: 1000 });
    report(ws[0], 5, 5, 0);
    report(ws[1], 0, 0, 0, clock.now() - 1500);
    expect(p.selectWorker(ws, ctx)).toBe(ws[0]);
    clock.advance(1001);
    ws[0].load = 1;
    ws[1].load = 1;
    expect(p.selectWorker(ws, ctx)).toBe(ws[2]); // all stale → least in-flight
  });

  it('picks a pair from the two pools', () => {
    const { deps, ws, report } = setup(2);
    const dec = [0, 1].map((i) => {
      const d = new Worker({ url: `http://d${i}:8000`, modelId: 'm', type: 'decode' });
      d.healthy = true;
      return d;
    });
    report(ws[1], 0, 0, 0);
    report(ws[0], 0, 4, 0);
    report(dec[0], 0, 2, 0);
    report(dec[1], 0, 1, 0);
    const pair = new LeastWaitingPolicy(deps).selectPair(ws, dec, ctx)!;
    expect(pair).toEqual({ prefill: ws[1], decode: dec[1] });
  });
});
