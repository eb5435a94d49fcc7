// Fault 10: soak. 20,000 mixed requests (streaming and not, chat and completions, ~3 % client
// aborts) through 4 engines, one of which fails 5 % of its requests (`--fail-rate 0.05`), with
// admission control on (128 slots) and 64 clients at a time. Afterwards: no in-flight count, no
// admission slot, no open response; every request that was not aborted by its client succeeded
// (injected failures are retried); the resident memory of this process, which hosts the gateway,
// is within 20 % of its level after a 2,000-request warm-up.
//
// The engines are separate `kvgate sim` processes: they get the machine's other core, and this
// process's RSS is then the gateway's (plus the load generator's), not the engines'.
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, describe, expect, it } from 'vitest';
import { request } from 'undici';
import { SeededRng } from '../../src/core/rng.js';
import { gatewayMetric, post, recordFigures, runCleanups, settle, sleep, spawnSim, startTestGateway, chatBody } from '../helpers/faults.js';

const TOTAL = 20_000;
const WARMUP = 2_000;
const CONCURRENCY = 64;
const ABORT_RATE = 0.03;
const MiB = 1024 * 1024;

/** A real gc() if the runtime lets us expose it; otherwise undefined (medians then absorb noise). */
function exposeGc(): (() => void) | undefined {
  const g = (globalThis as { gc?: () => void }).gc;
  if (g) return g;
  try {
    setFlagsFromString('--expose-gc');
    return runInNewContext('gc') as () => void;
  } catch {
    return undefined;
  }
}

