/**
 * Drop-in compatibility with the SGLang router (smg / sgl-model-gateway): kvgate is started with
 * the router's flags exactly as its own integration fixture (py_test/fixtures/router_manager.py)
 * passes them — `--host 127.0.0.1 --port P --policy POLICY --prometheus-port Q
 * --prometheus-host 127.0.0.1 --worker-urls ...` plus the mapped extras — with only the launch
 * command swapped (`python3 -m sglang_router.launch_router` → `kvgate serve`), against mock
 * workers shaped like the router's FastAPI mock worker (test/helpers/sglang-mock-worker.ts).
 */
import { readFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { SglangMockWorker } from '../helpers/sglang-mock-worker.js';
import { spawnKvgate, type Spawned } from '../helpers/processes.js';
import { freePort } from '../helpers/ports.js';

const running: Spawned[] = [];
const workers: SglangMockWorker[] = [];
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop()));
  await Promise.all(workers.map((w) => w.close()));
});

async function mock(opts: ConstructorParameters<typeof SglangMockWorker>[0] = {}): Promise<SglangMockWorker> {
  const w = await new SglangMockWorker(opts).start();
  workers.push(w);
  return w;
}

/** The fixture's start_router: the same flags in the same order. */
async function startRouter(workerUrls: string[], policy = 'round_robin', extra: string[] = []): Promise<{ url: string; promUrl: string; proc: Spawned }> {
  const port = await freePort();
  const prom = await freePort();
  const cmd = ['serve', '--host', '127.0.0.1', '--port', String(port), '--policy', policy, '--prometheus-port', String(prom), '--prometheus-host', '127.0.0.1'];
  if (workerUrls.length) cmd.push('--worker-urls', ...workerUrls);
  cmd.push(...extra);
  const proc = await spawnKvgate(cmd, /kvgate listening/);
  running.push(proc);
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 100; i++) {
    const r = await fetch(url + '/health').catch(() => undefined);
    if (r?.status === 200) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  return { url, promUrl: `http://127.0.0.1:${prom}`, proc };
}

const post = async (url: string, path: string, body: unknown, headers: Record<string, string> = {}) => {
  const r = await fetch(url + path, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });
  const text = await r.text();
  let json: any;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: r.status, headers: r.headers, text, json };
};
const chat = (content: string, model = 'gpt-4o') => ({ model, messages: [{ role: 'user', content }], max_tokens: 8 });

