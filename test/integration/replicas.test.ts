// Active-active replicas end to end: a real nats-server, `kvgate sim` engines and several
// `kvgate serve --replica-sync` processes, with this test as the round-robin load balancer.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startNats, type TestNats } from '../helpers/nats.js';
import { spawnKvgate, type Spawned } from '../helpers/processes.js';

const running: Spawned[] = [];
let nats: TestNats;
let sims: string[] = [];

interface Replica {
  url: string;
  proc: Spawned;
}

async function replica(args: string[], sync = true): Promise<Replica> {
  const p = await spawnKvgate(
    [
      'serve',
      '--host',
      '127.0.0.1',
      '--port',
      '0',
      '--worker-urls',
      ...sims,
      '--health-check-interval-secs',
      '0.5',
      '--engine-metrics-interval-secs',
      '0',
      ...(sync ? ['--replica-sync', nats.url, '--replica-heartbeat-ms', '200', '--replica-expiry-secs', '1'] : []),
      ...args,
    ],
    /"url":"(http:\/\/[^"]+)"[^\n]*kvgate listening/,
  );
  running.push(p);
  return { url: p.match[1], proc: p };
}

async function until<T>(what: string, fn: () => Promise<T>, ok: (v: T) => boolean, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: T | undefined;
  for (;;) {
    try {
      last = await fn();
      if (ok(last)) return last;
    } catch {
      /* not there yet */
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last value: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const getJson = async (url: string) => (await fetch(url)).json() as Promise<Record<string, unknown>>;
const loads = async (r: Replica) => ((await getJson(r.url + '/workers')).workers as Array<{ id: string; load: number; local_load: number }>);
const totalLoad = async (r: Replica) => (await loads(r)).reduce((s, w) => s + w.load, 0);
const ready = (r: Replica) => until(`${r.url} ready`, async () => (await fetch(r.url + '/readiness')).status, (s) => s === 200);

function chat(prefix: string, q: string, maxTokens = 2, stream = false) {
  return { model: 'kvgate-sim', messages: [{ role: 'system', content: prefix }, { role: 'user', content: q }], max_tokens: maxTokens, stream };
}

async function send(r: Replica, body: unknown) {
  const res = await fetch(r.url + '/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const json = (await res.json()) as { usage?: { prompt_tokens: number; prompt_tokens_details?: { cached_tokens?: number } } };
  return { status: res.status, worker: res.headers.get('x-kvgate-worker'), prompt: json.usage?.prompt_tokens ?? 0, cached: json.usage?.prompt_tokens_details?.cached_tokens ?? 0 };
}

/** Opens a long streaming chat and reads its first chunk; returns how to end it and how it ended. */
async function openStream(r: Replica, q: string) {
  const ac = new AbortController();
  const res = await fetch(r.url + '/v1/chat/completions', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(chat('long-running stream', q, 4000, true)),
    signal: ac.signal,
  });
  expect(res.status).toBe(200);
  const reader = res.body!.getReader();
  await reader.read();
  const ended = (async () => {
    try {
      for (;;) {
        const { done } = await reader.read();
        if (done) return 'complete';
      }
    } catch {
      return 'broken';
    }
  })();
  return { abort: () => ac.abort(), ended };
}

/** A shared-prefix workload through a round-robin front: groups × rounds, one request at a time. */
async function sharedPrefix(replicas: Replica[], tag: string, groups = 10, rounds = 4) {
  let i = 0;
  let prompt = 0;
  let cached = 0;
  const placement = new Map<number, Set<string>>();
  for (let round = 0; round < rounds; round++) {
    for (let g = 0; g < groups; g++) {
      const prefix = `[${tag} application ${g}] You are the assistant of application ${g}; follow its house rules carefully. `.repeat(25);
      const r = await send(replicas[i++ % replicas.length], chat(prefix, `${tag} question ${round} for ${g}?`));
      expect(r.status).toBe(200);
      if (round > 0) {
        prompt += r.prompt;
        cached += r.cached;
      }
      if (!placement.has(g)) placement.set(g, new Set());
      placement.get(g)!.add(r.worker!);
    }
  }
  const spread = [...placement.values()].filter((s) => s.size > 1).length;
  return { hitRate: cached / prompt, spread };
}

beforeAll(async () => {
  nats = await startNats();
  const started = await Promise.all(
    [1, 2, 3, 4].map((seed) => spawnKvgate(['sim', '--host', '127.0.0.1', '--port', '0', '--seed', String(seed)], /listening on (http:\/\/\S+)/)),
  );
  running.push(...started);
  sims = started.map((s) => s.match[1]);
}, 30_000);

afterAll(async () => {
  await Promise.all(running.map((p) => p.stop()));
  await nats?.kill('SIGTERM');
});

describe('kvgate serve --replica-sync (real nats-server, 4 sim engines)', () => {
  it('3 replicas behind a round-robin front keep each prefix on one worker; without sync they scatter it', async () => {
    const synced = await Promise.all([0, 1, 2].map(() => replica(['--policy', 'cache_aware'])));
    await Promise.all(synced.map(ready));
    const withSync = await sharedPrefix(synced, 'synced');
    const alone = await Promise.all([0, 1, 2].map(() => replica(['--policy', 'cache_aware'], false)));
    await Promise.all(alone.map(ready));
    const without = await sharedPrefix(alone, 'unsynced');
    expect(withSync.spread).toBe(0);
    expect(withSync.hitRate).toBeGreaterThan(0.85);
    expect(without.spread).toBeGreaterThan(0);
    expect(without.hitRate).toBeLessThan(withSync.hitRate);
    const status = await getJson(synced[0].url + '/replicas');
    expect((status.peers as unknown[]).length).toBe(2);
    expect(status.bytes_per_routed_request).toBeLessThan(1500); // 2,600-character prompts, shared as chunk references
    for (const r of [...synced, ...alone]) await r.proc.stop();
  }, 60_000);

  it('every replica sees the cluster-wide in-flight load; SIGKILL of one loses only its own requests and its load expires', async () => {
    const rs = await Promise.all([0, 1, 2].map(() => replica(['--policy', 'least_load'])));
    await Promise.all(rs.map(ready));
    const streams = [];
    for (let i = 0; i < 6; i++) streams.push({ on: i % 3, s: await openStream(rs[i % 3], `stream ${i}`) });
    for (const r of rs) await until('cluster-wide load 6', () => totalLoad(r), (n) => n === 6);
    // least_load on a shared view spreads 6 streams over 4 workers as one router would: none has 3.
    const view = await loads(rs[0]);
    expect(Math.max(...view.map((w) => w.load))).toBeLessThanOrEqual(2);

    rs[2].proc.child.kill('SIGKILL');
    const outcomes = await Promise.all(streams.filter((x) => x.on === 2).map((x) => x.s.ended));
    expect(outcomes).toEqual(['broken', 'broken']);
    for (const r of rs.slice(0, 2)) await until('the killed replica’s load expired', () => totalLoad(r), (n) => n === 4);
    // The others are untouched: still streaming, and new requests succeed.
    expect((await send(rs[0], chat('after the kill', 'hello'))).status).toBe(200);
    for (const x of streams.filter((x) => x.on !== 2)) x.s.abort();
    for (const r of rs.slice(0, 2)) await until('load back to 0', () => totalLoad(r), (n) => n === 0);
    for (const r of rs.slice(0, 2)) await r.proc.stop();
  }, 60_000);

  it('NATS killed mid-run fails no request; after it returns, state re-converges and a late joiner gets a snapshot', async () => {
    const rs = await Promise.all([0, 1].map(() => replica(['--policy', 'cache_aware'])));
    await Promise.all(rs.map(ready));
    const stream = await openStream(rs[0], 'held across the outage');
    await until('load seen by the peer', () => totalLoad(rs[1]), (n) => n === 1);

    await nats.kill('SIGKILL');
    let failed = 0;
    for (let i = 0; i < 10; i++) if ((await send(rs[i % 2], chat('during the outage', `q${i}`))).status !== 200) failed++;
    expect(failed).toBe(0);
    for (const r of rs) expect((await fetch(r.url + '/readiness')).status).toBe(200);
    const down = await getJson(rs[0].url + '/replicas');
    expect(down.connected).toBe(false);

    await nats.restart();
    for (const r of rs) await until('reconnected with its peer', () => getJson(r.url + '/replicas'), (s) => s.connected === true && (s.peers as unknown[]).length === 1);
    await until('load re-converged', () => totalLoad(rs[1]), (n) => n === 1);

    // A replica that joins now gets the routing history from a peer before it is ready.
    const prefix = 'A prompt placed before the late joiner existed. '.repeat(40);
    const placed = await send(rs[0], chat(prefix, 'first'));
    const late = await replica(['--policy', 'cache_aware']);
    await ready(late);
    const snap = await getJson(late.url + '/replicas');
    expect((snap.snapshot as { entries: number }).entries).toBeGreaterThan(0);
    expect((await send(late, chat(prefix, 'second'))).worker).toBe(placed.worker);

    stream.abort();
    expect(await stream.ended).toBe('broken');
    for (const r of [...rs, late]) await until('load back to 0', () => totalLoad(r), (n) => n === 0);
  }, 60_000);
});
