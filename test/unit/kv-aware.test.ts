import { describe, expect, it } from 'vitest';
import { BlockIndex, hashBlocks, hashBlocksU64, LOCAL_HASH_SEED, loraSeed, sequenceHashes } from '../../src/cache/block-index.js';
import { ManualClock } from '../../src/core/clock.js';
import type { RequestContext } from '../../src/core/context.js';
import { SeededRng } from '../../src/core/rng.js';
import { Worker } from '../../src/core/worker.js';
import type { KvCacheEvent } from '../../src/events/types.js';
import { blockKeys, defaultKvAwareConfig, KvAwarePolicy, type KvAwareConfig } from '../../src/policies/kv-aware.js';

const BS = 4;
const tokens = (n: number, from = 1) => Array.from({ length: n }, (_, i) => from + i);

function setup(over: Partial<KvAwareConfig> = {}, n = 3) {
  const clock = new ManualClock(1000);
  const index = new BlockIndex({ blockSize: BS });
  const last = new Map<string, number>();
  const resets = new Map<string, number>();
  const workers = Array.from({ length: n }, (_, i) => {
    const w = new Worker({ url: `http://w${i}:8000`, modelId: 'm' });
    w.healthy = true;
    return w;
  });
  const policy = new KvAwarePolicy(
    { clock, rng: new SeededRng(1) },
    { index, lastEventAtMs: (id) => last.get(id), isAccurate: () => true, resetCount: (id) => resets.get(id) ?? 0 },
    { ...defaultKvAwareConfig, evictionIntervalSecs: 0, defaultBlockSize: BS, historyWeight: 0, ...over },
  );
  /** The engine of worker i stored these tokens (full blocks) — as its KV events would say. */
  const store = (i: number, toks: number[]) => {
    const hashes = hashBlocks(toks, BS).map((_, b) => BigInt(1000 * (i + 1) + b + 1));
    const ev: KvCacheEvent = { type: 'stored', blockHashes: hashes, parentBlockHash: null, tokenIds: toks.slice(0, hashes.length * BS), blockSize: BS, medium: 'GPU', loraName: null };
    index.apply(workers[i].id, [ev]);
    last.set(workers[i].id, clock.now());
  };
  const clear = (i: number) => {
    index.apply(workers[i].id, [{ type: 'cleared' }]);
    resets.set(workers[i].id, (resets.get(workers[i].id) ?? 0) + 1);
    last.set(workers[i].id, clock.now());
  };
  for (let i = 0; i < n; i++) last.set(workers[i].id, clock.now()); // every worker's events are live
  let id = 0;
  const ctx = (toks: number[]): RequestContext => ({ requestId: `r${id++}`, route: 'completions', model: 'm', routingText: toks.join(' '), tokenIds: toks, headers: {}, stream: true, arrivalMs: clock.now() });
  return { clock, index, workers, policy, store, clear, ctx, last };
}

