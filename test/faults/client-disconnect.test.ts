// Fault 6: clients that leave. The engine must see the abort (its KV blocks freed), and the
// gateway must release the worker's load and the admission slot, mid-stream or before the first
// byte.
import { afterEach, describe, expect, it } from 'vitest';
import { chatBody, gatewayMetric, openStream, recordFigures, runCleanups, settle, simMetric, startSim, startTestGateway, waitFor, within } from '../helpers/faults.js';

afterEach(runCleanups);

const abortedOnEngine = (sim: Awaited<ReturnType<typeof startSim>>) => sim.engines[0]!.engine.stats().abortedRequests;

describe('fault: client disconnects', () => {
  it('mid-stream: the engine aborts the request, load and admission slot are released', async () => {
    // Speed 1: 2,000 tokens would take > 12 s.
    const sim = await startSim({ seed: 1, speed: 1 });
    const { gw } = await startTestGateway({ workerUrls: [sim.url], maxConcurrentRequests: 4, queueSize: 4 });

    const streams = Array.from({ length: 3 }, (_, i) => openStream(gw.url, '/v1/chat/completions', chatBody(`a very long story ${i}`, { stream: true, max_tokens: 2000 })));
    await waitFor(() => streams.every((s) => s.chunks() >= 3), 10_000, 'streams flowing');
    expect(gw.registry.get(sim.url)!.load).toBe(3);
    expect(gw.admission.inUse).toBe(3);
    expect(sim.engines[0]!.engine.stats().running).toBe(3);

    for (const s of streams) s.abort();
    const ends = await within(Promise.all(streams.map((s) => s.done)), 5000, 'aborted streams end');
    expect(ends.every((e) => !e.complete)).toBe(true);

    await waitFor(() => abortedOnEngine(sim) === 3, 3000, 'engine sees the aborts');
    expect(await simMetric(sim, 'vllm:request_success_total', { finished_reason: 'abort' })).toBe(3);
    expect(sim.engines[0]!.engine.stats().running).toBe(0);
    expect(await gatewayMetric(gw, 'kvgate_client_aborts_total', { route: 'chat' })).toBe(3);
    // Client aborts say nothing about the worker's health.
    expect(gw.registry.get(sim.url)!.breaker!.consecutiveFailures).toBe(0);

    const leaks = await settle(gw);
    recordFigures('06-client-disconnect-mid-stream', {
      requestsSent: 3,
      faultsInjected: 3,
      requestsFailedThatShouldHaveSucceeded: 0,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      engineAborts: abortedOnEngine(sim),
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });

  it('before the response starts (long prefill, not streaming): the engine still sees the abort', async () => {
    // A slow GPU and a long prompt: prefill takes seconds, so the client leaves before any token.
    const sim = await startSim({ seed: 2, speed: 1, cost: { slowFactor: 50 } });
    const { gw } = await startTestGateway({ workerUrls: [sim.url], maxConcurrentRequests: 4 });
    const prompt = 'lorem ipsum dolor sit amet '.repeat(400);
    const s = openStream(gw.url, '/v1/completions', { model: 'kvgate-sim', prompt, max_tokens: 50, stream: false });
    let headers = false;
    void s.started.then((h) => (headers = h.status !== 0));
    await waitFor(() => sim.engines[0]!.engine.stats().running + sim.engines[0]!.engine.stats().waiting === 1, 5000, 'request in the engine');
    await new Promise((r) => setTimeout(r, 100));
    expect(headers).toBe(false);
    expect(gw.registry.get(sim.url)!.load).toBe(1);
    s.abort();
    expect((await within(s.done, 5000, 'aborted request ends')).complete).toBe(false);
    await waitFor(() => abortedOnEngine(sim) === 1, 3000, 'engine sees the abort');
    expect(await gatewayMetric(gw, 'kvgate_client_aborts_total', { route: 'completions' })).toBe(1);
    const leaks = await settle(gw);
    recordFigures('06-client-disconnect-before-first-byte', {
      requestsSent: 1,
      faultsInjected: 1,
      requestsFailedThatShouldHaveSucceeded: 0,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      engineAborts: abortedOnEngine(sim),
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });
});
