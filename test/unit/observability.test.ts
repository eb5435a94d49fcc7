import { describe, expect, it } from 'vitest';
import { BlockIndex, hashBlocks } from '../../src/cache/block-index.js';
import { ManualClock } from '../../src/core/clock.js';
import type { RequestContext } from '../../src/core/context.js';
import { SeededRng } from '../../src/core/rng.js';
import { Worker } from '../../src/core/worker.js';
import { GatewayMetrics, WorkerLabels } from '../../src/metrics/gateway-metrics.js';
import { WorkerRegistry } from '../../src/core/registry.js';
import { DecisionFeed } from '../../src/observability/decision-feed.js';
import { compactSummary } from '../../src/policies/explain.js';
import { CacheAwarePolicy } from '../../src/policies/cache-aware.js';
import { createPolicy, POLICY_NAMES, withSessionAffinity } from '../../src/policies/factory.js';
import { KvAwarePolicy } from '../../src/policies/kv-aware.js';
import type { PolicyDeps, RoutingPolicy } from '../../src/policies/policy.js';
import { countContent, ResponseTap } from '../../src/upstream/response-tap.js';
import { boundObserver } from '../../src/metrics/bound-observer.js';
import { Histogram, Registry } from 'prom-client';

const sse = (obj: unknown) => Buffer.from(`data: ${JSON.stringify(obj)}\n\n`);

describe('ResponseTap', () => {
  it('times the first content chunk of a stream, not the role-only chunk, and the gaps between content chunks', () => {
    const itl: number[] = [];
    const firsts: number[] = [];
    const tap = new ResponseTap({ onFirstContent: (t) => firsts.push(t), onInterToken: (s) => itl.push(s) });
    tap.headers(200, 'text/event-stream; charset=utf-8');
    tap.data(sse({ choices: [{ delta: { role: 'assistant', content: '' } }] }), 100);
    expect(tap.firstContentAt).toBeUndefined();
    tap.data(sse({ choices: [{ delta: { content: 'Hel' } }] }), 130);
    tap.data(sse({ choices: [{ delta: { content: 'lo' } }] }), 150);
    // Two events in one read after a 40 ms gap: two samples of 20 ms.
    tap.data(Buffer.concat([sse({ choices: [{ delta: { content: ' a' } }] }), sse({ choices: [{ delta: { content: ' b' } }] })]), 190);
    tap.data(sse({ choices: [], usage: { prompt_tokens: 12, completion_tokens: 4, prompt_tokens_details: { cached_tokens: 8 } } }), 200);
    tap.data(Buffer.from('data: [DONE]\n\n'), 201);
    tap.end(202);
    expect(firsts).toEqual([130]);
    expect(itl.map((x) => Math.round(x * 1000))).toEqual([20, 20, 20]);
    expect(tap.contentEvents).toBe(4);
    expect(tap.usage()).toEqual({ promptTokens: 12, completionTokens: 4, cachedTokens: 8 });
  });

  it('reads SGLang-style JSON with spaces, completions text and tool calls as content', () => {
    expect(countContent(Buffer.from('data: {"text": "hi", "meta_info": {}}\n\n'))).toBe(1);
    expect(countContent(Buffer.from('data: {"choices":[{"text":""}]}\n\n'))).toBe(0);
    expect(countContent(Buffer.from('{"delta":{"tool_calls":[{"index":0}]}}'))).toBe(1);
    expect(countContent(Buffer.from('{"delta":{"tool_calls":[]}}'))).toBe(0);
    expect(countContent(Buffer.from('{"logprobs":{"content":[{"token":"a"}]}}'))).toBe(0);
  });

  it('finds usage split across reads, keeps the last one and ignores usage: null', () => {
    const tap = new ResponseTap();
    tap.headers(200, 'text/event-stream');
    tap.data(sse({ choices: [{ delta: { content: 'x' } }], usage: null }));
    tap.data(sse({ choices: [{ delta: { content: 'y' } }], usage: { prompt_tokens: 1, completion_tokens: 1 } }));
    const last = sse({ choices: [], usage: { prompt_tokens: 30, completion_tokens: 7, prompt_tokens_details: { cached_tokens: 16 } } });
    // Split inside the key and inside the object.
    const cut1 = last.indexOf('"usage"') + 3;
    const cut2 = last.indexOf('cached_tokens') + 4;
    tap.data(last.subarray(0, cut1));
    tap.data(last.subarray(cut1, cut2));
    tap.data(last.subarray(cut2));
    tap.end();
    expect(tap.usage()).toEqual({ promptTokens: 30, completionTokens: 7, cachedTokens: 16 });
  });

  it('a non-streaming answer: first token = the whole answer, usage from the JSON body', () => {
    const firsts: number[] = [];
    const tap = new ResponseTap({ onFirstContent: (t) => firsts.push(t) });
    tap.headers(200, 'application/json');
    const body = Buffer.from(JSON.stringify({ choices: [{ message: { content: 'hello' } }], usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 } }));
    tap.data(body.subarray(0, 20), 10);
    tap.data(body.subarray(20), 20);
    expect(firsts).toEqual([]);
    tap.end(25);
    expect(firsts).toEqual([25]);
    expect(tap.usage()).toEqual({ promptTokens: 5, completionTokens: 2, cachedTokens: undefined });
  });
});

