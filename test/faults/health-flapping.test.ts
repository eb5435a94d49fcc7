// Fault 5: a flapping health endpoint. A small front in this test sits before a simulated engine
// and answers /health as the test decides (everything else is relayed to the engine). Failures
// shorter than --health-failure-threshold never take the worker out; a sustained failure does,
// and it comes back only after --health-success-threshold consecutive passes.
import { createServer, request as httpRequest, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { chatBody, onCleanup, post, recordFigures, runCleanups, settle, sleep, startSim, startTestGateway, waitFor } from '../helpers/faults.js';

afterEach(runCleanups);

/** Relays to `target`, except GET /health, answered 200 or 503 by `verdict(n)` (n = 0, 1, ...). */
class HealthFront {
  verdict: (n: number) => boolean = () => true;
  readonly checks: boolean[] = [];
  private readonly server: Server;

  constructor(private readonly target: string) {
    this.server = createServer((req, res) => {
      if (req.url === '/health') {
        const ok = this.verdict(this.checks.length);
        this.checks.push(ok);
        res.writeHead(ok ? 200 : 503, { 'content-length': 0 });
        res.end();
        return;
      }
      const up = httpRequest(this.target + req.url, { method: req.method, headers: req.headers }, (r) => {
        res.writeHead(r.statusCode ?? 502, r.headers);
        r.pipe(res);
      });
      up.on('error', () => res.destroy());
      res.on('close', () => up.destroy());
      req.pipe(up);
    });
  }

  async start(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    onCleanup(
      () =>
        new Promise<void>((r) => {
          this.server.closeAllConnections();
          this.server.close(() => r());
        }),
    );
    return this;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  /** Switches to a new verdict pattern, indexed from the next check; returns that index. */
  setPattern(pattern: (i: number) => boolean): number {
    const from = this.checks.length;
    this.verdict = (n) => pattern(n - from);
    return from;
  }
}

describe('fault: flapping health endpoint', () => {
  it('real timers: alternating and short failure bursts never drop the worker; a sustained failure does; recovery needs 2 passes', async () => {
    const sim = await startSim({ seed: 1 });
    const front = await new HealthFront(sim.url).start();
    const { gw, logs } = await startTestGateway({
      workerUrls: [front.url],
      healthCheckIntervalSecs: 0.05,
      healthFailureThreshold: 3,
      healthSuccessThreshold: 2,
      maxConcurrentRequests: 8,
    });
    const w = gw.registry.get(front.url)!;
    expect(w.healthy).toBe(true);

    // Sample the health flag far more often than it is checked.
    const samples: boolean[] = [];
    const sampler = setInterval(() => samples.push(w.healthy), 5);
    onCleanup(() => clearInterval(sampler));

    let sent = 0;
    let failed = 0;
    const traffic = async (until: () => boolean) => {
      while (!until()) {
        const r = await post(gw.url, '/v1/chat/completions', chatBody(`flap ${sent}`));
        sent++;
        if (r.status !== 200) failed++;
        await sleep(15);
      }
    };

    // 1. Every other check fails.
    let from = front.setPattern((i) => i % 2 === 1);
    await traffic(() => front.checks.length - from >= 30);
    // 2. Bursts of 2 failed checks (threshold is 3), then one pass.
    from = front.setPattern((i) => i % 3 === 2);
    await traffic(() => front.checks.length - from >= 30);
    clearInterval(sampler);

    const failedChecks = front.checks.filter((ok) => !ok).length;
    expect(failedChecks).toBeGreaterThanOrEqual(30);
    expect(samples.length).toBeGreaterThan(100);
    expect(samples.every((h) => h)).toBe(true);
    const droppedWhileFlapping = logs.filter((l) => l.msg === 'worker unhealthy').length;
    expect(droppedWhileFlapping).toBe(0);
    expect(failed).toBe(0); // clients never noticed

    // 3. Sustained failure: dropped after 3 consecutive failed checks.
    from = front.setPattern(() => false);
    await waitFor(() => !w.healthy, 5000, 'worker dropped after a sustained failure');
    expect(front.checks.length - from).toBeGreaterThanOrEqual(3);
    expect(logs.filter((l) => l.msg === 'worker unhealthy')).toHaveLength(1);
    const r503 = await post(gw.url, '/v1/chat/completions', chatBody('while down'));
    expect(r503.status).toBe(503);

    // 4. Recovery: back only after 2 consecutive passes.
    from = front.setPattern(() => true);
    await waitFor(() => w.healthy, 5000, 'worker back after passes');
    expect(front.checks.length - from).toBeGreaterThanOrEqual(2);
    expect((await post(gw.url, '/v1/chat/completions', chatBody('back'))).status).toBe(200);

    const leaks = await settle(gw);
    recordFigures('05-health-flapping', {
      requestsSent: sent + 2,
      faultsInjected: front.checks.filter((ok) => !ok).length,
      requestsFailedThatShouldHaveSucceeded: failed,
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      healthChecks: front.checks.length,
      failedChecksWhileFlapping: failedChecks,
      droppedWhileFlapping,
    });
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
  });

  it('check by check: thresholds decide exactly when the worker leaves and returns', async () => {
    const sim = await startSim({ seed: 2 });
    const front = await new HealthFront(sim.url).start();
    // One automatic check (at registration); every later one is driven by the test.
    const { gw } = await startTestGateway({ workerUrls: [front.url], healthCheckIntervalSecs: 3600, healthFailureThreshold: 3, healthSuccessThreshold: 2 });
    const w = gw.registry.get(front.url)!;
    expect(w.healthy).toBe(true);
    expect(front.checks).toEqual([true]);

    const script: Array<[boolean, boolean]> = [
      // [check passes, healthy afterwards]
      [false, true],
      [true, true],
      [false, true],
      [false, true],
      [true, true],
      [false, true],
      [false, true],
      [false, false], // 3rd consecutive failure: out
      [false, false],
      [true, false], // 1 pass is not enough
      [false, false], // and a failure resets the count
      [true, false],
      [true, true], // 2nd consecutive pass: back
      [false, true],
    ];
    let i = 0;
    front.verdict = () => script[i]![0];
    for (; i < script.length; i++) {
      await gw.workers.check(front.url);
      expect({ step: i, healthy: w.healthy }).toEqual({ step: i, healthy: script[i]![1] });
    }
    expect(front.checks).toHaveLength(script.length + 1);
  });
});
