import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import { WorkerRegistry } from '../../src/core/registry.js';
import { Worker } from '../../src/core/worker.js';
import {
  EngineMetricsScraper,
  engineLoadsFromSamples,
  loadForWorker,
  parsePrometheusText,
  parsePromValue,
} from '../../src/metrics/engine-scraper.js';
import { startSimServer, type SimServer } from '../../src/sim/server.js';

// --- Hand-written samples ------------------------------------------------------------------------

/** vLLM V1, data parallel 2 behind one API server (series keyed by engine="<rank>"). */
const VLLM_DP2 = `# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.125
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.5
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.2345e+06
vllm:prefix_cache_queries_total{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 987654.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 42.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.75
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 42.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",num_gpu_blocks="27251",prefix_caching_hash_algo="sha256"} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="1",running_lora_adapters="",waiting_lora_adapters=""} 1.7342e+09
`;

/** An older vLLM (V0 names): only the deprecated gpu_cache_usage_perc, no engine label. */
const VLLM_OLD = `# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="mistral"} 4
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="mistral"} 1
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="mistral"} 0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="mistral"} 0.8
`;

/** SGLang --dp-size 2 (dp_rank label) with tp 2: each rank's scheduler metrics once per tp_rank. */
const SGLANG_DP2 = `# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 4.0
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="1"} 4.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="2"} 6.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="3"} 6.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 0.0
sglang:num_queue_reqs{dp_rank="1",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="2"} 3.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 0.31
sglang:token_usage{dp_rank="1",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="2"} 0.62
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{dp_rank="0",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 812.4
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{dp_rank="0",engine_type="unified",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="0"} NaN
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_bucket{dp_rank="0",engine_type="unified",le="+Inf",model_name="Qwen/Qwen3-8B",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 17.0
`;

/** SGLang without data parallelism: no dp_rank label. */
const SGLANG_SINGLE = `# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 5.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 2.0
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",pp_rank="0",tp_rank="0"} 0.28
`;

describe('Prometheus text parser', () => {
  it('parses names, labels, values; skips comments and blank lines', () => {
    const samples = parsePrometheusText(VLLM_DP2);
    expect(samples).toHaveLength(14);
    expect(samples[0]).toEqual({
      name: 'vllm:num_requests_running',
      labels: { engine: '0', model_name: 'meta-llama/Llama-3.1-8B-Instruct' },
      value: 3,
    });
    const queries = samples.find((s) => s.name === 'vllm:prefix_cache_queries_total' && s.labels.engine === '0')!;
    expect(queries.value).toBe(1_234_500);
    const inf = samples.find((s) => s.labels.le === '+Inf')!;
    expect(inf.value).toBe(42);
    expect(samples.find((s) => s.name === 'vllm:lora_requests_info')!.labels.running_lora_adapters).toBe('');
  });

  it('handles escaped label values, NaN/±Inf, timestamps, exemplars, CRLF, odd spacing, quoted names', () => {
    const text = [
      'a{path="C:\\\\dir\\\\f",msg="say \\"hi\\"\\nbye",brace="}{,="} 1 1700000000000',
      'b NaN',
      'c{} +Inf',
      'd -Inf',
      'e{x="1",} 2.5e-3',
      'f { x = "y" } 7',
      'g{le="0.5"} 3 # {trace_id="abc"} 0.4 1.7e9',
      '{"my.dotted.metric", a="b"} 9',
      '# EOF',
      '',
    ].join('\r\n');
    const s = parsePrometheusText(text);
    expect(s.map((x) => x.name)).toEqual(['a', 'b', 'c', 'd', 'e', 'f', 'g', 'my.dotted.metric']);
    expect(s[0].labels).toEqual({ path: 'C:\\dir\\f', msg: 'say "hi"\nbye', brace: '}{,=' });
    expect(s[0].timestampMs).toBe(1_700_000_000_000);
    expect(s[1].value).toBeNaN();
    expect(s[2].value).toBe(Infinity);
    expect(s[3].value).toBe(-Infinity);
    expect(s[4]).toMatchObject({ labels: { x: '1' }, value: 0.0025 });
    expect(s[5]).toMatchObject({ labels: { x: 'y' }, value: 7 });
    expect(s[6]).toMatchObject({ labels: { le: '0.5' }, value: 3 });
    expect(s[7]).toMatchObject({ labels: { a: 'b' }, value: 9 });
  });

  it('skips malformed lines without failing the rest', () => {
    const bad: string[] = [];
    const s = parsePrometheusText(
      ['ok 1', '9bad 1', 'x{a="unterminated} 1', 'y{a=1} 2', 'z', 'w abc', 'v 1 2 3', 'u{a="b"}1', 'fine{a="b"} 2'].join('\n'),
      (line) => bad.push(line),
    );
    expect(s.map((x) => x.name)).toEqual(['ok', 'fine']);
    expect(bad).toHaveLength(7);
  });

  it('parses values as Prometheus writes them', () => {
    expect(parsePromValue('1')).toBe(1);
    expect(parsePromValue('-0.5')).toBe(-0.5);
    expect(parsePromValue('1.5E+06')).toBe(1_500_000);
    expect(parsePromValue('.5')).toBe(0.5);
    expect(parsePromValue('+Inf')).toBe(Infinity);
    expect(parsePromValue('inf')).toBe(Infinity);
    expect(parsePromValue('NaN')).toBeNaN();
    expect(parsePromValue('')).toBeUndefined();
    expect(parsePromValue('0x10')).toBeUndefined();
    expect(parsePromValue('1,5')).toBeUndefined();
  });
});

