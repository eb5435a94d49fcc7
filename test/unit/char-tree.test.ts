import { describe, expect, it } from 'vitest';
import { CharTree } from '../../src/cache/char-tree.js';

/** Counts kept incrementally must always equal a full recount. */
function expectConsistent(tree: CharTree): void {
  expect(tree.tenantCharCounts()).toEqual(tree.recountTenantChars());
}

/** Length in code points of the longest common prefix of a and b. */
function lcp(a: string, b: string): number {
  const x = Array.from(a);
  const y = Array.from(b);
  let i = 0;
  while (i < x.length && i < y.length && x[i] === y[i]) i++;
  return i;
}

/** Deterministic PRNG for the randomized tests (xorshift32). */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0;
  return (n) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

describe('CharTree prefix matching', () => {
  it('returns no tenant and no match on an empty tree', () => {
    const tree = new CharTree();
    expect(tree.prefixMatch('hello')).toEqual({ matchedChars: 0, inputChars: 5, tenant: undefined });
    expect(tree.tenants()).toEqual([]);
  });

  it('matches each inserted word fully with its own tenant', () => {
    const tree = new CharTree();
    tree.insert('hello', 't1');
    tree.insert('apple', 't2');
    tree.insert('banana', 't3');
    expect(tree.prefixMatch('hello')).toEqual({ matchedChars: 5, inputChars: 5, tenant: 't1' });
    expect(tree.prefixMatch('apple')).toEqual({ matchedChars: 5, inputChars: 5, tenant: 't2' });
    expect(tree.prefixMatch('banana')).toEqual({ matchedChars: 6, inputChars: 6, tenant: 't3' });
    expect(tree.tenants()).toEqual(['t1', 't2', 't3']);
  });

  it('counts the shared part of a partially matched edge', () => {
    const tree = new CharTree();
    tree.insert('application', 't1');
    expect(tree.prefixMatch('apple')).toEqual({ matchedChars: 4, inputChars: 5, tenant: 't1' });
    expect(tree.prefixMatch('xyz')).toEqual({ matchedChars: 0, inputChars: 3, tenant: 't1' });
  });

  it('returns a tenant that owns the stopping node', () => {
    const tree = new CharTree();
    tree.insert('application', 't1');
    tree.insert('app', 't2');
    const app = tree.prefixMatch('app');
    expect(app.matchedChars).toBe(3);
    expect(['t1', 't2']).toContain(app.tenant);
    expect(tree.prefixMatch('application')).toEqual({ matchedChars: 11, inputChars: 11, tenant: 't1' });
  });

  it('matches per tenant only along that tenant\'s nodes', () => {
    const tree = new CharTree();
    tree.insert('hello', 't1');
    tree.insert('hello', 't2');
    tree.insert('hello world', 't2');
    tree.insert('help', 't1');
    tree.insert('helicopter', 't2');
    expect(tree.prefixMatchTenant('hello world', 't1')).toBe(5);
    expect(tree.prefixMatchTenant('helicopter', 't1')).toBe(3);
    expect(tree.prefixMatchTenant('help', 't1')).toBe(4);
    expect(tree.prefixMatchTenant('help', 't2')).toBe(3);
    expect(tree.prefixMatchTenant('hello world', 't2')).toBe(11);
    expect(tree.prefixMatchTenant('hello', 't3')).toBe(0);
    expectConsistent(tree);
  });
});

