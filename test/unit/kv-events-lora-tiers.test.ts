/**
 * KV events with LoRA adapters and offloaded tiers, shaped as current engines publish them:
 *  - vLLM (≥ 0.24): maps tagged `type`, `lora_id` (deprecated int), `medium`, `lora_name`,
 *    `extra_keys` (the adapter name per block); its OffloadingConnector's CPU stores carry the
 *    GPU block hashes with `parent_block_hash` nil and EMPTY `token_ids`.
 *  - SGLang: the same maps (older: positional arrays `[tag, block_hashes, parent, token_ids,
 *    block_size, lora_id, medium]`), signed i64 hashes, `[ts, events, attn_dp_rank]` batches,
 *    HiCache tiers as `medium`.
 * Decoded by kvgate's decoder, applied to the block index, and routed by kv_aware.
 */
import { Encoder } from '@msgpack/msgpack';
import { describe, expect, it } from 'vitest';
import { BlockIndex, hashBlocks, loraSeed, mediumTier } from '../../src/cache/block-index.js';
import { ManualClock } from '../../src/core/clock.js';
import type { RequestContext } from '../../src/core/context.js';
import { WorkerRegistry } from '../../src/core/registry.js';
import { SeededRng } from '../../src/core/rng.js';
import { Worker } from '../../src/core/worker.js';
import { decodeKvEventBatch } from '../../src/events/decode.js';
import { defaultKvAwareConfig, KvAwarePolicy } from '../../src/policies/kv-aware.js';
import { buildContext, resolveModel, routeModel, type RoutedRequest } from '../../src/routers/request.js';

const enc = new Encoder({ useBigInt64: true });
const BS = 16;
const SEQ = Buffer.from('0000000000000001', 'hex');
const tokens = (nBlocks: number, from = 100) => Array.from({ length: nBlocks * BS }, (_, i) => from + i);

/** vLLM's BlockStored as a map (msgspec, omit_defaults: lora_id/medium/lora_name always there). */
function vllmStored(hashes: bigint[], parent: bigint | null, toks: number[], o: { lora?: string; loraId?: number; medium?: string } = {}) {
  return {
    type: 'BlockStored',
    block_hashes: hashes,
    parent_block_hash: parent,
    token_ids: toks,
    block_size: BS,
    lora_id: o.loraId ?? null,
    medium: o.medium ?? 'GPU',
    lora_name: o.lora ?? null,
    ...(o.lora ? { extra_keys: hashes.map(() => [o.lora]) } : {}),
  };
}
const vllmRemoved = (hashes: bigint[], medium = 'GPU') => ({ type: 'BlockRemoved', block_hashes: hashes, medium });

function apply(index: BlockIndex, events: unknown[], source: string, rank: number | null = 0) {
  const batch = decodeKvEventBatch(SEQ, Buffer.from(enc.encode(rank === null ? [1_790_000_000.5, events] : [1_790_000_000.5, events, rank])));
  expect(batch.malformed).toBe(0);
  index.apply(source, batch.events);
  return batch;
}

const H = (i: number) => 0x9000_0000_0000_0000n + BigInt(i);

