// Misconfigured KV events are loud: the engine's publisher and kvgate's subscriber both CONNECT
// to one address (nobody binds), requests complete, no event ever arrives: kvgate says so in
// GET /workers (kv_events.silent), in kvgate_kv_events_silent{worker} and (once) in its log.
import { afterEach, describe, expect, it } from 'vitest';
import { startSimServer } from '../../src/sim/server.js';
import { startGateway, waitFor } from '../helpers/gateway.js';
import { freePort } from '../helpers/ports.js';

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!().catch(() => undefined);
});


async function complete(url: string, prompt: string) {
  const r = await fetch(url + '/v1/completions', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'kvgate-sim', prompt, max_tokens: 2 }),
  });
  expect(r.status).toBe(200);
  await r.arrayBuffer();
}

async function setup(endpointOfSim: (port: number) => string) {
  const port = await freePort();
  const sim = await startSimServer({ host: '127.0.0.1', port: 0, speed: 50, seed: 1, kvEvents: { endpoint: endpointOfSim(port), format: 'map' } });
  cleanups.push(() => sim.close());
  const gw = await startGateway({ workerUrls: [sim.url], policy: 'kv_aware', kvEventsEndpoints: [`tcp://127.0.0.1:${port}`], engineMetricsIntervalSecs: 0 });
  cleanups.push(() => gw.close());
  return { sim, gw };
}

const workersOf = async (url: string) => ((await (await fetch(url + '/workers')).json()) as { workers: Array<{ url: string; kv_events?: Record<string, unknown> }> }).workers;

describe('silent KV-event subscriptions', () => {
  it('both sides connecting: flagged silent after 5 completions, in /workers and the metric', async () => {
    const { sim, gw } = await setup((port) => `tcp://127.0.0.1:${port}`); // the sim CONNECTS (no '*')
    for (let i = 0; i < 6; i++) await complete(gw.url, `prompt ${i} ${'x '.repeat(100)}`);
    const silent = gw.kvEvents.checkSilence();
    expect(silent).toEqual([sim.url]);
    const w = (await workersOf(gw.url)).find((x) => x.url === sim.url)!;
    expect(w.kv_events).toMatchObject({ subscribed: true, mode: 'connect', endpoint: expect.stringContaining('127.0.0.1'), last_event_age_ms: null, silent: true });
    expect((w.kv_events!.completions_without_events as number) >= 5).toBe(true);
    const metrics = await (await fetch(gw.url + '/metrics')).text();
    expect(metrics).toMatch(new RegExp(`kvgate_kv_events_silent\\{worker="${sim.url.replace(/[.:/]/g, '\\$&')}"\\} 1`));
  });

  it('a publisher that binds: events arrive, never silent', async () => {
    const { sim, gw } = await setup((port) => `tcp://*:${port}`);
    await waitFor(() => true, 10);
    for (let i = 0; i < 6; i++) {
      await complete(gw.url, `prompt ${i} ${'y '.repeat(100)}`);
      await waitFor(() => gw.kvEvents.lastEventAtMs(sim.url) !== undefined, 5000, 'first KV event');
    }
    expect(gw.kvEvents.checkSilence()).toEqual([]);
    const w = (await workersOf(gw.url)).find((x) => x.url === sim.url)!;
    expect(w.kv_events).toMatchObject({ subscribed: true, silent: false });
    expect(w.kv_events!.last_event_age_ms).not.toBeNull();
  });
});
