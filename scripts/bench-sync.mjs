// npm run bench:sync — CPU that replica sync costs per routed request, in one process, without the
// network: cache_aware routes bench:proxy:wrk's chat texts (a shared 3,800-character system prompt
// and a varying user turn) through a real ReplicaSync whose transport only collects what it
// publishes; a second ReplicaSync then applies those messages, as a peer would.
//
// Reported per routed request, as process CPU time (process.cpuUsage, so time on other threads
// and GC is included): routing alone (no sync), routing + publishing (the sender's extra is the
// difference), and applying a peer's records (the receiver). Two prompt mixes: 1,024 texts in
// turn (as under wrk: most are repeats within the 1 s window, not published again) and a new
// text for every request (nothing to suppress). Batches every 50 requests, 5 ms of virtual time
// apart. Medians of 5 runs after 3 warm-up runs.
//
// Options (env): BENCH_SYNC_REQUESTS (30000 per run).
import { requireDist } from './lib/bench-util.mjs';

requireDist();
const dist = new URL('../dist/', import.meta.url).href;
const { WorkerRegistry } = await import(`${dist}core/registry.js`);
const { Worker } = await import(`${dist}core/worker.js`);
const { SeededRng } = await import(`${dist}core/rng.js`);
const { CacheAwarePolicy } = await import(`${dist}policies/cache-aware.js`);
const { ReplicaSync } = await import(`${dist}sync/replica-sync.js`);

const N = Number(process.env.BENCH_SYNC_REQUESTS ?? 30000);
const BATCH = 50;
let now = 0;
const clock = { now: () => now };
const timers = { once: () => () => {}, every: () => () => {} };

function replica(id, sent) {
  const registry = new WorkerRegistry();
  for (const url of ['http://127.0.0.1:18001', 'http://127.0.0.1:18002']) {
    const w = new Worker({ url, modelId: 'bench-model' });
    w.healthy = true;
    registry.add(w);
  }
  let sync;
  const deps = {
    clock,
    rng: new SeededRng(1),
    get share() {
      return sync?.shareFor('main');
    },
  };
  const policy = new CacheAwarePolicy(deps);
  const transport = { connected: true, maxPayload: 1 << 20, publish: (_s, d) => (sent?.push(d), true), subscribe: () => () => {}, onStatus: () => {}, close: async () => {} };
  if (sent) {
    sync = new ReplicaSync(transport, { registry, policies: new Map([['main', policy]]), clock, timers }, { replicaId: id });
    sync.start();
  }
  return { registry, policy, sync };
}

const system = 'You are a careful assistant for an online store. Answer briefly and cite the policy section. '.repeat(40).slice(0, 3800);
function text(i) {
  let user = `Customer ${i}: where is my order number ${(i * 7919) % 100000}? `;
  user += '.'.repeat(200 - user.length);
  return `system: ${system}\nuser: ${user}`;
}
const cpu = () => {
  const c = process.cpuUsage();
  return c.user + c.system;
};

function run(synced, unique, base) {
  const sent = [];
  const a = replica('a', synced ? sent : undefined);
  const texts = Array.from({ length: N }, (_, i) => text(unique ? base + i : i % 1024));
  const t0 = cpu();
  for (let i = 0; i < N; i++) {
    const ctx = { requestId: `r${i}`, route: 'chat', model: 'bench-model', routingText: texts[i], headers: {}, stream: false, arrivalMs: now };
    const w = a.policy.selectWorker(a.registry.all(), ctx);
    a.registry.get(w.id).acquire().release();
    if (i % BATCH === BATCH - 1) {
      now += 5;
      if (synced) a.sync.flush();
    }
  }
  const route = (cpu() - t0) / N;
  if (!synced) return { route };
  const b = replica('b', []);
  const t1 = cpu();
  for (const d of sent) b.sync.receive(d);
  return { route, apply: (cpu() - t1) / N, bytes: a.sync.stats.bytesSent / N, suppressed: a.sync.stats.repeatsSuppressed / N };
}

const median = (xs) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
console.log(`replica sync CPU per routed request (µs), ${N} requests per run, medians of 5 runs`);
console.log('| prompts | route alone | route + publish | publish | apply a peer\'s | bytes published per request | not published (repeats) |');
console.log('|---|---|---|---|---|---|---|');
for (const unique of [false, true]) {
  for (let k = 0; k < 3; k++) (run(false, unique, k * 1e6), run(true, unique, k * 1e6 + 5e5));
  const rows = [];
  for (let k = 0; k < 5; k++) rows.push([run(false, unique, (k + 3) * 1e6), run(true, unique, (k + 3) * 1e6 + 5e5)]);
  const alone = median(rows.map((r) => r[0].route));
  const withSync = median(rows.map((r) => r[1].route));
  console.log(
    `| ${unique ? 'a new one per request' : '1,024 in turn'} | ${alone.toFixed(1)} | ${withSync.toFixed(1)} | ${(withSync - alone).toFixed(1)} | ${median(rows.map((r) => r[1].apply)).toFixed(1)} | ${median(rows.map((r) => r[1].bytes)).toFixed(0)} | ${(100 * median(rows.map((r) => r[1].suppressed))).toFixed(1)}% |`,
  );
}