describe('CharTree character counts', () => {
  it('counts shared prefixes once per tenant', () => {
    const tree = new CharTree();
    tree.insert('hello', 't1');
    tree.insert('world', 't1');
    tree.insert('hello', 't2');
    tree.insert('help', 't2');
    expect(tree.tenantCharCount('t1')).toBe(10);
    expect(tree.tenantCharCount('t2')).toBe(6);
    expect(tree.tenantCharCount('nobody')).toBe(0);
    expect(tree.storedChars).toBe(11); // hel + lo + p + world
    expectConsistent(tree);
  });

  it('registers a tenant with no characters on an empty insert', () => {
    const tree = new CharTree();
    tree.insert('', 't1');
    expect(tree.tenants()).toEqual(['t1']);
    expect(tree.tenantCharCounts()).toEqual(new Map([['t1', 0]]));
    expect(tree.prefixMatch('abc')).toEqual({ matchedChars: 0, inputChars: 3, tenant: 't1' });
    expect(tree.nodeCount).toBe(0);
  });

  it('splits and counts CJK text by code point', () => {
    const tree = new CharTree();
    tree.insert('你好世界', 't1');
    tree.insert('你好嗎', 't2');
    tree.insert('你心情好嗎', 't3');
    expect(tree.tenantCharCount('t1')).toBe(4);
    expect(tree.tenantCharCount('t2')).toBe(3);
    expect(tree.tenantCharCount('t3')).toBe(5);
    expect(tree.prefixMatch('你好世界')).toEqual({ matchedChars: 4, inputChars: 4, tenant: 't1' });
    expect(tree.prefixMatch('你好嗎')).toEqual({ matchedChars: 3, inputChars: 3, tenant: 't2' });
    expect(tree.prefixMatch('你心情好嗎')).toEqual({ matchedChars: 5, inputChars: 5, tenant: 't3' });
    expect(tree.prefixMatch('你好世')).toMatchObject({ matchedChars: 3, tenant: 't1' });
    expect(tree.prefixMatchTenant('你好世界', 't2')).toBe(2);
    expectConsistent(tree);
  });

  it('never splits an emoji (surrogate pair) and counts it as one character', () => {
    const tree = new CharTree();
    tree.insert('🚀', 'solo');
    expect(tree.tenantCharCount('solo')).toBe(1);

    tree.insert('👋🌍🚀 hi', 't1');
    tree.insert('👋🌍🎉', 't2');
    expect(tree.tenantCharCount('t1')).toBe(6);
    expect(tree.tenantCharCount('t2')).toBe(3);
    expect(tree.prefixMatch('👋🌍🚀 hi')).toEqual({ matchedChars: 6, inputChars: 6, tenant: 't1' });
    expect(tree.prefixMatch('👋🌍🎉🎉')).toEqual({ matchedChars: 3, inputChars: 4, tenant: 't2' });
    expect(tree.prefixMatch('👋🌍')).toMatchObject({ matchedChars: 2 });

    // 🚀 (D83D DE80) and 😀 (D83D DE00) share their high surrogate: the split must fall before both.
    tree.insert('a🚀', 'u1');
    tree.insert('a😀', 'u2');
    expect(tree.tenantCharCount('u1')).toBe(2);
    expect(tree.tenantCharCount('u2')).toBe(2);
    expect(tree.prefixMatch('a😀x')).toEqual({ matchedChars: 2, inputChars: 3, tenant: 'u2' });
    expect(tree.prefixMatch('a🚀')).toMatchObject({ matchedChars: 2, tenant: 'u1' });
    expect(tree.prefixMatch('a\uD83D')).toMatchObject({ matchedChars: 1 }); // a lone high surrogate is its own character
    expectConsistent(tree);
  });

  it('handles surrogate pairs that differ deep inside long labels', () => {
    const tree = new CharTree();
    const base = 'x'.repeat(40) + '🙂'.repeat(20);
    tree.insert(`${base}🚀tail one`, 't1');
    tree.insert(`${base}😀tail two`, 't2');
    expect(tree.tenantCharCount('t1')).toBe(69);
    expect(tree.tenantCharCount('t2')).toBe(60 + 9);
    expect(tree.prefixMatch(`${base}😀tail two`)).toEqual({ matchedChars: 69, inputChars: 69, tenant: 't2' });
    expect(tree.prefixMatch(`${base}🚀`)).toMatchObject({ matchedChars: 61, tenant: 't1' });
    expect(tree.prefixMatch(`${base}🎉`)).toMatchObject({ matchedChars: 60 });
    expect(tree.prefixMatchTenant(`${base}🚀tail one`, 't2')).toBe(60);
    expectConsistent(tree);
  });

  it('keeps a label ending in a lone high surrogate apart from a pair that starts with it', () => {
    const tree = new CharTree();
    tree.insert('x\uD83D', 't1');
    tree.insert('x\uD83D\uDE80', 't2'); // "x🚀": shares only "x" in code points
    expect(tree.tenantCharCount('t1')).toBe(2);
    expect(tree.tenantCharCount('t2')).toBe(2);
    expect(tree.prefixMatch('x🚀')).toEqual({ matchedChars: 2, inputChars: 2, tenant: 't2' });
    expect(tree.prefixMatch('x\uD83D')).toEqual({ matchedChars: 2, inputChars: 2, tenant: 't1' });
    expect(tree.prefixMatchTenant('x🚀', 't1')).toBe(1);
    expectConsistent(tree);
  });

  it('finds the exact split point of long labels that differ far from their start', () => {
    const tree = new CharTree();
    const a = 'abcdefghij'.repeat(30);
    const b = `${a.slice(0, 173)}Z${a.slice(174)}`;
    tree.insert(a, 't1');
    tree.insert(b, 't2');
    expect(tree.tenantCharCount('t2')).toBe(300);
    expect(tree.storedChars).toBe(300 + 127);
    expect(tree.prefixMatchTenant(a, 't2')).toBe(173);
    expect(tree.prefixMatch(`${a.slice(0, 250)}!`)).toEqual({ matchedChars: 250, inputChars: 251, tenant: 't1' });
    expectConsistent(tree);
  });
});

