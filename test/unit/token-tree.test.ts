import { describe, expect, it } from 'vitest';
import { SeededRng } from '../../src/core/rng.js';
import { TokenTree } from '../../src/cache/token-tree.js';

const range = (from: number, n: number): number[] => Array.from({ length: n }, (_, i) => from + i);

describe('TokenTree: matching', () => {
  it('matches the longest prefix per worker, counting partial edges', () => {
    const t = new TokenTree({ windowMs: 10_000 });
    t.insert([1, 2, 3, 4], 'A', 0);
    let m = t.match([1, 2, 3, 4, 5]);
    expect(m.matchedTokens).toBe(4);
    expect([...m.holders]).toEqual([['A', 4]]);

    t.insert([1, 2, 9], 'B', 1); // splits the [1,2,3,4] edge after 2 tokens
    m = t.match([1, 2, 3]);
    expect(m.matchedTokens).toBe(3);
    expect(m.holders.get('A')).toBe(3);
    expect(m.holders.get('B')).toBe(2);

    m = t.match([1, 2, 9, 9]);
    expect(m.matchedTokens).toBe(3);
    expect(m.holders.get('A')).toBe(2);
    expect(m.holders.get('B')).toBe(3);

    m = t.match([7, 1, 2]);
    expect(m.matchedTokens).toBe(0);
    expect(m.holders.size).toBe(0);
    expect(t.match([]).matchedTokens).toBe(0);
    expect(t.size).toBe(3); // [1,2] → [3,4], [9]
    expect(t.tokens).toBe(5);
  });

  it('accepts plain arrays and typed arrays alike and stores ids as uint32', () => {
    const t = new TokenTree({ windowMs: 1000 });
    t.insert(new Uint32Array([100_000, 200_000, 4_000_000_000]), 'A', 0);
    expect(t.match([100_000, 200_000, 4_000_000_000]).matchedTokens).toBe(3);
    expect(t.match(new Int32Array([100_000, 200_000])).matchedTokens).toBe(2);
  });

  it('counts hits per node and per worker; a split copies the history to both halves', () => {
    const t = new TokenTree({ windowMs: 60_000 });
    t.insert([1, 2, 3, 4], 'A', 0);
    t.insert([1, 2, 3, 4], 'A', 10);
    t.insert([1, 2, 5], 'A', 20);
    t.insert([1, 2, 5], 'B', 30);
    expect(t.nodeHits([1, 2], 'A', 30)).toBe(3);
    expect(t.nodeHits([1, 2], 'B', 30)).toBe(1);
    expect(t.nodeHits([1, 2, 3, 4], 'A', 30)).toBe(2);
    expect(t.nodeHits([1, 2, 5], 'B', 30)).toBe(1);
    expect(t.nodeHits([1, 2, 3], 'A', 30)).toBe(0); // not a node boundary
    expect(t.recentRequests('A', 30)).toBe(3);
    expect(t.recentRequests('B', 30)).toBe(1);
    expect(t.recentRequests('C', 30)).toBe(0);
  });

  it('does not pin the caller’s array (labels are copies)', () => {
    const t = new TokenTree({ windowMs: 1000 });
    const toks = [5, 6, 7];
    t.insert(toks, 'A', 0);
    toks[1] = 99;
    expect(t.match([5, 6, 7]).matchedTokens).toBe(3);
  });
});

describe('TokenTree: sliding window', () => {
  it('a hit stays for windowMs (up to one bucket more), then match ignores it and expire drops it', () => {
    const t = new TokenTree({ windowMs: 180_000, bucketMs: 1000 });
    t.insert(range(1, 100), 'A', 0);
    t.insert([...range(1, 50), ...range(500, 50)], 'B', 100_000);
    expect(t.match(range(1, 100), 179_999).holders.get('A')).toBe(100);
    // A's bucket [0, 1000) leaves the window when now - 180 000 >= 1000.
    const later = t.match(range(1, 100), 181_000);
    expect(later.holders.has('A')).toBe(false);
    expect(later.holders.get('B')).toBe(50);
    expect(later.matchedTokens).toBe(50);
    // Without nowMs, match sees everything not yet expired.
    expect(t.match(range(1, 100)).holders.get('A')).toBe(100);

    const nodesBefore = t.size;
    expect(nodesBefore).toBe(3);
    expect(t.expire(181_000)).toBe(1); // A's private suffix node
    expect(t.size).toBe(2);
    expect(t.tokens).toBe(100);
    expect(t.match(range(1, 100)).holders.has('A')).toBe(false);
    expect(t.recentRequests('A', 181_000)).toBe(0);
    expect(t.recentRequests('B', 181_000)).toBe(1);

    t.expire(281_000);
    expect(t.size).toBe(0);
    expect(t.tokens).toBe(0);
    expect(t.stats()).toMatchObject({ nodes: 0, tokens: 0, records: 0, buckets: 0, workers: 0 });
  });

  it('a node stays while any worker still has a hit on it', () => {
    const t = new TokenTree({ windowMs: 1000, bucketMs: 10 });
    t.insert([1, 2, 3], 'A', 0);
    t.insert([1, 2, 3], 'A', 900);
    t.expire(1500);
    expect(t.match([1, 2, 3]).holders.get('A')).toBe(3);
    expect(t.nodeHits([1, 2, 3], 'A', 1500)).toBe(1);
    t.expire(1910);
    expect(t.size).toBe(0);
  });
});