describe('LoRA adapters in KV events', () => {
  it('vLLM map events: blocks stored under an adapter match only requests for that adapter', () => {
    const index = new BlockIndex();
    const t = tokens(4);
    const batch = apply(index, [vllmStored([H(1), H(2), H(3), H(4)], null, t, { lora: 'sql-lora', loraId: 1 })], 'w1');
    expect(batch.events[0]).toMatchObject({ type: 'stored', loraName: 'sql-lora', loraId: 1 });
    expect(index.matchTokens(t, null).size).toBe(0); // base model: no hit
    expect(index.matchTokens(t, 'other-lora').size).toBe(0); // another adapter: no hit
    expect(index.matchTokens(t, 'sql-lora').get('w1')).toBe(4);
    // The base model's own blocks of the same tokens are a separate path.
    apply(index, [vllmStored([H(11), H(12)], null, t.slice(0, 2 * BS))], 'w2');
    expect([...index.matchTokens(t, null)]).toEqual([['w2', 2]]);
    expect([...index.matchTokens(t, 'sql-lora')]).toEqual([['w1', 4]]);
    // Removal by engine hash works the same for adapter blocks.
    apply(index, [vllmRemoved([H(3), H(4)])], 'w1');
    expect(index.matchTokens(t, 'sql-lora').get('w1')).toBe(2);
    expect(index.verify()).toEqual([]);
  });

  it('positional (legacy) vLLM arrays carry lora_id at [5] and lora_name at [7]', () => {
    const index = new BlockIndex();
    const t = tokens(2);
    apply(index, [['BlockStored', [H(1), H(2)], null, t, BS, 3, 'GPU', 'a1']], 'w1');
    expect(index.matchTokens(t, 'a1').get('w1')).toBe(2);
    expect(index.matchTokens(t).size).toBe(0);
  });

  it('SGLang events (maps or arrays, signed hashes, attn_dp_rank) with only an integer lora_id stay apart from the base model', () => {
    const index = new BlockIndex();
    const t = tokens(3, 7);
    const signed = [-5n, -6n, -7n];
    const map = { type: 'BlockStored', block_hashes: signed, parent_block_hash: null, token_ids: t, block_size: BS, lora_id: 7, medium: 'GPU' };
    const batch = apply(index, [map], 'sg@1', 1);
    expect(batch.dpRank).toBe(1);
    expect(batch.events[0]).toMatchObject({ loraName: null, loraId: 7 });
    expect(index.matchTokens(t).size).toBe(0);
    expect(index.matchTokens(t, 'lora_id:7').get('sg@1')).toBe(3);
    // Base-model blocks (lora_id absent / 0) from an older SGLang, positional.
    apply(index, [['BlockStored', [-15n, -16n], null, t.slice(0, 2 * BS), BS, null, 'GPU']], 'sg@0');
    expect([...index.matchTokens(t)]).toEqual([['sg@0', 2]]);
    expect(index.verify()).toEqual([]);
  });

  it('loraSeed keeps the base model on seed 1337 and gives each adapter its own', () => {
    expect(loraSeed(null)).toBe(1337n);
    expect(loraSeed('')).toBe(1337n);
    expect(loraSeed('a')).not.toBe(loraSeed('b'));
    expect(hashBlocks(tokens(1), BS, loraSeed('a'))).not.toEqual(hashBlocks(tokens(1), BS));
  });
});

