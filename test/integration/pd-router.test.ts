import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { batchSize, mergeUsage, newRoom, prependLogprobs, sglangBody } from '../../src/routers/pd.js';
import { Worker } from '../../src/core/worker.js';
import type { Gateway } from '../../src/server/gateway.js';
import { startGateway, waitFor } from '../helpers/gateway.js';

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!().catch(() => undefined);
});

interface Seen {
  path: string;
  raw: string;
  headers: IncomingMessage['headers'];
}

/** A minimal engine that records what it received; `answer` decides the response. */
async function engine(model: string, answer: (seen: Seen, res: ServerResponse) => void | Promise<void>, dpSize?: number) {
  const seen: Seen[] = [];
  const server: Server = createServer(async (req, res) => {
    let raw = '';
    for await (const c of req) raw += c;
    const s = { path: req.url ?? '', raw, headers: req.headers };
    if (s.path === '/health') return res.end('{}');
    if (s.path === '/v1/models') return res.end(JSON.stringify({ object: 'list', data: [{ id: model }] }));
    if (s.path === '/get_server_info' && dpSize) return res.end(JSON.stringify({ dp_size: dpSize }));
    if (req.method !== 'POST') {
      res.writeHead(404);
      return res.end();
    }
    seen.push(s);
    await answer(s, res);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  cleanups.push(() => new Promise((r) => (server.closeAllConnections(), server.close(() => r(undefined)))));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, seen };
}

const json = (res: ServerResponse, status: number, body: unknown) => {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
};

async function gw(over: Parameters<typeof startGateway>[0]): Promise<Gateway> {
  const g = await startGateway({ pdDisaggregation: true, ...over });
  cleanups.push(() => g.close());
  return g;
}

async function post(g: Gateway, path: string, body: unknown) {
  const r = await fetch(g.url + path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  return { status: r.status, headers: r.headers, text: await r.text() };
}

describe('PD helpers', () => {
  it('rooms are exact integers in [0, 2^63-1], distinct per batch item, arrays for batches', () => {
    const p = new Worker({ url: 'http://10.0.0.7:8000', type: 'prefill', bootstrapPort: 9000 });
    const rooms = [newRoom(), newRoom(), newRoom()];
    for (const r of rooms) expect(r >= 0n && r <= (1n << 63n) - 1n).toBe(true);
    const text = sglangBody({ text: ['a', 'b', 'c'], sampling_params: {} }, p, rooms, undefined);
    expect(text).toContain(`"bootstrap_room":[${rooms.join(',')}]`);
    const parsed = JSON.parse(text);
    expect(parsed.bootstrap_host).toEqual(['10.0.0.7', '10.0.0.7', '10.0.0.7']);
    expect(parsed.bootstrap_port).toEqual([9000, 9000, 9000]);
    expect(new Set(rooms).size).toBe(3);
    const big = (1n << 62n) + 12345n;
    expect(sglangBody({ text: 'x' }, p, [big], 1)).toContain(`"bootstrap_room":${big}}`); // not a rounded float
    expect(JSON.parse(sglangBody({ text: 'x' }, p, [big], 1)).data_parallel_rank).toBe(1);
    expect(batchSize({ text: 'one' })).toBe(1);
    expect(batchSize({ input_ids: [[1], [2]] })).toBe(2);
    expect(batchSize({ prompt: ['a', 'b'] })).toBe(2);
  });

  it('merges logprobs and usage', () => {
    const o: Record<string, unknown> = { meta_info: { input_token_logprobs: [[-2, 7, null]] } };
    prependLogprobs(o, [[-1, 5, null], [-1.5, 6, null]]);
    expect((o.meta_info as { input_token_logprobs: unknown[] }).input_token_logprobs).toEqual([[-1, 5, null], [-1.5, 6, null], [-2, 7, null]]);
    const u: Record<string, unknown> = { usage: { prompt_tokens: 0, completion_tokens: 9, total_tokens: 9 } };
    mergeUsage(u, { prompt_tokens: 120, prompt_tokens_details: { cached_tokens: 64 } });
    expect(u.usage).toEqual({ prompt_tokens: 120, completion_tokens: 9, total_tokens: 129, prompt_tokens_details: { cached_tokens: 64 } });
  });
});

describe('PD router, SGLang protocol', () => {
  const sglangPrefill = (fail?: number) =>
    engine('m', (s, res) => {
      if (fail) return json(res, fail, { error: { message: 'prefill broke' } });
      json(res, 200, { text: 'x', meta_info: { input_token_logprobs: [[-0.5, 1, null], [-0.25, 2, null]], prompt_tokens: 2 } });
    });
  const sglangDecode = () =>
    engine('m', async (s, res) => {
      const body = JSON.parse(s.raw);
      if (body.stream) {
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        for (let i = 0; i < 3; i++) {
          res.write(`data: ${JSON.stringify({ text: `tok${i}`, meta_info: { input_token_logprobs: [[-1, 9, null]] } })}\n\n`);
          await new Promise((r) => setTimeout(r, 30));
        }
        return res.end('data: [DONE]\n\n');
      }
      json(res, 200, { text: 'decoded output', meta_info: { input_token_logprobs: [[-1, 9, null]], completion_tokens: 2 } });
    });

  it('sends the same body with bootstrap fields to both, returns the decode answer, releases load', async () => {
    const p = await sglangPrefill();
    const d = await sglangDecode();
    const g = await gw({ prefill: [{ url: p.url, bootstrapPort: 9123 }], decode: [d.url] });
    const r = await post(g, '/generate', { text: 'hello', sampling_params: { max_new_tokens: 4 } });
    expect(r.status).toBe(200);
    expect(JSON.parse(r.text).text).toBe('decoded output');
    expect(r.headers.get('x-kvgate-worker')).toBe(d.url);
    expect(r.headers.get('x-kvgate-prefill-worker')).toBe(p.url);
    expect(p.seen).toHaveLength(1);
    expect(d.seen).toHaveLength(1);
    expect(p.seen[0].raw).toBe(d.seen[0].raw); // the same body to both
    const sent = JSON.parse(p.seen[0].raw);
    expect(sent).toMatchObject({ text: 'hello', bootstrap_host: '127.0.0.1', bootstrap_port: 9123 });
    expect(p.seen[0].raw).toMatch(/"bootstrap_room":\d+}$/);
    expect(g.registry.all().map((w) => w.load)).toEqual([0, 0]);
    const ready = await fetch(g.url + '/readiness').then((x) => x.json());
    expect(ready).toMatchObject({ status: 'ready', healthy_prefill_workers: 1, healthy_decode_workers: 1 });
    const metrics = await fetch(g.url + '/metrics').then((x) => x.text());
    expect(metrics).toMatch(/kvgate_pd_requests_total\{route="generate",protocol="sglang"\} 1/);
    expect(metrics).toContain(`kvgate_pd_prefill_requests_total{worker="${p.url}"} 1`);
    expect(metrics).toContain(`kvgate_pd_decode_requests_total{worker="${d.url}"} 1`);
  });

  it('puts the prefill logprobs in front, non-streaming and in every streamed chunk', async () => {
    const p = await sglangPrefill();
    const d = await sglangDecode();
    const g = await gw({ prefill: [{ url: p.url, bootstrapPort: null }], decode: [d.url] });
    const r = await post(g, '/generate', { text: 'hi', return_logprob: true });
    expect(JSON.parse(r.text).meta_info.input_token_logprobs).toEqual([[-0.5, 1, null], [-0.25, 2, null], [-1, 9, null]]);
    expect(JSON.parse(p.seen[0].raw).bootstrap_port).toBeNull();
    const s = await post(g, '/generate', { text: 'hi', return_logprob: true, stream: true });
    const events = s.text.split('\n\n').filter((e) => e.startsWith('data: {'));
    expect(events).toHaveLength(3);
    for (const e of events) expect(JSON.parse(e.slice(6)).meta_info.input_token_logprobs).toHaveLength(3);
    expect(s.text).toContain('data: [DONE]');
  });

  it('maps a prefill failure and returns no decode output', async () => {
    const p = await sglangPrefill(503);
    const d = await sglangDecode();
    const g = await gw({ prefill: [{ url: p.url, bootstrapPort: 1 }], decode: [d.url] });
    const r = await post(g, '/generate', { text: 'hi' });
    expect(r.status).toBe(503);
    expect(JSON.parse(r.text).error.message).toContain('prefill broke');
    expect(r.text).not.toContain('decoded output');
    await waitFor(() => g.registry.all().every((w) => w.load === 0), 2000, 'load released');
  });

  it('keeps requests sharing a long prefix on one prefill worker with --prefill-policy cache_aware', async () => {
    const ps = await Promise.all([sglangPrefill(), sglangPrefill()]);
    const ds = await Promise.all([sglangDecode(), sglangDecode()]);
    const g = await gw({ prefill: ps.map((p) => ({ url: p.url, bootstrapPort: 1 })), decode: ds.map((d) => d.url), prefillPolicy: 'cache_aware', decodePolicy: 'round_robin' });
    const sys = 'You are a patient tutor who explains with examples. '.repeat(30);
    const prefills = new Set<string | null>();
    const decodes: (string | null)[] = [];
    for (let i = 0; i < 10; i++) {
      const r = await post(g, '/v1/chat/completions', { model: 'm', messages: [{ role: 'system', content: sys }, { role: 'user', content: `q${i}` }] });
      prefills.add(r.headers.get('x-kvgate-prefill-worker'));
      decodes.push(r.headers.get('x-kvgate-worker'));
    }
    expect(prefills.size).toBe(1);
    expect(new Set(decodes).size).toBe(2); // round robin on the decode side
  });
});

describe('PD router, vLLM protocol', () => {
  const ktp = { do_remote_prefill: true, do_remote_decode: false, remote_engine_id: 'e1', remote_block_ids: [1, 2, 3], remote_host: '10.1.1.1', remote_port: 5600, tp_size: 1 };
  const vllmPrefill = (fail?: number) =>
    engine('m', (s, res) => {
      if (fail) return json(res, fail, { error: { message: 'nope' } });
      json(res, 200, { id: 'p', choices: [{ text: 'a' }], usage: { prompt_tokens: 77, completion_tokens: 1, prompt_tokens_details: { cached_tokens: 32 } }, kv_transfer_params: ktp });
    });
  const vllmDecode = () =>
    engine('m', async (s, res) => {
      const body = JSON.parse(s.raw);
      if (body.stream) {
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write(`data: ${JSON.stringify({ choices: [{ text: 'one' }], usage: null })}\n\n`);
        res.write(`data: ${JSON.stringify({ choices: [], usage: { prompt_tokens: 77, completion_tokens: 5, total_tokens: 82 } })}\n\n`);
        return res.end('data: [DONE]\n\n');
      }
      json(res, 200, { id: 'd', choices: [{ text: 'decoded' }], usage: { prompt_tokens: 77, completion_tokens: 5, total_tokens: 82, prompt_tokens_details: { cached_tokens: 0 } } });
    });

  it('prefills with max_tokens 1 then decodes with the kv_transfer_params unchanged; usage from the prefill', async () => {
    const p = await vllmPrefill();
    const d = await vllmDecode();
    const g = await gw({ prefill: [{ url: p.url, bootstrapPort: null }], decode: [d.url], pdProtocol: 'vllm' });
    const r = await post(g, '/v1/completions', { model: 'm', prompt: 'hello', max_tokens: 50, stream_options: { include_usage: true } });
    expect(r.status).toBe(200);
    const pre = JSON.parse(p.seen[0].raw);
    expect(pre).toMatchObject({ prompt: 'hello', max_tokens: 1, stream: false, kv_transfer_params: { do_remote_decode: true, do_remote_prefill: false } });
    expect(pre.stream_options).toBeUndefined();
    const dec = JSON.parse(d.seen[0].raw);
    expect(dec).toMatchObject({ prompt: 'hello', max_tokens: 50 });
    expect(dec.kv_transfer_params).toEqual(ktp);
    const out = JSON.parse(r.text);
    expect(out.choices[0].text).toBe('decoded');
    expect(out.usage).toEqual({ prompt_tokens: 77, completion_tokens: 5, total_tokens: 82, prompt_tokens_details: { cached_tokens: 32 } });

    const s = await post(g, '/v1/completions', { model: 'm', prompt: 'hello', stream: true, stream_options: { include_usage: true } });
    const last = s.text.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6))).at(-1);
    expect(last.usage.prompt_tokens_details.cached_tokens).toBe(32);
    expect(s.text).toContain('data: [DONE]');
    expect(g.registry.all().map((w) => w.load)).toEqual([0, 0]);
  });

  it('a failing prefill never reaches the decode worker', async () => {
    const p = await vllmPrefill(400);
    const d = await vllmDecode();
    const g = await gw({ prefill: [{ url: p.url, bootstrapPort: null }], decode: [d.url], pdProtocol: 'vllm' });
    const r = await post(g, '/v1/completions', { model: 'm', prompt: 'x' });
    expect(r.status).toBe(400);
    expect(d.seen).toHaveLength(0);
  });

  it('readiness needs a healthy prefill and a healthy decode worker', async () => {
    const p = await vllmPrefill();
    const g = await gw({ prefill: [{ url: p.url, bootstrapPort: null }], decode: ['http://127.0.0.1:1'], pdProtocol: 'vllm' });
    const r = await fetch(g.url + '/readiness');
    expect(r.status).toBe(503);
    expect(((await r.json()) as { reason: string }).reason).toBe('no healthy decode worker');
    expect((await post(g, '/v1/completions', { model: 'm', prompt: 'x' })).status).toBe(503);
  });
});

