import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { defaultEppConfig, type EppConfig } from '../../src/config/epp-config.js';
import { SeededRng } from '../../src/core/rng.js';
import { EndpointPicker } from '../../src/epp/endpoint-picker.js';
import { FakeWorker } from '../helpers/fake-worker.js';
import { waitFor } from '../helpers/gateway.js';
import { dynamicMetadata, EnvoyStream, extProcClient, healthCheck, healthClient, setHeaders } from '../helpers/envoy-ext-proc.js';
import { spawnKvgate } from '../helpers/processes.js';

/* eslint-disable @typescript-eslint/no-explicit-any */

async function startEpp(overrides: Partial<EppConfig>): Promise<EndpointPicker> {
  const epp = new EndpointPicker(
    defaultEppConfig({ host: '127.0.0.1', port: 0, grpcPort: 0, grpcHealthPort: 0, logLevel: 'silent', healthCheckIntervalSecs: 0.1, healthCheckTimeoutSecs: 1, engineMetricsIntervalSecs: 0, ...overrides }),
    { rng: new SeededRng(7), logger: pino({ level: 'silent' }) },
  );
  await epp.start();
  return epp;
}

const endpoint = (w: FakeWorker) => new URL(w.url).host;
const PREFIX = 'You are a careful assistant for the ACME fleet. '.repeat(40);
const chat = (suffix: string, extra: Record<string, unknown> = {}) =>
  JSON.stringify({ model: 'fake-model', stream: true, messages: [{ role: 'system', content: PREFIX }, { role: 'user', content: suffix }], ...extra });
const chatHeaders = { ':method': 'POST', ':path': '/v1/chat/completions', ':authority': 'gw.example', 'content-type': 'application/json' };

/** Request phase as Envoy sends it in FULL_DUPLEX_STREAMED: headers, then the body in `parts` chunks. */
async function requestPhase(s: EnvoyStream, body: string, parts = 3, subset?: string[] | string) {
  s.requestHeaders(chatHeaders, { subset });
  const buf = Buffer.from(body);
  const size = Math.ceil(buf.length / parts);
  for (let i = 0; i < parts; i++) s.requestBody(buf.subarray(i * size, (i + 1) * size), i === parts - 1);
  const first = await s.next();
  return first;
}

/** Reads the streamed request body back until end_of_stream. */
async function streamedBody(s: EnvoyStream): Promise<string> {
  let out = '';
  for (;;) {
    const m = await s.next();
    const sr = m.request_body?.response?.body_mutation?.streamed_response;
    expect(sr, JSON.stringify(m)).toBeDefined();
    out += Buffer.from(sr.body ?? '').toString();
    if (sr.end_of_stream) return out;
  }
}

/** Response phase: headers with the served endpoint, `chunks` SSE chunks, end. */
async function responsePhase(s: EnvoyStream, served: string, chunks = 2) {
  s.responseHeaders(200, served);
  const rh = await s.next();
  expect(rh.response_headers).toBeDefined();
  for (let i = 0; i < chunks; i++) {
    const data = `data: {"i":${i}}\n\n`;
    s.responseBody(data, i === chunks - 1);
    const rb = await s.next();
    const sr = rb.response_body.response.body_mutation.streamed_response;
    expect(Buffer.from(sr.body).toString()).toBe(data);
    expect(!!sr.end_of_stream).toBe(i === chunks - 1);
  }
  return rh;
}

async function loads(epp: EndpointPicker): Promise<Record<string, number>> {
  const res = await fetch(`http://127.0.0.1:${epp.httpPort}/workers`);
  const body = (await res.json()) as { workers: Array<{ url: string; load: number }> };
  return Object.fromEntries(body.workers.map((w) => [new URL(w.url).host, w.load]));
}

