import { describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import { SeededRng } from '../../src/core/rng.js';
import { DEFAULT_COST_MODEL, stepDurationMs } from '../../src/engine/cost-model.js';
import { Engine, type EngineOptions, type RequestRecord, type StepPlan, type TokenOutput } from '../../src/sim/engine.js';
import type { KvEvent } from '../../src/sim/kv-events.js';

/** Mirrors a router's view of one engine's cache from its KV events. */
class EventMirror {
  readonly blocks = new Set<bigint>();
  stored = 0;
  readonly sink = (events: KvEvent[]): void => {
    for (const e of events) {
      if (e.type === 'BlockStored') {
        expect(e.tokenIds.length).toBe(e.blockHashes.length * e.blockSize);
        for (const h of e.blockHashes) {
          expect(this.blocks.has(h)).toBe(false);
          this.blocks.add(h);
          this.stored++;
        }
      } else if (e.type === 'BlockRemoved') {
        for (const h of e.blockHashes) {
          expect(this.blocks.has(h)).toBe(true);
          this.blocks.delete(h);
        }
      } else this.blocks.clear();
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

function runUntilIdle(engine: Engine, clock: ManualClock, mirror?: EventMirror): RunLog {
  const out: RunLog = { plans: [], outputs: [], records: new Map() };
  for (let i = 0; i < 1_000_000; i++) {
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

/** Duration of a lone decode step of a sequence whose context holds `ctx` tokens. */
const decodeStepMs = (ctx: number): number =>
  stepDurationMs(DEFAULT_COST_MODEL, { prefillTokens: 0, prefillPairs: 0, decodeSeqs: 1, decodeContextTokens: ctx });

describe('engine: prefilled (imported KV) requests', () => {
  it('TTFT is one decode step: no prefill time, no prompt tokens priced', () => {
    const { engine, clock, mirror } = makeEngine();
    const prompt = tokens(4000, 1);
    engine.submit({ id: 'd', promptTokens: prompt, maxTokens: 5, prefilled: true });
    const log = runUntilIdle(engine, clock, mirror);
    const rec = log.records.get('d')!;
    expect(log.plans).toHaveLength(5);
    for (const p of log.plans) {
      expect(p.prefillTokens).toBe(0);
      expect(p.decodeSeqs).toBe(1);
    }
    // First step: a decode over the whole prompt's context.
    expect(log.plans[0]!.durationMs).toBeCloseTo(decodeStepMs(4000), 9);
    expect(rec.ttftMs).toBeCloseTo(decodeStepMs(4000), 9);
    expect(rec.outputTokens).toBe(5);
    expect(rec.prefilled).toBe(true);
    expect(rec.prefillTokensComputed).toBe(0);
    expect(rec.cachedTokens).toBe(0);
    const idx = log.outputs.map((o) => o.index);
    expect(idx).toEqual([0, 1, 2, 3, 4]);
    expect(log.outputs[0]!.ttftMs).toBeCloseTo(rec.ttftMs, 9);

    // The same prompt computed normally takes far longer to its first token.
    const cold = makeEngine();
    cold.engine.submit({ id: 'c', promptTokens: prompt, maxTokens: 5 });
    const coldRec = runUntilIdle(cold.engine, cold.clock).records.get('c')!;
    expect(coldRec.ttftMs).toBeGreaterThan(rec.ttftMs * 10);
    expect(coldRec.prefillTokensComputed).toBe(4000);

    const s = engine.stats();
    expect(s).toMatchObject({ prefillTokensComputed: 0, prefilledAdmissions: 1, importedTokens: 3999, promptTokens: 4000, generationTokens: 5 });
  });

  it('step durations never include a prefilled request prompt, alongside normal work', () => {
    const { engine, clock, mirror } = makeEngine({ maxNumBatchedTokens: 512 });
    engine.submit({ id: 'p', promptTokens: tokens(3000, 3), maxTokens: 3, prefilled: true });
    engine.submit({ id: 'n', promptTokens: tokens(1000, 2), maxTokens: 3 });
    const log = runUntilIdle(engine, clock, mirror);
    // Only the normal request's 1000 prompt tokens are ever priced as prefill.
    expect(log.plans.reduce((a, p) => a + p.prefillTokens, 0)).toBe(1000);
    expect(engine.stats().prefillTokensComputed).toBe(1000);
    // Both share the first step: 1 token (a decode) for the prefilled one, 511 prefill tokens.
    expect(log.plans[0]).toMatchObject({ numScheduled: 2, prefillTokens: 511, decodeSeqs: 1 });
    const p = log.records.get('p')!;
    expect(p.firstTokenMs).toBe(log.plans[0]!.endMs);
    expect(p.prefillTokensComputed).toBe(0);
    expect(log.records.get('n')!.prefillTokensComputed).toBe(1000);
    // The first step is priced as 511 prefill tokens + one decode over a 3000-token context.
    expect(log.plans[0]!.durationMs).toBeCloseTo(
      stepDurationMs(DEFAULT_COST_MODEL, { prefillTokens: 511, prefillPairs: (511 * 512) / 2, decodeSeqs: 1, decodeContextTokens: 3000 }),
      9,
    );
  });

  it('imported blocks are cached and announced (BlockStored); stored − removed mirrors the cache', () => {
    const { engine, clock, mirror } = makeEngine({ blockSize: 4, numGpuBlocks: 64 });
    const prompt = tokens(22, 5); // 5 full blocks + 2 tokens
    engine.submit({ id: 'p', promptTokens: prompt, maxTokens: 1, prefilled: true });
    const plan = engine.step()!;
    expect(plan).toMatchObject({ prefillTokens: 0, decodeSeqs: 1, numScheduled: 1 });
    // Blocks for the whole prompt are held from admission on.
    expect(engine.stats().freeBlocks).toBe(64 - 6);
    clock.set(plan.endMs);
    engine.completeStep();
    expect(mirror.stored).toBe(5);
    expect(engine.cachedBlockHashes().size).toBe(5);
    expect(mirror.blocks).toEqual(engine.cachedBlockHashes());

    // A normal request for the same prompt now hits the imported blocks.
    engine.submit({ id: 'n', promptTokens: prompt, maxTokens: 1 });
    const rec = runUntilIdle(engine, clock, mirror).records.get('n')!;
    expect(rec.cachedTokens).toBe(20);
    expect(rec.prefillTokensComputed).toBe(2);
  });

  it('prefix-cache hits are reused by a prefilled request (and counted as hits)', () => {
    const { engine, clock, mirror } = makeEngine({ blockSize: 4, numGpuBlocks: 64 });
    const shared = tokens(16, 7);
    engine.submit({ id: 'a', promptTokens: [...shared, ...tokens(5, 8)], maxTokens: 1 });
    runUntilIdle(engine, clock, mirror);
    const storedBefore = mirror.stored;
    engine.submit({ id: 'p', promptTokens: [...shared, ...tokens(9, 9)], maxTokens: 2, prefilled: true });
    const log = runUntilIdle(engine, clock, mirror);
    const rec = log.records.get('p')!;
    expect(rec.cachedTokens).toBe(16);
    expect(rec.prefillTokensComputed).toBe(0);
    // 25 prompt tokens: 6 full blocks, 4 of them hits → 2 newly stored.
    expect(mirror.stored - storedBefore).toBe(2);
    const s = engine.stats();
    expect(s.importedTokens).toBe(24 - 16);
    expect(s.prefixCacheHits).toBe(16);
    expect(log.plans.every((p) => p.prefillTokens === 0)).toBe(true);
  });

  it('waits for blocks like any request', () => {
    const { engine, clock, mirror } = makeEngine({ blockSize: 4, numGpuBlocks: 8 });
    engine.submit({ id: 'big', promptTokens: tokens(24, 1), maxTokens: 4 }); // 6 blocks, then 7
    engine.submit({ id: 'p', promptTokens: tokens(12, 2), maxTokens: 2, prefilled: true }); // needs 3
    const plan = engine.step()!;
    expect(plan.numScheduled).toBe(1);
    expect(engine.stats()).toMatchObject({ running: 1, waiting: 1 });
    // big's 24 prompt tokens (in flight) + 1: a waiting prefilled request has 1 token to compute.
    expect(engine.stats().pendingTokens).toBe(25);
    clock.set(plan.endMs);
    engine.completeStep();
    const log = runUntilIdle(engine, clock, mirror);
    const p = log.records.get('p')!;
    const big = log.records.get('big')!;
    expect(p.firstScheduledMs).toBeGreaterThanOrEqual(big.finishMs);
    expect(p.outputTokens).toBe(2);
    expect(p.prefillTokensComputed).toBe(0);
    expect(p.queueMs).toBeGreaterThan(0);
    // TTFT = queueing + one decode step.
    expect(p.firstTokenMs - p.firstScheduledMs).toBeCloseTo(
      stepDurationMs(DEFAULT_COST_MODEL, { prefillTokens: 0, prefillPairs: 0, decodeSeqs: 1, decodeContextTokens: 12 }),
      9,
    );
  });

  it('a preempted prefilled request is recomputed locally (prefill priced), and still finishes', () => {
    // 10 blocks of 4 tokens. r0 (normal) is admitted first; the prefilled requests come after
    // and are the preemption victims once decode growth runs out of blocks.
    const { engine, clock, mirror } = makeEngine({ blockSize: 4, numGpuBlocks: 10 });
    engine.submit({ id: 'r0', promptTokens: tokens(6, 100), maxTokens: 20 });
    for (let i = 1; i < 4; i++) engine.submit({ id: `r${i}`, promptTokens: tokens(6, 100 + i), maxTokens: 20, prefilled: true });
    const log = runUntilIdle(engine, clock, mirror);
    const s = engine.stats();
    expect(s.preemptions).toBeGreaterThan(0);
    expect(s.finishedRequests).toBe(4);
    const victims = [1, 2, 3].map((i) => log.records.get(`r${i}`)!).filter((r) => r.preemptions > 0);
    expect(victims.length).toBeGreaterThan(0);
    for (const v of victims) {
      expect(v.prefilled).toBe(true);
      // Recomputed: prompt + tokens generated before the preemption, minus prefix hits (the
      // blocks freed at preemption usually stay cached).
      expect(v.prefillTokensComputed).toBeGreaterThan(0);
    }
    for (let i = 0; i < 4; i++) {
      expect(log.records.get(`r${i}`)!.outputTokens).toBe(20);
      const idx = log.outputs.filter((o) => o.id === `r${i}`).map((o) => o.index);
      expect(idx).toEqual(Array.from({ length: 20 }, (_, k) => k));
    }
    expect(s.prefillTokensComputed).toBe(log.plans.reduce((a, p) => a + p.prefillTokens, 0));
    expect(s.prefilledAdmissions).toBe(3); // re-admissions after preemption are normal ones
    expect(s.kvUsage).toBe(0);
  });

  it('reports the physical blocks held at the end when asked (PD prefill side)', () => {
    const { engine, clock } = makeEngine({ blockSize: 4, numGpuBlocks: 16 });
    engine.submit({ id: 'x', promptTokens: tokens(10, 1), maxTokens: 1, reportBlockIds: true });
    engine.submit({ id: 'y', promptTokens: tokens(10, 2), maxTokens: 1 });
    const log = runUntilIdle(engine, clock);
    const x = log.records.get('x')!;
    expect(x.blockIds).toHaveLength(3);
    expect(new Set(x.blockIds).size).toBe(3);
    for (const b of x.blockIds!) expect(b >= 0 && b < 16).toBe(true);
    expect(log.records.get('y')!.blockIds).toBeUndefined();
    expect(x.prefilled).toBeUndefined();
  });

  it('exposes the end of the last completed step', () => {
    const { engine, clock } = makeEngine();
    expect(engine.lastStepEndMs).toBe(-Infinity);
    engine.submit({ id: 'a', promptTokens: tokens(10, 1), maxTokens: 1 });
    const plan = engine.step()!;
    clock.set(plan.endMs);
    engine.completeStep();
    expect(engine.lastStepEndMs).toBe(plan.endMs);
  });
});