describe('PD router: aborts and data parallelism', () => {
  it('a client leaving mid-stream closes the decode stream and frees both workers', async () => {
    let closed = 0;
    const p = await engine('m', (_s, res) => json(res, 200, { text: 'x', meta_info: {} }));
    const d = await engine('m', async (_s, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.on('close', () => closed++);
      for (let i = 0; i < 200 && !res.destroyed; i++) {
        res.write(`data: {"text":"t${i}"}\n\n`);
        await new Promise((r) => setTimeout(r, 20));
      }
      res.end();
    });
    const g = await gw({ prefill: [{ url: p.url, bootstrapPort: 1 }], decode: [d.url] });
    const ac = new AbortController();
    const r = await fetch(g.url + '/generate', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ text: 'go', stream: true }), signal: ac.signal });
    const reader = r.body!.getReader();
    await reader.read();
    expect(g.registry.all().map((w) => w.load)).toEqual([1, 1]);
    ac.abort();
    await waitFor(() => closed === 1, 1000, 'decode stream closed upstream');
    await waitFor(() => g.registry.all().every((w) => w.load === 0), 1000, 'both loads back to 0');
  });

  it('pins the chosen data-parallel rank on both sides (header and body)', async () => {
    const p = await engine('m', (_s, res) => json(res, 200, { text: 'x', meta_info: {} }), 2);
    const d = await engine('m', (_s, res) => json(res, 200, { text: 'y', meta_info: {} }), 4);
    const g = await gw({ prefill: [{ url: p.url, bootstrapPort: 1 }], decode: [d.url], dpAware: true, policy: 'round_robin' });
    expect(g.registry.all().map((w) => w.id)).toEqual([`${p.url}@0`, `${p.url}@1`, `${d.url}@0`, `${d.url}@1`, `${d.url}@2`, `${d.url}@3`]);
    for (let i = 0; i < 4; i++) await post(g, '/generate', { text: `q${i}` });
    for (const side of [p, d]) {
      for (const s of side.seen) {
        const rank = Number(s.headers['x-data-parallel-rank']);
        expect(Number.isInteger(rank)).toBe(true);
        expect(JSON.parse(s.raw).data_parallel_rank).toBe(rank);
      }
    }
    expect(new Set(d.seen.map((s) => s.headers['x-data-parallel-rank'])).size).toBe(4);
    expect(new Set(p.seen.map((s) => s.headers['x-data-parallel-rank'])).size).toBe(2);
  });
});
