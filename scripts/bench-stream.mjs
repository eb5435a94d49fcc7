// npm run bench:stream — relaying many concurrent SSE streams (issue #12). Fake engines
// (scripts/lib/fake-engine.mjs) emit one ~100-byte chunk every 20 ms (~50 chunks/s) per stream,
// for as long as the run lasts. N = 400, 1,600 and 4,000 concurrent streams, spread over 4 workers
// and all on 1 worker, through: direct (the client spreads the streams over the engine ports
// itself), a bare Node proxy (node:http + undici, no logic, no connection cap, round robin over the
// workers), "before" = kvgate with --max-connections-per-worker 256 (the pool cap of the version
// before this change: every stream past 256 per worker waited inside the router), and kvgate
// (this version: no cap). kvgate routes with round_robin.
// Reported: chunk rate over the measurement window (chunks/s received by the client), its ratio to
// direct, the inter-chunk delay p99 (ms; the engine's period is 20 ms), streams that started, and
// the proxy's event-loop lag p99 and utilisation.
//
// Env: BENCH_STREAM_COUNTS (400,1600,4000), BENCH_STREAM_SECS (8), BENCH_STREAM_RAMP_SECS (3),
// BENCH_TARGETS (direct,bare,before,kvgate), BENCH_MAX_LOAD (1.5); target "prev" = kvgate built
// elsewhere (BENCH_PREV_MAIN = path of another checkout's dist/cli/main.js, e.g. the previous commit), same flags as kvgate.
import { Agent, request } from 'node:http';
import { loadavg } from 'node:os';
import { children, cleanup, forkBare, machine, percentile, requireDist, sleep, startFakeEngines, startKvgate, waitForQuietMachine } from './lib/bench-util.mjs';

requireDist();
const COUNTS = (process.env.BENCH_STREAM_COUNTS ?? '400,1600,4000').split(',').map(Number);
const SECS = Number(process.env.BENCH_STREAM_SECS ?? 8);
const RAMP = Number(process.env.BENCH_STREAM_RAMP_SECS ?? 3);
const TARGETS = (process.env.BENCH_TARGETS ?? 'direct,bare,before,kvgate').split(',');
const agent = new Agent({ keepAlive: false, maxSockets: Infinity });
const body = Buffer.from(JSON.stringify({ stream: true, max_tokens: 1_000_000, model: 'bench-model', messages: [{ role: 'user', content: 'stream please' }] }));

/** Opens n streams over the given URLs (round robin); measures chunks and gaps in the window after the ramp. */
async function run(urls, n) {
  let measuring = false;
  let chunks = 0;
  let started = 0;
  let failed = 0;
  const gaps = [];
  const reqs = [];
  for (let i = 0; i < n; i++) {
    const u = new URL('/v1/chat/completions', urls[i % urls.length]);
    const req = request(u, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': body.length } }, (res) => {
      if (res.statusCode !== 200) failed++;
      else started++;
      let last = 0;
      res.on('data', () => {
        const now = performance.now();
        if (measuring) {
          chunks++;
          if (last > 0) gaps.push(now - last);
        }
        last = now;
      });
      res.on('error', () => undefined);
    });
    req.on('error', () => undefined); // queued requests destroyed at the end
    req.end(body);
    reqs.push(req);
    if (i % 200 === 199) await sleep(20); // open gradually
  }
  await sleep(RAMP * 1000);
  measuring = true;
  const t0 = performance.now();
  await sleep(SECS * 1000);
  measuring = false;
  const secs = (performance.now() - t0) / 1000;
  for (const r of reqs) r.destroy();
  await sleep(1000);
  return { rate: chunks / secs, gapP99: percentile(gaps, 99), started, failed };
}

function prevMain() {
  if (!process.env.BENCH_PREV_MAIN) throw new Error('target "prev" needs BENCH_PREV_MAIN (another build\'s dist/cli/main.js)');
  return process.env.BENCH_PREV_MAIN;
}

const fmt = (x, d = 0) => (Number.isFinite(x) ? x.toFixed(d) : '–');
const rows = [];
try {
  console.log(`machine: ${machine()}`);
  console.log(`load average before the run: ${await waitForQuietMachine()}`);
  const engines = await startFakeEngines(4);
  for (const spread of [4, 1]) {
    const workers = engines.slice(0, spread);
    for (const name of TARGETS) {
      let target;
      if (name === 'direct') target = { urls: workers, stats: async () => ({}) };
      else if (name === 'bare') {
        const b = await forkBare(workers.join(','), 'unlimited');
        target = { urls: [b.url], stats: b.stats };
      } else {
        const extra = ['--policy', 'round_robin', ...(name === 'before' ? ['--max-connections-per-worker', '256'] : [])];
        const k = await startKvgate(workers, extra, name === 'prev' ? prevMain() : undefined);
        target = { urls: [k.url], stats: k.stats };
      }
      for (const n of COUNTS) {
        await target.stats();
        const r = await run(target.urls, n);
        const s = await target.stats();
        const direct = rows.find((x) => x.spread === spread && x.n === n && x.name === 'direct');
        const bare = rows.find((x) => x.spread === spread && x.n === n && x.name === 'bare');
        const row = { spread, name, n, ...r, lag: s.lagP99Ms, elu: s.elu, vsDirect: direct ? r.rate / direct.rate : NaN, vsBare: bare ? r.rate / bare.rate : NaN };
        rows.push(row);
        console.log(`${spread} worker(s) ${name} ${n} streams: ${fmt(r.rate)} chunks/s (${fmt(row.vsDirect, 2)}x direct, ${fmt(row.vsBare, 2)}x bare), gap p99 ${fmt(r.gapP99, 1)} ms, started ${r.started}/${n}, non-200 ${r.failed}, lag p99 ${fmt(s.lagP99Ms, 1)} ms, ELU ${fmt(s.elu, 2)}`);
      }
      if (name !== 'direct') {
        const c = children.pop();
        c.kill('SIGTERM');
        await new Promise((r) => c.once('exit', r));
      }
    }
  }
  console.log(`\nload average after the run: ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  console.log('\n| workers | streams | target | chunks/s | × direct | × bare | gap p99 (ms) | streams started | loop lag p99 (ms) | ELU |');
  console.log('|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) console.log(`| ${r.spread} | ${r.n} | ${r.name} | ${fmt(r.rate)} | ${fmt(r.vsDirect, 2)} | ${fmt(r.vsBare, 2)} | ${fmt(r.gapP99, 1)} | ${r.started} | ${fmt(r.lag, 1)} | ${fmt(r.elu, 2)} |`);
} finally {
  await cleanup();
}