describe('CharTree eviction and removal', () => {
  it('evicts each tenant\'s least recently inserted leaves first', () => {
    const tree = new CharTree();
    tree.insert('hello', 't1');
    tree.insert('hello', 't2');
    tree.insert('world', 't2');
    tree.evictTenantBySize(5);
    expect(tree.tenantCharCount('t1')).toBe(5);
    expect(tree.tenantCharCount('t2')).toBe(5);
    expect(tree.prefixMatch('world')).toEqual({ matchedChars: 5, inputChars: 5, tenant: 't2' });
    expect(tree.prefixMatchTenant('hello', 't2')).toBe(0);
    expect(tree.prefixMatchTenant('hello', 't1')).toBe(5);
    expectConsistent(tree);
  });

  it('refreshes the matched node on one match in eight (by epoch)', () => {
    // Epochs: insert aaaa = 0, insert bbbb = 1, matches draw 2, 3, ...; epoch 8 refreshes.
    const run = (matches: number): string | undefined => {
      const tree = new CharTree();
      tree.insert('aaaa', 't1');
      tree.insert('bbbb', 't1');
      for (let i = 0; i < matches; i++) tree.prefixMatch('aaaa');
      tree.evictTenantBySize(4);
      expect(tree.tenantCharCount('t1')).toBe(4);
      return tree.prefixMatchTenant('aaaa', 't1') === 4 ? 'aaaa' : 'bbbb';
    };
    expect(run(6)).toBe('bbbb'); // aaaa still has stamp 0: it goes first
    expect(run(7)).toBe('aaaa'); // the 7th match drew epoch 8 and refreshed aaaa
  });

  it('caps every tenant at the limit after random inserts', () => {
    const tree = new CharTree();
    const rand = rng(7);
    const letters = 'abcdef';
    for (let t = 0; t < 4; t++) {
      for (let i = 0; i < 100; i++) {
        let s = '';
        const len = 1 + rand(20);
        for (let c = 0; c < len; c++) s += letters[rand(letters.length)];
        tree.insert(s, `t${t}`);
      }
    }
    for (let t = 0; t < 4; t++) expect(tree.tenantCharCount(`t${t}`)).toBeGreaterThan(100);
    tree.evictTenantBySize(100);
    for (let t = 0; t < 4; t++) expect(tree.tenantCharCount(`t${t}`)).toBeLessThanOrEqual(100);
    expectConsistent(tree);
  });

  it('removes one tenant without disturbing the others', () => {
    const tree = new CharTree();
    tree.insert('hello', 't1');
    tree.insert('hello world', 't2');
    tree.insert('help', 't1');
    tree.insert('goodbye', 't1');
    tree.insert('helicopter', 't2');
    const t2Size = tree.tenantCharCount('t2');
    const bytesBefore = tree.memoryBytes();
    tree.removeTenant('t1');
    expect(tree.memoryBytes()).toBeLessThan(bytesBefore);
    expect(tree.tenants()).toEqual(['t2']);
    expect(tree.tenantCharCounts()).toEqual(new Map([['t2', t2Size]]));
    expect(tree.prefixMatchTenant('hello', 't1')).toBe(0);
    expect(tree.prefixMatch('hello world')).toEqual({ matchedChars: 11, inputChars: 11, tenant: 't2' });
    expect(tree.prefixMatch('helicopter')).toMatchObject({ matchedChars: 10, tenant: 't2' });
    expect(tree.prefixMatch('help')).toMatchObject({ matchedChars: 3, tenant: 't2' });
    expect(tree.prefixMatch('goodbye')).toMatchObject({ matchedChars: 0, tenant: 't2' });
    expect(tree.storedChars).toBe(t2Size);
    expectConsistent(tree);
    tree.removeTenant('t2');
    expect(tree.nodeCount).toBe(0);
    expect(tree.prefixMatch('hello')).toEqual({ matchedChars: 0, inputChars: 5, tenant: undefined });
  });

  it('empties every tenant with a limit of 0, and is a no-op on an empty tree', () => {
    const empty = new CharTree();
    empty.evictTenantBySize(0);
    expect(empty.tenantCharCounts().size).toBe(0);

    const tree = new CharTree();
    tree.insert('hello', 't1');
    tree.insert('help', 't2');
    tree.insert('你好', 't3');
    tree.evictTenantBySize(0);
    expect(tree.tenantCharCounts()).toEqual(new Map([['t1', 0], ['t2', 0], ['t3', 0]]));
    expect(tree.nodeCount).toBe(0);
    expect(tree.storedChars).toBe(0);
    expect(tree.prefixMatch('hello').matchedChars).toBe(0);
    expectConsistent(tree);
  });
});

