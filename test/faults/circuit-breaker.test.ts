// Fault 8: the circuit breaker's life cycle, with cbFailureThreshold 3, cbTimeoutDurationSecs 0.5
// and cbSuccessThreshold 2: an always-failing worker's breaker opens (kvgate_worker_cb_state 1),
// traffic avoids it, after the timeout it is half-open (2) and one failure re-opens it; a worker
// that recovers is closed again after 2 successes in half-open. Clients never see the failures
// (retries move them to the healthy worker).
import { afterEach, describe, expect, it } from 'vitest';
import type { Gateway } from '../../src/server/gateway.js';
import { chatBody, decisionsFor, gatewayMetric, post, recordFigures, runCleanups, settle, sleep, startSim, startTestGateway, waitFor } from '../helpers/faults.js';

afterEach(runCleanups);

const breaker = { cbFailureThreshold: 3, cbTimeoutDurationSecs: 0.5, cbSuccessThreshold: 2 };
const cbState = (gw: Gateway, id: string) => gatewayMetric(gw, 'kvgate_worker_cb_state', { worker: id });
const transitions = (gw: Gateway, id: string, from: string, to: string) => gatewayMetric(gw, 'kvgate_worker_cb_transitions_total', { worker: id, from, to });

describe('fault: circuit breaker life cycle', () => {
  it('always-failing worker: opens after 3 failures, is avoided, turns half-open after 0.5 s, a failure re-opens it', async () => {
    const bad = await startSim({ seed: 1, faults: { failRate: 1 } });
    const good = await startSim({ seed: 2 });
    const { gw } = await startTestGateway({ workerUrls: [bad.url, good.url], modelId: 'kvgate-sim', policy: 'round_robin', ...breaker });
    const wb = gw.registry.get(bad.url)!;
    let sent = 0;
    let failed = 0;
    const send = async () => {
      const r = await post(gw.url, '/v1/chat/completions', chatBody(`cb ${sent}`, { stream: sent % 2 === 0 }));
      sent++;
      if (r.status !== 200) failed++;
      return r;
    };

    expect(await cbState(gw, bad.url)).toBe(0);
    while (wb.breaker!.state === 'closed') {
      await send();
      if (sent > 20) throw new Error('breaker never opened');
    }
    expect(await decisionsFor(gw, bad.url)).toBe(3);
    expect(await cbState(gw, bad.url)).toBe(1);
    expect(await transitions(gw, bad.url, 'closed', 'open')).toBe(1);
    expect(wb.healthy).toBe(true); // health checks pass: only the breaker keeps it out

    // Open: no traffic reaches it (requests sent well inside the 0.5 s open period).
    const openedAt = Date.now();
    let whileOpen = 0;
    while (whileOpen < 10 && Date.now() - openedAt < 250) {
      await send();
      whileOpen++;
    }
    expect(whileOpen).toBeGreaterThan(0);
    expect(await decisionsFor(gw, bad.url)).toBe(3);

    // After the timeout: half-open, and the next request it gets (a trial) fails and re-opens it.
    await sleep(600);
    expect(await cbState(gw, bad.url)).toBe(2);
    expect(await transitions(gw, bad.url, 'open', 'half_open')).toBe(1);
    while ((await decisionsFor(gw, bad.url)) === 3) {
      await send();
      if (sent > 40) throw new Error('half-open worker never got a trial request');
    }
    expect(await decisionsFor(gw, bad.url)).toBe(4);
    expect(wb.breaker!.state).toBe('open');
    expect(await cbState(gw, bad.url)).toBe(1);
    expect(await transitions(gw, bad.url, 'half_open', 'open')).toBe(1);
    expect(failed).toBe(0);

    const leaks = await settle(gw);
    recordFigures('08-circuit-breaker-always-failing', {
      requestsSent: sent,
      faultsInjected: await decisionsFor(gw, bad.url),
      requestsFailedThatShouldHaveSucceeded: failed,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      breakerTransitions: await gatewayMetric(gw, 'kvgate_worker_cb_transitions_total'),
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });

  it('recovering worker: open → half-open → (failure) open → half-open → 2 successes → closed', async () => {
    // Fails its first 4 requests: 3 to open the breaker, 1 as the failed first trial.
    const flaky = await startSim({ seed: 3, faults: { failFirstN: 4 } });
    const good = await startSim({ seed: 4 });
    const { gw } = await startTestGateway({ workerUrls: [flaky.url, good.url], modelId: 'kvgate-sim', policy: 'round_robin', ...breaker });
    const wf = gw.registry.get(flaky.url)!;
    let sent = 0;
    let failed = 0;
    const sendUntil = async (cond: () => boolean | Promise<boolean>, what: string) => {
      for (let i = 0; !(await cond()); i++) {
        if (i > 30) throw new Error(`never reached: ${what}`);
        const r = await post(gw.url, '/v1/completions', { model: 'kvgate-sim', prompt: `p${sent}`, max_tokens: 2 });
        sent++;
        if (r.status !== 200) failed++;
      }
    };

    await sendUntil(() => wf.breaker!.state === 'open', 'open');
    await sleep(600);
    expect(wf.breaker!.state).toBe('half_open');
    await sendUntil(async () => (await decisionsFor(gw, flaky.url)) === 4, 'first trial');
    expect(wf.breaker!.state).toBe('open');
    await sleep(600);
    expect(wf.breaker!.state).toBe('half_open');
    await sendUntil(async () => (await decisionsFor(gw, flaky.url)) === 5, 'second trial');
    expect(wf.breaker!.state).toBe('half_open'); // 1 success of 2
    await sendUntil(async () => (await decisionsFor(gw, flaky.url)) === 6, 'third trial');
    expect(wf.breaker!.state).toBe('closed');
    expect(await cbState(gw, flaky.url)).toBe(0);
    expect(await transitions(gw, flaky.url, 'half_open', 'closed')).toBe(1);
    expect(await transitions(gw, flaky.url, 'half_open', 'open')).toBe(1);
    expect(await transitions(gw, flaky.url, 'closed', 'open')).toBe(1);
    expect(failed).toBe(0);

    await waitFor(() => wf.load === 0, 2000, 'load 0');
    const leaks = await settle(gw);
    recordFigures('08-circuit-breaker-recovery', {
      requestsSent: sent,
      faultsInjected: 4,
      requestsFailedThatShouldHaveSucceeded: failed,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });
});