describe('kvgate serve with the SGLang router fixture flags', () => {
  it('round_robin: any model name is served by a one-model cluster, every route and streaming works, metrics on --prometheus-port', async () => {
    const [a, b] = [await mock(), await mock()];
    const r = await startRouter([a.url, b.url]);
    for (const model of ['gpt-4o', 'test', 'default']) expect((await post(r.url, '/v1/chat/completions', chat('hi', model))).status).toBe(200);
    expect((await post(r.url, '/v1/completions', { model: 'test', prompt: 'hi', max_tokens: 4 })).status).toBe(200);
    const gen = await post(r.url, '/generate', { text: 'hi', sampling_params: { max_new_tokens: 4 } });
    expect(gen.status).toBe(200);
    expect(gen.json.text).toMatch(/hello from worker-/);
    const s = await post(r.url, '/v1/chat/completions', { ...chat('stream please'), stream: true });
    expect(s.status).toBe(200);
    expect(s.text.match(/^data: \{/gm)!.length).toBe(3);
    expect(s.text).toContain('data: [DONE]');
    // round_robin spreads over both workers; the engine sees the served model's name.
    expect(a.generations.length).toBeGreaterThan(0);
    expect(b.generations.length).toBeGreaterThan(0);
    expect(a.generations.every((g) => g.body?.model === undefined || g.body.model === 'mock-model')).toBe(true);
    const models = await (await fetch(r.url + '/v1/models')).json();
    expect(models.data[0]).toMatchObject({ id: 'mock-model', object: 'model' });
    expect((await fetch(r.url + '/v1/models/mock-model')).status).toBe(200);
    const metrics = await (await fetch(r.promUrl + '/metrics')).text();
    expect(metrics).toContain('kvgate_requests_total{route="chat",status="200",model="mock-model"}');
  });

  it('two models served: a request naming neither gets the 404', async () => {
    const [a, b] = [await mock({ model: 'llama' }), await mock({ model: 'qwen' })];
    const r = await startRouter([a.url, b.url]);
    const res = await post(r.url, '/v1/chat/completions', chat('hi', 'gpt-4o'));
    expect(res.status).toBe(404);
    expect(res.json.error.code).toBe('model_not_found');
    expect((await post(r.url, '/v1/chat/completions', chat('hi', 'qwen'))).headers.get('x-worker-id')).toBe(b.workerId);
  });

  it('manual: X-SMG-Routing-Key is sticky, keys spread, and a new worker moves only the keys it wins', async () => {
    const [a, b, c] = [await mock(), await mock(), await mock()];
    const r = await startRouter([a.url, b.url], 'manual');
    const owner = async (key: string) => (await post(r.url, '/v1/chat/completions', chat('x'), { 'X-SMG-Routing-Key': key })).headers.get('x-worker-id');
    const keys = Array.from({ length: 24 }, (_, i) => `user-${i}`);
    const before = new Map<string, string | null>();
    for (const k of keys) before.set(k, await owner(k));
    for (const k of keys.slice(0, 6)) expect(await owner(k)).toBe(before.get(k));
    expect(new Set(before.values()).size).toBe(2);
    // No header: still served (fallback policy).
    expect((await post(r.url, '/v1/chat/completions', chat('no key'))).status).toBe(200);
    // Add a third worker through the admin API: keys either stay or move to the new worker.
    const add = await post(r.url, '/workers', { url: c.url });
    expect(add.status).toBe(202);
    let moved = 0;
    for (const k of keys) {
      const now = await owner(k);
      if (now !== before.get(k)) {
        expect(now).toBe(c.workerId);
        moved++;
      }
    }
    expect(moved).toBeGreaterThan(0);
    expect(moved).toBeLessThan(keys.length);
  });

  it('session affinity by header on top of round_robin', async () => {
    const [a, b] = [await mock(), await mock()];
    const r = await startRouter([a.url, b.url], 'round_robin', ['--session-affinity-header', 'X-Session-ID', '--session-affinity-ttl-secs', '600']);
    const owners = new Set<string | null>();
    for (let i = 0; i < 6; i++) owners.add((await post(r.url, '/v1/chat/completions', chat(`turn ${i}`), { 'X-Session-ID': 'conv-1' })).headers.get('x-worker-id'));
    expect(owners.size).toBe(1);
    const free = new Set<string | null>();
    for (let i = 0; i < 4; i++) free.add((await post(r.url, '/v1/chat/completions', chat(`q ${i}`))).headers.get('x-worker-id'));
    expect(free.size).toBe(2);
  });

  it('worker admin API as the fixture drives it: POST 202 + worker_id, poll is_healthy, remove by the listed id, 404 after', async () => {
    const [a, b] = [await mock(), await mock()];
    const r = await startRouter([a.url], 'round_robin', ['--worker-startup-check-interval', '1']);
    const add = await post(r.url, '/workers', { url: b.url });
    expect(add.status).toBe(202);
    expect(add.json).toMatchObject({ status: 'accepted', url: b.url });
    expect(add.json.worker_id).toMatch(/^[A-Za-z0-9_-]+$/);
    expect(add.json.location).toBe(`/workers/${add.json.worker_id}`);
    const one = await (await fetch(`${r.url}/workers/${add.json.worker_id}`)).json();
    expect(one.is_healthy).toBe(true);
    const list = await (await fetch(r.url + '/workers')).json();
    expect(list.workers.map((w: any) => w.url).sort()).toEqual([a.url, b.url].sort());
    const id = list.workers.find((w: any) => w.url === b.url).id;
    const del = await fetch(`${r.url}/workers/${id}`, { method: 'DELETE' });
    expect(del.status).toBe(202);
    expect((await fetch(`${r.url}/workers/${add.json.worker_id}`)).status).toBe(404);
    // The older aliases still work.
    expect((await fetch(`${r.url}/add_worker?url=${encodeURIComponent(b.url)}`, { method: 'POST' })).status).toBe(200);
    expect((await (await fetch(r.url + '/list_workers')).json()).urls.sort()).toEqual([a.url, b.url].sort());
    expect((await fetch(`${r.url}/remove_worker?url=${encodeURIComponent(b.url)}`, { method: 'POST' })).status).toBe(200);
  });

  it('headers: the allow-list reaches workers, cookies and others do not, --forward-headers extends it', async () => {
    const a = await mock();
    const r = await startRouter([a.url], 'round_robin', ['--forward-headers', 'X-Tenant']);
    await post(r.url, '/v1/chat/completions', chat('h'), {
      authorization: 'Bearer client-key',
      'x-request-id': 'req-1',
      'x-request-id-parent': 'p-1',
      'x-correlation-id': 'corr-1',
      traceparent: '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',
      tracestate: 'v=1',
      'x-smg-routing-key': 'k',
      'x-tenant': 'acme',
      cookie: 'session=secret',
      'x-internal-secret': 'nope',
    });
    const h = a.generations.at(-1)!.headers;
    expect(h).toMatchObject({
      authorization: 'Bearer client-key',
      'x-request-id': 'req-1',
      'x-request-id-parent': 'p-1',
      'x-correlation-id': 'corr-1',
      tracestate: 'v=1',
      'x-smg-routing-key': 'k',
      'x-tenant': 'acme',
    });
    expect(h.traceparent).toMatch(/^00-/);
    expect(h.cookie).toBeUndefined();
    expect(h['x-internal-secret']).toBeUndefined();
  });

  it('mTLS to workers: --ca-cert-paths, --client-cert-path, --client-key-path for health checks, scraping and proxying', async () => {
    const cert = readFileSync('test/fixtures/tls-test-cert.pem');
    const key = readFileSync('test/fixtures/tls-test-key.pem');
    const a = await mock({ tls: { cert, key, ca: cert } });
    const r = await startRouter([a.url], 'round_robin', [
      '--client-cert-path', 'test/fixtures/tls-test-cert.pem',
      '--client-key-path', 'test/fixtures/tls-test-key.pem',
      '--ca-cert-paths', 'test/fixtures/tls-test-cert.pem',
    ]);
    const res = await post(r.url, '/v1/chat/completions', chat('secure'));
    expect(res.status).toBe(200);
    expect(res.json.choices[0].message.content).toContain(a.workerId);
    const paths = new Set(a.seen.map((s) => s.path));
    for (const p of ['/health', '/v1/models', '/v1/chat/completions']) expect(paths.has(p)).toBe(true);
    // Every request the worker saw came with kvgate's client certificate.
    expect(a.seen.every((s) => s.clientCn === 'localhost')).toBe(true);
    for (let i = 0; i < 50 && !a.seen.some((s) => s.path === '/metrics'); i++) await new Promise((r) => setTimeout(r, 50));
    expect(a.seen.some((s) => s.path === '/metrics')).toBe(true);
  });

  it('reliability flags as the fixture maps them are accepted and applied', async () => {
    const bad = await mock({ failStatus: 500 });
    const r = await startRouter([bad.url], 'round_robin', [
      '--retry-max-retries', '1', '--cb-failure-threshold', '2', '--cb-success-threshold', '1',
      '--cb-timeout-duration-secs', '60', '--cb-window-duration-secs', '60', '--max-payload-size', '1000000',
    ]);
    expect((await post(r.url, '/v1/chat/completions', chat('1'))).status).toBe(500);
    expect((await post(r.url, '/v1/chat/completions', chat('2'))).status).toBe(500);
    // Two failures within the window open the breaker: no worker left to try.
    const third = await post(r.url, '/v1/chat/completions', chat('3'));
    expect(third.status).toBe(503);
    expect(bad.generations.length).toBe(2);
  });
});
