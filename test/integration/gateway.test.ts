import { afterEach, describe, expect, it } from 'vitest';
import { request } from 'undici';
import OpenAI from 'openai';
import { FakeWorker } from '../helpers/fake-worker.js';
import { send } from '../helpers/http.js';
import { startGateway, waitFor } from '../helpers/gateway.js';
import type { Gateway } from '../../src/server/gateway.js';

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!().catch(() => undefined);
});

const isError = (r: { json: any }, code?: string) => {
  expect(typeof r.json.error.message).toBe('string');
  expect(typeof r.json.error.type).toBe('string');
  if (code) expect(r.json.error.code).toBe(code);
};

async function workers(n: number, opts: ConstructorParameters<typeof FakeWorker>[0] = {}): Promise<FakeWorker[]> {
  const ws = await Promise.all(Array.from({ length: n }, () => new FakeWorker(opts).start()));
  cleanups.push(() => Promise.all(ws.map((w) => w.close())));
  return ws;
}

async function gateway(overrides: Parameters<typeof startGateway>[0]): Promise<Gateway> {
  const gw = await startGateway(overrides);
  cleanups.push(() => gw.close());
  return gw;
}

function post(gw: Gateway, path: string, body: unknown, headers: Record<string, string> = {}) {
  return send(gw.url + path, { method: 'POST', body, headers });
}

const system = 'You are a meticulous assistant. '.repeat(40);
const chat = (user: string, extra: Record<string, unknown> = {}) => ({
  model: 'fake-model',
  messages: [
    { role: 'system', content: system },
    { role: 'user', content: user },
  ],
  ...extra,
});

