import { xxh3 } from '@node-rs/xxhash';
import { describe, expect, it } from 'vitest';
import { BlockIndex, hashBlocks, LOCAL_HASH_SEED, loraSeed } from '../../src/cache/block-index.js';
import type { KvCacheEvent } from '../../src/events/types.js';

const BS = 4;

/** Tokens of a block whose content is identified by `content` (distinct contents → distinct tokens). */
function blockTokens(content: number, bs = BS): number[] {
  return Array.from({ length: bs }, (_, j) => content * 1009 + j * 7 + 1);
}

function tokensOf(contents: readonly number[], bs = BS): number[] {
  return contents.flatMap((c) => blockTokens(c, bs));
}

function stored(
  blockHashes: bigint[],
  parent: bigint | null,
  contents: readonly number[],
  extra: { medium?: string | null; loraName?: string | null; tokenIds?: number[]; blockSize?: number } = {},
): KvCacheEvent {
  const blockSize = extra.blockSize ?? BS;
  return {
    type: 'stored',
    blockHashes,
    parentBlockHash: parent,
    tokenIds: extra.tokenIds ?? tokensOf(contents, blockSize),
    blockSize,
    medium: extra.medium === undefined ? 'GPU' : extra.medium,
    loraName: extra.loraName ?? null,
  };
}

function removed(blockHashes: bigint[], medium: string | null = 'GPU'): KvCacheEvent {
  return { type: 'removed', blockHashes, medium };
}

const CLEARED: KvCacheEvent = { type: 'cleared' };

/** Local hashes of a request made of these block contents. */
function q(contents: readonly number[], bs = BS): bigint[] {
  return hashBlocks(tokensOf(contents, bs), bs);
}

/** Deterministic PRNG (xorshift32). */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

function expectSound(index: BlockIndex): void {
  expect(index.verify()).toEqual([]);
}

describe('hashBlocks (Dynamo LocalBlockHash)', () => {
  it('matches the known constant for tokens 1..16, seed 1337', () => {
    const tokens = Array.from({ length: 16 }, (_, i) => i + 1);
    expect(hashBlocks(tokens, 16)).toEqual([16863443419780771464n]);
  });

  it('equals xxh3-64(seed 1337) over hand-built u32 little-endian bytes, for several block sizes', () => {
    const next = rng(7);
    for (const bs of [1, 2, 3, 4, 5, 16, 32, 60, 61, 64, 100, 300, 520]) {
      const tokens = Array.from({ length: bs * 5 + (bs > 1 ? bs - 1 : 0) }, () => next(0x7fffffff) * 2 + next(2));
      const expected: bigint[] = [];
      for (let b = 0; b < 5; b++) {
        const bytes = new Uint8Array(bs * 4);
        const view = new DataView(bytes.buffer);
        for (let j = 0; j < bs; j++) view.setUint32(j * 4, tokens[b * bs + j], true);
        expected.push(xxh3.xxh64(bytes, 1337n));
      }
      const got = hashBlocks(tokens, bs);
      expect(got).toHaveLength(5); // the trailing partial block is ignored
      expect(got).toEqual(expected);
      expect(hashBlocks(Uint32Array.from(tokens), bs)).toEqual(expected); // typed arrays too
    }
  });

  it('takes seeds modulo 2^64', () => {
    expect(hashBlocks([1, 2, 3, 4], 4, -1n)).toEqual(hashBlocks([1, 2, 3, 4], 4, (1n << 64n) - 1n));
    expect(hashBlocks([1, 2, 3, 4], 4, 0n)).not.toEqual(hashBlocks([1, 2, 3, 4], 4));
  });

  it('is position independent and content sensitive', () => {
    const [a1, b1, a2] = q([1, 2, 1]);
    expect(a1).toBe(a2);
    expect(a1).not.toBe(b1);
    expect(hashBlocks([1, 2, 3], 4)).toEqual([]);
    // Tokens are coerced like Uint32Array elements.
    expect(hashBlocks([-1, 1.5, 2 ** 32 + 3, Number.NaN], 4)).toEqual(hashBlocks([0xffffffff, 1, 3, 0], 4));
    expect(() => hashBlocks([1, 2, 3, 4], 0)).toThrow(RangeError);
  });

  it('LoRA adapters get their own seed', () => {
    expect(loraSeed(null)).toBe(LOCAL_HASH_SEED);
    const s = loraSeed('my-adapter');
    expect(s).toBe((1337n + xxh3.xxh64(Buffer.from('my-adapter'), 0n)) & ((1n << 64n) - 1n));
    expect(hashBlocks(tokensOf([1]), BS, s)).not.toEqual(q([1]));
  });
});