describe('offloaded tiers (CPU / disk) and weighted overlap', () => {
  const weights = { host: 0.75, disk: 0.25 };

  it('maps engine medium names to tiers', () => {
    expect([null, 'GPU', 'gpu'].map(mediumTier)).toEqual(['gpu', 'gpu', 'gpu']);
    expect(['CPU', 'CPU_PINNED', 'CPU_TIER1', 'HOST'].map(mediumTier)).toEqual(['host', 'host', 'host', 'host']);
    expect(['DISK', 'STORAGE', 'EXTERNAL', 'CPU_TIER2', 'LMCACHE'].map(mediumTier)).toEqual(['disk', 'disk', 'disk', 'disk', 'disk']);
  });

  it("vLLM OffloadingConnector: tokenless CPU stores resolve through the worker's GPU blocks; GPU eviction leaves them as host hits", () => {
    const index = new BlockIndex({ mediums: 'separate' });
    const t = tokens(6);
    const hs = [1, 2, 3, 4, 5, 6].map(H);
    apply(index, [vllmStored(hs, null, t)], 'w1');
    // The connector offloads all six (no parent, no tokens), then the GPU evicts the last four.
    apply(index, [vllmStored(hs, null, [], { medium: 'CPU' }), vllmRemoved(hs.slice(2))], 'w1');
    // Worker 2 holds three blocks on GPU.
    apply(index, [vllmStored([H(21), H(22), H(23)], null, t.slice(0, 3 * BS))], 'w2');
    const local = hashBlocks(t, BS);
    expect(Object.fromEntries(index.match(local))).toEqual({ w1: 2, w2: 3 }); // GPU only
    expect(Object.fromEntries(index.matchTiered(local, weights))).toEqual({ w1: 2 + 4 * 0.75, w2: 3 });
    expect(Object.fromEntries(index.matchTiered(local, { host: 0, disk: 0 }))).toEqual({ w1: 2, w2: 3 });
    // The host LRU drops block 5: w1's run over the union of tiers ends at block 4.
    apply(index, [vllmRemoved([H(5)], 'CPU')], 'w1');
    expect(index.matchTiered(local, weights).get('w1')).toBe(2 + 2 * 0.75);
    expect(index.stats().noTokens).toBe(0);
    expect(index.verify()).toEqual([]);
  });

  it('disk tier counts with the disk weight; a hole in every tier ends the run; weight 0 ends it too', () => {
    const index = new BlockIndex({ mediums: 'separate' });
    const t = tokens(4);
    apply(index, [vllmStored([H(1), H(2)], null, t.slice(0, 2 * BS))], 'w1');
    // SGLang HiCache: the storage layer stores the whole chain with tokens.
    apply(index, [{ type: 'BlockStored', block_hashes: [H(1), H(2), H(3), H(4)], parent_block_hash: null, token_ids: t, block_size: BS, lora_id: null, medium: 'DISK' }], 'w1');
    const local = hashBlocks(t, BS);
    expect(index.matchTiered(local, weights).get('w1')).toBe(2 + 2 * 0.25);
    // A host-tier run whose parent only the GPU tier holds continues the same path.
    apply(index, [vllmStored([H(3)], H(2), t.slice(2 * BS, 3 * BS), { medium: 'CPU_PINNED' })], 'w1');
    expect(index.stats().unknownParent).toBe(0);
    expect(index.matchTiered(local, weights).get('w1')).toBe(2 + 0.75 + 0.25);
    apply(index, [vllmRemoved([H(3)], 'CPU_PINNED')], 'w1');
    expect(index.matchTiered(local, { host: 0.75, disk: 0 }).get('w1')).toBe(2);
    apply(index, [vllmRemoved([H(2)])], 'w1'); // GPU loses block 2: disk still has it
    expect(index.matchTiered(local, weights).get('w1')).toBe(1 + 3 * 0.25);
    apply(index, [{ type: 'AllBlocksCleared' }], 'w1'); // clears every tier of the worker
    expect(index.matchTiered(local, weights).size).toBe(0);
    expect(index.verify()).toEqual([]);
  });

  it("'gpu-only' ignores tier events, so weights change nothing", () => {
    const index = new BlockIndex({ mediums: 'gpu-only' });
    const t = tokens(2);
    apply(index, [vllmStored([H(1), H(2)], null, t, { medium: 'CPU' })], 'w1');
    expect(index.matchTiered(hashBlocks(t, BS), weights).size).toBe(0);
    expect(index.stats().ignoredMedium).toBe(1);
  });
});