describe('kv_aware', () => {
  it('goes to the worker holding the longest prefix (from its events)', () => {
    const { workers, policy, store, ctx } = setup();
    const prompt = tokens(40);
    store(1, prompt.slice(0, 20));
    store(2, prompt.slice(0, 36));
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[2]);
    expect(policy.lastDecision).toMatchObject({ overlapBlocks: 9, requestBlocks: 10, fallback: false });
  });

  it('trades cache for load: enough pending prefill on the holder sends the request elsewhere', () => {
    const { workers, policy, store, ctx } = setup({ overlapWeight: 1 });
    const prompt = tokens(40);
    store(0, prompt);
    const busy = [policy.selectWorker([workers[0]], ctx(tokens(400, 5000)))]; // 100 blocks of prefill pending on w0
    expect(busy[0]).toBe(workers[0]);
    expect(policy.activeOf(workers[0].id).pendingPrefillTokens).toBe(400);
    expect(policy.selectWorker(workers, ctx(prompt))).not.toBe(workers[0]);
  });

  it('counts as new exactly the blocks not in flight on the worker (a shared in-flight prefix is not new)', () => {
    const { workers, policy, ctx } = setup();
    const first = tokens(80); // 20 blocks
    const c1 = ctx(first);
    const w = policy.selectWorker([workers[0]], c1)!;
    // 12 blocks shared with the request in flight, then 8 of its own, then a partial block.
    const second = [...first.slice(0, 48), ...tokens(34, 9000)];
    const terms = policy.explain([w], ctx(second)).candidates[0].terms as Record<string, number>;
    expect(terms.in_flight_prefix_blocks).toBe(12);
    expect(terms.new_blocks).toBe(Math.ceil(second.length / 4) - 12);
    policy.onRequestComplete(w, c1);
    const after = policy.explain([w], ctx(second)).candidates[0].terms as Record<string, number>;
    expect(after.new_blocks).toBe(Math.ceil(second.length / 4));
  });

  it('tracks in-flight work: prefill done at the first token, everything freed at the end', () => {
    const { workers, policy, ctx } = setup();
    const c = ctx(tokens(41)); // 10 full blocks + a partial one
    const w = policy.selectWorker(workers, c)!;
    expect(policy.activeOf(w.id)).toEqual({ requests: 1, blocks: 10, pendingPrefillTokens: 41 });
    policy.onFirstToken(w, c);
    expect(policy.activeOf(w.id).pendingPrefillTokens).toBe(0);
    policy.onRequestComplete(w, c);
    expect(policy.activeOf(w.id)).toEqual({ requests: 0, blocks: 0, pendingPrefillTokens: 0 });
  });

  it('counts blocks in flight on a worker as cached there (their events have not arrived yet)', () => {
    const { workers, policy, ctx } = setup();
    const prompt = tokens(64);
    const first = policy.selectWorker(workers, ctx(prompt))!;
    // The twin arrives before the first one's prefill produced events: it joins the same worker.
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(first);
    expect(policy.lastDecision!.overlapBlocks).toBe(16);
  });

  it('breaks cost ties toward the emptier cache, then at random', () => {
    const { workers, policy, store, ctx } = setup();
    store(0, tokens(20, 900));
    store(1, tokens(8, 700));
    // A prompt nobody holds: equal costs; w2 holds nothing at all.
    expect(policy.selectWorker(workers, ctx(tokens(16, 50)))).toBe(workers[2]);
  });

  it('samples with temperature instead of always taking the argmin', () => {
    const { workers, policy, store, ctx } = setup({ temperature: 5 });
    const prompt = tokens(40);
    store(0, prompt);
    const picks = new Set<string>();
    for (let i = 0; i < 200; i++) {
      const c = ctx(prompt);
      const w = policy.selectWorker(workers, c)!;
      picks.add(w.id);
      policy.onRequestComplete(w, c);
    }
    expect(picks.size).toBeGreaterThan(1);
  });

  it('routes a worker with stale or absent events on its routing history, and says so', () => {
    const { clock, workers, policy, ctx, last } = setup({ historyWeight: 1, staleAfterMs: 100 });
    last.delete(workers[0].id);
    last.delete(workers[1].id);
    last.delete(workers[2].id); // no worker has ever sent an event
    const prompt = tokens(40);
    const a = ctx(prompt);
    const first = policy.selectWorker(workers, a)!;
    policy.onRequestComplete(first, a);
    clock.advance(1000);
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(first);
    expect(policy.lastDecision!.fallback).toBe(true);
    expect(policy.lastDecision!.overlapBlocks).toBe(10);
  });

  it('forgets a worker whose cache was cleared: no more pull from its history', () => {
    const { workers, policy, store, clear, ctx } = setup({ historyWeight: 1 });
    const prompt = tokens(40);
    store(0, prompt);
    const c = ctx(prompt);
    expect(policy.selectWorker(workers, c)).toBe(workers[0]);
    policy.onRequestComplete(workers[0], c);
    store(1, prompt.slice(0, 20)); // half of it elsewhere
    clear(0);
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[1]);
    expect(policy.lastDecision!.overlapBlocks).toBe(5);
  });

  it('skips unavailable workers even when they hold the prefix', () => {
    const { workers, policy, store, ctx } = setup();
    const prompt = tokens(40);
    store(0, prompt);
    workers[0].healthy = false;
    expect(policy.selectWorker(workers, ctx(prompt))).not.toBe(workers[0]);
  });
});

