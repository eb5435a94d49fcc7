import { describe, expect, it } from 'vitest';
import { BlockIndex, hashBlocks } from '../../src/cache/block-index.js';
import { ManualClock } from '../../src/core/clock.js';
import type { RequestContext } from '../../src/core/context.js';
import { SeededRng } from '../../src/core/rng.js';
import { Worker } from '../../src/core/worker.js';
import type { KvCacheEvent } from '../../src/events/types.js';
import { AibrixPrefixPolicy } from '../../src/lab/peer-policies.js';

// The lab's reproduction of AIBrix's prefix-cache routing (docs/lab.md "Peer baselines").
const BS = 4;
const tokens = (n: number, from = 1) => Array.from({ length: n }, (_, i) => from + i);

function setup(n = 4) {
  const clock = new ManualClock(1000);
  const index = new BlockIndex({ blockSize: BS });
  const workers = Array.from({ length: n }, (_, i) => {
    const w = new Worker({ url: `http://w${i}:8000`, modelId: 'm' });
    w.healthy = true;
    return w;
  });
  const policy = new AibrixPrefixPolicy({ clock, rng: new SeededRng(3) }, { index, lastEventAtMs: () => clock.now(), isAccurate: () => true, resetCount: () => 0 });
  const store = (i: number, toks: number[]) => {
    const hashes = hashBlocks(toks, BS).map((_, b) => BigInt(1000 * (i + 1) + b + 1));
    const ev: KvCacheEvent = { type: 'stored', blockHashes: hashes, parentBlockHash: null, tokenIds: toks.slice(0, hashes.length * BS), blockSize: BS, medium: 'GPU', loraName: null };
    index.apply(workers[i].id, [ev]);
  };
  let id = 0;
  const ctx = (toks: number[]): RequestContext => ({ requestId: `r${id++}`, route: 'completions', model: 'm', routingText: toks.join(' '), tokenIds: toks, headers: {}, stream: true, arrivalMs: clock.now() });
  return { workers, policy, store, ctx };
}

describe('peer_aibrix (lab reproduction of AIBrix prefix-cache routing)', () => {
  it('takes the pod with the highest match percent', () => {
    const { workers, policy, store, ctx } = setup();
    const prompt = tokens(400);
    store(1, prompt.slice(0, 200));
    store(3, prompt.slice(0, 320));
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[3]);
  });

  it('breaks ties between pods with the same integer match percent and load at random (AIBrix shuffles before its stable sort), not by position', () => {
    const { workers, policy, store, ctx } = setup();
    const prompt = tokens(400); // 100 blocks
    // Every pod holds the first block (a shared template): 1% each, equal loads.
    for (let i = 0; i < workers.length; i++) store(i, prompt.slice(0, BS));
    const picks = new Map<string, number>();
    for (let r = 0; r < 400; r++) {
      const w = policy.selectWorker(workers, ctx(prompt))!;
      picks.set(w.id, (picks.get(w.id) ?? 0) + 1);
    }
    // A position-ordered sort gives all 400 to the first pod.
    expect(picks.size).toBe(4);
    for (const n of picks.values()) expect(n).toBeGreaterThan(50);
    expect(policy.explain(workers, ctx(prompt))).toMatchObject({ rule: 'prefix_match', deterministic: false, chosen: undefined });
  });

  it('counts the match as AIBrix does, in whole percent: 99 of 400 blocks and 99.5 of 400 are a tie, broken by load', () => {
    const { workers, policy, store, ctx } = setup(2);
    const prompt = tokens(1600); // 400 blocks
    store(0, prompt.slice(0, 398 * BS)); // 99.5% → 99
    store(1, prompt.slice(0, 396 * BS)); // 99.0% → 99
    workers[0].load = 1;
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[1]);
    workers[0].load = 0;
    workers[1].load = 1;
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[0]);
  });
});

describe('peer_aibrix load gate and spread bound (AIBrix code defaults)', () => {
  it('matches only among the least busy pods when the busiest runs more than 2 × (mean + 1) and at least 8 more', () => {
    const { workers, policy, store, ctx } = setup();
    const prompt = tokens(400);
    store(0, prompt.slice(0, 360)); // the best match, on the busy pod
    store(2, prompt.slice(0, 40));
    workers[0].load = 12; // mean 3: 12 > 2 × 4 and 12 − 0 ≥ 8
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[2]);
    expect(policy.explain(workers, ctx(prompt))).toMatchObject({ rule: 'imbalance_prefix_match', chosen: workers[2].id });
    workers[0].load = 7; // 7 ≤ 2 × (1.75 + 1): no gate, but 7 > mean + 1σ (1.75 + 3.03): not the holder either
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[2]);
    workers[0].load = 1; // [1, 0, 0, 0]: mean + 1σ = 0.68, so even one request more than the others excludes the holder
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[2]);
    for (const w of workers) w.load = 1; // equal loads: the holder
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[0]);
  });
});