describe('gateway: routing through real HTTP', () => {
  it('cache_aware sends requests sharing a long system prompt to one worker; round_robin alternates', async () => {
    const ws = await workers(2);
    const gw = await gateway({ workerUrls: ws.map((w) => w.url), policy: 'cache_aware' });
    const seen: string[] = [];
    for (let i = 0; i < 20; i++) {
      const r = await post(gw, '/v1/chat/completions', chat(`question number ${i}?`));
      expect(r.status).toBe(200);
      seen.push(String(r.headers['x-kvgate-worker']));
    }
    expect(new Set(seen).size).toBe(1);

    const gw2 = await gateway({ workerUrls: ws.map((w) => w.url), policy: 'round_robin' });
    const rr: string[] = [];
    for (let i = 0; i < 20; i++) rr.push(String((await post(gw2, '/v1/chat/completions', chat(`q ${i}`))).headers['x-kvgate-worker']));
    for (let i = 1; i < rr.length; i++) expect(rr[i]).not.toBe(rr[i - 1]);

    const listed = await request(gw.url + '/workers').then((r) => r.body.json() as Promise<any>);
    expect(listed.workers.map((w: any) => w.load)).toEqual([0, 0]);
    expect(listed.workers.reduce((s: number, w: any) => s + w.processed, 0)).toBe(20);
  });

  it('passes the body through unchanged and returns the worker status, body and content type', async () => {
    const [w] = await workers(1);
    const gw = await gateway({ workerUrls: [w.url] });
    const body = JSON.stringify({ model: 'fake-model', prompt: 'héllo 👋', unknown_field: { keep: [1, 2, 3] }, max_tokens: 3 });
    const r = await post(gw, '/v1/completions', body, { 'x-request-id': 'my-id-1' });
    expect(r.status).toBe(200);
    expect(r.json.echo_path).toBe('/v1/completions');
    expect(w.received.at(-1)!.body).toBe(body);
    expect(w.received.at(-1)!.headers['x-request-id']).toBe('my-id-1');
    expect(r.headers['x-request-id']).toBe('my-id-1');
    expect(r.headers['x-kvgate-worker']).toBe(w.url);
    expect(r.headers['content-type']).toBe('application/json');

    const corr = await post(gw, '/v1/completions', body, { 'x-correlation-id': 'corr-9' });
    expect(corr.headers['x-request-id']).toBe('corr-9');
    const gen = await post(gw, '/v1/completions', body);
    expect(String(gen.headers['x-request-id'])).toMatch(/^[0-9a-f-]{36}$/);

    w.opts.status = 422;
    const err = await post(gw, '/v1/completions', body);
    expect(err.status).toBe(422);
    expect(err.json.error.message).toBe('injected');
  });

  it('streams SSE chunk by chunk as the worker produces them', async () => {
    const [w] = await workers(1, { chunks: 4, chunkDelayMs: 150 });
    const gw = await gateway({ workerUrls: [w.url] });
    const res = await request(gw.url + '/v1/chat/completions', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(chat('stream please', { stream: true })),
    });
    expect(res.headers['content-type']).toBe('text/event-stream');
    const arrivals: number[] = [];
    let text = '';
    const t0 = Date.now();
    for await (const c of res.body) {
      arrivals.push(Date.now() - t0);
      text += c.toString();
    }
    expect(text).toContain('data: [DONE]');
    expect(text.match(/chat\.completion\.chunk/g)!.length).toBe(4);
    // Chunks arrive spread over time, not buffered into one write at the end.
    expect(arrivals.length).toBeGreaterThanOrEqual(4);
    expect(arrivals.at(-1)! - arrivals[0]).toBeGreaterThan(300);
  });

  it('the OpenAI SDK streams through kvgate; aborting closes the upstream within a second and releases load', async () => {
    const [w] = await workers(1, { chunks: 200, chunkDelayMs: 20 });
    const gw = await gateway({ workerUrls: [w.url] });
    const client = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 'none', maxRetries: 0 });
    const stream = await client.chat.completions.create({ model: 'fake-model', messages: [{ role: 'user', content: 'hi' }], stream: true });
    let n = 0;
    for await (const chunk of stream) {
      expect(chunk.choices[0].delta.content).toBe(`tok${n} `);
      if (++n === 5) break; // leaving the loop aborts the SDK's request
    }
    await waitFor(() => w.abortedEarly === 1, 1000, 'upstream abort');
    await waitFor(() => gw.registry.all()[0].load === 0, 1000, 'load release');
    const metrics = await request(gw.url + '/metrics').then((r) => r.body.text());
    expect(metrics).toMatch(/kvgate_client_aborts_total\{route="chat"\} 1/);
  });

  it('a client leaving before the first response byte aborts the upstream request within a second', async () => {
    const [w] = await workers(1, { hang: true });
    const gw = await gateway({ workerUrls: [w.url] });
    const ac = new AbortController();
    const pending = request(gw.url + '/v1/completions', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'fake-model', prompt: 'long prefill' }),
      signal: ac.signal,
    }).catch(() => 'aborted');
    await waitFor(() => w.received.some((r) => r.path === '/v1/completions'), 1000, 'request reached worker');
    expect(gw.registry.all()[0].load).toBe(1);
    ac.abort();
    expect(await pending).toBe('aborted');
    await waitFor(() => w.abortedEarly === 1, 1000, 'upstream abort');
    await waitFor(() => gw.registry.all()[0].load === 0, 1000, 'load release');
  });

  it('leaks no load after 1,000 mixed requests with aborts and upstream errors', async () => {
    const good = await workers(2, { chunks: 3, chunkDelayMs: 2 });
    const [bad] = await workers(1, { status: 500 });
    // Retries and the breaker would hide the failing worker; this test wants its errors to reach clients.
    const gw = await gateway({ workerUrls: [...good, bad].map((w) => w.url), policy: 'round_robin', disableRetries: true, disableCircuitBreaker: true });
    const statuses = new Map<number, number>();
    let aborted = 0;
    const one = async (i: number) => {
      const stream = i % 3 === 0;
      const ac = new AbortController();
      if (i % 7 === 0) setTimeout(() => ac.abort(), 1 + (i % 5));
      try {
        const res = await request(gw.url + (i % 2 ? '/v1/chat/completions' : '/v1/completions'), {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify(i % 2 ? chat(`m${i}`, { stream }) : { model: 'fake-model', prompt: `p${i}`, stream }),
          signal: ac.signal,
        });
        await res.body.text();
        statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1);
      } catch {
        aborted++;
      }
    };
    for (let batch = 0; batch < 20; batch++) await Promise.all(Array.from({ length: 50 }, (_, j) => one(batch * 50 + j)));
    await waitFor(() => gw.registry.all().every((w) => w.load === 0), 3000, 'all loads back to 0');
    const processed = gw.registry.all().reduce((s, w) => s + w.processed, 0);
    const answered = [...statuses.values()].reduce((a, b) => a + b, 0);
    expect(answered + aborted).toBe(1000);
    expect(statuses.get(500)).toBeGreaterThan(100);
    expect(statuses.get(200)).toBeGreaterThan(400);
    expect(aborted).toBeGreaterThan(0);
    // Every routed request released its load exactly once: releases == routing decisions.
    const decisions = (await gw.metrics.decisions.get()).values.reduce((s, v) => s + v.value, 0);
    expect(processed).toBe(decisions);
    expect(processed).toBeGreaterThanOrEqual(answered);
    expect(processed).toBeLessThanOrEqual(1000);
  });
});

