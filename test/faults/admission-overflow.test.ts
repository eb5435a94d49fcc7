// Fault 7: more requests than admission control lets in. With 2 slots, a queue of 2 and a 0.5 s
// queue timeout, a burst of 20 against a slow engine is answered with 200 (admitted), 429 with
// Retry-After (queue full) and 408 (waited too long), never anything else; afterwards no slot is
// held and the next request succeeds. Clients leaving the queue free their place.
import { afterEach, describe, expect, it } from 'vitest';
import { chatBody, gatewayMetric, openStream, post, recordFigures, runCleanups, settle, startSim, startTestGateway, waitFor, within } from '../helpers/faults.js';

afterEach(runCleanups);

describe('fault: admission overflow', () => {
  it('a burst of 20 gets only 200, 429 (with retry-after) and 408; no slot is held afterwards', async () => {
    // Each admitted request takes ~1.5 s (64 steps of >= 24 ms), far past the 0.5 s queue timeout.
    const sim = await startSim({ seed: 1, speed: 1, cost: { slowFactor: 4 } });
    const { gw } = await startTestGateway({ workerUrls: [sim.url], maxConcurrentRequests: 2, queueSize: 2, queueTimeoutSecs: 0.5 });

    const burst = await within(
      Promise.all(Array.from({ length: 20 }, (_, i) => post(gw.url, '/v1/chat/completions', chatBody(`burst ${i}`, { max_tokens: 64, stream: i % 2 === 0 })))),
      15_000,
      'burst answered',
    );
    const count = (s: number) => burst.filter((r) => r.status === s).length;
    const others = burst.filter((r) => ![200, 408, 429].includes(r.status));
    expect(others.map((r) => [r.status, r.text, r.error?.message])).toEqual([]);
    expect(count(200)).toBeGreaterThanOrEqual(1);
    expect(count(429)).toBeGreaterThanOrEqual(1);
    expect(count(408)).toBeGreaterThanOrEqual(1);
    expect(count(200)).toBeLessThanOrEqual(4); // 2 slots (+ at most the 2 queued, had a slot freed in time)
    expect(count(200) + count(408)).toBeLessThanOrEqual(4);
    for (const r of burst.filter((x) => x.status === 429)) {
      expect(Number(r.headers['retry-after'])).toBeGreaterThanOrEqual(1);
      expect(r.json.error).toMatchObject({ type: 'rate_limit_error', code: 'rate_limited' });
    }
    for (const r of burst.filter((x) => x.status === 408)) expect(r.json.error).toMatchObject({ type: 'timeout_error', code: 'queue_timeout' });
    for (const r of burst.filter((x) => x.status === 200)) expect(r.text.length).toBeGreaterThan(0);
    expect(await gatewayMetric(gw, 'kvgate_admission_rejected_total', { reason: 'queue_full' })).toBe(count(429));
    expect(await gatewayMetric(gw, 'kvgate_admission_rejected_total', { reason: 'queue_timeout' })).toBe(count(408));

    const leaks = await settle(gw);
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
    const after = await post(gw.url, '/v1/chat/completions', chatBody('after the burst', { max_tokens: 2 }));
    expect(after.status).toBe(200);

    recordFigures('07-admission-overflow', {
      requestsSent: 21,
      faultsInjected: 20 - 2, // requests beyond the 2 slots
      requestsFailedThatShouldHaveSucceeded: others.length + (after.status === 200 ? 0 : 1),
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      answered200: count(200),
      answered429: count(429),
      answered408: count(408),
    });
  });

  it('clients leaving the queue free their place at once; a freed slot goes to the next in line', async () => {
    const sim = await startSim({ seed: 2, speed: 1 });
    const { gw } = await startTestGateway({ workerUrls: [sim.url], maxConcurrentRequests: 1, queueSize: 3, queueTimeoutSecs: 10 });

    const running = openStream(gw.url, '/v1/chat/completions', chatBody('occupy the slot', { stream: true, max_tokens: 2000 }));
    await waitFor(() => running.chunks() >= 1, 5000, 'slot taken');
    const queued = Array.from({ length: 3 }, (_, i) => openStream(gw.url, '/v1/completions', { model: 'kvgate-sim', prompt: `queued ${i}`, max_tokens: 4 }));
    await waitFor(() => gw.admission.waiting === 3, 5000, '3 queued');
    expect(gw.admission.inUse).toBe(1);

    queued[0]!.abort();
    queued[1]!.abort();
    await waitFor(() => gw.admission.waiting === 1, 2000, 'aborted waiters leave the queue');

    running.abort(); // frees the slot: the last waiter gets it
    const last = await within(queued[2]!.done, 5000, 'last waiter served');
    expect(last.status).toBe(200);
    await within(Promise.all([running.done, queued[0]!.done, queued[1]!.done]), 5000, 'aborted requests end');

    const leaks = await settle(gw);
    recordFigures('07-admission-queue-aborts', {
      requestsSent: 4,
      faultsInjected: 3,
      requestsFailedThatShouldHaveSucceeded: last.status === 200 ? 0 : 1,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });
});