describe('BlockIndex events and matching', () => {
  it('chains stored events through parent engine hashes', () => {
    const index = new BlockIndex({ blockSize: BS });
    index.apply('w0', [stored([11n, 12n], null, [1, 2]), stored([13n], 12n, [3])]);
    index.apply('w0', [stored([14n, 15n], 13n, [4, 5])]);
    expect(index.match(q([1, 2, 3, 4, 5]))).toEqual(new Map([['w0', 5]]));
    expect(index.match(q([1, 2, 3, 9, 5]))).toEqual(new Map([['w0', 3]]));
    // Position matters: the same contents not starting at the root do not match.
    expect(index.match(q([2, 3]))).toEqual(new Map());
    expect(index.blocksOf('w0')).toBe(5);
    expect(index.size).toBe(5);
    expectSound(index);
  });

  it('two sources share a prefix then diverge', () => {
    const index = new BlockIndex({ blockSize: BS });
    index.apply('a', [stored([1n, 2n, 3n, 4n], null, [1, 2, 3, 4])]);
    index.apply('b', [stored([101n, 102n, 103n], null, [1, 2, 7]), stored([104n], 103n, [8])]);
    expect(index.match(q([1, 2, 3, 4, 5]))).toEqual(new Map([['a', 4], ['b', 2]]));
    expect(index.match(q([1, 2, 7, 8]))).toEqual(new Map([['a', 2], ['b', 4]]));
    expect(index.match(q([1]))).toEqual(new Map([['a', 1], ['b', 1]]));
    expect(index.match(q([5, 1]))).toEqual(new Map());
    expect(index.size).toBe(6); // 1,2 shared; 3,4 and 7,8
    expect(index.blocksOf('a')).toBe(4);
    expect(index.blocksOf('b')).toBe(4);
    expectSound(index);
  });

  it('different engine hashes for the same content still meet on the same local path', () => {
    const index = new BlockIndex({ blockSize: BS });
    index.apply('a', [stored([0xaaaa_0001n, 0xaaaa_0002n], null, [1, 2])]);
    index.apply('b', [stored([0xbbbb_0001n], null, [1]), stored([0xbbbb_0002n], 0xbbbb_0001n, [2])]);
    // Same engine hashes as `a` but on another source and other content: no confusion.
    index.apply('c', [stored([0xaaaa_0001n, 0xaaaa_0002n], null, [3, 4])]);
    expect(index.size).toBe(4);
    expect(index.match(q([1, 2]))).toEqual(new Map([['a', 2], ['b', 2]]));
    expect(index.match(q([3, 4]))).toEqual(new Map([['c', 2]]));
    // Removal through c's engine hash touches only c's block.
    index.apply('c', [removed([0xaaaa_0001n])]);
    expect(index.match(q([1, 2]))).toEqual(new Map([['a', 2], ['b', 2]]));
    expect(index.match(q([3, 4]))).toEqual(new Map());
    expectSound(index);
  });

  it('removal in the middle of a chain stops the consecutive count there; pruning keeps other holders', () => {
    const index = new BlockIndex({ blockSize: BS });
    index.apply('a', [stored([1n, 2n, 3n, 4n, 5n], null, [1, 2, 3, 4, 5])]);
    index.apply('b', [stored([21n, 22n, 23n], null, [1, 2, 3])]);
    index.apply('a', [removed([3n])]);
    expect(index.match(q([1, 2, 3, 4, 5]))).toEqual(new Map([['a', 2], ['b', 3]]));
    expect(index.blocksOf('a')).toBe(4);
    // a's tail is still linked by engine hash: a child of block 5 can still be stored.
    index.apply('a', [stored([6n], 5n, [6])]);
    expect(index.size).toBe(6);
    index.apply('a', [removed([1n])]);
    expect(index.match(q([1, 2]))).toEqual(new Map([['b', 2]]));
    // Removing the tail prunes leaves nobody holds any more (block 3 stays for b).
    index.apply('a', [removed([6n, 5n, 4n])]);
    expect(index.size).toBe(3);
    index.apply('a', [removed([2n, 999n])]);
    expect(index.stats().unknownRemoved).toBe(1);
    expect(index.blocksOf('a')).toBe(0);
    expect(index.match(q([1, 2, 3]))).toEqual(new Map([['b', 3]]));
    expectSound(index);
  });

  it('cleared drops only that source (and its medium sub-sources)', () => {
    const index = new BlockIndex({ blockSize: BS, mediums: 'separate' });
    index.apply('a', [stored([1n, 2n], null, [1, 2]), stored([51n], null, [1], { medium: 'CPU_PINNED' })]);
    index.apply('b', [stored([11n, 12n, 13n], null, [1, 2, 3])]);
    index.apply('a', [CLEARED]);
    expect(index.match(q([1, 2, 3]), { mediums: true })).toEqual(new Map([['b', 3]]));
    expect(index.blocksOf('a')).toBe(0);
    expect(index.blocksOf('a#CPU_PINNED')).toBe(0);
    expect(index.blocksOf('b')).toBe(3);
    expect(index.sources()).toEqual(['a', 'a#CPU_PINNED', 'b']);
    // Parent links of a are gone too.
    index.apply('a', [stored([3n], 2n, [3])]);
    expect(index.stats().unknownParent).toBe(1);
    index.removeSource('b');
    expect(index.sources()).toEqual(['a', 'a#CPU_PINNED']);
    expect(index.size).toBe(0);
    expectSound(index);
  });

  it('unknown parent is counted and the event ignored; the rest of the batch still applies', () => {
    const index = new BlockIndex({ blockSize: BS });
    index.apply('a', [stored([2n], 1n, [2]), stored([5n], null, [5])]);
    expect(index.stats().unknownParent).toBe(1);
    expect(index.size).toBe(1);
    expect(index.match(q([5]))).toEqual(new Map([['a', 1]]));
    // The parent must be known to the SAME source.
    index.apply('b', [stored([6n], 5n, [6])]);
    expect(index.stats().unknownParent).toBe(2);
    expect(index.blocksOf('b')).toBe(0);
  });

  it('malformed events are counted and skipped, never thrown', () => {
    const index = new BlockIndex({ blockSize: BS });
    const bad: unknown[] = [
      stored([1n, 2n], null, [1]), // 1 block of tokens for 2 hashes
      stored([1n], null, [1], { tokenIds: [1, 2, 3] }), // partial block
      stored([1n, 1n], null, [1, 2]), // duplicate hash in the event
      { ...(stored([3n], null, [3]) as object), blockHashes: [3n, 'x'] },
      { type: 'stored', blockHashes: null, parentBlockHash: null, tokenIds: [], blockSize: 4, medium: null, loraName: null },
      { ...(stored([4n], null, [4]) as object), blockSize: 0 },
      { type: 'bogus' },
      null,
      42,
    ];
    index.apply('a', bad as KvCacheEvent[]);
    index.apply('a', [stored([7n], null, [7])]);
    index.apply('a', [stored([8n], 7n, [8]), stored([9n], 9n, [9])]); // self-parent
    expect(index.stats().malformed).toBe(bad.length + 1);
    expect(index.match(q([7, 8, 9]))).toEqual(new Map([['a', 2]]));
    // Other block sizes, and empty tokens (CPU offload), have their own counters.
    index.apply('a', [stored([10n], null, [10], { blockSize: 8 }), stored([11n], null, [], { tokenIds: [] })]);
    expect(index.stats()).toMatchObject({ blockSizeMismatch: 1, noTokens: 1, malformed: bad.length + 1 });
    index.apply('a', undefined as unknown as KvCacheEvent[]);
    expect(index.size).toBe(2);
    expectSound(index);
  });

  it('block size is fixed by the first stored event when not configured', () => {
    const index = new BlockIndex();
    expect(index.blockSize).toBeNull();
    expect(index.matchTokens(tokensOf([1]))).toEqual(new Map());
    index.apply('a', [stored([1n, 2n], null, [1, 2], { blockSize: 2, tokenIds: [5, 6, 7, 8] })]);
    expect(index.blockSize).toBe(2);
    expect(index.matchTokens([5, 6, 7, 8, 9])).toEqual(new Map([['a', 2]]));
    index.apply('a', [stored([3n], null, [3])]); // block size 4
    expect(index.stats().blockSizeMismatch).toBe(1);
  });

  it("medium 'gpu-only' ignores non-GPU events; null and 'GPU' are GPU", () => {
    const index = new BlockIndex({ blockSize: BS });
    index.apply('a', [
      stored([1n], null, [1], { medium: null }),
      stored([2n], 1n, [2], { medium: 'GPU' }),
      stored([3n], 2n, [3], { medium: 'CPU_PINNED' }),
      stored([4n], null, [], { medium: 'CPU_PINNED', tokenIds: [] }),
      removed([1n], 'DISK'),
    ]);
    expect(index.stats().ignoredMedium).toBe(3);
    expect(index.sources()).toEqual(['a']);
    expect(index.match(q([1, 2, 3]), { mediums: true })).toEqual(new Map([['a', 2]]));
  });

  it("medium 'separate' indexes other media as <source>#<medium>, never as GPU hits", () => {
    const index = new BlockIndex({ blockSize: BS, mediums: 'separate' });
    index.apply('a', [
      stored([1n], null, [1]),
      stored([1n, 2n, 3n], null, [1, 2, 3], { medium: 'CPU_PINNED' }), // same engine hashes, separate map
    ]);
    index.apply('b', [stored([9n, 8n], null, [1, 2], { medium: 'DISK' })]);
    expect(index.match(q([1, 2, 3]))).toEqual(new Map([['a', 1]]));
    expect(index.match(q([1, 2, 3]), { mediums: true })).toEqual(
      new Map([['a', 1], ['a#CPU_PINNED', 3], ['b#DISK', 2]]),
    );
    // Only a medium holds the first block: no GPU result at all.
    index.apply('c', [stored([5n], null, [6], { medium: 'CPU_PINNED' })]);
    expect(index.match(q([6]))).toEqual(new Map());
    expect(index.match(q([6]), { mediums: true })).toEqual(new Map([['c#CPU_PINNED', 1]]));
    index.apply('b', [removed([9n], 'DISK')]);
    expect(index.match(q([1, 2]), { mediums: true })).toEqual(new Map([['a', 1], ['a#CPU_PINNED', 2]]));
    index.apply('a', [removed([2n], 'CPU_PINNED')]);
    expect(index.match(q([1, 2]), { mediums: true })).toEqual(new Map([['a', 1], ['a#CPU_PINNED', 1]]));
    expect(index.blocksOf('a')).toBe(1);
    expect(index.blocksOf('a#CPU_PINNED')).toBe(2);
    index.removeSource('a');
    expect(index.sources()).toEqual(['b#DISK', 'c#CPU_PINNED']);
    expect(index.stats().ignoredMedium).toBe(0);
    expectSound(index);
  });

  it('remaps an engine hash stored again under different content', () => {
    const index = new BlockIndex({ blockSize: BS });
    index.apply('a', [stored([1n, 2n], null, [1, 2])]);
    index.apply('a', [stored([2n], 1n, [3])]); // engine reused hash 2 for other content
    expect(index.match(q([1, 2]))).toEqual(new Map([['a', 1]]));
    expect(index.match(q([1, 3]))).toEqual(new Map([['a', 2]]));
    expect(index.size).toBe(2); // the old block was pruned
    expect(index.blocksOf('a')).toBe(2);
    // The same hash stored twice for the same block is idempotent.
    index.apply('a', [stored([2n], 1n, [3])]);
    expect(index.blocksOf('a')).toBe(2);
    expectSound(index);
  });

  it('one source may reference a block through two engine hashes; it stays until both are removed', () => {
    const index = new BlockIndex({ blockSize: BS });
    index.apply('a', [stored([1n], null, [1]), stored([2n], null, [1])]);
    expect(index.blocksOf('a')).toBe(1);
    index.apply('a', [removed([1n])]);
    expect(index.match(q([1]))).toEqual(new Map([['a', 1]]));
    index.apply('a', [removed([2n])]);
    expect(index.match(q([1]))).toEqual(new Map());
    expect(index.size).toBe(0);
    expectSound(index);
  });

  it('more sources than mask bits (id-list match) give exact per-source counts', () => {
    const index = new BlockIndex({ blockSize: BS, mediums: 'separate' });
    const contents = Array.from({ length: 40 }, (_, i) => i + 1);
    for (let k = 1; k <= 36; k++) {
      const hashes = Array.from({ length: k }, (_, i) => BigInt(k * 1000 + i));
      index.apply(`s${k}`, [stored(hashes, null, contents.slice(0, k))]);
    }
    index.apply('s36', [stored([1n], null, [1], { medium: 'CPU_PINNED' })]);
    index.apply('s20', [removed([20_005n])]); // s20 now holds blocks 0-4 and 6-19
    const want = new Map<string, number>();
    for (let k = 1; k <= 36; k++) want.set(`s${k}`, k === 20 ? 5 : k);
    expect(index.match(q(contents))).toEqual(want);
    expect(index.match(q(contents), { mediums: true })).toEqual(new Map([...want, ['s36#CPU_PINNED', 1]]));
    expect(index.match(q([1, 2, 3, 99]))).toEqual(new Map([...want].map(([s, n]) => [s, Math.min(n, 3)])));
    index.removeSource('s1');
    expect(index.match(q([1])).has('s1')).toBe(false);
    expect(index.match(q([1])).size).toBe(35);
    expectSound(index);
  });

  it('LoRA blocks live on their own path', () => {
    const index = new BlockIndex({ blockSize: BS });
    index.apply('a', [stored([1n], null, [1], { loraName: 'sql' })]);
    expect(index.match(q([1]))).toEqual(new Map());
    expect(index.matchTokens(tokensOf([1]), 'sql')).toEqual(new Map([['a', 1]]));
  });
});