describe('TokenTree: removal and bounded memory', () => {
  it('removeWorker drops the worker and the nodes only it held', () => {
    const t = new TokenTree({ windowMs: 10_000 });
    t.insert([1, 2, 3], 'A', 0);
    t.insert([1, 2, 4], 'B', 0);
    t.insert([9, 9], 'A', 0);
    expect(t.size).toBe(4);
    t.removeWorker('A');
    expect(t.size).toBe(2);
    const m = t.match([1, 2, 3]);
    expect([...m.holders]).toEqual([['B', 2]]);
    expect(t.match([9, 9]).matchedTokens).toBe(0);
    expect(t.recentRequests('A', 0)).toBe(0);
    t.removeWorker('B');
    expect(t.size).toBe(0);
    expect(t.tokens).toBe(0);
  });

  it('stays bounded under a steady stream when expired periodically', () => {
    const windowMs = 5_000;
    const t = new TokenTree({ windowMs, bucketMs: 100 });
    const rng = new SeededRng(3);
    const prefixes = Array.from({ length: 20 }, (_, p) => range(p * 10_000, 200));
    let maxNodes = 0;
    let maxTokens = 0;
    let lastExpire = 0;
    // 20 000 requests, one every 10 ms (100 req/s, 500 per window): shared prefixes + unique tails.
    for (let i = 0; i < 20_000; i++) {
      const now = i * 10;
      const toks = [...prefixes[rng.int(20)], ...range(1_000_000 + i * 100, 50 + rng.int(50))];
      t.insert(toks, `w${rng.int(4)}`, now);
      if (now - lastExpire >= 1000) {
        t.expire(now);
        lastExpire = now;
      }
      maxNodes = Math.max(maxNodes, t.size);
      maxTokens = Math.max(maxTokens, t.tokens);
    }
    // At most (window + expiry period + bucket) of requests are alive: 610 requests, ≤ 2 nodes each
    // (a unique tail plus at most one split), ≤ 100 tail tokens each, plus the 20 prefixes.
    expect(maxNodes).toBeLessThanOrEqual(2 * 610 + 20);
    expect(maxTokens).toBeLessThanOrEqual(610 * 100 + 20 * 200);
    const s = t.stats();
    expect(s.records).toBeLessThanOrEqual(s.nodes * 4);
    expect(s.buckets).toBeLessThanOrEqual(s.records * (windowMs / 100 + 1));
    expect(s.approxBytes).toBeGreaterThan(0);
    t.expire(20_000 * 10 + windowMs + 100);
    expect(t.stats()).toMatchObject({ nodes: 0, tokens: 0, records: 0, workers: 0 });
  });

  it('a busy hot node keeps O(window / bucket) counters, whatever the request rate', () => {
    const t = new TokenTree({ windowMs: 10_000, bucketMs: 1000 });
    for (let i = 0; i < 50_000; i++) t.insert([1, 2, 3], 'A', i); // 50 s at 1000 req/s
    t.expire(50_000);
    const s = t.stats();
    expect(s.nodes).toBe(1);
    expect(s.buckets).toBeLessThanOrEqual(11);
    expect(t.nodeHits([1, 2, 3], 'A', 50_000)).toBeGreaterThanOrEqual(9_000);
    expect(t.nodeHits([1, 2, 3], 'A', 50_000)).toBeLessThanOrEqual(11_000);
  });

  it('maxTokens caps label tokens, dropping least recently inserted leaves first', () => {
    const t = new TokenTree({ windowMs: 1e9, maxTokens: 1000 });
    for (let i = 0; i < 100; i++) {
      t.insert(range(i * 1000, 100), `w${i % 3}`, i);
      expect(t.tokens).toBeLessThanOrEqual(1000);
    }
    expect(t.match(range(99 * 1000, 100)).matchedTokens).toBe(100); // newest kept
    expect(t.match(range(0, 100)).matchedTokens).toBe(0); // oldest gone
    // Shared prefix: evicting a leaf keeps the parent while another leaf uses it.
    const c = new TokenTree({ windowMs: 1e9, maxTokens: 350 }); // evicts down to 90 % = 315
    c.insert([...range(0, 100), ...range(1000, 100)], 'A', 1);
    c.insert([...range(0, 100), ...range(2000, 100)], 'B', 2);
    c.insert(range(5000, 100), 'C', 3); // 400 tokens > 350 → drop A's tail (oldest leaf)
    expect(c.tokens).toBe(300);
    expect(c.match([...range(0, 100), ...range(2000, 100)]).holders.get('B')).toBe(200);
    expect(c.match([...range(0, 100), ...range(1000, 100)]).holders.get('A')).toBe(100);
  });

  it('validates options', () => {
    expect(() => new TokenTree({ windowMs: 0 })).toThrow(RangeError);
    expect(() => new TokenTree({ windowMs: 10, bucketMs: 0 })).toThrow(RangeError);
    expect(() => new TokenTree({ windowMs: 10, maxTokens: -1 })).toThrow(RangeError);
  });
});