describe('kvgate epp: ext_proc endpoint picker driven as Envoy drives it', () => {
  let workers: FakeWorker[];
  let epp: EndpointPicker;
  let client: grpc.Client;

  beforeAll(async () => {
    workers = await Promise.all([0, 1, 2].map(() => new FakeWorker().start()));
    epp = await startEpp({ workerUrls: workers.map((w) => w.url), policy: 'cache_aware' });
    await waitFor(() => epp.core.registry.all().every((w) => w.isAvailable() && w.modelId === 'fake-model'), 5000, 'workers healthy');
    client = extProcClient(`127.0.0.1:${epp.grpcPort}`);
  });
  afterAll(async () => {
    client?.close();
    await epp?.close();
    await Promise.all(workers.map((w) => w.close()));
  });
  afterEach(async () => {
    // Every test ends with no load held anywhere.
    await waitFor(() => epp.core.registry.all().every((w) => w.load === 0), 3000, 'load back to 0');
  });

  it('sends a warmed prefix to the endpoint that holds it, in header and metadata alike, with fallbacks; load returns to 0', async () => {
    // Warm: the first request with the prefix goes somewhere and the policy records it there.
    const warm = new EnvoyStream(client);
    const body1 = chat('first question');
    const h1 = await requestPhase(warm, body1);
    const dest1 = setHeaders(h1.request_headers.response)['x-gateway-destination-endpoint'];
    const holder = dest1.split(',')[0];
    expect(workers.map(endpoint)).toContain(holder);
    // The body is streamed back unchanged after the decision.
    expect(await streamedBody(warm)).toBe(body1);
    await responsePhase(warm, holder);
    warm.end();
    await warm.waitEnd();

    // Same prefix, other question: the holder again.
    const s = new EnvoyStream(client);
    const body2 = chat('second, different question');
    const h2 = await requestPhase(s, body2, 4);
    const common = h2.request_headers.response;
    expect(common.clear_route_cache).toBe(true);
    const header = setHeaders(common)['x-gateway-destination-endpoint'];
    const meta = dynamicMetadata(h2)['envoy.lb']['x-gateway-destination-endpoint'];
    expect(header).toBe(meta);
    const list = header.split(',');
    expect(list[0]).toBe(holder);
    // Fallbacks: the two other endpoints (--fallback-endpoints 2), each once.
    expect(list).toHaveLength(3);
    expect(new Set(list)).toEqual(new Set(workers.map(endpoint)));
    expect(await streamedBody(s)).toBe(body2);
    // In flight: the holder carries the load until the response ends.
    expect((await loads(epp))[holder]).toBe(1);
    await responsePhase(s, holder, 3);
    expect((await loads(epp))[holder]).toBe(0);
    s.end();
    await s.waitEnd();
    expect(Object.values(await loads(epp)).every((l) => l === 0)).toBe(true);
  });

  it('honours the subset hint: the best endpoint inside it; an empty or foreign subset gets 503', async () => {
    // Find the prefix holder.
    const warm = new EnvoyStream(client);
    const h = await requestPhase(warm, chat('warm'));
    const holder = setHeaders(h.request_headers.response)['x-gateway-destination-endpoint'].split(',')[0];
    warm.cancel();
    const others = workers.map(endpoint).filter((e) => e !== holder);
    await waitFor(() => epp.core.registry.all().every((w) => w.load === 0), 3000, 'load back to 0');

    // Busy one of the others (an open request restricted to it).
    const busy = new EnvoyStream(client);
    const hb = await requestPhase(busy, chat('unrelated', { messages: [{ role: 'user', content: 'something else entirely' }] }), 1, [others[0]]);
    expect(setHeaders(hb.request_headers.response)['x-gateway-destination-endpoint']).toBe(others[0]);

    // The prefix with a subset excluding its holder: the least loaded of the subset wins.
    const s = new EnvoyStream(client);
    const hs = await requestPhase(s, chat('subset question'), 2, others.join(','));
    const dest = setHeaders(hs.request_headers.response)['x-gateway-destination-endpoint'];
    expect(dynamicMetadata(hs)['envoy.lb']['x-gateway-destination-endpoint']).toBe(dest);
    expect(dest.split(',')[0]).toBe(others[1]);
    expect(dest.split(',').every((e) => others.includes(e))).toBe(true);
    s.cancel();
    busy.cancel();

    for (const subset of [[], ['10.255.255.1:8000']]) {
      const e = new EnvoyStream(client);
      const r = await requestPhase(e, chat('x'), 1, subset);
      expect(r.immediate_response.status.code).toBe('ServiceUnavailable');
      const err = JSON.parse(Buffer.from(r.immediate_response.body).toString()).error;
      expect(err.code).toBe('no_endpoint_in_subset');
      expect(err.type).toBe('server_error');
      e.end();
      await e.waitEnd();
    }
  });

  it('releases the load when the stream is reset mid-request or after the response headers', async () => {
    for (const phase of ['after-pick', 'after-response-headers', 'half-close-without-response'] as const) {
      const s = new EnvoyStream(client);
      const h = await requestPhase(s, chat(`reset ${phase}`));
      const picked = setHeaders(h.request_headers.response)['x-gateway-destination-endpoint'].split(',')[0];
      await streamedBody(s);
      expect((await loads(epp))[picked]).toBe(1);
      if (phase === 'after-response-headers') {
        s.responseHeaders(200, picked);
        await s.next();
        s.responseBody('data: {"partial":true}\n\n', false);
        await s.next();
      }
      if (phase === 'half-close-without-response') s.end();
      else s.cancel();
      await waitFor(() => epp.core.registry.all().every((w) => w.load === 0), 3000, `load released (${phase})`);
      expect((await loads(epp))[picked]).toBe(0);
    }
  });

  it('moves load and completion to the endpoint the gateway reports as served', async () => {
    const s = new EnvoyStream(client);
    const h = await requestPhase(s, chat('fallback case'));
    const [primary, fallback] = setHeaders(h.request_headers.response)['x-gateway-destination-endpoint'].split(',');
    await streamedBody(s);
    const before = epp.core.registry.all().find((w) => endpoint({ url: w.url } as FakeWorker) === fallback)!.processed;
    s.responseHeaders(200, fallback);
    await s.next();
    const l = await loads(epp);
    expect(l[primary]).toBe(0);
    expect(l[fallback]).toBe(1);
    s.responseBody('data: [DONE]\n\n', true);
    await s.next();
    expect((await loads(epp))[fallback]).toBe(0);
    expect(epp.core.registry.all().find((w) => new URL(w.url).host === fallback)!.processed).toBe(before + 1);
    s.end();
    await s.waitEnd();
  });

  it('BUFFERED mode: headers answered at once, the decision rides on the body response', async () => {
    const s = new EnvoyStream(client, { request: 'BUFFERED', response: 'NONE' });
    s.requestHeaders(chatHeaders);
    const hr = await s.next();
    expect(hr.request_headers).toBeDefined();
    expect(hr.request_headers.response?.header_mutation).toBeUndefined();
    s.requestBody(chat('buffered'), true);
    const br = await s.next();
    const common = br.request_body.response;
    expect(common.clear_route_cache).toBe(true);
    const dest = setHeaders(common)['x-gateway-destination-endpoint'];
    expect(dest).toBe(dynamicMetadata(br)['envoy.lb']['x-gateway-destination-endpoint']);
    expect(common.body_mutation).toBeUndefined();
    s.responseHeaders(200, dest.split(',')[0], true);
    await s.next();
    s.end();
    await s.waitEnd();
  });

  it('headers-only requests pick at once with no routing text', async () => {
    const s = new EnvoyStream(client);
    s.requestHeaders({ ':method': 'GET', ':path': '/v1/models' }, { endOfStream: true });
    const r = await s.next();
    const dest = setHeaders(r.request_headers.response)['x-gateway-destination-endpoint'];
    expect(workers.map(endpoint)).toContain(dest.split(',')[0]);
    expect(dynamicMetadata(r)['envoy.lb']['x-gateway-destination-endpoint']).toBe(dest);
    s.responseHeaders(200, dest.split(',')[0], true);
    await s.next();
    s.end();
    await s.waitEnd();
  });

  it('bad input gets an OpenAI-style ImmediateResponse 400 and the picker keeps serving', async () => {
    const bad: Array<[string, string]> = [
      ['{not json', 'invalid_json'],
      [JSON.stringify({ model: 'fake-model', messages: 'nope' }), 'invalid_type'],
    ];
    for (const [body, code] of bad) {
      const s = new EnvoyStream(client);
      const r = await requestPhase(s, body, 1);
      const ir = r.immediate_response;
      expect(ir, JSON.stringify(r)).toBeDefined();
      const err = JSON.parse(Buffer.from(ir.body).toString()).error;
      expect(err.code).toBe(code);
      expect(Object.keys(err).sort()).toEqual(['code', 'message', 'param', 'type']);
      expect(ir.status.code).toBe(code === 'model_not_found' ? 'NotFound' : 'BadRequest');
      const ct = (ir.headers.set_headers as any[]).find((x) => x.header.key === 'content-type');
      expect(Buffer.from(ct.header.raw_value).toString()).toBe('application/json');
      s.end();
      await s.waitEnd();
    }
    // Still serving; and with one model served, any model name is routed to it (as `serve` does).
    const ok = new EnvoyStream(client);
    const r = await requestPhase(ok, chat('after bad input'));
    expect(setHeaders(r.request_headers.response)['x-gateway-destination-endpoint']).toBeTruthy();
    ok.cancel();
    const other = new EnvoyStream(client);
    const r2 = await requestPhase(other, JSON.stringify({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] }), 1);
    expect(setHeaders(r2.request_headers.response)['x-gateway-destination-endpoint']).toBeTruthy();
    other.cancel();
  });

  it('gRPC health: liveness always, readiness and the ext_proc service only with healthy endpoints', async () => {
    const hc = healthClient(`127.0.0.1:${epp.healthPort}`);
    for (const svc of ['', 'liveness', 'readiness', 'envoy.service.ext_proc.v3.ExternalProcessor']) expect(await healthCheck(hc, svc)).toEqual({ status: 'SERVING' });
    expect((await healthCheck(hc, 'no.such.Service')).code).toBe(5); // NOT_FOUND
    hc.close();

    const empty = await startEpp({});
    const hc2 = healthClient(`127.0.0.1:${empty.healthPort}`);
    try {
      expect(await healthCheck(hc2, 'liveness')).toEqual({ status: 'SERVING' });
      expect(await healthCheck(hc2, 'readiness')).toEqual({ status: 'NOT_SERVING' });
      expect(await healthCheck(hc2, 'envoy.service.ext_proc.v3.ExternalProcessor')).toEqual({ status: 'NOT_SERVING' });
      expect((await fetch(`http://127.0.0.1:${empty.httpPort}/readiness`)).status).toBe(503);
      // No endpoint at all: 503 with an OpenAI-style body.
      const c2 = extProcClient(`127.0.0.1:${empty.grpcPort}`);
      const s = new EnvoyStream(c2);
      const r = await requestPhase(s, chat('nobody home'), 1);
      expect(r.immediate_response.status.code).toBe('ServiceUnavailable');
      expect(JSON.parse(Buffer.from(r.immediate_response.body).toString()).error.type).toBe('server_error');
      s.end();
      await s.waitEnd();
      c2.close();
    } finally {
      hc2.close();
      await empty.close();
    }
  });
});