describe('CharTree randomized consistency', () => {
  // Small alphabet with BMP, CJK, astral pairs sharing a high surrogate, and lone surrogates.
  const ALPHABET = ['a', 'b', 'c', 'é', '你', '🚀', '😀', '🙂', '\uD83D', '\uDE00'];

  function randomText(rand: (n: number) => number, pool: string[]): string {
    let s = rand(3) > 0 && pool.length > 0 ? pool[rand(pool.length)] : '';
    if (rand(2) === 0) s = Array.from(s).slice(0, rand(Array.from(s).length + 1)).join('');
    const extra = rand(4) === 0 ? rand(40) : rand(6);
    for (let i = 0; i < extra; i++) s += ALPHABET[rand(ALPHABET.length)];
    return s;
  }

  it('agrees with a brute-force model under inserts, matches and tenant removal', () => {
    const rand = rng(12345);
    const tree = new CharTree();
    const model = new Map<string, string[]>(); // tenant -> inserted strings
    const pool: string[] = [];
    for (let batch = 0; batch < 40; batch++) {
      for (let op = 0; op < 100; op++) {
        const tenant = `w${rand(5)}`;
        const roll = rand(20);
        if (roll < 10) {
          const text = randomText(rand, pool);
          tree.insert(text, tenant);
          if (!model.has(tenant)) model.set(tenant, []);
          model.get(tenant)!.push(text);
          pool.push(text);
        } else if (roll < 19) {
          const query = randomText(rand, pool);
          const all = [...model.values()].flat();
          const best = all.reduce((m, s) => Math.max(m, lcp(query, s)), 0);
          const r = tree.prefixMatch(query);
          expect(r.matchedChars).toBe(best);
          expect(r.inputChars).toBe(Array.from(query).length);
          if (model.size === 0) expect(r.tenant).toBeUndefined();
          else expect(tree.prefixMatchTenant(query, r.tenant!)).toBe(best);
          const own = (model.get(tenant) ?? []).reduce((m, s) => Math.max(m, lcp(query, s)), 0);
          expect(tree.prefixMatchTenant(query, tenant)).toBe(own);
        } else {
          tree.removeTenant(tenant);
          model.delete(tenant);
        }
      }
      expectConsistent(tree);
      expect([...tree.tenants()].sort()).toEqual([...model.keys()].sort());
    }
  });

  it('keeps counts equal to a recount under mixed inserts, matches, evictions and removals', () => {
    const rand = rng(987654321);
    const tree = new CharTree();
    const pool: string[] = [];
    for (let batch = 0; batch < 60; batch++) {
      for (let op = 0; op < 80; op++) {
        const tenant = `w${rand(6)}`;
        const roll = rand(40);
        if (roll < 24) {
          const text = randomText(rand, pool);
          tree.insert(text, tenant);
          pool.push(text);
        } else if (roll < 37) {
          const query = randomText(rand, pool);
          const r = tree.prefixMatch(query);
          if (r.tenant !== undefined) expect(tree.prefixMatchTenant(query, r.tenant)).toBe(r.matchedChars);
          for (const t of tree.tenants()) expect(tree.prefixMatchTenant(query, t)).toBeLessThanOrEqual(r.matchedChars);
        } else if (roll < 39) {
          const max = rand(60);
          tree.evictTenantBySize(max);
          for (const count of tree.tenantCharCounts().values()) expect(count).toBeLessThanOrEqual(max);
        } else {
          tree.removeTenant(tenant);
          expect(tree.tenants()).not.toContain(tenant);
        }
      }
      expectConsistent(tree);
      const total = [...tree.recountTenantChars().values()].reduce((a, b) => a + b, 0);
      expect(tree.storedChars).toBeLessThanOrEqual(total);
      if (tree.tenants().length === 0) expect(tree.nodeCount).toBe(0);
    }
  });
});