describe('gateway: errors are OpenAI-shaped JSON and the process stays up', () => {
  it('maps malformed input, size, model, health, unreachable and timeout', async () => {
    const [w] = await workers(1);
    const gw = await gateway({ workerUrls: [w.url], maxPayloadSize: 10_000 });

    let r = await post(gw, '/v1/chat/completions', '{"model": "fake-model", "messages": [');
    expect(r.status).toBe(400);
    isError(r, 'invalid_json');
    r = await post(gw, '/v1/chat/completions', '[1,2]');
    expect(r.status).toBe(400);
    r = await post(gw, '/v1/chat/completions', { model: 'fake-model', messages: 'hi' });
    expect(r.status).toBe(400);
    expect(r.json.error.param).toBe('messages');
    r = await post(gw, '/v1/chat/completions', { model: 42, messages: [] });
    expect(r.status).toBe(400);
    r = await post(gw, '/v1/completions', { model: 'fake-model', prompt: 'x'.repeat(20_000) });
    expect(r.status).toBe(413);
    isError(r, 'payload_too_large');
    // One model served: any name is routed to it (as the SGLang router does), rewritten for the engine.
    r = await post(gw, '/v1/chat/completions', { model: 'gpt-4o', messages: [{ role: 'user', content: 'hi' }] });
    expect(r.status).toBe(200);
    expect(JSON.parse(w.received.at(-1)!.body).model).toBe('fake-model');
    r = await post(gw, '/v1/completions', { prompt: 'no model field, single-model cluster' });
    expect(r.status).toBe(200);
    r = await post(gw, '/no/such/route', {});
    expect(r.status).toBe(404);
    const get = await request(gw.url + '/v1/chat/completions');
    expect(get.statusCode).toBe(405);
    await get.body.dump();

    // Worker goes away: requests fail with 502 until health checks mark it down, then 503.
    await w.close();
    r = await post(gw, '/v1/completions', { model: 'fake-model', prompt: 'x' });
    expect(r.status).toBe(502);
    isError(r, 'worker_unreachable');
    await waitFor(() => !gw.registry.all()[0].healthy, 3000, 'worker marked unhealthy');
    r = await post(gw, '/v1/completions', { model: 'fake-model', prompt: 'x' });
    expect(r.status).toBe(503);
    isError(r, 'no_available_workers');
    const ready = await request(gw.url + '/readiness');
    expect(ready.statusCode).toBe(503);
    expect(((await ready.body.json()) as any).reason).toMatch(/healthy/);
    expect(gw.registry.all()[0].load).toBe(0);
  });

  it('answers 504 when the worker does not respond in time and releases the load', async () => {
    const [w] = await workers(1, { hang: true });
    const gw = await gateway({ workerUrls: [w.url], requestTimeoutSecs: 0.3 });
    const r = await post(gw, '/v1/completions', { model: 'fake-model', prompt: 'x' });
    expect(r.status).toBe(504);
    isError(r, 'worker_timeout');
    await waitFor(() => w.abortedEarly === 1, 1000, 'upstream closed');
    expect(gw.registry.all()[0].load).toBe(0);
  });
});

