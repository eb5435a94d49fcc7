import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent, request } from 'undici';
import { FakeWorker } from '../helpers/fake-worker.js';
import { send } from '../helpers/http.js';
import { startGateway, waitFor } from '../helpers/gateway.js';
import type { Gateway } from '../../src/server/gateway.js';

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!().catch(() => undefined);
});
async function workers(n: number, opts: ConstructorParameters<typeof FakeWorker>[0] = {}) {
  const ws = await Promise.all(Array.from({ length: n }, () => new FakeWorker(opts).start()));
  cleanups.push(() => Promise.all(ws.map((w) => w.close())));
  return ws;
}
async function gateway(overrides: Parameters<typeof startGateway>[0]) {
  const gw = await startGateway(overrides);
  cleanups.push(() => gw.close());
  return gw;
}
function call(gw: Gateway, path: string, body?: unknown, headers: Record<string, string> = {}, method = body === undefined ? 'GET' : 'POST') {
  return send(gw.url + path, { method, body, headers });
}
const completion = { model: 'fake-model', prompt: 'hello' };
const metricValue = (text: string, prefix: string) =>
  text
    .split('\n')
    .filter((l) => l.startsWith(prefix))
    .reduce((s, l) => s + Number(l.split(' ').at(-1)), 0);

describe('retries', () => {
  it('a failing worker is retried on a healthy one; the client sees only success', async () => {
    const [bad] = await workers(1, { status: 500 });
    const [good] = await workers(1);
    const gw = await gateway({ workerUrls: [bad.url, good.url], policy: 'round_robin', retryInitialBackoffMs: 1 });
    for (let i = 0; i < 10; i++) {
      const r = await call(gw, '/v1/completions', completion);
      expect(r.status).toBe(200);
      expect(r.headers['x-kvgate-worker']).toBe(good.url);
    }
    const m = await call(gw, '/metrics');
    expect(metricValue(m.text, 'kvgate_retries_total')).toBeGreaterThan(0);
    expect(gw.registry.all().every((w) => w.load === 0)).toBe(true);
  });

  it('does not retry a 4xx other than 408/429, and relays the last failure when every attempt fails', async () => {
    const [w400] = await workers(1, { status: 400 });
    const gw = await gateway({ workerUrls: [w400.url] });
    const r = await call(gw, '/v1/completions', completion);
    expect(r.status).toBe(400);
    expect(w400.received.filter((x) => x.path === '/v1/completions')).toHaveLength(1);

    const failing = await workers(3, { status: 503 });
    const gw2 = await gateway({ workerUrls: failing.map((w) => w.url), retryMaxRetries: 3, retryInitialBackoffMs: 1 });
    const r2 = await call(gw2, '/v1/completions', completion);
    expect(r2.status).toBe(503);
    expect(r2.json.error.message).toBe('injected'); // the worker's own body, unchanged
    // Three attempts, each on a different worker.
    expect(failing.map((w) => w.received.filter((x) => x.path === '/v1/completions').length).sort()).toEqual([1, 1, 1]);
    const m = await call(gw2, '/metrics');
    expect(metricValue(m.text, 'kvgate_retries_exhausted_total')).toBe(1);
  });

  it('with --disable-retries a failure reaches the client after exactly one attempt', async () => {
    const [bad] = await workers(1, { status: 500 });
    const [good] = await workers(1);
    const gw = await gateway({ workerUrls: [bad.url, good.url], policy: 'round_robin', disableRetries: true });
    const statuses = [];
    for (let i = 0; i < 4; i++) statuses.push((await call(gw, '/v1/completions', completion)).status);
    expect(statuses.sort()).toEqual([200, 200, 500, 500]);
  });
});

describe('circuit breaker', () => {
  it('opens on consecutive failures, keeps traffic away, half-opens after the timeout', async () => {
    const [bad] = await workers(1, { status: 500 });
    const [good] = await workers(1);
    const gw = await gateway({ workerUrls: [bad.url, good.url], policy: 'round_robin', disableRetries: true, cbFailureThreshold: 3, cbTimeoutDurationSecs: 0.3, cbSuccessThreshold: 1 });
    for (let i = 0; i < 6; i++) await call(gw, '/v1/completions', completion);
    const badWorker = gw.registry.get(bad.url)!;
    expect(badWorker.breaker!.state).toBe('open');
    const generations = () => bad.received.filter((x) => x.path === '/v1/completions').length;
    expect(generations()).toBe(3); // exactly the failures that opened it
    for (let i = 0; i < 6; i++) expect((await call(gw, '/v1/completions', completion)).status).toBe(200);
    expect(generations()).toBe(3); // open: no traffic reaches it
    let m = await call(gw, '/metrics');
    expect(m.text).toContain(`kvgate_worker_cb_state{worker="${bad.url}"} 1`);
    const workersView = await call(gw, '/workers');
    expect(workersView.json.workers.find((w: any) => w.url === bad.url).circuit_breaker).toBe('open');
    await new Promise((r) => setTimeout(r, 350));
    expect(badWorker.breaker!.state).toBe('half_open');
    bad.opts.status = 200; // recovered: one success closes it (success threshold 1)
    for (let i = 0; i < 4; i++) await call(gw, '/v1/completions', completion);
    expect(badWorker.breaker!.state).toBe('closed');
    m = await call(gw, '/metrics');
    expect(m.text).toMatch(new RegExp(`kvgate_worker_cb_transitions_total\\{worker="${bad.url.replace(/[/.]/g, '\\$&')}",from="half_open",to="closed"\\} 1`));
  });
});

