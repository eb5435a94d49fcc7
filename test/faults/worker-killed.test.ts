// Fault 1: a worker process dies while streams are running on it (`kill -9`, and
// `kvgate sim --crash-after-requests`). Clients on it get a broken stream, never a complete-looking
// one and never a hang; its load is released, its breaker counts the failures, and later
// requests are served by the other worker.
import { afterEach, describe, expect, it } from 'vitest';
import {
  chatBody,
  gatewayMetric,
  openStream,
  post,
  recordFigures,
  runCleanups,
  settle,
  spawnSim,
  startTestGateway,
  waitFor,
  within,
} from '../helpers/faults.js';

afterEach(runCleanups);

describe('fault: worker killed mid-stream', () => {
  it('SIGKILL while 2 streams run on it: clean stream error, load 0, breaker counts it, then the other worker serves', async () => {
    // Speed 1: 400 tokens take >= 2.4 s, so the streams are still running when the worker dies.
    const a = await spawnSim(['--speed', '1', '--seed', '1']);
    const b = await spawnSim(['--speed', '1', '--seed', '2']);
    const { gw } = await startTestGateway({ workerUrls: [a.url, b.url], policy: 'round_robin', maxConcurrentRequests: 16 });

    const streams = Array.from({ length: 4 }, (_, i) => openStream(gw.url, '/v1/chat/completions', chatBody(`tell story ${i}`, { stream: true, max_tokens: 400 })));
    const starts = await within(Promise.all(streams.map((s) => s.started)), 10_000, 'stream headers');
    expect(starts.map((s) => s.status)).toEqual([200, 200, 200, 200]);
    const onA = streams.filter((_, i) => starts[i]!.worker === a.url);
    const onB = streams.filter((_, i) => starts[i]!.worker === b.url);
    expect(onA).toHaveLength(2);
    expect(onB).toHaveLength(2);
    await waitFor(() => streams.every((s) => s.chunks() >= 2), 10_000, 'tokens flowing on every stream');
    expect(gw.registry.get(a.url)!.load).toBe(2);

    a.child.kill('SIGKILL');
    expect((await within(a.exited, 5000, 'worker exit')).signal).toBe('SIGKILL');

    // The broken streams end promptly (bounded), with an error and without [DONE].
    const broken = await within(Promise.all(onA.map((s) => s.done)), 5000, 'streams of the killed worker end');
    for (const r of broken) {
      expect(r.complete).toBe(false);
      expect(r.text).not.toContain('[DONE]');
      expect(r.text).toContain('chat.completion.chunk'); // it was streaming before the kill
      expect(r.error).toBeDefined();
    }
    // The other worker's streams are untouched.
    const fine = await within(Promise.all(onB.map((s) => s.done)), 15_000, 'streams of the healthy worker end');
    for (const r of fine) expect(r.complete).toBe(true);

    const wa = gw.registry.get(a.url)!;
    expect(wa.load).toBe(0);
    expect(wa.breaker!.consecutiveFailures).toBeGreaterThanOrEqual(2);
    expect(await gatewayMetric(gw, 'kvgate_upstream_errors_total', { worker: a.url, kind: 'reset' })).toBe(2);

    // Later requests all succeed on the other worker, before and after health checks drop A.
    let failed = 0;
    for (let i = 0; i < 10; i++) {
      const r = await post(gw.url, '/v1/chat/completions', chatBody(`after the crash ${i}`, { stream: i % 2 === 0 }));
      if (r.status !== 200 || r.headers['x-kvgate-worker'] !== b.url) failed++;
    }
    await waitFor(() => !wa.healthy, 5000, 'killed worker marked unhealthy');
    for (let i = 0; i < 4; i++) {
      const r = await post(gw.url, '/v1/completions', { model: 'kvgate-sim', prompt: `later ${i}`, max_tokens: 4 });
      if (r.status !== 200 || r.headers['x-kvgate-worker'] !== b.url) failed++;
    }
    expect(failed).toBe(0);

    const leaks = await settle(gw);
    recordFigures('01-worker-killed-sigkill', {
      requestsSent: 18,
      faultsInjected: 1,
      requestsFailedThatShouldHaveSucceeded: failed + fine.filter((r) => !r.complete).length,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      brokenStreams: broken.length,
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });

  it('--crash-after-requests: the crash breaks the streams on it and the crashing request is retried on the other worker', async () => {
    const a = await spawnSim(['--speed', '1', '--seed', '3', '--crash-after-requests', '2']);
    const b = await spawnSim(['--speed', '1', '--seed', '4']);
    // A configured model id fixes the candidate order to [A, B] (with discovery it is the order in
    // which the first health checks answered).
    const { gw } = await startTestGateway({ workerUrls: [a.url, b.url], modelId: 'kvgate-sim', policy: 'round_robin', maxConcurrentRequests: 16 });

    // Round robin: 2 of 4 streams land on A, which is exactly its request budget.
    const streams = Array.from({ length: 4 }, (_, i) => openStream(gw.url, '/v1/completions', { model: 'kvgate-sim', prompt: `once upon ${i}`, max_tokens: 400, stream: true }));
    const starts = await within(Promise.all(streams.map((s) => s.started)), 10_000, 'stream headers');
    const onA = streams.filter((_, i) => starts[i]!.worker === a.url);
    const onB = streams.filter((_, i) => starts[i]!.worker === b.url);
    expect(onA).toHaveLength(2);
    await waitFor(() => streams.every((s) => s.chunks() >= 2), 10_000, 'tokens flowing');

    // The 5th pick is A again, and it is A's 3rd request: A crashes (all its connections dropped, exit 1).
    // That request never got an answer from A, so it is retried on B.
    const third = await post(gw.url, '/v1/completions', { model: 'kvgate-sim', prompt: 'the straw', max_tokens: 4 });
    expect(third.status).toBe(200);
    expect(third.headers['x-kvgate-worker']).toBe(b.url);
    expect((await within(a.exited, 5000, 'crashed worker exit')).code).toBe(1);

    const broken = await within(Promise.all(onA.map((s) => s.done)), 5000, 'streams of the crashed worker end');
    for (const r of broken) {
      expect(r.complete).toBe(false);
      expect(r.text).not.toContain('[DONE]');
      expect(r.error).toBeDefined();
    }
    const fine = await within(Promise.all(onB.map((s) => s.done)), 15_000, 'healthy streams end');
    for (const r of fine) expect(r.complete).toBe(true);

    const wa = gw.registry.get(a.url)!;
    // 2 broken streams + the crashing request (reset before any answer).
    expect(wa.breaker!.consecutiveFailures).toBeGreaterThanOrEqual(3);
    expect(await gatewayMetric(gw, 'kvgate_retries_total')).toBeGreaterThanOrEqual(1);

    let failed = 0;
    for (let i = 0; i < 6; i++) {
      const r = await post(gw.url, '/v1/chat/completions', chatBody(`after ${i}`));
      if (r.status !== 200) failed++;
    }
    expect(failed).toBe(0);
    const leaks = await settle(gw);
    recordFigures('01-worker-killed-crash-after-requests', {
      requestsSent: 11,
      faultsInjected: 1,
      requestsFailedThatShouldHaveSucceeded: failed + (third.status === 200 ? 0 : 1) + fine.filter((r) => !r.complete).length,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      brokenStreams: broken.length,
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });
});