describe('gateway: admin, models and metrics', () => {
  it('adds, lists and removes workers; flushes and reports loads; serves models and metrics', async () => {
    const [a, b] = await workers(2);
    const gw = await gateway({ workerUrls: [a.url] });
    let r = await post(gw, '/workers', { url: b.url });
    expect(r.status).toBe(202);
    expect(r.json.worker.healthy).toBe(true);
    expect(r.json.worker.model).toBe('fake-model');
    r = await post(gw, '/workers', { url: b.url });
    expect(r.status).toBe(409);
    r = await post(gw, '/workers', { url: 'not a url' });
    expect(r.status).toBe(400);

    const list = (await request(gw.url + '/list_workers').then((x) => x.body.json())) as any;
    expect(list.urls.sort()).toEqual([a.url, b.url].sort());
    const models = (await request(gw.url + '/v1/models').then((x) => x.body.json())) as any;
    expect(models).toMatchObject({ object: 'list', data: [{ id: 'fake-model', object: 'model' }] });

    r = await post(gw, '/flush_cache', {});
    expect(r.json).toMatchObject({ successful: 2, failed: 0, total_workers: 2 });
    const loads = (await request(gw.url + '/get_loads').then((x) => x.body.json())) as any;
    expect(loads.loads.map((l: any) => l.load)).toEqual([42, 42]);

    for (let i = 0; i < 3; i++) await post(gw, '/v1/chat/completions', chat(`x${i}`));
    const metrics = await request(gw.url + '/metrics').then((x) => x.body.text());
    // Requests by route, status and model (the served model the request was routed to).
    expect(metrics).toMatch(/kvgate_requests_total\{route="chat",status="200",model="[^"]+"\} 3/);
    for (const name of [
      'kvgate_request_duration_seconds_bucket',
      'kvgate_worker_load{worker=',
      'kvgate_worker_processed_total{worker=',
      'kvgate_worker_healthy{worker=',
      'kvgate_policy_decisions_total{policy="cache_aware",worker=',
      'kvgate_cache_hits_total',
      'kvgate_cache_misses_total',
      'kvgate_load_balancing_events_total',
      'kvgate_tree_chars{worker=',
    ]) {
      expect(metrics).toContain(name);
    }

    // The SGLang router's shape: POST answered 202 with a stable URL-safe worker_id and its location.
    const added = (await post(gw, '/workers', { url: 'http://127.0.0.1:1' })).json;
    expect(added).toMatchObject({ status: 'accepted', url: 'http://127.0.0.1:1', location: `/workers/${added.worker_id}` });
    expect(added.worker_id).toMatch(/^[0-9a-f]{16}$/);
    const one = await request(`${gw.url}/workers/${added.worker_id}`);
    expect(one.statusCode).toBe(200);
    expect(await one.body.json()).toMatchObject({ worker_id: added.worker_id, url: 'http://127.0.0.1:1', is_healthy: false });
    const delNew = await request(`${gw.url}/workers/${added.worker_id}`, { method: 'DELETE' });
    expect(delNew.statusCode).toBe(202);
    expect(await delNew.body.json()).toMatchObject({ status: 'accepted', worker_id: added.worker_id });
    // The older form: the URL-encoded worker URL.
    const del = await request(`${gw.url}/workers/${encodeURIComponent(b.url)}`, { method: 'DELETE' });
    expect(del.statusCode).toBe(202);
    await del.body.dump();
    const rem = await request(`${gw.url}/remove_worker?url=${encodeURIComponent(a.url)}`, { method: 'POST' });
    expect(rem.statusCode).toBe(200);
    await rem.body.dump();
    expect(gw.registry.size).toBe(0);
    r = await post(gw, '/v1/completions', { prompt: 'x' });
    expect(r.status).toBe(503);
    const add = await request(`${gw.url}/add_worker?url=${encodeURIComponent(a.url)}`, { method: 'POST' });
    expect(add.statusCode).toBe(200);
    await add.body.dump();
    r = await post(gw, '/v1/completions', { prompt: 'x' });
    expect(r.status).toBe(200);
  });

  it('keeps models apart and 404s an unknown model, asking for model when several are served', async () => {
    const [a] = await workers(1, { model: 'llama' });
    const [b] = await workers(1, { model: 'qwen' });
    const gw = await gateway({ workerUrls: [a.url, b.url] });
    const ra = await post(gw, '/v1/completions', { model: 'llama', prompt: 'x' });
    const rb = await post(gw, '/v1/completions', { model: 'qwen', prompt: 'x' });
    expect(ra.headers['x-kvgate-worker']).toBe(a.url);
    expect(rb.headers['x-kvgate-worker']).toBe(b.url);
    expect((await post(gw, '/v1/completions', { prompt: 'x' })).status).toBe(400);
    const r = await post(gw, '/v1/chat/completions', { model: 'gpt-4o', messages: [{ role: 'user', content: 'hi' }] });
    expect(r.status).toBe(404);
    isError(r, 'model_not_found');
    expect((await post(gw, '/v1/completions', { model: 'mistral', prompt: 'x' })).status).toBe(404);
  });

  it('--strict-model keeps the 404 with one model; GET /v1/models/{id} answers in the OpenAI shape', async () => {
    const [a] = await workers(1, { model: 'org/llama-3' });
    const gw = await gateway({ workerUrls: [a.url], strictModel: true });
    const r = await post(gw, '/v1/completions', { model: 'gpt-4o', prompt: 'x' });
    expect(r.status).toBe(404);
    isError(r, 'model_not_found');
    expect((await post(gw, '/v1/completions', { model: 'org/llama-3', prompt: 'x' })).status).toBe(200);
    for (const path of ['/v1/models/org/llama-3', '/v1/models/org%2Fllama-3']) {
      const m = await request(gw.url + path);
      expect(m.statusCode).toBe(200);
      expect(await m.body.json()).toMatchObject({ id: 'org/llama-3', object: 'model', owned_by: 'kvgate' });
    }
    const missing = await request(gw.url + '/v1/models/gpt-4o');
    expect(missing.statusCode).toBe(404);
    expect(((await missing.body.json()) as any).error).toMatchObject({ code: 'model_not_found', type: 'invalid_request_error' });
  });
});