describe('CharTree with maxTenantChars: inserts keep each tenant near its cap', () => {
  const unique = (i: number, chars: number) => `prompt ${i} `.padEnd(chars, String.fromCharCode(97 + (i % 26)));

  it('trims a tenant that an insert takes a quarter (at least 1 Mi characters) past the cap, LRU first', () => {
    const cap = 2_000_000;
    const tree = new CharTree({ maxTenantChars: cap });
    for (let i = 0; i < 12; i++) {
      tree.insert(unique(i, 1_000_000), 'w1');
      tree.insert(`short ${i}`, 'w2');
      // The threshold is cap + max(cap / 4, 1 Mi): never more than that after an insert.
      expect(tree.tenantCharCount('w1')).toBeLessThanOrEqual(cap + (1 << 20));
    }
    expect(tree.sizeTriggeredTrims).toBeGreaterThan(0);
    // The newest prompt is kept, the oldest evicted; the other tenant is untouched.
    expect(tree.prefixMatch(unique(11, 1_000_000)).matchedChars).toBe(1_000_000);
    expect(tree.prefixMatch(unique(0, 1_000_000)).matchedChars).toBeLessThan(1_000_000);
    expect(tree.tenantCharCount('w2')).toBeGreaterThan(0);
    expect(tree.storedChars).toBeLessThanOrEqual(cap + (1 << 20) + 1000);
  });

  it('without a cap, only explicit passes trim (SGLang semantics)', () => {
    const tree = new CharTree();
    for (let i = 0; i < 6; i++) tree.insert(unique(i, 1_000_000), 'w1');
    expect(tree.tenantCharCount('w1')).toBeGreaterThan(5_999_000); // (their common start "prompt " counts once)
    expect(tree.sizeTriggeredTrims).toBe(0);
    tree.evictTenantBySize(2_000_000);
    expect(tree.tenantCharCount('w1')).toBeLessThanOrEqual(2_000_000);
  });
});

describe('CharTree.insertParts: a text inserted as two pieces', () => {
  it('leaves the tree exactly as insert of the joined text, under matches, evictions, trims and removals', () => {
    // Pieces of a shared "system prompt", emoji, a lone high surrogate and CJK, so that seams fall
    // inside labels, at their ends, between the halves of a pair, and next to lone surrogates.
    const words = ['sys ', 'prompt ', 'é', '😀', '\uD83D', '中文', 'x', 'yy', 'user ', '\uDE00'];
    for (const seed of [1, 2, 3, 4]) {
      const r = rng(seed);
      const cap = seed <= 2 ? 60 : undefined; // inserts trim past the cap themselves (with slack)
      const plain = new CharTree(cap === undefined ? {} : { maxTenantChars: cap });
      const parts = new CharTree(cap === undefined ? {} : { maxTenantChars: cap });
      const texts: string[] = [];
      for (let n = 0; n < 700; n++) {
        const op = r(20);
        const tenant = `t${r(4)}`;
        if (op < 14) {
          // Often a known text extended or cut short, as prompts behind one system prompt are.
          let text = texts.length > 0 && r(3) > 0 ? texts[r(texts.length)] : '';
          if (r(2) === 0) text = text.slice(0, r(text.length + 1));
          for (let k = r(6); k > 0; k--) text += words[r(words.length)];
          texts.push(text);
          const seam = r(text.length + 1);
          plain.insert(text, tenant);
          parts.insertParts(text.slice(0, seam), text.slice(seam), tenant);
        } else if (op < 17) {
          const probe = texts.length > 0 ? texts[r(texts.length)] + (r(2) ? 'x' : '') : 'x';
          expect(parts.prefixMatch(probe)).toEqual(plain.prefixMatch(probe));
          expect(parts.prefixMatchTenant(probe, tenant)).toBe(plain.prefixMatchTenant(probe, tenant));
        } else if (op < 19) {
          const limit = r(40);
          plain.evictTenantBySize(limit);
          parts.evictTenantBySize(limit);
        } else {
          plain.removeTenant(tenant);
          parts.removeTenant(tenant);
        }
        expect(parts.dump()).toBe(plain.dump());
      }
      expect(parts.dump()).not.toContain('bad');
      expectConsistent(parts);
    }
  });

  it('a new leaf that starts inside the head holds the rest of the head and the tail', () => {
    const tree = new CharTree();
    const head = 'h'.repeat(1000);
    tree.insertParts(head, 'tail', 't');
    tree.insertParts(head.slice(0, 990) + 'Z'.repeat(10), 'tail', 't');
    expect(tree.tenantStrings().map(([, s]) => s).sort()).toEqual([head + 'tail', head.slice(0, 990) + 'Z'.repeat(10) + 'tail'].sort());
    expect(tree.prefixMatch(head + 'tail').matchedChars).toBe(1004);
  });
});
