// kv_aware end to end: simulated engines publishing vLLM KV events over ZMQ (both wire formats,
// two data-parallel ranks), kvgate subscribing, indexing and routing on them.
import { afterEach, describe, expect, it } from 'vitest';
import { startSimServer, type SimServer } from '../../src/sim/server.js';
import type { Gateway } from '../../src/server/gateway.js';
import type { KvAwarePolicy } from '../../src/policies/kv-aware.js';
import { startGateway, waitFor } from '../helpers/gateway.js';
import { freePortRange } from '../helpers/ports.js';

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!().catch(() => undefined);
});


async function cluster(format: 'array' | 'map', dp: number) {
  const port = await freePortRange(Math.max(2, dp));
  const sim = await startSimServer({
    host: '127.0.0.1',
    port: 0,
    speed: 50,
    seed: 1,
    dataParallelSize: dp,
    kvEvents: { endpoint: `tcp://*:${port}`, replayEndpoint: `tcp://*:${port + 50}`, format }, // * = bind, as vLLM
  });
  cleanups.push(() => sim.close());
  const gw = await startGateway({
    workerUrls: [sim.url],
    policy: 'kv_aware',
    dpAware: dp > 1,
    kvEventsEndpoints: [`tcp://127.0.0.1:${port}`],
    kvEventsReplayEndpoints: [`tcp://127.0.0.1:${port + 50}`],
    engineMetricsIntervalSecs: 0,
  });
  cleanups.push(() => gw.close());
  return { sim, gw };
}

async function complete(url: string, prompt: string, headers: Record<string, string> = {}) {
  const r = await fetch(url + '/v1/completions', {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify({ model: 'kvgate-sim', prompt, max_tokens: 2 }),
  });
  expect(r.status).toBe(200);
  const body = (await r.json()) as { usage: { prompt_tokens: number; prompt_tokens_details?: { cached_tokens?: number } } };
  return { worker: r.headers.get('x-kvgate-worker'), rank: r.headers.get('x-data-parallel-rank'), usage: body.usage };
}

/** Waits until the index holds exactly the engine's cached blocks for that worker/rank. */
async function synced(gw: Gateway, sim: SimServer, rank: number, id: string) {
  await waitFor(() => {
    const truth = sim.engines[rank]!.engine.cachedBlockHashes();
    const known = gw.kvEvents.index.engineHashesOf(id);
    return truth.size === known.size && [...truth].every((h) => known.has(h));
  }, 5000, `index of ${id} in sync with the engine`);
}

const longText = (tag: string, words = 700) => Array.from({ length: words }, (_, i) => `${tag}${i % 97}`).join(' ');

