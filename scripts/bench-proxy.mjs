// npm run bench:proxy — latency kvgate adds and its maximum throughput, next to calling the
// worker directly and next to a bare Node proxy (node:http in, undici Pool out, no logic),
// all measured in the same run. Each server runs in its own process; the load generator here.
//
// Options (env): BENCH_LATENCY_REQUESTS (3000), BENCH_THROUGHPUT_SECS (5), BENCH_CONCURRENCY (64), BENCH_ROUNDS (3)
import { fork, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Pool } from 'undici';

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const LAT_N = Number(process.env.BENCH_LATENCY_REQUESTS ?? 3000);
const TP_SECS = Number(process.env.BENCH_THROUGHPUT_SECS ?? 5);
const CONC = Number(process.env.BENCH_CONCURRENCY ?? 64);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);

if (!existsSync(here('../dist/cli/main.js'))) {
  console.error('dist/ is missing: run `npm run build` first');
  process.exit(1);
}

function forkServer(script, args = []) {
  const child = fork(here(script), args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  return new Promise((resolve, reject) => {
    child.once('message', (m) => resolve({ child, url: `http://127.0.0.1:${m.port}` }));
    child.once('exit', (code) => reject(new Error(`${script} exited ${code}`)));
  });
}

async function startKvgate(workerUrl) {
  const port = 30000 + Math.floor(Math.random() * 20000);
  const child = spawn(process.execPath, [here('../dist/cli/main.js'), 'serve', '--host', '127.0.0.1', '--port', String(port), '--worker-urls', workerUrl, '--policy', 'cache_aware', '--log-level', 'warn'], { stdio: ['ignore', 'inherit', 'inherit'] });
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 200; i++) {
    try {
      const r = await fetch(url + '/readiness');
      if (r.status === 200) return { child, url };
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('kvgate did not become ready');
}

// A 4,000-character chat body: a long shared system prompt and a varying user turn.
const SYSTEM = 'You are a careful assistant for an online store. Answer briefly and cite the policy section. '.repeat(40).slice(0, 3800);
function body(i) {
  const user = `Customer ${i}: where is my order number ${(i * 7919) % 100000}? `.padEnd(200, '.');
  return JSON.stringify({ model: 'bench-model', messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: user }], max_tokens: 16 });
}
const BODIES = Array.from({ length: 1024 }, (_, i) => body(i));

async function once(pool, i) {
  const res = await pool.request({ path: '/v1/chat/completions', method: 'POST', headers: { 'content-type': 'application/json' }, body: BODIES[i % BODIES.length] });
  await res.body.dump();
  if (res.statusCode !== 200) throw new Error(`status ${res.statusCode}`);
}

async function latency(url) {
  const pool = new Pool(url, { connections: 1 });
  for (let i = 0; i < 300; i++) await once(pool, i);
  const samples = new Float64Array(LAT_N);
  for (let i = 0; i < LAT_N; i++) {
    const t = process.hrtime.bigint();
    await once(pool, i);
    samples[i] = Number(process.hrtime.bigint() - t) / 1e3;
  }
  await pool.close();
  samples.sort();
  return { p50: samples[Math.floor(LAT_N * 0.5)], p99: samples[Math.floor(LAT_N * 0.99)] };
}

async function throughput(url) {
  const pool = new Pool(url, { connections: CONC });
  let done = 0;
  let stop = false;
  const warmEnd = Date.now() + 1000;
  const worker = async (k) => {
    let i = k;
    while (!stop) {
      await once(pool, i);
      i += CONC;
      if (Date.now() > warmEnd) done++;
    }
  };
  const loops = Array.from({ length: CONC }, (_, k) => worker(k));
  await new Promise((r) => setTimeout(r, 1000));
  const t0 = Date.now();
  const d0 = done;
  await new Promise((r) => setTimeout(r, TP_SECS * 1000));
  const rps = (done - d0) / ((Date.now() - t0) / 1000);
  stop = true;
  await Promise.all(loops);
  await pool.close();
  return rps;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const worker = await forkServer('./lib/bench-worker.mjs');
const bare = await forkServer('./lib/bare-proxy.mjs', [worker.url]);
const kvgate = await startKvgate(worker.url);
const targets = { direct: worker.url, bare: bare.url, kvgate: kvgate.url };
const results = { direct: [], bare: [], kvgate: [] };
try {
  for (let round = 0; round < ROUNDS; round++) {
    for (const name of ['direct', 'bare', 'kvgate']) {
      const lat = await latency(targets[name]);
      const rps = await throughput(targets[name]);
      results[name].push({ ...lat, rps });
      console.log(`round ${round + 1} ${name.padEnd(6)} p50=${lat.p50.toFixed(0)}us p99=${lat.p99.toFixed(0)}us max_rps=${rps.toFixed(0)}`);
    }
  }
} finally {
  worker.child.kill();
  bare.child.kill();
  kvgate.child.kill();
}

const med = Object.fromEntries(Object.entries(results).map(([k, rs]) => [k, { p50: median(rs.map((r) => r.p50)), p99: median(rs.map((r) => r.p99)), rps: median(rs.map((r) => r.rps)) }]));
const added = (name) => ({ p50: med[name].p50 - med.direct.p50, p99: med[name].p99 - med.direct.p99 });
const a = { bare: added('bare'), kvgate: added('kvgate') };
console.log(`\nmedians of ${ROUNDS} rounds; body 4,000-char chat; latency: ${LAT_N} sequential requests; throughput: ${CONC} concurrent for ${TP_SECS} s`);
console.log('| target | p50 (us) | p99 (us) | added p50 (us) | added p99 (us) | max req/s |');
console.log('|---|---|---|---|---|---|');
for (const name of ['direct', 'bare', 'kvgate']) {
  const m = med[name];
  const ad = name === 'direct' ? { p50: 0, p99: 0 } : a[name];
  console.log(`| ${name === 'bare' ? 'bare proxy' : name === 'kvgate' ? 'kvgate (cache_aware)' : 'worker direct'} | ${m.p50.toFixed(0)} | ${m.p99.toFixed(0)} | ${ad.p50.toFixed(0)} | ${ad.p99.toFixed(0)} | ${m.rps.toFixed(0)} |`);
}
console.log(`\nproxy kvgate_added_p50_us=${a.kvgate.p50.toFixed(0)} bare_added_p50_us=${a.bare.p50.toFixed(0)} added_p50_ratio=${(a.kvgate.p50 / a.bare.p50).toFixed(2)} (target <= 1.25) max_rps_ratio=${(med.kvgate.rps / med.bare.rps).toFixed(2)} (target >= 0.80)`);