describe('kv_aware with tiers and LoRA', () => {
  function setup(over: { hostHitWeight?: number; diskHitWeight?: number } = {}) {
    const clock = new ManualClock(1000);
    const index = new BlockIndex({ blockSize: BS, mediums: 'separate' });
    const workers = [0, 1].map((i) => {
      const w = new Worker({ url: `http://w${i}:8000`, modelId: 'm' });
      w.healthy = true;
      return w;
    });
    const policy = new KvAwarePolicy(
      { clock, rng: new SeededRng(1) },
      { index, lastEventAtMs: () => clock.now(), isAccurate: () => true, resetCount: () => 0 },
      { ...defaultKvAwareConfig, evictionIntervalSecs: 0, defaultBlockSize: BS, historyWeight: 0, ...over },
    );
    let id = 0;
    const ctx = (toks: number[], loraName?: string): RequestContext => ({ requestId: `r${id++}`, route: 'completions', model: 'm', loraName, routingText: '', tokenIds: toks, headers: {}, stream: true, arrivalMs: clock.now() });
    return { index, workers, policy, ctx };
  }

  it('credits host-tier blocks: a worker with the prefix offloaded beats one with a shorter GPU prefix (weights on), not with weights 0', () => {
    const prompt = tokens(20);
    for (const [weights, expected] of [
      [{}, 0],
      [{ hostHitWeight: 0, diskHitWeight: 0 }, 1],
    ] as const) {
      const { index, workers, policy, ctx } = setup(weights);
      const hs = Array.from({ length: 16 }, (_, i) => H(i));
      apply(index, [vllmStored(hs, null, prompt.slice(0, 16 * BS))], workers[0].id);
      apply(index, [vllmStored(hs, null, [], { medium: 'CPU' }), vllmRemoved(hs)], workers[0].id); // all 16 only on host now
      apply(index, [vllmStored([H(101), H(102), H(103), H(104)], null, prompt.slice(0, 4 * BS))], workers[1].id);
      expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[expected]);
      expect(policy.lastDecision!.overlapBlocks).toBe(expected === 0 ? 12 : 4);
    }
  });

  it("routes a LoRA request to the worker holding that adapter's blocks, and a base request ignores them", () => {
    const { index, workers, policy, ctx } = setup();
    const prompt = tokens(10);
    apply(index, [vllmStored(Array.from({ length: 8 }, (_, i) => H(i)), null, prompt.slice(0, 8 * BS), { lora: 'sql-lora', loraId: 1 })], workers[1].id);
    apply(index, [vllmStored([H(50), H(51)], null, prompt.slice(0, 2 * BS))], workers[0].id);
    expect(policy.selectWorker(workers, ctx(prompt, 'sql-lora'))).toBe(workers[1]);
    expect(policy.lastDecision!.overlapBlocks).toBe(8);
    expect(policy.selectWorker(workers, ctx(prompt))).toBe(workers[0]);
    expect(policy.lastDecision!.overlapBlocks).toBe(2);
  });
});

describe('LoRA model names at the front', () => {
  function registry() {
    const reg = new WorkerRegistry();
    const a = new Worker({ url: 'http://a:8000', modelId: 'meta-llama/Llama-3.1-8B' });
    const b = new Worker({ url: 'http://b:8000', modelId: 'meta-llama/Llama-3.1-8B' });
    a.loraAdapters = ['sql-lora'];
    for (const w of [a, b]) {
      w.healthy = true;
      reg.add(w);
    }
    return { reg, a, b };
  }
  const routed = (body: Record<string, unknown>): RoutedRequest => ({ req: { headers: {} } as never, res: undefined as never, route: 'chat', path: '/v1/chat/completions', requestId: 'x', rawBody: Buffer.from(JSON.stringify(body)), body });

  it('a request naming an adapter resolves to its base model, keeps its model name upstream and carries the adapter', () => {
    const { reg } = registry();
    const r = routed({ model: 'sql-lora', messages: [{ role: 'user', content: 'hi' }] });
    expect(routeModel(reg, r, ['regular'])).toBe('meta-llama/Llama-3.1-8B');
    expect(r.body.model).toBe('sql-lora');
    expect(JSON.parse(r.rawBody.toString()).model).toBe('sql-lora');
    const ctx = buildContext(r, 'meta-llama/Llama-3.1-8B', new ManualClock(0), undefined, false, reg);
    expect(ctx.loraName).toBe('sql-lora');
  });

  it('an unknown name with one model served is still rewritten to it (no adapter)', () => {
    const { reg } = registry();
    const r = routed({ model: 'gpt-4o', messages: [{ role: 'user', content: 'hi' }] });
    expect(routeModel(reg, r, ['regular'])).toBe('meta-llama/Llama-3.1-8B');
    expect(r.body.model).toBe('meta-llama/Llama-3.1-8B');
    expect(buildContext(r, 'meta-llama/Llama-3.1-8B', new ManualClock(0), undefined, false, reg).loraName).toBeUndefined();
  });

  it('with two models served an adapter name still resolves (its base), an unknown name is 404', () => {
    const { reg } = registry();
    const other = new Worker({ url: 'http://c:8000', modelId: 'qwen' });
    other.healthy = true;
    reg.add(other);
    expect(resolveModel(reg, { model: 'sql-lora' }, ['regular'])).toBe('meta-llama/Llama-3.1-8B');
    expect(() => resolveModel(reg, { model: 'gpt-4o' }, ['regular'])).toThrow(/gpt-4o/);
  });
});