describe('BlockIndex LRU pruning', () => {
  it('prunes least-recently-used leaves first, down to the target ratio', () => {
    const index = new BlockIndex({ blockSize: BS, maxBlocks: 10, pruneTarget: 0.5 });
    index.apply('a', [stored([1n, 2n, 3n, 4n], null, [1, 2, 3, 4])]); // chain A
    index.apply('b', [stored([11n, 12n, 13n, 14n], null, [5, 6, 7, 8])]); // chain B
    expect(index.match(q([1, 2, 3, 4]))).toEqual(new Map([['a', 4]])); // A is now the most recent
    index.apply('c', [stored([21n, 22n, 23n], null, [9, 10, 11])]); // 11 nodes > 10 → prune to 5
    const s = index.stats();
    expect(s.nodes).toBe(5);
    expect(s.pruned).toBe(6);
    // B (oldest) went entirely, then the LRU leaf of A (its tail, touched before c was stored).
    expect(index.match(q([5, 6, 7, 8]))).toEqual(new Map());
    expect(index.match(q([1, 2, 3, 4]))).toEqual(new Map([['a', 2]]));
    expect(index.match(q([9, 10, 11]))).toEqual(new Map([['c', 3]]));
    expect(index.blocksOf('b')).toBe(0);
    // Pruned blocks lost their engine mappings: children of them have an unknown parent.
    index.apply('b', [stored([15n], 14n, [9])]);
    expect(index.stats().unknownParent).toBe(1);
    expectSound(index);
  });

  it('random stores keep nodes within maxBlocks and never report pruned or removed blocks', () => {
    const next = rng(99);
    const maxBlocks = 60;
    const index = new BlockIndex({ blockSize: BS, maxBlocks });
    const model = new Model();
    let h = 1n;
    for (let step = 0; step < 3000; step++) {
      const src = `s${next(4)}`;
      const mine = model.mapped(src);
      const op = next(10);
      let ev: KvCacheEvent;
      if (op < 7) {
        const parent = mine.length > 0 && next(4) > 0 ? mine[next(mine.length)] : null;
        const len = 1 + next(4);
        const contents = Array.from({ length: len }, () => next(5));
        ev = stored(Array.from({ length: len }, () => h++), parent, contents);
      } else if (op < 9 || mine.length === 0) {
        ev = removed(mine.length > 0 ? [mine[next(mine.length)]] : [h + 1000n]);
      } else ev = CLEARED;
      index.apply(src, [ev]);
      model.apply(src, ev, BS);
      expect(index.size).toBeLessThanOrEqual(maxBlocks);
      const query = model.randomQuery(next, 5);
      const got = index.match(hashBlocks(tokensOf(query), BS));
      const want = model.match(query);
      for (const [s, n] of got) {
        expect(n).toBeGreaterThan(0);
        expect(n).toBeLessThanOrEqual(want.get(s) ?? 0);
      }
      if (step % 250 === 0) expectSound(index);
    }
    expect(index.stats().pruned).toBeGreaterThan(0);
    expectSound(index);
  });
});