describe('kv_aware with block hashes computed off the event loop (ctx.blockHashes)', () => {
  it('asks for its block size and the LoRA seed', () => {
    const { policy, ctx } = setup();
    expect(policy.blockHashing(ctx(tokens(8)))).toEqual({ blockSize: BS, seed: LOCAL_HASH_SEED });
    expect(policy.blockHashing({ ...ctx(tokens(8)), loraName: 'a' })).toEqual({ blockSize: BS, seed: loraSeed('a') });
  });

  it('hashBlocksU64 / sequenceHashes give hashBlocks\' values', () => {
    const t = tokens(1000, 7);
    for (const seed of [LOCAL_HASH_SEED, loraSeed('x')]) {
      const local = hashBlocksU64(t, 16, seed);
      expect(Array.from(local)).toEqual(hashBlocks(t, 16, seed));
      expect(sequenceHashes(local).length).toBe(local.length);
    }
  });

  it('decides the same with the given hashes as with its own, and uses them only for its block size and seed', () => {
    const a = setup();
    const b = setup();
    const prompt = tokens(40);
    for (const s of [a, b]) {
      s.store(1, prompt.slice(0, 20));
      s.store(2, prompt.slice(0, 36));
    }
    const local = hashBlocksU64(prompt, BS);
    const given = { blockSize: BS, seed: LOCAL_HASH_SEED, local, seq: sequenceHashes(local) };
    expect(b.policy.selectWorker(b.workers, { ...b.ctx(prompt), blockHashes: given })!.id).toBe(a.policy.selectWorker(a.workers, a.ctx(prompt))!.id);
    expect(b.policy.lastDecision).toMatchObject({ overlapBlocks: 9, requestBlocks: 10 });
    expect({ ...b.policy.lastDecision, worker: undefined }).toEqual({ ...a.policy.lastDecision, worker: undefined });
    expect(b.policy.activeOf(b.workers[2].id)).toEqual(a.policy.activeOf(a.workers[2].id));
    // Hashes that match nothing are used as they are when block size and seed agree (so they are read)...
    const bogus = new BigUint64Array(local.length).fill(42n);
    const decide = (blockSize: number, seed: bigint) => {
      const c = setup();
      c.store(2, prompt.slice(0, 36));
      c.policy.selectWorker(c.workers, { ...c.ctx(prompt), blockHashes: { blockSize, seed, local: bogus, seq: bogus } });
      return { worker: c.policy.lastDecision!.worker.id, overlapBlocks: c.policy.lastDecision!.overlapBlocks };
    };
    expect(decide(BS, LOCAL_HASH_SEED).overlapBlocks).toBe(0);
    // ...and ignored for another block size or seed (hashed here instead).
    expect(decide(BS * 2, LOCAL_HASH_SEED)).toEqual({ worker: 'http://w2:8000', overlapBlocks: 9 });
    expect(decide(BS, loraSeed('other'))).toEqual({ worker: 'http://w2:8000', overlapBlocks: 9 });
  });
});

describe('kv_aware in-flight block keys', () => {
  it('are the low 30 bits of each sequence hash, read without bigints', () => {
    const tokens = Array.from({ length: 4096 }, (_, i) => (i * 7919) % 151_000);
    const seq = sequenceHashes(hashBlocks(tokens, 16, 0n));
    const keys = blockKeys(seq);
    expect(keys.length).toBe(seq.length);
    for (let k = 0; k < seq.length; k++) expect(keys[k]).toBe(Number(seq[k] & 0x3fffffffn));
    // From a view at an offset too (hashes handed over from the tokenizer thread share a buffer).
    const big = new BigUint64Array(seq.length + 3);
    big.set(seq, 3);
    expect([...blockKeys(big.subarray(3))]).toEqual([...keys]);
    expect(new Set(keys).size).toBe(new Set(seq).size);
  });
});
