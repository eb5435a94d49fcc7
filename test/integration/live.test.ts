import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runLive } from '../../src/lab/live.js';
import { loadWorkload } from '../../src/lab/workloads/index.js';
import { startSimServer, type SimServer } from '../../src/sim/server.js';
import type { Gateway } from '../../src/server/gateway.js';
import { startGateway } from '../helpers/gateway.js';
import { runKvgate } from '../helpers/processes.js';

const sims: SimServer[] = [];
let gw: Gateway | undefined;
afterAll(async () => {
  await gw?.close();
  await Promise.all(sims.map((s) => s.close()));
});

describe('kvgate bench --live', () => {
  it('sends the workload as streaming requests through kvgate and measures it from the client side', async () => {
    for (let i = 0; i < 3; i++) sims.push(await startSimServer({ host: '127.0.0.1', port: 0, speed: 50, seed: i + 1 }));
    gw = await startGateway({ workerUrls: sims.map((s) => s.url) });
    const workload = loadWorkload('shared-prefix:groups=3,system=800,users=6,question=40,output=12,n=36', { seed: 1, rps: 60 });
    const r = await runLive({ target: gw.url, workload, concurrency: 8, durationSecs: 10, route: 'chat' });
    expect(r.model).toBe('kvgate-sim');
    expect(r.sent).toBe(36);
    expect(r.succeeded).toBe(36);
    expect(r.errors).toEqual({});
    // cache_aware keeps each group on one worker, so the engines report most prompt tokens cached.
    expect(r.hitRate).toBeGreaterThan(0.6);
    expect(Object.values(r.perWorker).reduce((a, b) => a + b, 0)).toBe(36);
    expect(r.ttftP50).toBeGreaterThan(0);
    expect(r.ttftP50).toBeLessThanOrEqual(r.e2eP50);
    expect(gw.registry.all().every((w) => w.load === 0)).toBe(true);
  });

  it('counts the target\'s errors instead of failing', async () => {
    const workload = loadWorkload('random:input=50,output=4,n=5', { seed: 1, rps: 50 });
    // With one model served any name is routed to it; --strict-model keeps the 404.
    const strict = await startGateway({ workerUrls: sims.map((s) => s.url), strictModel: true });
    const r = await runLive({ target: strict.url, workload, model: 'no-such-model', concurrency: 2, durationSecs: 5, route: 'completions' }).finally(() => strict.close());
    expect(r.sent).toBe(5);
    expect(r.succeeded).toBe(0);
    expect(r.errors).toEqual({ 404: 5 });
  });

  it('through the CLI: --duration-secs is honoured for a generated workload, with no MaxListenersExceededWarning', async () => {
    const out = mkdtempSync(join(tmpdir(), 'kvgate-live-'));
    // 1 s of arrivals at 40 rps with 50-token answers at real speed: ~20 requests in flight at once
    // (above the 10-listener default), and a default one-round n (2×2 = 4) far below 40 requests.
    const slow = await startSimServer({ host: '127.0.0.1', port: 0, speed: 1, seed: 9 });
    sims.push(slow);
    const r = await runKvgate([
      'bench', '--live', '--target', slow.url, '--workload', 'shared-prefix:groups=2,system=100,users=2,question=20,output=50',
      '--rps', '40', '--duration-secs', '1', '--concurrency', '64', '--route', 'completions', '--quiet', '--out', out,
    ]);
    expect(r.code, r.out).toBe(0);
    expect(r.out).not.toMatch(/MaxListenersExceeded|Warning/);
    const report = JSON.parse(readFileSync(join(out, 'live-report.json'), 'utf8'));
    expect(report.workloadRanOut).toBe(false);
    expect(report.sendSecs).toBe(1);
    expect(report.sent).toBeGreaterThan(10);
    expect(report.succeeded).toBe(report.sent);
    expect(r.out).toContain('Sent arrivals for 1 s (--duration-secs).');
  });
});
