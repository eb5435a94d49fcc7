import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Writable } from 'node:stream';
import { gunzipSync } from 'node:zlib';
import pino from 'pino';
import { request } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultServeConfig } from '../../src/config/serve-config.js';
import { SeededRng } from '../../src/core/rng.js';
import { Gateway } from '../../src/server/gateway.js';
import { startSimServer, type SimServer } from '../../src/sim/server.js';
import { FakeWorker } from '../helpers/fake-worker.js';
import { startGateway, waitFor } from '../helpers/gateway.js';

const MODEL = 'kvgate-sim';
const SYSTEM = 'You are the support assistant of an online bookshop. Answer in two sentences, cite the relevant policy section, and never invent order data. '.repeat(3);
const chat = (user: string, extra: Record<string, unknown> = {}) => ({ model: MODEL, messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: user }], max_tokens: 8, ...extra });

async function post(url: string, body: unknown, headers: Record<string, string> = {}) {
  const r = await request(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });
  return { status: r.statusCode, headers: r.headers, text: await r.body.text() };
}
const get = async (url: string, headers: Record<string, string> = {}) => {
  const r = await request(url, { headers });
  return { status: r.statusCode, text: await r.body.text() };
};

/** Sum of a metric's samples whose labels include all of `labels`. */
function sample(text: string, name: string, labels: Record<string, string>): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name + '{') && !line.startsWith(name + ' ')) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`))) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

describe('metrics, /debug/route and explained decisions against simulated engines', () => {
  let sims: SimServer[] = [];
  let gw: Gateway;
  const logLines: Array<Record<string, unknown>> = [];

  beforeAll(async () => {
    for (let i = 0; i < 3; i++) sims.push(await startSimServer({ host: '127.0.0.1', port: 0, model: MODEL, speed: 50, seed: i + 1 }));
    const sink = new Writable({
      write(chunk, _enc, cb) {
        for (const l of String(chunk).split('\n')) if (l.trim()) logLines.push(JSON.parse(l));
        cb();
      },
    });
    gw = new Gateway(
      defaultServeConfig({
        host: '127.0.0.1',
        port: 0,
        healthCheckIntervalSecs: 0.2,
        workerUrls: sims.map((s) => s.url),
        policy: 'cache_aware',
        explainDecisions: true,
        decisionLogSampleRate: 1,
        engineMetricsIntervalSecs: 0.2,
      }),
      { rng: new SeededRng(3), logger: pino({ level: 'info' }, sink) },
    );
    await gw.start();
  });
  afterAll(async () => {
    await gw?.close();
    await Promise.all(sims.map((s) => s.close()));
  });

  it('TTFT and ITL histograms carry model and worker; token counters equal the usage the engines reported', async () => {
    const usage = { prompt: 0, cached: 0, completion: 0 };
    const byWorker = new Map<string, number>();
    for (let i = 0; i < 6; i++) {
      const stream = i % 2 === 0;
      const r = await post(gw.url + '/v1/chat/completions', chat(`question ${i}`, stream ? { stream: true, stream_options: { include_usage: true } } : {}));
      expect(r.status).toBe(200);
      const worker = String(r.headers['x-kvgate-worker']);
      byWorker.set(worker, (byWorker.get(worker) ?? 0) + 1);
      let u: any;
      if (stream) {
        const events = r.text.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)));
        u = events.find((e) => e.usage)?.usage;
      } else u = JSON.parse(r.text).usage;
      usage.prompt += u.prompt_tokens;
      usage.completion += u.completion_tokens;
      usage.cached += u.prompt_tokens_details?.cached_tokens ?? 0;
    }
    const m = (await get(gw.url + '/metrics')).text;
    const [w] = [...byWorker.keys()];
    expect(m).toContain(`kvgate_ttft_seconds_bucket{le="0.005",model="${MODEL}",worker="${w}"}`);
    expect(sample(m, 'kvgate_ttft_seconds_count', { model: MODEL })).toBe(6);
    expect(sample(m, 'kvgate_e2e_seconds_count', { model: MODEL })).toBe(6);
    expect(sample(m, 'kvgate_itl_seconds_count', { model: MODEL })).toBeGreaterThan(0);
    expect(sample(m, 'kvgate_prompt_tokens_total', { model: MODEL })).toBe(usage.prompt);
    expect(sample(m, 'kvgate_completion_tokens_total', { model: MODEL })).toBe(usage.completion);
    expect(sample(m, 'kvgate_cached_tokens_total', { model: MODEL })).toBe(usage.cached);
    expect(usage.cached).toBeGreaterThan(0);
    expect(sample(m, 'kvgate_requests_total', { route: 'chat', status: '200', model: MODEL })).toBe(6);
    for (const name of ['nodejs_eventloop_lag_seconds', 'process_cpu_seconds_total', 'nodejs_heap_size_used_bytes']) expect(m).toContain(`\n${name}`);
  });

  it('--explain-decisions answers a compact x-kvgate-route header; the sampled log line carries the explanation', async () => {
    const r = await post(gw.url + '/v1/chat/completions', chat('header please'));
    const header = String(r.headers['x-kvgate-route']);
    expect(header).toMatch(/^policy=cache_aware; worker=http:\/\/127\.0\.0\.1:\d+; rule=\w+; matched_chars=\d+\/\d+; load=\d+; .*candidates=3/);
    expect(header).toContain(`worker=${r.headers['x-kvgate-worker']}`);
    const line = logLines.find((l) => l.msg === 'routing decision' && (l.decision as any)?.summary === header);
    expect(line).toBeDefined();
    expect((line!.decision as any).candidates).toHaveLength(3);
  });

  it('POST /debug/route names the worker holding the prefix and its match; with its breaker open it names the exclusion; nothing changes', async () => {
    const first = await post(gw.url + '/v1/chat/completions', chat('warm the prefix'));
    const holder = String(first.headers['x-kvgate-worker']);
    const before = { processed: gw.registry.all().map((w) => w.processed), tree: [...((gw.policy as any).treeChars() as Map<string, number>)] };
    const simRequests = await Promise.all(sims.map(async (s) => (await get(s.url + '/metrics')).text.match(/vllm:request_success_total\{[^}]*\} (\d+)/)?.[1]));
    const body = chat('a new question about refunds');
    const r = await post(gw.url + '/debug/route', body);
    expect(r.status).toBe(200);
    const d = JSON.parse(r.text);
    expect(d).toMatchObject({ route: 'chat', model: MODEL, policy: 'cache_aware', chosen: holder, mode: 'regular' });
    expect(d.explanation.rule).toBe('prefix_match');
    const mine = d.explanation.candidates.find((c: any) => c.worker === holder);
    expect(mine.matchedChars).toBeGreaterThanOrEqual(SYSTEM.length);
    for (const c of d.explanation.candidates) if (c.worker !== holder) expect(c.matchedChars).toBeLessThan(mine.matchedChars);

    // Nothing was sent to a worker and no routing state changed.
    expect(gw.registry.all().map((w) => w.processed)).toEqual(before.processed);
    expect([...((gw.policy as any).treeChars() as Map<string, number>)]).toEqual(before.tree);
    const simAfter = await Promise.all(sims.map(async (s) => (await get(s.url + '/metrics')).text.match(/vllm:request_success_total\{[^}]*\} (\d+)/)?.[1]));
    expect(simAfter).toEqual(simRequests);

    // Its breaker open: the explanation excludes it and names another worker.
    const w = gw.registry.get(holder)!;
    for (let i = 0; i < 20; i++) w.breaker!.recordFailure();
    expect(w.breaker!.state).toBe('open');
    const r2 = JSON.parse((await post(gw.url + '/debug/route', body)).text);
    expect(r2.explanation.candidates.find((c: any) => c.worker === holder)).toMatchObject({ excluded: 'breaker_open' });
    expect(r2.chosen).not.toBe(holder);
    for (let i = 0; i < 5; i++) w.breaker!.recordSuccess();
    (w.breaker as any).s = 'closed';

    // ?exclude= as a retry would; ?route= by name or path.
    const r3 = JSON.parse((await post(gw.url + `/debug/route?route=/v1/chat/completions&exclude=${encodeURIComponent(holder)}`, body)).text);
    expect(r3.explanation.candidates.find((c: any) => c.worker === holder)).toMatchObject({ excluded: 'excluded_by_retry' });
    const r4 = JSON.parse((await post(gw.url + '/debug/route?route=completions', { model: MODEL, prompt: SYSTEM + 'x' })).text);
    expect(r4.route).toBe('completions');
  });

  it('/debug/route refuses bad input with OpenAI-style errors', async () => {
    const bad = async (path: string, body: string, status: number, code: string) => {
      const r = await request(gw.url + path, { method: 'POST', body });
      expect(r.statusCode).toBe(status);
      expect((await r.body.json()) as any).toMatchObject({ error: { code } });
    };
    await bad('/debug/route', '{"messages":', 400, 'invalid_json');
    await bad('/debug/route', '{}', 400, 'missing_field');
    await bad('/debug/route?route=nope', JSON.stringify(chat('x')), 400, 'invalid_value');
    await bad('/debug/route?exclude=http://nowhere:1', JSON.stringify(chat('x')), 400, 'invalid_value');
    // One model served: any model name routes to it, as real requests do.
    const other = await post(gw.url + '/debug/route', { model: 'other-model', messages: [{ role: 'user', content: 'x' }] });
    expect(JSON.parse(other.text)).toMatchObject({ model: MODEL });
    await bad('/debug/route', JSON.stringify({ model: 42, messages: [] }), 400, 'invalid_type');
    const r = await request(gw.url + '/debug/route');
    expect(r.statusCode).toBe(405);
    await r.body.dump();
  });

  it('the dashboard: page, state and a live SSE feed of decisions; the watcher is dropped when it leaves', async () => {
    const page = await get(gw.url + '/dashboard');
    expect(page.status).toBe(200);
    expect(page.text).toContain('<title>kvgate');
    expect(page.text).not.toMatch(/<script[^>]+src=|<link[^>]+href=|https?:\/\/(?!127)/);
    const state = JSON.parse((await get(gw.url + '/dashboard/state')).text);
    expect(state.workers).toHaveLength(3);
    expect(state.workers[0]).toHaveProperty('hit_rate');
    expect(state.prefix_groups.total).toBeGreaterThan(0);

    const ac = new AbortController();
    const res = await request(gw.url + '/dashboard/events?backlog=0', { signal: ac.signal });
    expect(res.headers['content-type']).toBe('text/event-stream');
    await waitFor(() => gw.core.feed.watcherCount === 1, 3000, 'watcher');
    let text = '';
    const reading = (async () => {
      try {
        for await (const c of res.body) {
          text += String(c);
          if (text.includes('event: done')) break;
        }
      } catch {
        /* aborted */
      }
    })();
    const sent = await post(gw.url + '/v1/chat/completions', chat('watched request'));
    await reading;
    ac.abort();
    const decision = text.split('\n\n').find((e) => e.startsWith('event: decision'));
    const rec = JSON.parse(decision!.split('\ndata: ')[1]);
    expect(rec).toMatchObject({ worker: sent.headers['x-kvgate-worker'], model: MODEL, policy: 'cache_aware' });
    expect(rec.explanation.candidates).toHaveLength(3);
    await waitFor(() => gw.core.feed.watcherCount === 0, 3000, 'watcher removed');
  });
});

describe('admin protection of the debug and dashboard routes', () => {
  it('needs the admin key when one is set', async () => {
    const fake = await new FakeWorker().start();
    const gw = await startGateway({ workerUrls: [fake.url], adminApiKey: 'sesame' });
    try {
      for (const path of ['/dashboard', '/dashboard/state', '/dashboard/events']) expect((await get(gw.url + path)).status).toBe(401);
      expect((await post(gw.url + '/debug/route', { messages: [] })).status).toBe(401);
      expect((await get(gw.url + '/dashboard/state', { authorization: 'Bearer sesame' })).status).toBe(200);
    } finally {
      await gw.close();
      await fake.close();
    }
  });
});

describe('OpenTelemetry tracing', () => {
  let receiver: Server;
  const bodies: any[] = [];
  let contentTypes: string[] = [];
  beforeAll(async () => {
    receiver = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        if (req.method === 'POST' && req.url === '/v1/traces') {
          let raw = Buffer.concat(chunks);
          if (req.headers['content-encoding'] === 'gzip') raw = gunzipSync(raw);
          contentTypes.push(String(req.headers['content-type']));
          bodies.push(JSON.parse(raw.toString('utf8')));
          res.writeHead(200, { 'content-type': 'application/json' });
          res.end('{}');
        } else {
          res.writeHead(404);
          res.end();
        }
      });
    });
    await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
  });
  afterAll(async () => {
    await new Promise<void>((r) => receiver.close(() => r()));
  });

  it('a span per request with tokenize, select, upstream and first-token children; the worker continues kvgate\'s span', async () => {
    const fake = await new FakeWorker({ chunks: 3 }).start();
    const endpoint = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/v1/traces`;
    const gw = await startGateway({ workerUrls: [fake.url], policy: 'kv_aware', otlpTracesEndpoint: endpoint });
    const clientTrace = '4bf92f3577b34da6a3ce929d0e0e4736';
    const clientSpan = '00f067aa0ba902b7';
    try {
      const r = await post(gw.url + '/v1/chat/completions', { model: 'fake-model', messages: [{ role: 'user', content: 'trace me' }], stream: true }, { traceparent: `00-${clientTrace}-${clientSpan}-01` });
      expect(r.status).toBe(200);
      await gw.core.tracing!.flush();
      await waitFor(() => bodies.length > 0, 5000, 'an OTLP export');
      expect(contentTypes[0]).toContain('application/json');
      const spans = bodies.flatMap((b) => b.resourceSpans.flatMap((rs: any) => rs.scopeSpans.flatMap((ss: any) => ss.spans)));
      const resource = bodies[0].resourceSpans[0].resource.attributes;
      expect(resource).toContainEqual({ key: 'service.name', value: { stringValue: 'kvgate' } });
      const byName = (n: string) => spans.find((s: any) => s.name === n);
      const root = byName('POST /v1/chat/completions');
      expect(root).toBeDefined();
      expect(root.traceId).toBe(clientTrace);
      expect(root.parentSpanId).toBe(clientSpan);
      const attr = (s: any, k: string) => s.attributes.find((a: any) => a.key === k)?.value;
      expect(attr(root, 'kvgate.policy')).toEqual({ stringValue: 'kv_aware' });
      expect(attr(root, 'kvgate.worker')).toEqual({ stringValue: fake.url });
      for (const n of ['tokenize', 'select']) expect(byName(n)?.parentSpanId).toBe(root.spanId);
      const upstream = byName('upstream /v1/chat/completions');
      expect(upstream.parentSpanId).toBe(root.spanId);
      expect(attr(byName('select'), 'kvgate.matched_blocks')).toBeDefined();
      expect(byName('first_token').parentSpanId).toBe(upstream.spanId);
      // The worker received kvgate's upstream span as its parent, in the client's trace.
      const got = fake.received.find((x) => x.path === '/v1/chat/completions')!;
      expect(got.headers.traceparent).toBe(`00-${clientTrace}-${upstream.spanId}-01`);
    } finally {
      await gw.close();
      await fake.close();
    }
  });

  it('is off by default: the client traceparent passes through unchanged', async () => {
    const fake = await new FakeWorker().start();
    const gw = await startGateway({ workerUrls: [fake.url] });
    try {
      expect(gw.core.tracing).toBeUndefined();
      const tp = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
      await post(gw.url + '/v1/chat/completions', { model: 'fake-model', messages: [{ role: 'user', content: 'x' }] }, { traceparent: tp });
      expect(fake.received.find((x) => x.path === '/v1/chat/completions')!.headers.traceparent).toBe(tp);
    } finally {
      await gw.close();
      await fake.close();
    }
  });
});