describe('authentication', () => {
  it('requires the API key on the data plane, keeps probes public and never forwards it to workers', async () => {
    const [w] = await workers(1);
    const gw = await gateway({ workerUrls: [w.url], apiKey: ['k-123'] });
    let r = await call(gw, '/v1/completions', completion);
    expect(r.status).toBe(401);
    expect(r.json.error.type).toBe('authentication_error');
    r = await call(gw, '/v1/completions', completion, { authorization: 'Bearer wrong' });
    expect(r.status).toBe(401);
    r = await call(gw, '/v1/models');
    expect(r.status).toBe(401);
    r = await call(gw, '/v1/completions', completion, { authorization: 'Bearer k-123' });
    expect(r.status).toBe(200);
    expect(w.received.at(-1)!.headers.authorization).toBeUndefined();
    for (const p of ['/health', '/liveness', '/readiness', '/metrics']) expect((await call(gw, p)).status).toBe(200);
  });

  it('sends a worker its own key', async () => {
    const [w] = await workers(1);
    const gw = await gateway({ workerUrls: [w.url], workerApiKey: 'worker-secret' });
    await call(gw, '/v1/completions', completion, { authorization: 'Bearer client-key' });
    expect(w.received.at(-1)!.headers.authorization).toBe('Bearer worker-secret');
    expect(w.received.find((x) => x.path === '/v1/models')!.headers.authorization).toBe('Bearer worker-secret');
  });

  it('refuses admin routes without the admin key and accepts them with it', async () => {
    const [a, b] = await workers(2);
    const gw = await gateway({ workerUrls: [a.url], adminApiKey: 'admin-1' });
    let r = await call(gw, '/workers', { url: b.url });
    expect(r.status).toBe(401);
    expect(gw.registry.size).toBe(1);
    for (const [p, m] of [['/workers', 'GET'], ['/list_workers', 'GET'], ['/get_loads', 'GET'], ['/flush_cache', 'POST']] as const) {
      expect((await call(gw, p, m === 'POST' ? {} : undefined, {}, m)).status).toBe(401);
    }
    r = await call(gw, '/workers', { url: b.url }, { authorization: 'Bearer admin-1' });
    expect(r.status).toBe(202);
    expect(gw.registry.size).toBe(2);
    // The admin key is not a data-plane key when data-plane keys are configured separately.
    const m = await call(gw, '/metrics');
    expect(metricValue(m.text, 'kvgate_auth_failures_total{scope="admin"}')).toBe(5);
  });
});

describe('graceful shutdown', () => {
  it('lets in-flight streams finish, refuses new requests, turns readiness 503', async () => {
    const [w] = await workers(1, { chunks: 10, chunkDelayMs: 60 });
    const gw = await gateway({ workerUrls: [w.url] });
    const res = await request(gw.url + '/v1/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...completion, stream: true }) });
    const reading = res.body.text();
    await waitFor(() => w.activeStreams === 1, 2000, 'stream started');
    const probe = new Agent({ connections: 1 });
    // Open a keep-alive connection before draining starts.
    expect((await request(gw.url + '/liveness', { dispatcher: probe }).then(async (r) => (await r.body.dump(), r.statusCode)))).toBe(200);
    const done = gw.shutdown(5000);
    const ready = await request(gw.url + '/readiness', { dispatcher: probe });
    expect(ready.statusCode).toBe(503);
    await ready.body.dump();
    const refused = await request(gw.url + '/v1/completions', { dispatcher: probe, method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(completion) });
    expect(refused.statusCode).toBe(503);
    expect(((await refused.body.json()) as any).error.code).toBe('shutting_down');
    expect(await reading).toContain('data: [DONE]');
    expect(await done).toBe(0);
    await probe.close();
  });

  it('cuts what is still running when the grace period ends', async () => {
    const [w] = await workers(1, { chunks: 100, chunkDelayMs: 50 });
    const gw = await gateway({ workerUrls: [w.url] });
    const res = await request(gw.url + '/v1/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...completion, stream: true }) });
    const reading = res.body.text().then(
      (t) => t,
      () => 'broken',
    );
    await waitFor(() => w.activeStreams === 1, 2000, 'stream started');
    expect(await gw.shutdown(200)).toBe(1);
    const text = await reading;
    expect(text === 'broken' || !text.includes('[DONE]')).toBe(true);
    await waitFor(() => w.abortedEarly === 1, 2000, 'upstream aborted');
  });
});

describe('listener limits and TLS', () => {
  it('answers 431 JSON to oversized headers and keeps serving', async () => {
    const [w] = await workers(1);
    const gw = await gateway({ workerUrls: [w.url], maxHeaderSize: 2048 });
    const r = await call(gw, '/v1/completions', completion, { 'x-big': 'y'.repeat(4000) });
    expect(r.status).toBe(431);
    expect(r.json.error.code).toBe('headers_too_large');
    expect((await call(gw, '/v1/completions', completion)).status).toBe(200);
  });

  it('serves HTTPS with --tls-cert-path/--tls-key-path', async () => {
    const [w] = await workers(1);
    const gw = await gateway({ workerUrls: [w.url], tlsCertPath: 'test/fixtures/tls-test-cert.pem', tlsKeyPath: 'test/fixtures/tls-test-key.pem' });
    expect(gw.url.startsWith('https://')).toBe(true);
    const agent = new Agent({ connect: { ca: readFileSync('test/fixtures/tls-test-cert.pem') } });
    const res = await request(gw.url + '/v1/completions', { dispatcher: agent, method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(completion) });
    expect(res.statusCode).toBe(200);
    await res.body.dump();
    await agent.close();
  });
});
