import { connect, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { FakeWorker } from '../helpers/fake-worker.js';
import { send } from '../helpers/http.js';
import { startGateway, waitFor } from '../helpers/gateway.js';
import type { Gateway } from '../../src/server/gateway.js';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

async function setup(overrides: Parameters<typeof startGateway>[0], workerOpts: ConstructorParameters<typeof FakeWorker>[0] = {}, waitHealthy = true) {
  const worker = await new FakeWorker(workerOpts).start();
  cleanups.push(() => worker.close());
  const gw: Gateway = await startGateway({ workerUrls: [worker.url], ...overrides });
  cleanups.push(() => gw.close());
  if (waitHealthy) await waitFor(() => gw.registry.all().length > 0 && gw.registry.all().every((w) => w.healthy), 5000, 'healthy worker');
  return { worker, gw, url: (p: string) => gw.url + p };
}


/** A raw HTTP/1.1 client on one socket: responses are read by Content-Length, in order. */
class RawConnection {
  private buf = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  closed = false;
  readonly socket: Socket;
  constructor(port: number) {
    this.socket = connect(port, '127.0.0.1');
    this.socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      for (const w of this.waiters.splice(0)) w();
    });
    this.socket.on('error', () => undefined);
    this.socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w();
    });
  }
  write(text: string): void {
    this.socket.write(text);
  }
  /** The next complete response (status, headers, body), or undefined if the connection closes first. */
  async response(): Promise<{ status: number; headers: Record<string, string>; body: string } | undefined> {
    for (;;) {
      const end = this.buf.indexOf('\r\n\r\n');
      if (end >= 0) {
        const head = this.buf.subarray(0, end).toString('latin1').split('\r\n');
        const headers: Record<string, string> = {};
        for (const line of head.slice(1)) headers[line.slice(0, line.indexOf(':')).toLowerCase()] = line.slice(line.indexOf(':') + 1).trim();
        const len = Number(headers['content-length'] ?? 0);
        if (this.buf.length >= end + 4 + len) {
          const body = this.buf.subarray(end + 4, end + 4 + len).toString('utf8');
          this.buf = this.buf.subarray(end + 4 + len);
          return { status: Number(head[0].split(' ')[1]), headers, body };
        }
      }
      if (this.closed) return undefined;
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }
  closedPromise(): Promise<void> {
    return this.closed ? Promise.resolve() : new Promise((r) => this.socket.once('close', () => r()));
  }
}

const chunk = (text: string) => `${Buffer.byteLength(text).toString(16)}\r\n${text}\r\n`;
const postHead = (headers: Record<string, string>) =>
  `POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n${Object.entries(headers)
    .map(([k, v]) => `${k}: ${v}\r\n`)
    .join('')}\r\n`;

const chat = (tag: string) => ({ model: 'fake-model', messages: [{ role: 'user', content: tag }], max_tokens: 4 });

