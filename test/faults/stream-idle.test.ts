// A stream whose worker goes silent mid-body is cut after --stream-idle-timeout-secs of silence;
// a stream that keeps sending, each gap under the limit, is never cut however long it lasts.
// The idle timer is lazy (a chunk stamps the time; the timer re-arms for what is left), so this
// pins its semantics: silence is measured from the last chunk, not from the first.
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { chatBody, gatewayMetric, onCleanup, post, runCleanups, settle, startTestGateway } from '../helpers/faults.js';

afterEach(runCleanups);

/** An OpenAI-style engine that streams `chunks` SSE chunks `gapMs` apart, then either ends or (silent) stops sending. */
async function fakeEngine(opts: { chunks: number; gapMs: number; thenSilent: boolean }): Promise<string> {
  const server: Server = createServer((req, res) => {
    if (req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(req.url === '/v1/models' ? JSON.stringify({ object: 'list', data: [{ id: 'kvgate-sim', object: 'model' }] }) : '{}');
      return;
    }
    req.resume();
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      let sent = 0;
      const tick = () => {
        if (res.destroyed) return;
        res.write(`data: ${JSON.stringify({ id: 'c', object: 'chat.completion.chunk', choices: [{ index: 0, delta: { content: `t${sent}` } }] })}\n\n`);
        sent++;
        if (sent < opts.chunks) setTimeout(tick, opts.gapMs);
        else if (!opts.thenSilent) res.end('data: [DONE]\n\n');
        // thenSilent: the connection stays open and nothing more comes.
      };
      tick();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  onCleanup(() => {
    server.closeAllConnections();
    return new Promise((r) => server.close(r));
  });
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

describe('stream idle timeout', () => {
  it('never cuts a stream whose gaps are each under the limit, however long it runs', async () => {
    // 12 chunks 100 ms apart: 1.1 s in all, against a 0.4 s silence limit.
    const url = await fakeEngine({ chunks: 12, gapMs: 100, thenSilent: false });
    const { gw } = await startTestGateway({ workerUrls: [url], modelId: 'kvgate-sim', streamIdleTimeoutSecs: 0.4, disableRetries: true });
    const r = await post(gw.url, '/v1/chat/completions', chatBody('go on', { stream: true }), { timeoutMs: 10_000 });
    expect(r.error).toBeUndefined();
    expect(r.status).toBe(200);
    for (let i = 0; i < 12; i++) expect(r.text).toContain(`"t${i}"`);
    expect(r.text).toContain('data: [DONE]');
    expect(await gatewayMetric(gw, 'kvgate_upstream_errors_total', { worker: url, kind: 'idle_timeout' })).toBe(0);
    expect(await settle(gw)).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });

  it('cuts a stream after the limit of silence that follows its last chunk, and releases everything', async () => {
    // 5 chunks 100 ms apart (0.4 s of activity, longer than the 0.3 s limit), then silence.
    const url = await fakeEngine({ chunks: 5, gapMs: 100, thenSilent: true });
    const { gw } = await startTestGateway({ workerUrls: [url], modelId: 'kvgate-sim', streamIdleTimeoutSecs: 0.3, disableRetries: true });
    const r = await post(gw.url, '/v1/chat/completions', chatBody('then nothing', { stream: true }), { timeoutMs: 10_000 });
    // Mid-body the status cannot change: the client sees its connection close after the chunks it got.
    expect(r.error ?? r.status !== 200).toBeTruthy();
    expect(await gatewayMetric(gw, 'kvgate_upstream_errors_total', { worker: url, kind: 'idle_timeout' })).toBe(1);
    expect(await settle(gw)).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });
});
