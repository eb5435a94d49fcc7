import { describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import type { RequestContext } from '../../src/core/context.js';
import { SeededRng } from '../../src/core/rng.js';
import { Worker } from '../../src/core/worker.js';
import { CacheAwarePolicy, defaultCacheAwareConfig } from '../../src/policies/cache-aware.js';
import { createPolicy, POLICY_NAMES } from '../../src/policies/factory.js';
import type { PolicyDeps } from '../../src/policies/policy.js';
import { BlockIndex } from '../../src/cache/block-index.js';

/** What the host gives kv_aware: an index (empty here: no engine events), so it routes on history. */
const hostOptions = () => ({ kvIndex: { index: new BlockIndex(), lastEventAtMs: () => undefined, isAccurate: () => true, resetCount: () => 0 } });

const deps = (seed = 1): PolicyDeps => ({ clock: new ManualClock(), rng: new SeededRng(seed) });

function mkWorkers(n: number, model = 'm'): Worker[] {
  return Array.from({ length: n }, (_, i) => {
    const w = new Worker({ url: `http://${model}-w${i}:8000`, modelId: model });
    w.healthy = true;
    return w;
  });
}

const ctx = (text: string, model = 'm'): RequestContext => ({
  requestId: 'r',
  route: 'chat',
  model,
  routingText: text,
  headers: {},
  stream: false,
  arrivalMs: 0,
});

describe('every policy', () => {
  it.each(POLICY_NAMES)('%s skips unhealthy workers and returns undefined when none is healthy', (name) => {
    const ws = mkWorkers(4);
    ws[0].healthy = false;
    ws[2].healthy = false;
    const p = createPolicy(name, deps(), hostOptions());
    for (let i = 0; i < 200; i++) {
      const w = p.selectWorker(ws, ctx(`text ${i % 7}`))!;
      expect([ws[1], ws[3]]).toContain(w);
    }
    for (const w of ws) w.healthy = false;
    expect(p.selectWorker(ws, ctx('x'))).toBeUndefined();
    expect(p.selectWorker([], ctx('x'))).toBeUndefined();
    p.close?.();
  });

  it.each(POLICY_NAMES)('%s picks a prefill/decode pair from the two pools', (name) => {
    const pre = mkWorkers(2);
    const dec = mkWorkers(2).map((w, i) => {
      const d = new Worker({ url: `http://d${i}:8000`, modelId: 'm', type: 'decode' });
      d.healthy = true;
      return d;
    });
    const pair = createPolicy(name, deps(), hostOptions()).selectPair(pre, dec, ctx('hello'))!;
    expect(pre).toContain(pair.prefill);
    expect(dec).toContain(pair.decode);
  });
});

describe('random', () => {
  it('reaches every healthy worker and is reproducible for a seed', () => {
    const ws = mkWorkers(3);
    const picks = (seed: number) => Array.from({ length: 60 }, () => createPolicy('random', deps(seed))).map((p) => p.selectWorker(ws, ctx('')));
    const a = createPolicy('random', deps(5));
    const b = createPolicy('random', deps(5));
    const sa = Array.from({ length: 100 }, () => a.selectWorker(ws, ctx(''))!.id);
    const sb = Array.from({ length: 100 }, () => b.selectWorker(ws, ctx(''))!.id);
    expect(sa).toEqual(sb);
    expect(new Set(sa).size).toBe(3);
    expect(picks(1).length).toBe(60);
  });
});

describe('round_robin', () => {
  it('cycles w0, w1, w2, w0 and skips an unhealthy worker', () => {
    const ws = mkWorkers(3);
    const p = createPolicy('round_robin', deps());
    expect(Array.from({ length: 4 }, () => p.selectWorker(ws, ctx(''))!.id)).toEqual([ws[0].id, ws[1].id, ws[2].id, ws[0].id]);
    ws[1].healthy = false;
    const seq = Array.from({ length: 6 }, () => p.selectWorker(ws, ctx(''))!.id);
    expect(seq).not.toContain(ws[1].id);
    expect(new Set(seq).size).toBe(2);
  });
});

describe('power_of_two', () => {
  it('returns the only healthy worker, and the lower-loaded of two', () => {
    const ws = mkWorkers(2);
    const p = createPolicy('power_of_two', deps());
    ws[0].load = 5;
    ws[1].load = 1;
    for (let i = 0; i < 50; i++) expect(p.selectWorker(ws, ctx(''))).toBe(ws[1]);
    ws[1].healthy = false;
    expect(p.selectWorker(ws, ctx(''))).toBe(ws[0]);
  });

  it('never picks the most loaded of three workers (it always loses to the other sample)', () => {
    const ws = mkWorkers(3);
    ws[0].load = 10;
    const p = createPolicy('power_of_two', deps(3));
    const picks = Array.from({ length: 300 }, () => p.selectWorker(ws, ctx(''))!);
    expect(picks).not.toContain(ws[0]);
    expect(new Set(picks).size).toBe(2);
  });
});

describe('least_load', () => {
  it('picks fewest in-flight, ties by fewest processed, then order', () => {
    const ws = mkWorkers(3);
    const p = createPolicy('least_load', deps());
    ws[0].load = 2;
    ws[1].load = 1;
    ws[2].load = 1;
    ws[1].processed = 10;
    ws[2].processed = 3;
    expect(p.selectWorker(ws, ctx(''))).toBe(ws[2]);
    ws[2].processed = 10;
    expect(p.selectWorker(ws, ctx(''))).toBe(ws[1]);
  });
});

describe('cache_aware', () => {
  const mk = (over: Partial<typeof defaultCacheAwareConfig> = {}) =>
    new CacheAwarePolicy(deps(), { ...defaultCacheAwareConfig, evictionIntervalSecs: 0, ...over });

  it('sends the same prompt and its extensions to the same worker when balanced', () => {
    const ws = mkWorkers(3);
    const p = mk();
    const base = 'System: you are helpful. '.repeat(10);
    const first = p.selectWorker(ws, ctx(base))!;
    first.load = 1; // still balanced under the default thresholds
    expect(p.selectWorker(ws, ctx(base))).toBe(first);
    expect(p.selectWorker(ws, ctx(base + ' and one more question'))).toBe(first);
  });

  it('on a miss picks the least-loaded worker, not a fixed one', () => {
    const ws = mkWorkers(3);
    const p = mk();
    ws[0].load = 3;
    ws[1].load = 0;
    ws[2].load = 2;
    expect(p.selectWorker(ws, ctx('completely new text'))).toBe(ws[1]);
  });

  it('under imbalance picks the least-loaded worker whatever the match, and still records the text for it', () => {
    const ws = mkWorkers(2);
    const p = mk({ balanceAbsThreshold: 4, balanceRelThreshold: 1.5 });
    const text = 'shared prefix '.repeat(20);
    const owner = p.selectWorker(ws, ctx(text))!;
    const other = ws.find((w) => w !== owner)!;
    owner.load = 10;
    other.load = 0;
    expect(p.selectWorker(ws, ctx(text))).toBe(other);
    owner.load = 0;
    other.load = 0;
    // The text is now under both; the match still resolves to a worker holding it.
    expect([owner, other]).toContain(p.selectWorker(ws, ctx(text)));
    expect(p.treeChars().get(other.id)).toBe([...text].length);
  });

  it('never returns an unhealthy matched worker', () => {
    const ws = mkWorkers(2);
    const p = mk();
    const text = 'abcdefghij'.repeat(20);
    const owner = p.selectWorker(ws, ctx(text))!;
    owner.healthy = false;
    const w = p.selectWorker(ws, ctx(text));
    expect(w).toBeDefined();
    expect(w).not.toBe(owner);
  });

  it('keeps a tree per model and forgets a removed worker', () => {
    const ws = mkWorkers(2, 'a');
    const p = mk();
    const text = 'model a prompt '.repeat(5);
    const owner = p.selectWorker(ws, ctx(text, 'a'))!;
    expect(p.treeChars().get(owner.id)).toBe(text.length);
    const wb = mkWorkers(1, 'b');
    p.selectWorker(wb, ctx(text, 'b'));
    expect(p.treeChars().get(wb[0].id)).toBe(text.length);
    p.onWorkerRemoved(owner);
    expect(p.treeChars().get(owner.id) ?? 0).toBe(0);
  });

  it('counts characters as code points and evicts to the per-worker cap on its schedule', () => {
    let tick: (() => void) | undefined;
    const p = new CacheAwarePolicy(
      { ...deps(), schedule: (_ms, fn) => ((tick = fn), () => (tick = undefined)) },
      { ...defaultCacheAwareConfig, evictionIntervalSecs: 1, maxTreeSize: 10 },
    );
    const ws = mkWorkers(1);
    p.selectWorker(ws, ctx('你好世界👋🌍 and more text here'));
    expect(p.treeChars().get(ws[0].id)).toBe([...'你好世界👋🌍 and more text here'].length);
    tick!();
    expect(p.treeChars().get(ws[0].id)).toBeLessThanOrEqual(10);
    p.close();
    expect(tick).toBeUndefined();
  });
});

describe('cache_aware with a prefix held by several workers', () => {
  it('sends it to the least loaded holder, not always the same one', () => {
    const ws = mkWorkers(3);
    const p = new CacheAwarePolicy(deps(), { ...defaultCacheAwareConfig, evictionIntervalSecs: 0, balanceAbsThreshold: 2, balanceRelThreshold: 1.5 });
    const text = 'a hot system prompt shared by many users. '.repeat(10);
    const first = p.selectWorker(ws, ctx(text))!;
    first.load = 10; // imbalance: the next request spreads the prefix to the least loaded worker
    const second = p.selectWorker(ws, ctx(text))!;
    expect(second).not.toBe(first);
    // Balanced again, but both hold the prefix: the less loaded holder wins.
    first.load = 3;
    second.load = 2;
    const third = ws.find((w) => w !== first && w !== second)!;
    third.load = 2;
    expect(p.selectWorker(ws, ctx(text))).toBe(second);
    second.load = 4;
    expect(p.selectWorker(ws, ctx(text))).toBe(first);
  });
});

describe('round_robin pairs', () => {
  it('cycles each pool on its own: 2 prefill × 2 decode workers all get traffic', () => {
    const pre = mkWorkers(2, 'p');
    const dec = mkWorkers(2, 'd');
    const p = createPolicy('round_robin', deps());
    const pairs = Array.from({ length: 4 }, () => p.selectPair(pre, dec, ctx('x'))!);
    expect(new Set(pairs.map((x) => x.prefill.id)).size).toBe(2);
    expect(new Set(pairs.map((x) => x.decode.id)).size).toBe(2);
  });
});