describe('character-tree metrics', () => {
  // Unique 400k-character prompts to one worker: with --max-tree-size 1000 the worker's share
  // passes the insert-time bound (the cap plus at least 1 Mi characters of slack) on the third
  // insert, and the tree trims itself.
  const unique = (i: number) => Array.from({ length: 400_000 }, (_, k) => String.fromCharCode(97 + ((k * 7 + i + ((k * k) % 11)) % 26))).join('');

  for (const policy of ['cache_aware', 'kv_aware'] as const) {
    it(`${policy}: kvgate_tree_chars holds its tree per worker and kvgate_tree_size_trims_total counts insert-time trims`, async () => {
      const fake = await new FakeWorker().start();
      const gw = await startGateway({ workerUrls: [fake.url], policy, maxTreeSize: 1000, evictionIntervalSecs: 0 });
      try {
        const first = await post(gw.url + '/v1/chat/completions', { model: 'fake-model', messages: [{ role: 'user', content: unique(0) }], max_tokens: 1 });
        expect(first.status).toBe(200);
        let m = (await get(gw.url + '/metrics')).text;
        expect(sample(m, 'kvgate_tree_chars', {})).toBeGreaterThan(400_000);
        expect(sample(m, 'kvgate_tree_size_trims_total', {})).toBe(0);
        for (let i = 1; i < 4; i++) {
          const r = await post(gw.url + '/v1/chat/completions', { model: 'fake-model', messages: [{ role: 'user', content: unique(i) }], max_tokens: 1 });
          expect(r.status).toBe(200);
        }
        m = (await get(gw.url + '/metrics')).text;
        expect(sample(m, 'kvgate_tree_size_trims_total', {})).toBeGreaterThanOrEqual(1);
        // Trimmed back to the cap (LRU leaves first): far below the 1.6 M characters inserted.
        expect(sample(m, 'kvgate_tree_chars', {})).toBeLessThan(1_200_000);
        expect(m).toMatch(/# TYPE kvgate_tree_size_trims_total counter/);
      } finally {
        await gw.close();
        await fake.close();
      }
    });
  }
});
