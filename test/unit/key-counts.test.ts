import { describe, expect, it } from 'vitest';
import { KeyCounts } from '../../src/policies/key-counts.js';

/** A Map<number, number> of refcounts: what KeyCounts replaces in kv_aware. */
function model() {
  const m = new Map<number, number>();
  return {
    m,
    add: (k: number) => m.set(k, (m.get(k) ?? 0) + 1),
    release: (k: number) => {
      const n = m.get(k);
      if (n === undefined) return;
      if (n === 1) m.delete(k);
      else m.set(k, n - 1);
    },
  };
}

describe('KeyCounts (kv_aware in-flight block refcounts)', () => {
  it('agrees with a Map of refcounts under random adds and releases, colliding keys, growth and wrap-around', () => {
    let seed = 99;
    const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
    for (const [space, ops] of [[40, 20_000], [5_000, 60_000], [0x3fffffff, 60_000]] as const) {
      const t = new KeyCounts(16);
      const ref = model();
      // Keys that share low bits (same home slot) make long probe runs that wrap around the table.
      const key = () => (rnd() < 0.3 ? Math.floor(rnd() * 8) * 1024 + 15 : Math.floor(rnd() * space));
      for (let i = 0; i < ops; i++) {
        const k = key();
        if (rnd() < 0.55) {
          t.add(k);
          ref.add(k);
        } else {
          t.release(k);
          ref.release(k);
        }
        if (i % 997 === 0) {
          expect(t.size).toBe(ref.m.size);
          let wrong = 0;
          for (const [k2, n] of ref.m) if (t.get(k2) !== n) wrong++;
          expect(wrong).toBe(0);
        }
      }
      expect(t.size).toBe(ref.m.size);
      for (const [k2, n] of ref.m) {
        expect(t.has(k2)).toBe(true);
        expect(t.get(k2)).toBe(n);
      }
      // Released to nothing: every key gone.
      for (const [k2, n] of [...ref.m]) for (let j = 0; j < n; j++) t.release(k2);
      expect(t.size).toBe(0);
      for (const k2 of ref.m.keys()) expect(t.has(k2)).toBe(false);
    }
  });

  it('ignores releases of absent keys and counts a key added twice twice', () => {
    const t = new KeyCounts();
    t.release(5);
    t.add(5);
    t.add(5);
    t.release(5);
    expect(t.get(5)).toBe(1);
    expect(t.size).toBe(1);
    t.release(5);
    expect(t.has(5)).toBe(false);
    expect(t.size).toBe(0);
  });
});