/** The previous countContent (one Buffer.indexOf search per key), as the reference for the one-pass scan. */
function countContentByKeySearch(buf: Buffer): number {
  const keys = ['"content"', '"text"', '"reasoning_content"', '"reasoning"', '"tool_calls"'].map((k) => Buffer.from(k));
  const space = new Set([0x20, 0x09, 0x0a, 0x0d]);
  let n = 0;
  for (const key of keys) {
    let from = 0;
    for (;;) {
      const at = buf.indexOf(key, from);
      if (at < 0) break;
      from = at + key.length;
      let i = from;
      while (i < buf.length && space.has(buf[i])) i++;
      if (buf[i] !== 0x3a) continue;
      i++;
      while (i < buf.length && space.has(buf[i])) i++;
      const open = buf[i];
      if (open === 0x22 && i + 1 < buf.length && buf[i + 1] !== 0x22) n++;
      else if (open === 0x5b && key === keys[4]) {
        let j = i + 1;
        while (j < buf.length && space.has(buf[j])) j++;
        if (j < buf.length && buf[j] !== 0x5d) n++;
      }
    }
  }
  return n;
}

describe('ResponseTap per-chunk scanning', () => {
  it('counts content events exactly as a search for each key does, on random SSE-like reads (cut anywhere)', () => {
    const frags = ['"content"', '"text"', '"reasoning_content"', '"reasoning"', '"tool_calls"', '"content', 'content"', '"', ':', ' ', '\n', '"x"', '""', '[', ']', '[{"index":0}]', '{', '}', ',', 'data: ', '"delta"', '\\"', '"te', 'xt"', '"reasoning_', '"usage"', 'null', '"c"', '"t"', '"r"'];
    let seed = 3;
    const rnd = (k: number) => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % k);
    let total = 0;
    for (let i = 0; i < 5000; i++) {
      let s = '';
      const len = 1 + rnd(30);
      for (let j = 0; j < len; j++) s += frags[rnd(frags.length)];
      const buf = Buffer.from(s);
      const want = countContentByKeySearch(buf);
      total += want;
      expect(countContent(buf)).toBe(want);
      const cut = rnd(buf.length + 1); // a read boundary anywhere
      expect(countContent(buf.subarray(0, cut)) + countContent(buf.subarray(cut))).toBe(countContentByKeySearch(buf.subarray(0, cut)) + countContentByKeySearch(buf.subarray(cut)));
    }
    expect(total).toBeGreaterThan(100);
    const vllm = Buffer.from('data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" the","reasoning_content":"x"},"logprobs":null,"finish_reason":null}]}\n\n');
    expect(countContent(vllm)).toBe(2);
  });

  it('finds the usage object whatever byte the reads are cut at (key, value, between), and only the last one', () => {
    const body = Buffer.concat([
      sse({ choices: [{ delta: { content: 'a' } }], usage: null }),
      sse({ choices: [{ delta: { content: 'b' } }], usage: { prompt_tokens: 2, completion_tokens: 1 } }),
      Buffer.from('data: {"choices":[],"usage" : {"prompt_tokens":41,"completion_tokens":9,"prompt_tokens_details":{"cached_tokens":32}}}\n\n'),
      Buffer.from('data: [DONE]\n\n'),
    ]);
    for (let a = 0; a <= body.length; a += 1) {
      for (const b of [a, Math.min(body.length, a + 3), Math.min(body.length, a + 17)]) {
        const tap = new ResponseTap();
        tap.headers(200, 'text/event-stream');
        tap.data(body.subarray(0, a));
        tap.data(body.subarray(a, b));
        tap.data(body.subarray(b));
        tap.end();
        expect(tap.usage()).toEqual({ promptTokens: 41, completionTokens: 9, cachedTokens: 32 });
      }
    }
    // A read ending in a prefix of "usage" that the next read does not complete.
    const tap = new ResponseTap();
    tap.headers(200, 'application/json');
    tap.data(Buffer.from('{"x":"us'));
    tap.data(Buffer.from('er","u'));
    tap.data(Buffer.from('sage":{"prompt_tokens":3}}'));
    expect(tap.usage()).toEqual({ promptTokens: 3, completionTokens: undefined, cachedTokens: undefined });
  });

  it('boundObserver records what Histogram#observe records, also after remove() and reset()', async () => {
    const buckets = [0.001, 0.01, 0.1, 1];
    const reg = new Registry();
    const a = new Histogram({ name: 'a_seconds', help: 'a', labelNames: ['model', 'worker'], buckets, registers: [reg] });
    const b = new Histogram({ name: 'b_seconds', help: 'b', labelNames: ['model', 'worker'], buckets, registers: [reg] });
    const labels = { model: 'm', worker: 'w1' };
    const other = { model: 'm', worker: 'w2' };
    const fast = boundObserver(b, labels);
    const values = [0.0005, 0.001, 0.002, 0.05, 0.1, 0.5, 1, 3, 0, 0.01];
    const both = (v: number) => {
      a.observe(labels, v);
      fast(v);
      a.observe(other, v * 2);
      b.observe(other, v * 2);
    };
    const same = async () => {
      const [x, y] = [(await a.get()).values, (await b.get()).values];
      expect(y.map((v) => ({ ...v, metricName: v.metricName?.replace('b_', 'a_') }))).toEqual(x);
    };
    values.forEach(both);
    await same();
    a.remove(labels);
    b.remove(labels);
    values.forEach(both);
    await same();
    a.reset();
    b.reset();
    values.forEach(both);
    await same();
    expect((await b.get()).values.find((v) => v.metricName === 'b_seconds_count' && v.labels.worker === 'w1')?.value).toBe(values.length);
    expect(() => fast(Number.NaN)).toThrow();
  });
});

