import { describe, expect, it } from 'vitest';
import { CircuitBreaker } from '../../src/core/circuit-breaker.js';
import { ManualClock } from '../../src/core/clock.js';
import type { RequestContext } from '../../src/core/context.js';
import { SeededRng } from '../../src/core/rng.js';
import { Worker } from '../../src/core/worker.js';
import { createPolicy, withSessionAffinity } from '../../src/policies/factory.js';
import { rendezvous } from '../../src/policies/manual.js';

function mkWorkers(n: number, from = 0): Worker[] {
  return Array.from({ length: n }, (_, i) => {
    const w = new Worker({ url: `http://w${from + i}:8000`, modelId: 'm' });
    w.healthy = true;
    return w;
  });
}

const ctx = (headers: Record<string, string> = {}): RequestContext => ({
  requestId: 'r',
  route: 'chat',
  model: 'm',
  routingText: 'x',
  headers,
  stream: false,
  arrivalMs: 0,
});

describe('manual policy (X-SMG-Routing-Key)', () => {
  it('maps a key to one worker, spreads keys, and moves only the keys of a worker that leaves or joins', () => {
    const ws = mkWorkers(4);
    const p = createPolicy('manual', { clock: new ManualClock(), rng: new SeededRng(1) });
    const keys = Array.from({ length: 400 }, (_, i) => `k${i}`);
    const owner = (cands: Worker[], k: string) => p.selectWorker(cands, ctx({ 'x-smg-routing-key': k }))!;
    const before = new Map(keys.map((k) => [k, owner(ws, k)]));
    for (const k of keys) expect(owner(ws, k)).toBe(before.get(k));
    const per = ws.map((w) => [...before.values()].filter((x) => x === w).length);
    for (const n of per) expect(n).toBeGreaterThan(60); // 100 each on average
    // Worker 1 fails: only its keys move; the others stay put.
    ws[1].healthy = false;
    for (const k of keys) {
      const now = owner(ws, k);
      if (before.get(k) !== ws[1]) expect(now).toBe(before.get(k));
      else expect(now).not.toBe(ws[1]);
    }
    ws[1].healthy = true;
    // A fifth worker joins: a key either stays or moves to it (about 1/5 of them).
    const grown = [...ws, ...mkWorkers(1, 4)];
    let moved = 0;
    for (const k of keys) {
      const now = owner(grown, k);
      if (now !== before.get(k)) {
        expect(now).toBe(grown[4]);
        moved++;
      }
    }
    expect(moved).toBeGreaterThan(40);
    expect(moved).toBeLessThan(130);
    expect(rendezvous('k', [])).toBeUndefined();
  });

  it('without the header uses the fallback (random) over available workers', () => {
    const ws = mkWorkers(3);
    ws[0].healthy = false;
    const p = createPolicy('manual', { clock: new ManualClock(), rng: new SeededRng(3) });
    const seen = new Set<Worker>();
    for (let i = 0; i < 50; i++) seen.add(p.selectWorker(ws, ctx())!);
    expect(seen).toEqual(new Set([ws[1], ws[2]]));
  });
});

describe('session affinity on top of any policy', () => {
  it('binds a session to the first worker chosen, re-binds when it goes, expires after the TTL', () => {
    const clock = new ManualClock();
    const deps = { clock, rng: new SeededRng(1) };
    const p = withSessionAffinity(createPolicy('round_robin', deps), deps, 'X-Session-ID', 10);
    const ws = mkWorkers(3);
    const s = ctx({ 'x-session-id': 'abc' });
    const first = p.selectWorker(ws, s)!;
    for (let i = 0; i < 5; i++) expect(p.selectWorker(ws, s)).toBe(first);
    // Without the header: round robin as usual.
    const free = new Set([0, 1, 2].map(() => p.selectWorker(ws, ctx())));
    expect(free.size).toBe(3);
    // The bound worker fails: re-bound to another, which then sticks.
    first.healthy = false;
    const second = p.selectWorker(ws, s)!;
    expect(second).not.toBe(first);
    first.healthy = true;
    expect(p.selectWorker(ws, s)).toBe(second);
    // Idle past the TTL: chosen afresh by the inner policy (round robin moves on).
    clock.advance(10_001);
    const choices = new Set([p.selectWorker(ws, s), (clock.advance(10_001), p.selectWorker(ws, s))]);
    expect(choices.size).toBe(2);
    // Removal of the bound worker forgets the binding.
    const bound = p.selectWorker(ws, s)!;
    p.onWorkerRemoved?.(bound);
    expect(p.selectWorker(ws.filter((w) => w !== bound), s)).not.toBe(bound);
  });
});

describe('circuit breaker window (--cb-window-duration-secs)', () => {
  it('counts only the failures within the window', () => {
    const clock = new ManualClock();
    const b = new CircuitBreaker({ failureThreshold: 3, successThreshold: 1, openMs: 1000, disabled: false, windowMs: 10_000 }, clock);
    b.recordFailure();
    clock.advance(6000);
    b.recordFailure();
    clock.advance(6000); // the first failure is now 12 s old
    b.recordFailure();
    expect(b.state).toBe('closed');
    b.recordFailure();
    expect(b.state).toBe('open');
    const noWindow = new CircuitBreaker({ failureThreshold: 3, successThreshold: 1, openMs: 1000, disabled: false }, clock);
    for (let i = 0; i < 3; i++) {
      noWindow.recordFailure();
      clock.advance(60_000);
    }
    expect(noWindow.state).not.toBe('closed');
  });
});
