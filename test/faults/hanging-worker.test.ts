// Fault 3: a worker accepts requests and never answers (`hangRate: 1`). With a short
// first-byte timeout every request gives up on it after 0.5 s and is retried on the other worker;
// the timeouts are counted, and without retries the client gets a 504 JSON error.
import { afterEach, describe, expect, it } from 'vitest';
import { chatBody, gatewayMetric, post, recordFigures, runCleanups, settle, startSim, startTestGateway, within } from '../helpers/faults.js';

afterEach(runCleanups);

describe('fault: hanging worker', () => {
  it('requests time out on the hanging worker after firstByteTimeoutSecs and succeed elsewhere', async () => {
    const hang = await startSim({ seed: 1, faults: { hangRate: 1 } });
    const good = await startSim({ seed: 2 });
    const { gw } = await startTestGateway({
      workerUrls: [hang.url, good.url],
      modelId: 'kvgate-sim',
      policy: 'round_robin',
      firstByteTimeoutSecs: 0.5,
      maxConcurrentRequests: 16,
    });

    const n = 8;
    const results = await within(
      Promise.all(
        Array.from({ length: n }, (_, i) =>
          i % 2 ? post(gw.url, '/v1/chat/completions', chatBody(`q${i}`, { stream: i % 4 === 1 })) : post(gw.url, '/v1/completions', { model: 'kvgate-sim', prompt: `p${i}`, max_tokens: 4 }),
        ),
      ),
      10_000,
      'requests past a hanging worker',
    );
    const failed = results.filter((r) => r.status !== 200);
    expect(failed.map((r) => [r.status, r.text])).toEqual([]);
    expect(results.every((r) => r.headers['x-kvgate-worker'] === good.url)).toBe(true);

    const timeouts = await gatewayMetric(gw, 'kvgate_upstream_errors_total', { worker: hang.url, kind: 'first_byte_timeout' });
    expect(timeouts).toBeGreaterThan(0);
    expect(await gatewayMetric(gw, 'kvgate_retries_total')).toBe(timeouts);
    expect(gw.registry.get(hang.url)!.breaker!.consecutiveFailures).toBe(timeouts);

    const leaks = await settle(gw);
    recordFigures('03-hanging-worker', {
      requestsSent: n,
      faultsInjected: timeouts,
      requestsFailedThatShouldHaveSucceeded: failed.length,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      firstByteTimeouts: timeouts,
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });

  it('without retries the client gets 504 worker_first_byte_timeout, in bounded time', async () => {
    const hang = await startSim({ seed: 3, faults: { hangRate: 1 } });
    const { gw } = await startTestGateway({ workerUrls: [hang.url], firstByteTimeoutSecs: 0.5, disableRetries: true, maxConcurrentRequests: 4 });
    const t0 = Date.now();
    const r = await post(gw.url, '/v1/chat/completions', chatBody('anyone there?'), { timeoutMs: 5000 });
    expect(r.status).toBe(504);
    expect(r.json.error).toMatchObject({ type: 'server_error', code: 'worker_first_byte_timeout' });
    expect(Date.now() - t0).toBeLessThan(5000); // a bound, not a speed claim
    const leaks = await settle(gw);
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });

  // BUG (src/routers/regular.ts:142 with src/upstream/proxy.ts:171): --request-timeout-secs is
  // documented as "Longest a request may take end to end" (src/config/serve-config.ts:87), but each
  // retry attempt gets a fresh total timer, so with N hanging workers the client waits about
  // N x the timeout plus the backoffs (2.5 s for 0.5 s and 4 workers). Fails until fixed.
  it('requestTimeoutSecs bounds the whole request, retries included (hanging workers everywhere)', async () => {
    const hangs = await Promise.all([5, 6, 7, 8].map((seed) => startSim({ seed, faults: { hangRate: 1 } })));
    const { gw } = await startTestGateway({ workerUrls: hangs.map((h) => h.url), requestTimeoutSecs: 0.5, maxConcurrentRequests: 4 });
    const t0 = Date.now();
    const r = await post(gw.url, '/v1/completions', { model: 'kvgate-sim', prompt: 'x', max_tokens: 2 }, { timeoutMs: 10_000 });
    const waited = Date.now() - t0;
    expect(r.status).toBe(504);
    expect(r.json.error.code).toBe('worker_timeout');
    const leaks = await settle(gw);
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
    // 0.5 s end to end, plus a generous second of slack for a loaded machine.
    expect(waited).toBeLessThan(1500);
  });
});