async function residentMemory(gc: (() => void) | undefined): Promise<{ rss: number; heapUsed: number }> {
  const rss: number[] = [];
  const heap: number[] = [];
  for (let i = 0; i < 7; i++) {
    gc?.();
    await sleep(30);
    const m = process.memoryUsage();
    rss.push(m.rss);
    heap.push(m.heapUsed);
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;
  return { rss: median(rss), heapUsed: median(heap) };
}

afterAll(runCleanups);

describe('fault: soak', () => {
  it(`${TOTAL} mixed requests through 4 engines (one failing 5 %), with client aborts: nothing leaks, nothing that should succeed fails, RSS stable`, async () => {
    const sims = await Promise.all(
      [1, 2, 3, 4].map((i) => spawnSim(['--speed', '200', '--seed', String(i), '--max-model-len', '1024', '--default-max-tokens', '4', ...(i === 4 ? ['--fail-rate', '0.05'] : [])])),
    );
    const failing = sims[3]!.url;
    const { gw } = await startTestGateway({
      workerUrls: sims.map((s) => s.url),
      maxConcurrentRequests: 128,
      queueSize: 128,
      healthCheckIntervalSecs: 1,
      logLevel: 'error',
    });
    const gc = exposeGc();
    const rng = new SeededRng(42);
    const apps = Array.from({ length: 32 }, (_, i) => `You are assistant #${i} of the soak test. Answer briefly and politely.`);

    let sent = 0;
    let ok = 0;
    let plannedAborts = 0;
    const failures: string[] = [];
    let maxSlotsInUse = 0;

    const one = async (i: number) => {
      const stream = rng.next() < 0.5;
      const chat = rng.next() < 0.67;
      const app = rng.int(apps.length);
      const q = rng.int(64);
      const abort = rng.next() < ABORT_RATE;
      const abortAfterMs = rng.int(6);
      const body = chat
        ? { model: 'kvgate-sim', messages: [{ role: 'system', content: apps[app] }, { role: 'user', content: `question ${q}` }], max_tokens: 1 + rng.int(4), stream }
        : { model: 'kvgate-sim', prompt: `${apps[app]} Q: ${q}`, max_tokens: 1 + rng.int(4), stream };
      const ac = new AbortController();
      const timeout = setTimeout(() => ac.abort(new Error('soak request exceeded 30 s')), 30_000);
      let timer: NodeJS.Timeout | undefined;
      if (abort) {
        plannedAborts++;
        timer = setTimeout(() => ac.abort(), abortAfterMs);
      }
      sent++;
      try {
        const res = await request(gw.url + (chat ? '/v1/chat/completions' : '/v1/completions'), {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'x-request-id': `soak-${i}` },
          body: JSON.stringify(body),
          signal: ac.signal,
        });
        maxSlotsInUse = Math.max(maxSlotsInUse, gw.admission.inUse);
        const text = await res.body.text();
        const complete = res.statusCode === 200 && (stream ? text.trimEnd().endsWith('data: [DONE]') : text.includes('"choices"'));
        if (complete) ok++;
        else if (!abort) failures.push(`#${i} ${res.statusCode} ${text.slice(0, 160)}`);
      } catch (e) {
        if (!abort) failures.push(`#${i} ${(e as Error).message}`);
      } finally {
        clearTimeout(timeout);
        clearTimeout(timer);
      }
    };

    const run = async (from: number, to: number) => {
      let next = from;
      await Promise.all(
        Array.from({ length: CONCURRENCY }, async () => {
          while (next < to) await one(next++);
        }),
      );
    };

    const t0 = performance.now();
    await run(0, WARMUP);
    await settle(gw);
    const warm = await residentMemory(gc);
    await run(WARMUP, TOTAL);
    const leaks = await settle(gw);
    const end = await residentMemory(gc);
    const secs = (performance.now() - t0) / 1000;

    const retries = await gatewayMetric(gw, 'kvgate_retries_total');
    const upstreamErrors = await gatewayMetric(gw, 'kvgate_upstream_errors_total');
    const clientAborts = await gatewayMetric(gw, 'kvgate_client_aborts_total');
    const after = await post(gw.url, '/v1/chat/completions', chatBody('after the soak'));
    const perWorker = await Promise.all(gw.registry.all().map(async (w) => ({ url: w.url, processed: w.processed, load: w.load, breaker: w.breaker?.state })));

    recordFigures('10-soak', {
      requestsSent: sent + 1,
      faultsInjected: retries + plannedAborts,
      requestsFailedThatShouldHaveSucceeded: failures.length + (after.status === 200 ? 0 : 1),
      leakedInFlight: leaks.leakedInFlight,
      leakedAdmissionSlots: leaks.leakedAdmissionSlots,
      openResponsesAtEnd: leaks.openResponses,
      injectedWorkerFailuresRetried: retries,
      plannedClientAborts: plannedAborts,
      clientAbortsSeenByGateway: clientAborts,
      upstreamConnectionErrors: upstreamErrors,
      succeeded: ok,
      maxAdmissionSlotsInUse: maxSlotsInUse,
      rssAfterWarmupMiB: +(warm.rss / MiB).toFixed(1),
      rssAtEndMiB: +(end.rss / MiB).toFixed(1),
      heapUsedAfterWarmupMiB: +(warm.heapUsed / MiB).toFixed(1),
      heapUsedAtEndMiB: +(end.heapUsed / MiB).toFixed(1),
      gcExposed: gc !== undefined,
      durationSecs: +secs.toFixed(1),
      failingWorkerProcessed: perWorker.find((w) => w.url === failing)?.processed ?? 0,
    });

    expect(sent).toBe(TOTAL);
    expect(failures.slice(0, 10)).toEqual([]);
    expect(ok + plannedAborts).toBeGreaterThanOrEqual(TOTAL);
    expect(after.status).toBe(200);
    expect(leaks).toEqual({ leakedInFlight: 0, leakedAdmissionSlots: 0, openResponses: 0 });
    expect(perWorker.every((w) => w.load === 0)).toBe(true);
    // Every routing decision's load was released exactly once.
    const decisions = (await gw.metrics.decisions.get()).values.reduce((n, v) => n + v.value, 0);
    expect(perWorker.reduce((n, w) => n + w.processed, 0)).toBe(decisions);
    // The fault injection did happen, and was absorbed by retries.
    expect(retries).toBeGreaterThan(0);
    expect(await gatewayMetric(gw, 'kvgate_retries_exhausted_total')).toBe(0);
    expect(end.rss).toBeLessThanOrEqual(warm.rss * 1.2);
  }, 150_000);
});