describe('kvgate epp: admission and conformance hooks', () => {
  let workers: FakeWorker[];
  afterEach(async () => {
    await Promise.all(workers.map((w) => w.close()));
  });

  it('sheds with ImmediateResponse 429 when --max-concurrent-requests is reached, and frees the slot on reset', async () => {
    workers = await Promise.all([0, 1].map(() => new FakeWorker().start()));
    const epp = await startEpp({ workerUrls: workers.map((w) => w.url), maxConcurrentRequests: 1, queueSize: 0 });
    const client = extProcClient(`127.0.0.1:${epp.grpcPort}`);
    try {
      await waitFor(() => epp.core.registry.all().every((w) => w.isAvailable() && w.modelId), 5000, 'workers healthy');
      const a = new EnvoyStream(client);
      const ha = await requestPhase(a, chat('one'));
      expect(ha.request_headers).toBeDefined();
      const b = new EnvoyStream(client);
      const hb = await requestPhase(b, chat('two'));
      expect(hb.immediate_response.status.code).toBe('TooManyRequests');
      expect(JSON.parse(Buffer.from(hb.immediate_response.body).toString()).error.code).toBe('rate_limited');
      b.end();
      a.cancel();
      await waitFor(() => epp.core.admission.inUse === 0, 3000, 'slot freed');
      const c = new EnvoyStream(client);
      const hc = await requestPhase(c, chat('three'));
      expect(hc.request_headers).toBeDefined();
      c.cancel();
      await waitFor(() => epp.core.admission.inUse === 0 && epp.core.registry.all().every((w) => w.load === 0), 3000, 'all released');
    } finally {
      client.close();
      await epp.close();
    }
  });

  it('--conformance-test-hooks: test-epp-endpoint-selection steers, echo and served headers are set', async () => {
    workers = await Promise.all([0, 1, 2].map(() => new FakeWorker().start()));
    const epp = await startEpp({ workerUrls: workers.map((w) => w.url), conformanceTestHooks: true, policy: 'round_robin' });
    const client = extProcClient(`127.0.0.1:${epp.grpcPort}`);
    try {
      await waitFor(() => epp.core.registry.all().every((w) => w.isAvailable() && w.modelId), 5000, 'workers healthy');
      const target = endpoint(workers[2]);
      for (let i = 0; i < 3; i++) {
        const s = new EnvoyStream(client);
        s.requestHeaders({ ':method': 'GET', ':path': '/', 'test-epp-endpoint-selection': target }, { endOfStream: true });
        const r = await s.next();
        const set = setHeaders(r.request_headers.response);
        expect(set['x-gateway-destination-endpoint'].split(',')[0]).toBe(target);
        expect(set['X-Echo-Set-Header']).toBe(`x-conformance-test-served-endpoint:${target}`);
        s.responseHeaders(200, target, true);
        const rh = await s.next();
        expect(setHeaders(rh.response_headers.response)['x-conformance-test-served-endpoint']).toBe(target);
        s.end();
        await s.waitEnd();
      }
    } finally {
      client.close();
      await epp.close();
    }
  });
});