describe.each(['array', 'map'] as const)('kv_aware with KV events in %s format, 2 DP ranks', (format) => {
  it('routes a repeated long prompt to the rank that holds it, and stops once that rank is flushed', async () => {
    const { sim, gw } = await cluster(format, 2);
    expect(gw.registry.all().map((w) => w.id)).toEqual([`${sim.url}@0`, `${sim.url}@1`]);
    const policy = gw.policy as KvAwarePolicy;
    const P = longText('alpha');

    const first = await complete(gw.url, P);
    const home = first.worker!;
    const homeRank = Number(home.split('@')[1]);
    const other = homeRank === 0 ? 1 : 0;
    await synced(gw, sim, homeRank, home);
    for (let i = 0; i < 4; i++) {
      const r = await complete(gw.url, P);
      expect(r.worker).toBe(home);
      expect(r.usage.prompt_tokens_details!.cached_tokens!).toBeGreaterThanOrEqual(0.9 * r.usage.prompt_tokens);
      expect(policy.lastDecision!.fallback).toBe(false);
      expect(policy.lastDecision!.overlapBlocks).toBeGreaterThan(0);
    }
    // The other rank gets the first half of P straight from a client (not through kvgate).
    const half = P.slice(0, Math.floor(P.length / 2));
    await complete(sim.url, `${half} something else entirely`, { 'x-data-parallel-rank': String(other) });
    await synced(gw, sim, other, `${sim.url}@${other}`);
    expect((await complete(gw.url, P)).worker).toBe(home); // still the full holder

    // Flush the home rank only: AllBlocksCleared on its event stream.
    sim.engines[homeRank]!.engine.reset();
    await waitFor(() => gw.kvEvents.index.blocksOf(home) === 0 && gw.kvEvents.resetCount(home) > 0, 5000, 'flush seen');
    const after = await complete(gw.url, P);
    expect(after.worker).toBe(`${sim.url}@${other}`);
    expect(after.usage.prompt_tokens_details!.cached_tokens!).toBeGreaterThan(0);
    expect(policy.lastDecision!.overlapBlocks).toBeGreaterThan(0);

    const metrics = await (await fetch(gw.url + '/metrics')).text();
    expect(metrics).toMatch(new RegExp(`kvgate_kv_indexed_blocks\\{worker="${sim.url.replace(/[/.:]/g, '\\$&')}@${other}"\\} [1-9]`));
    expect(metrics).toMatch(/kvgate_kv_decisions_total\{worker="[^"]+@\d",source="events"\} [1-9]/);
    expect(metrics).toContain('kvgate_kv_index_memory_bytes');
  });
});

describe('KV event replay', () => {
  it('repairs missed events: after a pause the index equals the engine cache once replay finishes', async () => {
    const { sim, gw } = await cluster('map', 1);
    const id = sim.url;
    await complete(gw.url, longText('warm'));
    await synced(gw, sim, 0, id);
    await gw.kvEvents.pauseSource(id);
    // The engine keeps publishing (stores and evictions) while kvgate is not listening.
    for (let i = 0; i < 6; i++) await complete(sim.url, longText(`missed${i}`, 300));
    await gw.kvEvents.resumeSource(id);
    // The next live batch reveals the gap; replay fills it in order.
    await complete(sim.url, longText('after'));
    await synced(gw, sim, 0, id);
    const stats = gw.kvEvents.sourceStats(id)!;
    expect(stats.replayed).toBeGreaterThan(0);
    expect(stats.inaccurate).toBe(false);
  });
});

describe('KV event subscription modes', () => {
  it('--kv-events-bind: engines connect to kvgate; the topic names the worker', async () => {
    const httpPort = await freePortRange(2);
    const evPort = await freePortRange(2);
    const gw = await startGateway({ workerUrls: [], policy: 'kv_aware', kvEventsBind: `tcp://127.0.0.1:${evPort}`, engineMetricsIntervalSecs: 0 });
    cleanups.push(() => gw.close());
    // No '*' in the endpoint: the simulated engine's PUB connects (vLLM's rule), topic as llm-d names it.
    const sim = await startSimServer({
      host: '127.0.0.1',
      port: httpPort,
      speed: 50,
      seed: 2,
      kvEvents: { endpoint: `tcp://127.0.0.1:${evPort}`, format: 'map', topic: `kv@127.0.0.1:${httpPort}@kvgate-sim` },
    });
    cleanups.push(() => sim.close());
    const add = await fetch(gw.url + '/workers', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ url: sim.url }) });
    expect(add.status).toBe(202);
    // A connecting PUB joins asynchronously: send requests until the index has the engine's blocks.
    for (let i = 0; i < 50 && gw.kvEvents.index.blocksOf(sim.url) === 0; i++) {
      await complete(gw.url, longText(`bound${i}`, 200));
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(gw.kvEvents.index.blocksOf(sim.url)).toBeGreaterThan(0);
    await synced(gw, sim, 0, sim.url);
  });

  it('POST /workers with kv_events_endpoint subscribes the new worker', async () => {
    const port = await freePortRange(2);
    const sim = await startSimServer({ host: '127.0.0.1', port: 0, speed: 50, seed: 3, kvEvents: { endpoint: `tcp://*:${port}`, replayEndpoint: `tcp://*:${port + 50}`, format: 'array' } });
    cleanups.push(() => sim.close());
    const gw = await startGateway({ workerUrls: [], policy: 'kv_aware', engineMetricsIntervalSecs: 0 });
    cleanups.push(() => gw.close());
    const bad = await fetch(gw.url + '/workers', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ url: sim.url, kv_events_endpoint: 'http://nope' }) });
    expect(bad.status).toBe(400);
    const add = await fetch(gw.url + '/workers', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ url: sim.url, kv_events_endpoint: `tcp://127.0.0.1:${port}`, kv_events_replay_endpoint: `tcp://127.0.0.1:${port + 50}` }),
    });
    expect(add.status).toBe(202);
    await complete(gw.url, longText('added'));
    await synced(gw, sim, 0, sim.url);
    expect((gw.policy as KvAwarePolicy).lastDecision!.fallback).toBe(true); // no events yet at the first request
    await complete(gw.url, longText('added'));
    expect((gw.policy as KvAwarePolicy).lastDecision).toMatchObject({ fallback: false });
    expect((gw.policy as KvAwarePolicy).lastDecision!.overlapBlocks).toBeGreaterThan(0);
  });
});
