/**
 * The simulated engine's CPU-offload tier (--cpu-offload-blocks): GPU-cached blocks written
 * through to a bounded host LRU, loaded back instead of recomputed, with events shaped like vLLM's
 * OffloadingConnector (medium "CPU", no parent, no tokens), which the router's index resolves.
 */
import { describe, expect, it } from 'vitest';
import { BlockIndex, hashBlocks } from '../../src/cache/block-index.js';
import { ManualClock } from '../../src/core/clock.js';
import { SeededRng } from '../../src/core/rng.js';
import { normalise } from '../../src/lab/cluster.js';
import { Engine } from '../../src/sim/engine.js';
import type { KvEvent } from '../../src/sim/kv-events.js';

const BS = 16;
const tokens = (n: number, seed: number) => {
  const rng = new SeededRng(seed);
  return Array.from({ length: n }, () => rng.int(100_000));
};

function run(cpuOffloadBlocks: number) {
  const clock = new ManualClock(0);
  const events: KvEvent[] = [];
  const index = new BlockIndex({ mediums: 'separate' });
  const engine = new Engine({
    clock,
    rng: new SeededRng(1),
    numGpuBlocks: 24,
    cpuOffloadBlocks,
    kvEventSink: (batch) => {
      events.push(...batch);
      index.apply('w', normalise(batch));
    },
  });
  const records = new Map<string, { cachedTokens: number; ttftMs: number; prefillTokensComputed?: number }>();
  const serve = (id: string, prompt: number[]) => {
    engine.submit({ id, promptTokens: prompt, maxTokens: 2 });
    for (;;) {
      const plan = engine.step();
      if (!plan) break;
      clock.set(plan.endMs);
      for (const r of engine.completeStep().finished) records.set(r.id, r);
    }
  };
  const a = tokens(20 * BS, 1);
  serve('a1', a);
  serve('b', tokens(20 * BS, 2)); // together these evict a's blocks from the 24-block GPU cache
  serve('c', tokens(20 * BS, 3));
  const local = hashBlocks(a, BS);
  const before = { gpu: index.match(local).get('w') ?? 0, tiered: index.matchTiered(local, { host: 0.75, disk: 0.25 }).get('w') ?? 0 };
  serve('a2', a);
  return { records, events, before, engine };
}

describe('engine: CPU-offload tier', () => {
  it('off by default: an evicted prompt is recomputed, and no CPU events', () => {
    const { records, events } = run(0);
    expect(records.get('a2')!.cachedTokens).toBe(0);
    expect(events.some((e) => e.type !== 'AllBlocksCleared' && e.medium === 'CPU')).toBe(false);
  });

  it('on: the evicted prompt is loaded back from the host tier, faster than recomputing it', () => {
    const off = run(0);
    const on = run(200);
    const a2 = on.records.get('a2')!;
    expect(a2.cachedTokens).toBe(19 * BS); // every full block but the last token's
    expect(a2.prefillTokensComputed).toBe(20 * BS - 19 * BS);
    expect(a2.ttftMs).toBeLessThan(off.records.get('a2')!.ttftMs);
    // The router saw a's blocks leave the GPU but stay on the host, from the events alone.
    expect(on.before.gpu).toBeLessThan(20);
    expect(on.before.tiered).toBeGreaterThan(on.before.gpu);
    const cpuStores = on.events.filter((e) => e.type === 'BlockStored' && e.medium === 'CPU');
    expect(cpuStores.length).toBeGreaterThan(0);
    for (const e of cpuStores) if (e.type === 'BlockStored') expect([e.tokenIds.length, e.parentBlockHash]).toEqual([0, null]);
  });

  it('the host LRU is bounded and announces its evictions', () => {
    const { events } = run(30);
    const stored = new Set<bigint>();
    for (const e of events) {
      if (e.type === 'BlockStored' && e.medium === 'CPU') for (const h of e.blockHashes) stored.add(h);
      if (e.type === 'BlockRemoved' && e.medium === 'CPU') for (const h of e.blockHashes) expect(stored.delete(h)).toBe(true);
    }
    expect(stored.size).toBeLessThanOrEqual(30);
    expect(events.some((e) => e.type === 'BlockRemoved' && e.medium === 'CPU')).toBe(true);
  });
});