describe('kvgate epp through the CLI', () => {
  it('starts, answers ext_proc, gRPC health and /workers, and stops on SIGTERM', async () => {
    const w = await new FakeWorker().start();
    const proc = await spawnKvgate(
      ['epp', '--host', '127.0.0.1', '--port', '0', '--grpc-port', '0', '--grpc-health-port', '0', '--worker-urls', w.url, '--health-check-interval-secs', '0.2', '--policy', 'kv_aware'],
      /"extProc":"127\.0\.0\.1:(\d+)","grpcHealth":"127\.0\.0\.1:(\d+)","http":"http:\/\/127\.0\.0\.1:(\d+)"/,
    );
    const [, grpcPort, healthPort, httpPort] = proc.match;
    const client = extProcClient(`127.0.0.1:${grpcPort}`);
    const hc = healthClient(`127.0.0.1:${healthPort}`);
    try {
      const end = Date.now() + 5000;
      while ((await healthCheck(hc, 'readiness')).status !== 'SERVING') {
        if (Date.now() > end) throw new Error('not ready');
        await new Promise((r) => setTimeout(r, 50));
      }
      const s = new EnvoyStream(client);
      const r = await requestPhase(s, chat('via the cli'), 2);
      expect(setHeaders(r.request_headers.response)['x-gateway-destination-endpoint']).toBe(endpoint(w));
      await streamedBody(s);
      await responsePhase(s, endpoint(w));
      s.end();
      await s.waitEnd();
      const workers = (await (await fetch(`http://127.0.0.1:${httpPort}/workers`)).json()) as any;
      expect(workers.workers[0].load).toBe(0);
      expect(workers.workers[0].processed).toBe(1);
      const metrics = await (await fetch(`http://127.0.0.1:${httpPort}/metrics`)).text();
      expect(metrics).toMatch(/kvgate_policy_decisions_total\{policy="kv_aware"/);
    } finally {
      client.close();
      hc.close();
      expect(await proc.stop()).toBe(0);
      await w.close();
    }
  }, 30_000);
});