/**
 * Reference model: per source, the engine hash → block PATH (the block contents from the root,
 * as a string) it maps to. A source holds a path if some engine hash maps to it; match counts
 * the consecutive held prefixes. No tree, no local hashes.
 */
class Model {
  private readonly maps = new Map<string, Map<bigint, string>>();

  mapped(src: string): bigint[] {
    return [...(this.maps.get(src)?.keys() ?? [])];
  }

  /** Distinct paths the source holds. */
  held(src: string): number {
    return new Set(this.maps.get(src)?.values() ?? []).size;
  }

  private key(src: string, medium: string | null): string {
    return medium === null || medium === 'GPU' ? src : `${src}#${medium}`;
  }

  apply(src: string, ev: KvCacheEvent, bs: number): void {
    if (ev.type === 'cleared') {
      for (const [k, m] of this.maps) if (k === src || k.startsWith(`${src}#`)) m.clear();
      return;
    }
    const key = this.key(src, ev.medium);
    let m = this.maps.get(key);
    if (m === undefined) this.maps.set(key, (m = new Map()));
    if (ev.type === 'removed') {
      for (const h of ev.blockHashes) m.delete(h);
      return;
    }
    let path = '';
    if (ev.parentBlockHash !== null) {
      const p = m.get(ev.parentBlockHash);
      if (p === undefined) return;
      path = p;
    }
    for (let i = 0; i < ev.blockHashes.length; i++) {
      const content = (ev.tokenIds[i * bs] - 1) / 1009;
      path = `${path}/${content}`;
      m.set(ev.blockHashes[i], path);
    }
  }