describe('engine load extraction', () => {
  it('vLLM DP: per engine rank; a worker without a rank gets sums (kv usage averaged)', () => {
    const snap = engineLoadsFromSamples(parsePrometheusText(VLLM_DP2));
    expect(snap.unranked).toBeUndefined();
    expect(loadForWorker(snap, 0)).toEqual({ running: 3, waiting: 0, kvUsage: 0.125 });
    expect(loadForWorker(snap, 1)).toEqual({ running: 7, waiting: 2, kvUsage: 0.5 });
    expect(loadForWorker(snap, 2)).toBeUndefined();
    expect(loadForWorker(snap, undefined)).toEqual({ running: 10, waiting: 2, kvUsage: 0.3125 });
  });

  it('old vLLM: falls back to gpu_cache_usage_perc; no rank label → every worker gets the engine totals', () => {
    const snap = engineLoadsFromSamples(parsePrometheusText(VLLM_OLD));
    expect(loadForWorker(snap, undefined)).toEqual({ running: 4, waiting: 1, kvUsage: 0.8 });
    expect(loadForWorker(snap, 0)).toEqual({ running: 4, waiting: 1, kvUsage: 0.8 });
  });

  it('prefers kv_cache_usage_perc over the deprecated name when both are present', () => {
    const snap = engineLoadsFromSamples(
      parsePrometheusText('vllm:gpu_cache_usage_perc{engine="0"} 0.9\nvllm:kv_cache_usage_perc{engine="0"} 0.4\nvllm:num_requests_running{engine="0"} 1\n'),
    );
    expect(loadForWorker(snap, 0)).toEqual({ running: 1, waiting: 0, kvUsage: 0.4 });
  });

  it('SGLang DP: per dp_rank, tp_rank duplicates folded (not added), NaN ignored', () => {
    const snap = engineLoadsFromSamples(parsePrometheusText(SGLANG_DP2));
    expect(loadForWorker(snap, 0)).toEqual({ running: 4, waiting: 0, kvUsage: 0.31 });
    expect(loadForWorker(snap, 1)).toEqual({ running: 6, waiting: 3, kvUsage: 0.62 });
    const all = loadForWorker(snap, undefined)!;
    expect(all.running).toBe(10);
    expect(all.waiting).toBe(3);
    expect(all.kvUsage).toBeCloseTo(0.465, 12);
  });

  it('SGLang without DP: one unranked load', () => {
    const snap = engineLoadsFromSamples(parsePrometheusText(SGLANG_SINGLE));
    expect(snap.ranks.size).toBe(0);
    expect(loadForWorker(snap, undefined)).toEqual({ running: 5, waiting: 2, kvUsage: 0.28 });
  });

  it('no load metrics at all → nothing', () => {
    const snap = engineLoadsFromSamples(parsePrometheusText('process_cpu_seconds_total 12.5\n'));
    expect(snap.ranks.size).toBe(0);
    expect(snap.unranked).toBeUndefined();
    expect(loadForWorker(snap, undefined)).toBeUndefined();
  });
});