describe('admission by priority and predicted latency, end to end', () => {
  it('queued requests go by priority; sheddable ones are refused at once with 429 saturated; nothing is lost', async () => {
    const { worker, gw, url } = await setup({ maxConcurrentRequests: 1, queueSize: 10 }, { hang: true });
    const blocker = new AbortController();
    const first = send(url('/v1/chat/completions'), { body: chat('blocker'), signal: blocker.signal }).catch(() => undefined);
    await waitFor(() => worker.received.some((r) => r.body.includes('blocker')), 3000, 'blocker at the worker');
    const batch = send(url('/v1/chat/completions'), { body: chat('batch'), headers: { 'x-kvgate-priority': '0' } });
    const interactive = send(url('/v1/chat/completions'), { body: chat('interactive'), headers: { 'x-kvgate-priority': '10' } });
    await waitFor(() => gw.admission.waiting === 2, 3000, 'two waiters');
    // A sheddable request does not wait behind them: refused while the slot is still taken.
    const shed = await send(url('/v1/chat/completions'), { body: chat('shed'), headers: { 'x-kvgate-priority': '-1' } });
    expect(shed.status).toBe(429);
    expect(shed.headers['x-kvgate-dropped-reason']).toBe('saturated');
    expect(shed.json.error).toMatchObject({ type: 'rate_limit_error', code: 'saturated' });
    expect(gw.admission.inUse).toBe(1);
    expect(gw.admission.waiting).toBe(2);
    // Free the slot: the interactive request is admitted before the batch one that came first.
    worker.opts.hang = false;
    blocker.abort();
    await first;
    const [b, i] = await Promise.all([batch, interactive]);
    expect(b.status).toBe(200);
    expect(i.status).toBe(200);
    const order = worker.received.map((r) => (/"content":"(\w+)"/.exec(r.body) ?? [])[1]).filter(Boolean);
    expect(order).toEqual(['blocker', 'interactive', 'batch']);
    await waitFor(() => gw.admission.inUse === 0, 3000, 'slots released');
    expect(worker.received.some((r) => r.body.includes('shed'))).toBe(false);
  });

  /** A gateway with its one admission slot held by a hanging request, and a raw connection to it. */
  async function saturatedRawConnection(extra: Parameters<typeof setup>[0]) {
    const { worker, gw } = await setup({ maxConcurrentRequests: 1, queueSize: 4, ...extra }, { hang: true });
    const blocker = new AbortController();
    const first = send(gw.url + '/v1/chat/completions', { body: chat('blocker'), signal: blocker.signal }).catch(() => undefined);
    await waitFor(() => worker.received.some((r) => r.body.includes('blocker')), 3000, 'blocker at the worker');
    const conn = new RawConnection(gw.port);
    cleanups.push(async () => void conn.socket.destroy());
    return { worker, gw, blocker, first, conn };
  }

  it('a sheddable request is refused from its headers, before its body has arrived; the body is drained and the connection kept alive', async () => {
    const { worker, gw, blocker, first, conn } = await saturatedRawConnection({});
    // Headers and half a body: the refusal comes while the rest of the body is still unsent.
    conn.write(postHead({ 'transfer-encoding': 'chunked', 'x-kvgate-priority': '-1' }) + chunk('{"model":"fake-model","messages":[{"role":"user",'));
    const shed = await conn.response();
    expect(shed?.status).toBe(429);
    expect(shed?.headers['x-kvgate-dropped-reason']).toBe('saturated');
    expect(JSON.parse(shed!.body).error).toMatchObject({ type: 'rate_limit_error', code: 'saturated' });
    expect(shed?.headers.connection).not.toBe('close');
    // The rest of the body follows; the same connection then carries the next requests.
    conn.write(chunk('"content":"shed"}],"max_tokens":4}') + '0\r\n\r\n');
    const again = JSON.stringify(chat('shed-again'));
    conn.write(postHead({ 'content-length': String(Buffer.byteLength(again)), 'x-kvgate-priority': '-2' }) + again);
    const second = await conn.response();
    expect(second?.status).toBe(429);
    expect(second?.headers['x-kvgate-dropped-reason']).toBe('saturated');
    expect(gw.admission.inUse).toBe(1);
    expect(gw.admission.waiting).toBe(0);
    // Free the slot: a request on the same connection is served.
    worker.opts.hang = false;
    blocker.abort();
    await first;
    await waitFor(() => gw.admission.inUse === 0, 3000, 'slot released');
    const ok = JSON.stringify(chat('served'));
    conn.write(postHead({ 'content-length': String(Buffer.byteLength(ok)), 'x-kvgate-priority': '-1' }) + ok);
    const served = await conn.response();
    expect(served?.status).toBe(200);
    expect(conn.closed).toBe(false);
    expect(worker.received.some((r) => r.body.includes('shed'))).toBe(false);
    expect(worker.received.some((r) => r.body.includes('served'))).toBe(true);
    await waitFor(() => gw.admission.inUse === 0 && gw.activeRequests === 0, 3000, 'nothing left in flight');
    const text = await (await fetch(gw.url + '/metrics')).text();
    expect(text).toMatch(/kvgate_admission_rejected_total\{reason="shed"\} 2/);
  });

  it('a refused request whose body keeps growing past --max-payload-size has its connection closed instead of being read on', async () => {
    const { gw, blocker, first, conn } = await saturatedRawConnection({ maxPayloadSize: 4096 });
    conn.write(postHead({ 'transfer-encoding': 'chunked', 'x-kvgate-priority': '-1' }) + chunk('{"model":"fake-model","prompt":"'));
    const shed = await conn.response();
    expect(shed?.status).toBe(429);
    conn.write(chunk('x'.repeat(3000)));
    conn.write(chunk('x'.repeat(3000)));
    await conn.closedPromise();
    expect(conn.closed).toBe(true);
    blocker.abort();
    await first;
    await waitFor(() => gw.admission.inUse === 0 && gw.activeRequests === 0, 3000, 'nothing left in flight');
  });

  it('a malformed priority is a 400; an API key maps to its class', async () => {
    const { url } = await setup({ apiKey: ['k-batch'], apiKeyPriority: ['k-batch=-1'], maxConcurrentRequests: 1, queueSize: 4 });
    const bad = await send(url('/v1/chat/completions'), { body: chat('x'), headers: { authorization: 'Bearer k-batch', 'x-kvgate-priority': 'urgent' } });
    expect(bad.status).toBe(400);
    expect(bad.json.error).toMatchObject({ code: 'invalid_priority', param: 'x-kvgate-priority' });
    const ok = await send(url('/v1/chat/completions'), { body: chat('x'), headers: { authorization: 'Bearer k-batch' } });
    expect(ok.status).toBe(200);
  });

  it('slo_aware: served responses carry x-kvgate-predicted-ttft-ms; a sheddable request predicted to miss is refused (429 predicted-slo-miss)', async () => {
    const { worker, gw, url } = await setup({ policy: 'slo_aware' });
    const served = await send(url('/v1/chat/completions'), { body: { ...chat('hello there'), stream: true }, headers: { 'x-slo-ttft-ms': '1' } });
    expect(served.status).toBe(200);
    const predicted = Number(served.headers['x-kvgate-predicted-ttft-ms']);
    expect(predicted).toBeGreaterThan(1); // at least one engine step: the 1 ms objective is predicted missed, but priority 0 is served
    const before = worker.received.length;
    const shed = await send(url('/v1/chat/completions'), { body: chat('hello there'), headers: { 'x-slo-ttft-ms': '1', 'x-kvgate-priority': '-5' } });
    expect(shed.status).toBe(429);
    expect(shed.headers['x-kvgate-dropped-reason']).toBe('predicted-slo-miss');
    expect(shed.json.error.code).toBe('predicted_slo_miss');
    expect(worker.received.length).toBe(before);
    // A reachable objective: the sheddable request is served.
    const fine = await send(url('/v1/chat/completions'), { body: chat('hello there'), headers: { 'x-slo-ttft-ms': '60000', 'x-kvgate-priority': '-5' } });
    expect(fine.status).toBe(200);
    expect(Number(fine.headers['x-kvgate-predicted-ttft-ms'])).toBeGreaterThan(0);
    await waitFor(() => gw.registry.all().every((w) => w.load === 0), 3000, 'loads released');
    const text = await (await fetch(url('/metrics'))).text();
    expect(text).toMatch(/kvgate_admission_rejected_total\{reason="predicted_slo_miss"\} 1/);
    // The streamed request's first token taught the worker's predictor (the others were not streamed).
    expect(text).toContain(`kvgate_slo_predictor_observations{pool="main",worker="${worker.url}"} 1`);
    expect(text).toMatch(/kvgate_slo_predictor_slowness\{pool="main",worker="[^"]+"\} [\d.e+-]+/);
  });

  it('per-key token limits: prompt + completion tokens the engine reported are charged; a spent key gets 429 with Retry-After', async () => {
    // The fake worker reports 3 prompt + 1 completion tokens per request: 10 tokens/min allow three.
    const { url } = await setup({ apiKey: ['k1', 'k2'], apiKeyTokenLimitPerMin: 10 });
    const call = (key: string) => send(url('/v1/chat/completions'), { body: chat('x'), headers: { authorization: `Bearer ${key}` } });
    for (let i = 0; i < 3; i++) expect((await call('k1')).status).toBe(200);
    const spent = await call('k1');
    expect(spent.status).toBe(429);
    expect(spent.json.error.code).toBe('token_rate_limited');
    expect(Number(spent.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    expect((await call('k2')).status).toBe(200); // another key has its own budget
  });

  it('503 with x-kvgate-dropped-reason: no-endpoints when no worker can serve', async () => {
    const { url } = await setup({ healthFailureThreshold: 1 }, { healthy: false }, false);
    const r = await send(url('/v1/chat/completions'), { body: chat('x') });
    expect(r.status).toBe(503);
    expect(r.json.error, JSON.stringify(r.json)).toBeDefined();
    expect(r.headers['x-kvgate-dropped-reason'], JSON.stringify(r.json)).toBe('no-endpoints');
  });
});