  match(contents: readonly number[], withMediums = false): Map<string, number> {
    const out = new Map<string, number>();
    for (const [src, m] of this.maps) {
      if (!withMediums && src.includes('#')) continue;
      const held = new Set(m.values());
      let path = '';
      let n = 0;
      while (n < contents.length && held.has((path = `${path}/${contents[n]}`))) n++;
      if (n > 0) out.set(src, n);
    }
    return out;
  }

  /** A held path of some source, often cut, extended or altered. */
  randomQuery(next: (n: number) => number, alphabet: number): number[] {
    const paths = [...this.maps.values()].flatMap((m) => [...m.values()]);
    let q: number[] = [];
    if (paths.length > 0 && next(5) > 0) q = paths[next(paths.length)].split('/').slice(1).map(Number);
    if (next(2) === 0 && q.length > 0) q.length = 1 + next(q.length);
    if (next(3) === 0 && q.length > 0) q[next(q.length)] = next(alphabet);
    const extra = next(3);
    for (let i = 0; i < extra; i++) q.push(next(alphabet));
    return q;
  }
}

describe('BlockIndex against a reference model', () => {
  // 5 sources: the bit-mask match; 40 sources: ids past the mask width, the id-list match.
  for (const [seed, nSources] of [[1, 5], [2, 5], [3, 5], [4, 40]]) {
    it(`random stores/removes/clears (seed ${seed}, ${nSources} sources) give the model's match for random queries`, () => {
      const next = rng(seed * 7919);
      const index = new BlockIndex({ blockSize: BS, mediums: 'separate' });
      const model = new Model();
      const alphabet = 4; // few distinct contents → heavy path sharing across sources and events
      let fresh = 1n;
      let nonEmpty = 0;
      let diverging = 0;
      for (let step = 0; step < 4000; step++) {
        const src = `w${next(nSources)}`;
        const medium = next(8) === 0 ? 'CPU_PINNED' : 'GPU';
        const key = medium === 'GPU' ? src : `${src}#${medium}`;
        const mine = model.mapped(key);
        const op = next(100);
        let ev: KvCacheEvent;
        if (op < 60) {
          let parent: bigint | null = null;
          const r = next(10);
          if (r < 7 && mine.length > 0) parent = mine[next(mine.length)];
          else if (r === 7) parent = 1n << 62n; // unknown parent
          const len = 1 + next(5);
          const contents = Array.from({ length: len }, () => next(alphabet));
          const blockHashes: bigint[] = [];
          for (let i = 0; i < len; i++) {
            // Sometimes reuse one of the source's mapped engine hashes (remap), else a fresh one;
            // a shared counter also gives different sources equal engine hashes for other content.
            if (next(10) === 0 && mine.length > 0) {
              const reuse = mine[next(mine.length)];
              if (reuse !== parent && !blockHashes.includes(reuse)) {
                blockHashes.push(reuse);
                continue;
              }
            }
            blockHashes.push(fresh++);
          }
          ev = stored(blockHashes, parent, contents, { medium });
        } else if (op < 90) {
          const n = 1 + next(3);
          const hs = Array.from({ length: n }, () => (mine.length > 0 && next(5) > 0 ? mine[next(mine.length)] : fresh + 99n));
          ev = removed([...new Set(hs)], medium);
        } else if (op < 97) {
          ev = CLEARED;
        } else {
          ev = stored([fresh++, fresh++], null, [1]); // malformed: 2 hashes, 1 block of tokens
        }
        index.apply(src, [ev]);
        if (!(ev.type === 'stored' && ev.tokenIds.length !== ev.blockHashes.length * BS)) model.apply(src, ev, BS);
        for (let k = 0; k < 3; k++) {
          const query = model.randomQuery(next, alphabet);
          const local = hashBlocks(tokensOf(query), BS);
          const want = model.match(query);
          expect(index.match(local)).toEqual(want);
          if (want.size > 0) nonEmpty++;
          if (want.size > 1 && new Set(want.values()).size > 1) diverging++;
          if (k === 0) expect(index.match(local, { mediums: true })).toEqual(model.match(query, true));
        }
        if (step % 500 === 0) expectSound(index);
      }
      expectSound(index);
      const s = index.stats();
      // The queries exercise the index: most hit something, many split sources at different depths.
      expect(nonEmpty).toBeGreaterThan(4000 * 3 * 0.5);
      expect(diverging).toBeGreaterThan(4000 * 3 * 0.1);
      expect(s.unknownParent).toBeGreaterThan(0);
      expect(s.unknownRemoved).toBeGreaterThan(0);
      expect(s.malformed).toBeGreaterThan(0);
      expect(s.nodes).toBeGreaterThan(0);
      expect(index.sources().length).toBeGreaterThanOrEqual(nSources);
      for (const [src, n] of s.blocksPerSource) expect(n).toBe(model.held(src));
    });
  }
});
