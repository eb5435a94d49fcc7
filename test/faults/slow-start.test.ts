// Fault 4: a worker that takes 2 s to become ready (`startupDelaySecs: 2`: /health and generation
// answer 503 meanwhile). It gets no traffic until a health check passes, then joins; alone, the
// gateway answers 503 no_available_workers until it is ready, then 200.
import { afterEach, describe, expect, it } from 'vitest';
import { chatBody, decisionsFor, post, recordFigures, runCleanups, settle, sleep, startSim, startTestGateway, waitFor } from '../helpers/faults.js';

afterEach(runCleanups);

describe('fault: worker slow to start', () => {
  it('is not routed to until healthy; the other worker serves meanwhile; then it joins', async () => {
    const fast = await startSim({ seed: 1 });
    const slow = await startSim({ seed: 2, faults: { startupDelaySecs: 2 } });
    const { gw } = await startTestGateway({ workerUrls: [fast.url, slow.url], policy: 'round_robin', maxConcurrentRequests: 8 });
    const ws = gw.registry.get(slow.url)!;
    expect(ws.healthy).toBe(false);

    let sent = 0;
    let failed = 0;
    const servedBy: string[] = [];
    // While the slow worker starts: every request is served by the fast one.
    while (!ws.healthy) {
      const r = await post(gw.url, '/v1/chat/completions', chatBody(`while starting ${sent}`));
      sent++;
      if (r.status !== 200) failed++;
      else if (!ws.healthy) servedBy.push(String(r.headers['x-kvgate-worker']));
      if (sent > 200) throw new Error('slow worker never became healthy');
      await sleep(20);
    }
    expect(servedBy.length).toBeGreaterThan(10);
    expect(new Set(servedBy)).toEqual(new Set([fast.url]));

    // Once healthy it takes its share of round robin.
    const after: string[] = [];
    for (let i = 0; i < 10; i++) {
      const r = await post(gw.url, '/v1/chat/completions', chatBody(`after start ${i}`));
      sent++;
      if (r.status !== 200) failed++;
      after.push(String(r.headers['x-kvgate-worker']));
    }
    expect(after.filter((w) => w === slow.url).length).toBeGreaterThanOrEqual(4);
    expect(failed).toBe(0);

    const leaks = await settle(gw);
    recordFigures('04-slow-start-two-workers', {
      requestsSent: sent,
      faultsInjected: 1,
      requestsFailedThatShouldHaveSucceeded: failed,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });

  it('alone, requests get 503 no_available_workers until it is ready, then 200', async () => {
    const slow = await startSim({ seed: 3, faults: { startupDelaySecs: 2 } });
    const { gw } = await startTestGateway({ workerUrls: [slow.url], maxConcurrentRequests: 8 });
    const statuses: number[] = [];
    const readiness: number[] = [];
    const end = Date.now() + 8000;
    for (;;) {
      const withModel = statuses.length % 2 === 0;
      const r = await post(gw.url, '/v1/chat/completions', withModel ? chatBody('ready yet?') : { messages: [{ role: 'user', content: 'ready yet?' }], max_tokens: 4 });
      statuses.push(r.status);
      if (r.status === 503) expect(r.json.error).toMatchObject({ type: 'server_error', code: 'no_available_workers' });
      if (r.status === 200) break;
      readiness.push((await fetch(gw.url + '/readiness')).status);
      if (Date.now() > end) throw new Error(`never became ready: ${statuses.join(',')}`);
      await sleep(50);
    }
    // 503s first, then 200, nothing else (never a 502/500 from routing to a starting worker).
    expect(statuses.at(-1)).toBe(200);
    expect(statuses.slice(0, -1).length).toBeGreaterThan(5);
    expect(new Set(statuses.slice(0, -1))).toEqual(new Set([503]));
    // /readiness agreed (it may flip to 200 between a 503 answer and its probe, never back).
    expect(readiness[0]).toBe(503);
    expect(readiness.slice(readiness.indexOf(200) < 0 ? readiness.length : readiness.indexOf(200)).every((s) => s === 200)).toBe(true);
    expect((await fetch(gw.url + '/readiness')).status).toBe(200);
    for (let i = 0; i < 5; i++) expect((await post(gw.url, '/v1/completions', { prompt: `now ${i}`, max_tokens: 4 })).status).toBe(200);
    expect(await decisionsFor(gw, slow.url)).toBe(6); // nothing was routed to it before it was ready

    const leaks = await settle(gw);
    recordFigures('04-slow-start-alone', {
      requestsSent: statuses.length + 5,
      faultsInjected: 1,
      requestsFailedThatShouldHaveSucceeded: 0,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      answered503BeforeReady: statuses.length - 1,
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });
});