describe('WorkerLabels', () => {
  it('caps distinct worker labels and folds the rest into other; a removed worker frees its place', () => {
    const l = new WorkerLabels(3);
    expect(['a', 'b', 'c', 'd', 'e'].map((x) => l.of(x))).toEqual(['a', 'b', 'c', 'other', 'other']);
    l.forget('b');
    expect(l.of('e')).toBe('e');
    expect(l.of('d')).toBe('other');
  });
});

describe('metric types', () => {
  it('every *_total metric is a counter, and process metrics are on the registry', async () => {
    const m = new GatewayMetrics(new WorkerRegistry(), () => []);
    const text = await m.registry.metrics();
    const types = [...text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((x) => [x[1], x[2]]);
    for (const [name, type] of types) if (name.startsWith('kvgate_') && name.endsWith('_total')) expect({ name, type }).toEqual({ name, type: 'counter' });
    for (const name of ['process_cpu_seconds_total', 'nodejs_eventloop_lag_seconds', 'nodejs_heap_size_used_bytes', 'nodejs_gc_duration_seconds']) expect(text).toContain(`# TYPE ${name}`);
  });
});

// --- explain(): side-effect free, and it names what selectWorker picks -------------------------

const deps = (seed = 1): PolicyDeps => ({ clock: new ManualClock(), rng: new SeededRng(seed) });
function workers(n: number): Worker[] {
  return Array.from({ length: n }, (_, i) => {
    const w = new Worker({ url: `http://w${i}:8000`, modelId: 'm' });
    w.healthy = true;
    return w;
  });
}
const PREFIXES = ['You are a helpful bookshop assistant. '.repeat(8), 'You review code carefully and cite lines. '.repeat(8), 'Plan trips by train across Europe. '.repeat(8)];
function ctxOf(i: number): RequestContext {
  const text = PREFIXES[i % 3] + `question ${i} ${'x'.repeat(i % 7)}`;
  const tokenIds = Uint32Array.from([...text].map((c) => c.charCodeAt(0)));
  return { requestId: `r${i}`, route: 'chat', model: 'm', routingText: text, tokenIds, headers: {}, stream: false, arrivalMs: i };
}
function kvView(index: BlockIndex) {
  return { index, lastEventAtMs: () => 0, isAccurate: () => true, resetCount: () => 0 };
}

describe('explain()', () => {
  it.each(POLICY_NAMES)('%s: explaining before every decision changes none of its decisions (no state, no RNG draw)', (name) => {
    const run = (explain: boolean) => {
      const ws = workers(4);
      const index = new BlockIndex();
      const p: RoutingPolicy = createPolicy(name, deps(3), { kvIndex: kvView(index), kvAware: { defaultBlockSize: 16 } });
      const picks: string[] = [];
      for (let i = 0; i < 60; i++) {
        const ctx = ctxOf(i);
        if (explain) {
          const e = p.explain!(ws, ctx);
          expect(e.policy).toBe(name);
          expect(e.candidates.map((c) => c.worker)).toEqual(ws.map((w) => w.id));
        }
        const w = p.selectWorker(ws, ctx)!;
        picks.push(w.id);
        // Some in-flight load on the chosen worker, released a few requests later.
        w.localLoad++;
        if (i % 3 === 2) for (const x of ws) x.localLoad = Math.max(0, x.localLoad - 1);
      }
      return picks;
    };
    expect(run(true)).toEqual(run(false));
  });

  it.each(POLICY_NAMES.filter((n) => !['random', 'power_of_two', 'manual'].includes(n)))('%s: a deterministic explanation names the worker selectWorker then picks', (name) => {
    const ws = workers(3);
    const p = createPolicy(name, deps(5), { kvIndex: kvView(new BlockIndex()), kvAware: { defaultBlockSize: 16 } });
    for (let i = 0; i < 40; i++) {
      const ctx = ctxOf(i);
      const e = p.explain!(ws, ctx);
      const w = p.selectWorker(ws, ctx)!;
      if (e.deterministic) expect(e.chosen).toBe(w.id);
      w.localLoad = i % 4;
    }
  });

  it('cache_aware: shows each worker\'s matched prefix, leaves the tree unchanged, names unhealthy and breaker-open workers', () => {
    const ws = workers(3);
    const p = new CacheAwarePolicy(deps());
    const text = PREFIXES[0] + 'first';
    ws[0].localLoad = 0;
    expect(p.selectWorker([ws[1]], { ...ctxOf(0), routingText: text })!.id).toBe(ws[1].id);
    const before = [...p.treeChars()];
    const e = p.explain(ws, { ...ctxOf(1), routingText: PREFIXES[0] + 'second' });
    expect([...p.treeChars()]).toEqual(before);
    expect(e.chosen).toBe(ws[1].id);
    expect(e.rule).toBe('prefix_match');
    const c1 = e.candidates.find((c) => c.worker === ws[1].id)!;
    expect(c1.matchedChars).toBe(PREFIXES[0].length);
    expect(e.candidates.find((c) => c.worker === ws[0].id)!.matchedChars).toBe(0);
    ws[2].healthy = false;
    ws[1].breaker = { canExecute: () => false, state: 'open' } as unknown as Worker['breaker'];
    const e2 = p.explain(ws, { ...ctxOf(1), routingText: PREFIXES[0] + 'second' });
    expect(e2.candidates.map((c) => c.excluded)).toEqual([undefined, 'breaker_open', 'unhealthy']);
    expect(e2.chosen).toBe(ws[0].id);
    expect(compactSummary(e2)).toMatch(/^policy=cache_aware; worker=http:\/\/w0:8000; rule=least_loaded; matched_chars=0\/\d+; load=0; candidates=3; excluded=2$/);
  });

  it('kv_aware: index overlaps in blocks; explaining leaves in-flight accounting and the index unchanged', () => {
    const ws = workers(2);
    const index = new BlockIndex({});
    const p = new KvAwarePolicy(deps(), kvView(index), { overlapWeight: 4, activeWeight: 1, temperature: 0, staleAfterMs: 1e9, historyWeight: 0, defaultBlockSize: 4, maxTreeSize: 1e6, evictionIntervalSecs: 0 });
    const ctx = ctxOf(0);
    // Worker 1's engine holds the first 5 blocks of the request.
    const tokens = Array.from(ctx.tokenIds!).slice(0, 20);
    const hashes = hashBlocks(tokens, 4);
    index.apply(ws[1].id, [{ type: 'stored', blockHashes: hashes.map((h, i) => BigInt(1000 + i)), parentBlockHash: null, tokenIds: tokens, blockSize: 4 } as never]);
    const stats = JSON.stringify(index.stats(), (_k, v) => (typeof v === 'bigint' ? String(v) : v instanceof Map ? [...v] : v));
    const e = p.explain(ws, ctx);
    expect(e.chosen).toBe(ws[1].id);
    expect(e.candidates[1].matchedBlocks).toBe(5);
    expect(e.candidates[0].matchedBlocks).toBe(0);
    expect(e.candidates[1].terms).toMatchObject({ source: 'events', indexed_blocks: 5 });
    expect(p.activeOf(ws[1].id)).toEqual({ requests: 0, blocks: 0, pendingPrefillTokens: 0 });
    expect(JSON.stringify(index.stats(), (_k, v) => (typeof v === 'bigint' ? String(v) : v instanceof Map ? [...v] : v))).toBe(stats);
    expect(p.selectWorker(ws, ctx)!.id).toBe(ws[1].id);
  });

  it('round_robin says what comes next without advancing; session affinity names the bound worker without renewing it', () => {
    const ws = workers(3);
    const rr = createPolicy('round_robin', deps());
    expect(rr.explain!(ws, ctxOf(0)).chosen).toBe(ws[0].id);
    expect(rr.explain!(ws, ctxOf(0)).chosen).toBe(ws[0].id);
    expect(rr.selectWorker(ws, ctxOf(0))!.id).toBe(ws[0].id);
    expect(rr.explain!(ws, ctxOf(0)).chosen).toBe(ws[1].id);
    const d = deps();
    const sa = withSessionAffinity(createPolicy('round_robin', d), d, 'x-session', 60);
    const c = { ...ctxOf(0), headers: { 'x-session': 's1' } };
    expect(sa.selectWorker(ws, c)!.id).toBe(ws[0].id);
    const e = sa.explain!(ws, c);
    expect(e).toMatchObject({ chosen: ws[0].id, rule: 'session' });
  });
});

describe('DecisionFeed', () => {
  it('keeps a bounded ring of decisions and prefix groups per worker', () => {
    const f = new DecisionFeed(5);
    for (let i = 0; i < 12; i++) {
      f.push({ requestId: `r${i}`, route: 'chat', model: 'm', policy: 'p', worker: `w${i % 2}`, attempt: 0, note: {} }, PREFIXES[i % 3] + i);
    }
    const recent = f.recent();
    expect(recent.map((r) => r.requestId)).toEqual(['r7', 'r8', 'r9', 'r10', 'r11']);
    const g = f.groupsView();
    expect(g.total).toBe(3);
    f.forgetWorker('w0');
    f.forgetWorker('w1');
    expect(f.groupsView().total).toBe(0);
  });

  it('copies each decision into a reused slot: later changes to the entry or its note do not reach the ring', () => {
    const f = new DecisionFeed(3);
    const note = { kind: 'hit' as const, matched: 120, input: 400 };
    const explanation = { chosen: 'w1', rule: 'prefix', candidates: [] } as unknown as NonNullable<Parameters<DecisionFeed['push']>[0]['explanation']>;
    const entry = { requestId: 'a', route: 'chat', model: 'm', policy: 'cache_aware', worker: 'w1', prefillWorker: 'p0', attempt: 1, note, explanation };
    const seq = f.push(entry, 'x'.repeat(300));
    entry.requestId = 'changed';
    entry.worker = 'w9';
    note.matched = 0;
    note.kind = 'miss' as never;
    const [r] = f.recent();
    expect(r).toMatchObject({ seq, requestId: 'a', worker: 'w1', prefillWorker: 'p0', attempt: 1, note: { kind: 'hit', matched: 120, input: 400 }, explanation });
    expect(Object.keys(r!.note).sort()).toEqual(['input', 'kind', 'matched']);
    expect(typeof r!.group).toBe('string');
    // A decision without a prefill worker, an explanation or a routing text has none of them, also after its slot held one.
    for (let i = 0; i < 3; i++) f.push({ requestId: `b${i}`, route: 'chat', model: 'm', policy: 'kv_aware', worker: 'w2', attempt: 0, note: { matchedBlocks: i, requestBlocks: 4, fallback: false } }, '');
    const recent = f.recent();
    expect(recent.map((x) => x.requestId)).toEqual(['b0', 'b1', 'b2']);
    expect(recent[0]).not.toHaveProperty('prefillWorker');
    expect(recent[0]).not.toHaveProperty('explanation');
    expect(recent[0]).not.toHaveProperty('group');
    expect(recent[2]!.note).toEqual({ matchedBlocks: 2, requestBlocks: 4, fallback: false });
    expect(f.recent(2).map((x) => x.requestId)).toEqual(['b1', 'b2']);
    expect(new DecisionFeed(4).recent()).toEqual([]);
  });
});