// --- Against live HTTP servers -------------------------------------------------------------------

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function textServer(body: () => string, status = 200): Promise<string> {
  const server: Server = createServer((_req, res) => {
    res.writeHead(status, { 'content-type': 'text/plain; version=0.0.4' });
    res.end(body());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  cleanups.push(() => new Promise<void>((r) => server.close(() => r())));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

async function waitFor(cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const t0 = performance.now();
  while (!cond()) {
    if (performance.now() - t0 > timeoutMs) throw new Error('timed out waiting for condition');
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('EngineMetricsScraper against kvgate sim (vLLM names, DP 2)', () => {
  it('reports waiting/running on the rank the requests were pinned to, and only there', async () => {
    const sim: SimServer = await startSimServer({ host: '127.0.0.1', port: 0, speed: 20, dataParallelSize: 2, maxNumSeqs: 1, seed: 7 });
    cleanups.push(() => sim.close());
    const registry = new WorkerRegistry();
    const r0 = registry.add(new Worker({ url: sim.url, dpRank: 0, modelId: sim.model }));
    const r1 = registry.add(new Worker({ url: sim.url, dpRank: 1, modelId: sim.model }));
    const clock = new ManualClock(1234);
    const scraper = new EngineMetricsScraper(registry, { intervalMs: 1000, timeoutMs: 2000, clock });
    cleanups.push(() => scraper.stop());

    expect(await scraper.scrapeOnce()).toEqual({ urls: 1, failed: 0, updated: 2 });
    expect(r0.engineLoad).toEqual({ running: 0, waiting: 0, kvUsage: 0, updatedAtMs: 1234 });
    expect(r1.engineLoad).toEqual({ running: 0, waiting: 0, kvUsage: 0, updatedAtMs: 1234 });

    // Three long requests pinned to rank 1; max_num_seqs 1 → one runs, two wait.
    const abort = new AbortController();
    cleanups.push(() => abort.abort()); // cleanups run in reverse: before sim.close()
    const pending = Array.from({ length: 3 }, (_, i) =>
      fetch(`${sim.url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-data-parallel-rank': '1' },
        body: JSON.stringify({ model: sim.model, prompt: `request ${i}: ${'lorem ipsum '.repeat(50)}`, max_tokens: 4000 }),
        signal: abort.signal,
      }).catch(() => undefined),
    );
    const rank1 = sim.engines[1].engine;
    await waitFor(() => rank1.stats().running === 1 && rank1.stats().waiting === 2);

    clock.set(5000);
    const round = await scraper.scrapeOnce();
    expect(round).toEqual({ urls: 1, failed: 0, updated: 2 });
    expect(r1.engineLoad).toMatchObject({ running: 1, waiting: 2, updatedAtMs: 5000 });
    expect(r1.engineLoad!.kvUsage).toBeGreaterThan(0);
    expect(r0.engineLoad).toEqual({ running: 0, waiting: 0, kvUsage: 0, updatedAtMs: 5000 });

    // A worker registered for the whole URL (no rank) sees the sum over ranks.
    const whole = registry.add(new Worker({ url: sim.url, modelId: sim.model }));
    await scraper.scrapeOnce();
    expect(whole.engineLoad).toMatchObject({ running: 1, waiting: 2 });
    expect(whole.engineLoad!.kvUsage).toBeCloseTo(r1.engineLoad!.kvUsage / 2, 9);
    expect(scraper.scrapes).toBe(3);
    expect(scraper.failures).toBe(0);

    abort.abort();
    await Promise.all(pending);
  });
});

describe('EngineMetricsScraper against hand-made servers', () => {
  it('reads SGLang metrics per dp_rank', async () => {
    const url = await textServer(() => SGLANG_DP2);
    const registry = new WorkerRegistry();
    const a = registry.add(new Worker({ url, dpRank: 0, modelId: 'm' }));
    const b = registry.add(new Worker({ url, dpRank: 1, modelId: 'm' }));
    const scraper = new EngineMetricsScraper(registry, { clock: new ManualClock(7) });
    cleanups.push(() => scraper.stop());
    await scraper.scrapeOnce();
    expect(a.engineLoad).toEqual({ running: 4, waiting: 0, kvUsage: 0.31, updatedAtMs: 7 });
    expect(b.engineLoad).toEqual({ running: 6, waiting: 3, kvUsage: 0.62, updatedAtMs: 7 });
  });

  it('counts failures (refused, non-200, no load metrics) and leaves engineLoad untouched', async () => {
    const gone = createServer();
    await new Promise<void>((r) => gone.listen(0, '127.0.0.1', r));
    const goneUrl = `http://127.0.0.1:${(gone.address() as AddressInfo).port}`;
    await new Promise<void>((r) => gone.close(() => r()));
    const notFound = await textServer(() => 'nope', 404);
    const notEngine = await textServer(() => 'process_cpu_seconds_total 1\n');

    const registry = new WorkerRegistry();
    const ws = [goneUrl, notFound, notEngine].map((url) => registry.add(new Worker({ url, modelId: 'm' })));
    const before = { running: 9, waiting: 9, kvUsage: 0.9, updatedAtMs: 1 };
    ws[1].engineLoad = { ...before };
    const scraper = new EngineMetricsScraper(registry, { timeoutMs: 2000, clock: new ManualClock(100) });
    cleanups.push(() => scraper.stop());
    expect(await scraper.scrapeOnce()).toEqual({ urls: 3, failed: 3, updated: 0 });
    expect(scraper.scrapes).toBe(3);
    expect(scraper.failures).toBe(3);
    expect(ws[0].engineLoad).toBeUndefined();
    expect(ws[1].engineLoad).toEqual(before);
    expect(scraper.lastErrors.get(notFound)).toMatch(/404/);
    expect(scraper.lastErrors.get(notEngine)).toMatch(/no vLLM or SGLang load metrics/);
  });

  it('times out a hanging /metrics', async () => {
    const server = createServer(() => {
      /* never answers */
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    cleanups.push(() => {
      server.closeAllConnections();
      return new Promise<void>((r) => server.close(() => r()));
    });
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const registry = new WorkerRegistry();
    registry.add(new Worker({ url, modelId: 'm' }));
    const scraper = new EngineMetricsScraper(registry, { timeoutMs: 100 });
    cleanups.push(() => scraper.stop());
    const t0 = performance.now();
    expect(await scraper.scrapeOnce()).toMatchObject({ failed: 1 });
    expect(performance.now() - t0).toBeLessThan(2000);
    expect(scraper.lastErrors.get(url)).toMatch(/timed out after 100 ms/);
  });

  it('start() polls on an unref’d timer until stop(); the next round picks up changes', async () => {
    let running = 1;
    const url = await textServer(() => `vllm:num_requests_running{engine="0"} ${running}\nvllm:num_requests_waiting{engine="0"} 0\nvllm:kv_cache_usage_perc{engine="0"} 0.1\n`);
    const registry = new WorkerRegistry();
    const w = registry.add(new Worker({ url, dpRank: 0, modelId: 'm' }));
    const scraper = new EngineMetricsScraper(registry, { intervalMs: 20 });
    cleanups.push(() => scraper.stop());
    scraper.start();
    scraper.start(); // idempotent
    expect(scraper.running).toBe(true);
    expect((scraper as unknown as { timer: NodeJS.Timeout }).timer.hasRef()).toBe(false);
    await waitFor(() => w.engineLoad?.running === 1);
    running = 4;
    await waitFor(() => w.engineLoad?.running === 4);
    await waitFor(() => scraper.rounds >= 3);
    await scraper.stop();
    expect(scraper.running).toBe(false);
    const rounds = scraper.rounds;
    await new Promise((r) => setTimeout(r, 100));
    expect(scraper.rounds).toBe(rounds);
    // Still usable by hand after stop().
    running = 2;
    await scraper.scrapeOnce();
    expect(w.engineLoad?.running).toBe(2);
  });
});
