#!/usr/bin/env node
// BlockIndex benchmark (src/cache/block-index.ts): stored-event apply rate, match rate, hashing
// rate and heap bytes per block, for a router-like shape.
//
//   npx tsc -p tsconfig.json && node scripts/bench-index.mjs [--sources 8] [--blocks 100000]
//                                                           [--queries 400] [--seed 12345]
//
// Workload (deterministic, xorshift32): block size 16; 48 shared prefixes ("system prompts,
// documents") of 100-2000 blocks; prompts of 500-5000 blocks = one shared prefix + a unique
// suffix. Each prompt goes to one of the sources (its prefix's home source 70% of the time);
// like an engine, a source emits BlockStored only for blocks it does not hold yet, in events of
// 16 blocks chained by per-source random 64-bit engine hashes. Prompts are generated until the
// tree would hold `--blocks` distinct blocks. Queries: 1/3 replay a stored prompt, 1/3 a shared
// prefix plus a new suffix, 1/3 a shared prefix cut at a random point plus a new suffix.
// The script re-runs itself with --expose-gc to measure heap growth. Last, kv_aware's in-flight
// bookkeeping for 100k-token requests (select + complete), as the event loop pays it.

import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

if (typeof globalThis.gc !== 'function') {
  const r = spawnSync(process.execPath, ['--expose-gc', '--max-old-space-size=4096', fileURLToPath(import.meta.url), ...process.argv.slice(2)], {
    stdio: 'inherit',
  });
  process.exit(r.status ?? 1);
}

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const DIST = join(ROOT, 'dist/cache/block-index.js');
if (!existsSync(DIST)) {
  console.error(`${DIST} is missing: run \`npx tsc -p tsconfig.json\` first`);
  process.exit(1);
}
const { BlockIndex, hashBlocks } = await import(pathToFileURL(DIST).href);

const args = process.argv.slice(2);
function opt(name, def) {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? Number(args[i + 1]) : def;
}
const N_SOURCES = opt('sources', 8);
const TARGET_BLOCKS = opt('blocks', 100_000);
const N_QUERIES = opt('queries', 400);
const SEED = opt('seed', 12345);
const BS = 16;
const EVENT_BLOCKS = 16;
const N_PREFIXES = 48;

let x = SEED >>> 0 || 1;
function r32() {
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  return (x >>>= 0);
}
const rand = (n) => r32() % n;
const between = (lo, hi) => lo + rand(hi - lo + 1);
const engineHash = () => BigInt.asUintN(64, (BigInt(r32()) << 32n) | BigInt(r32()));
function randomTokens(blocks) {
  const t = new Array(blocks * BS);
  for (let i = 0; i < t.length; i++) t[i] = rand(151_000);
  return t;
}

// ----- workload -----------------------------------------------------------------------------
const prefixes = Array.from({ length: N_PREFIXES }, (_, id) => ({
  id,
  tokens: randomTokens(between(100, 2000)),
  home: id % N_SOURCES,
}));
/** Per source: prefix id → engine hashes of its blocks on that source. */
const held = Array.from({ length: N_SOURCES }, () => new Map());
const sourceName = (s) => `http://10.0.0.${s + 1}:8000@0`;
const batches = []; // [sourceName, events[]]
const prompts = [];
let distinct = 0;
let storedBlocks = 0;
let storedEvents = 0;

function emit(s, tokens, fromBlock, parent) {
  const nBlocks = tokens.length / BS - fromBlock;
  const hashes = [];
  const events = [];
  for (let b = 0; b < nBlocks; b += EVENT_BLOCKS) {
    const k = Math.min(EVENT_BLOCKS, nBlocks - b);
    const bh = Array.from({ length: k }, engineHash);
    const start = (fromBlock + b) * BS;
    events.push({
      type: 'stored',
      blockHashes: bh,
      parentBlockHash: parent,
      tokenIds: tokens.slice(start, start + k * BS),
      blockSize: BS,
      medium: 'GPU',
      loraName: null,
    });
    parent = bh[k - 1];
    hashes.push(...bh);
  }
  batches.push([sourceName(s), events]);
  storedEvents += events.length;
  storedBlocks += nBlocks;
  return hashes;
}

const prefixSeen = new Set();
while (distinct < TARGET_BLOCKS) {
  const p = prefixes[rand(N_PREFIXES)];
  const pBlocks = p.tokens.length / BS;
  const total = Math.max(between(500, 5000), pBlocks + 1);
  const suffix = randomTokens(total - pBlocks);
  const s = rand(10) < 7 ? p.home : rand(N_SOURCES);
  let ph = held[s].get(p.id);
  if (ph === undefined) {
    ph = emit(s, p.tokens, 0, null);
    held[s].set(p.id, ph);
    if (!prefixSeen.has(p.id)) distinct += pBlocks;
    prefixSeen.add(p.id);
  }
  const all = p.tokens.concat(suffix);
  emit(s, all, pBlocks, ph[ph.length - 1]);
  distinct += total - pBlocks;
  prompts.push(all);
}

const queries = [];
for (let i = 0; i < N_QUERIES; i++) {
  const kind = i % 3;
  if (kind === 0) queries.push(prompts[rand(prompts.length)]);
  else {
    const p = prefixes[rand(N_PREFIXES)];
    const cut = kind === 1 ? p.tokens.length / BS : between(1, p.tokens.length / BS);
    const total = Math.max(between(500, 5000), cut + 1);
    queries.push(p.tokens.slice(0, cut * BS).concat(randomTokens(total - cut)));
  }
}
const queryBlocks = queries.reduce((a, q) => a + q.length / BS, 0);

// ----- stored events ------------------------------------------------------------------------
const fmt = (n, d = 0) => n.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d });
console.log(`node ${process.version}, ${N_SOURCES} sources, block size ${BS}, ${fmt(storedEvents)} stored events (${EVENT_BLOCKS} blocks each, last of a run shorter), ${fmt(storedBlocks)} stored blocks`);

function build(options) {
  const index = new BlockIndex({ blockSize: BS, mediums: 'gpu-only', ...options });
  const t0 = performance.now();
  for (const [src, events] of batches) index.apply(src, events);
  return { index, ms: performance.now() - t0 };
}

// Heap growth of a build fed with fresh copies of the events (so the engine-hash BigInts the
// index retains are counted, and the copies themselves are garbage by the time we measure).
function measureHeap() {
  gc();
  gc();
  const before = process.memoryUsage().heapUsed;
  const index = new BlockIndex({ blockSize: BS, maxBlocks: 10_000_000 });
  for (const [src, events] of batches) {
    index.apply(
      src,
      events.map((e) => ({ ...e, blockHashes: e.blockHashes.map((h) => (h ^ 1n) ^ 1n), parentBlockHash: e.parentBlockHash === null ? null : (e.parentBlockHash ^ 1n) ^ 1n, tokenIds: e.tokenIds.slice() })),
    );
  }
  gc();
  gc();
  return { index, bytes: process.memoryUsage().heapUsed - before };
}

// Warm-up build (JIT), then the measured build.
build({ maxBlocks: 10_000_000 });
const { index, ms } = build({ maxBlocks: 10_000_000 });
const st = index.stats();
const perSource = [...st.blocksPerSource.values()];
console.log(
  `tree: ${fmt(st.nodes)} nodes, blocks per source ${Math.min(...perSource)}..${Math.max(...perSource)} (sum ${fmt(perSource.reduce((a, b) => a + b, 0))}), ` +
    `unknownParent ${st.unknownParent}, malformed ${st.malformed}`,
);
console.log(
  `apply (hashing included): ${fmt(storedEvents / (ms / 1000))} stored events/s, ${fmt(storedBlocks / (ms / 1000))} blocks/s, ` +
    `${fmt((ms * 1000) / storedEvents, 2)} µs per 16-block event`,
);
const runs = [];
for (let r = 0; r < 3; r++) runs.push(build({ maxBlocks: 10_000_000 }).ms);
runs.sort((a, b) => a - b);
console.log(`apply, 3 more builds: ${runs.map((m) => `${fmt(storedEvents / (m / 1000))}/s`).join(', ')} (median ${fmt((runs[1] * 1000) / storedEvents, 2)} µs/event)`);
{
  const m = measureHeap();
  const refs = perSource.reduce((a, b) => a + b, 0);
  console.log(
    `memory: heap growth ${fmt(m.bytes)} B = ${fmt(m.bytes / st.nodes, 1)} B per block (tree node, with its ${fmt(refs / st.nodes, 2)} engine-hash refs on average); ` +
      `memoryBytes() estimate ${fmt(st.memoryBytes)} B = ${fmt(st.memoryBytes / st.nodes, 1)} B per block`,
  );
}

// ----- pruning --------------------------------------------------------------------------------
{
  const cap = Math.floor(st.nodes * 0.6);
  const b = build({ maxBlocks: cap });
  const s = b.index.stats();
  console.log(
    `with maxBlocks ${fmt(cap)} (prune to 0.8): ${fmt(storedEvents / (b.ms / 1000))} stored events/s, ${fmt(s.pruned)} nodes pruned, final ${fmt(s.nodes)} nodes, ` +
      `${s.unknownParent} unknown parents (runs whose parent was pruned)`,
  );
}

// ----- hashing and matching ---------------------------------------------------------------------
let t0 = performance.now();
const hashed = queries.map((q) => hashBlocks(q, BS));
let t = performance.now() - t0;
t0 = performance.now();
for (const q of queries) hashBlocks(q, BS);
t = Math.min(t, performance.now() - t0);
console.log(
  `hashBlocks: ${fmt((t * 1e6) / queryBlocks, 0)} ns per block (${fmt((t * 1000 * 1000) / queryBlocks, 0)} µs per 1000-block request), ${N_QUERIES} requests of avg ${fmt(queryBlocks / N_QUERIES)} blocks`,
);

let hits = 0;
let matchedBlocks = 0;
for (const h of hashed) {
  const m = index.match(h);
  let best = 0;
  for (const v of m.values()) if (v > best) best = v;
  matchedBlocks += best;
  if (best > 0) hits++;
}
const ROUNDS = 10;
t0 = performance.now();
for (let r = 0; r < ROUNDS; r++) for (const h of hashed) index.match(h);
t = performance.now() - t0;
const nMatch = ROUNDS * N_QUERIES;
console.log(
  `match: ${fmt(nMatch / (t / 1000))} matches/s, ${fmt((t * 1000) / nMatch, 1)} µs per match (avg ${fmt(queryBlocks / N_QUERIES)} blocks asked, ` +
    `avg ${fmt(matchedBlocks / N_QUERIES)} matched by the best source, ${hits}/${N_QUERIES} hit), ${fmt((t * 1e6) / (ROUNDS * matchedBlocks), 1)} ns per matched block`,
);

// A 1000-block request fully held by several sources: the shared prefixes are held by their
// home source and often by others.
{
  const p = prefixes.reduce((a, b) => (b.tokens.length > a.tokens.length ? b : a));
  const h = hashBlocks(p.tokens.slice(0, Math.min(1000, p.tokens.length / BS) * BS), BS);
  const m = index.match(h);
  const n = 20_000;
  t0 = performance.now();
  for (let i = 0; i < n; i++) index.match(h);
  t = performance.now() - t0;
  console.log(
    `match of a ${h.length}-block prefix held by ${m.size} sources: ${fmt((t * 1000) / n, 1)} µs per match (${[...m.values()].join(',')} blocks)`,
  );
}

// kv_aware's in-flight bookkeeping on the event loop (issue #12): routing a 100k-token request
// (6,250 blocks, hashes given as the tokenizer thread hands them over) to one of 2 workers while
// 8 such requests are in flight, and completing the oldest. Times select + complete per request.
{
  const { KvAwarePolicy, defaultKvAwareConfig } = await import(pathToFileURL(join(ROOT, 'dist/policies/kv-aware.js')).href);
  const { Worker } = await import(pathToFileURL(join(ROOT, 'dist/core/worker.js')).href);
  const { ManualClock } = await import(pathToFileURL(join(ROOT, 'dist/core/clock.js')).href);
  const { SeededRng } = await import(pathToFileURL(join(ROOT, 'dist/core/rng.js')).href);
  const { sequenceHashes, LOCAL_HASH_SEED, BlockIndex: Index } = await import(pathToFileURL(DIST).href);
  const ws = [0, 1].map((i) => Object.assign(new Worker({ url: `http://w${i}:8000`, modelId: 'm' }), { healthy: true }));
  const policy = new KvAwarePolicy({ clock: new ManualClock(1000), rng: new SeededRng(1) }, { index: new Index({ blockSize: 16 }), lastEventAtMs: () => undefined, isAccurate: () => true, resetCount: () => 0 }, defaultKvAwareConfig);
  const ctxs = [];
  for (let r = 0; r < 24; r++) {
    const tokens = Uint32Array.from({ length: 100_000 }, (_, i) => (i * 7919 + r * 104729) % 151_000);
    const local = hashBlocks(tokens, 16, LOCAL_HASH_SEED);
    ctxs.push({ requestId: `r${r}`, route: 'chat', model: 'm', routingText: `prompt ${r} `.repeat(100), tokenIds: tokens, blockHashes: { blockSize: 16, seed: LOCAL_HASH_SEED, local, seq: sequenceHashes(local) }, headers: {}, stream: false, arrivalMs: 0 });
  }
  const live = [];
  const times = [];
  for (let i = 0; i < 400; i++) {
    const c = { ...ctxs[i % ctxs.length], requestId: `q${i}` };
    const s = performance.now();
    live.push([policy.selectWorker(ws, c), c]);
    if (live.length > 8) {
      const [w, old] = live.shift();
      policy.onRequestComplete(w, old);
    }
    if (i >= 50) times.push(performance.now() - s);
  }
  times.sort((a, b) => a - b);
  const q = (p) => times[Math.floor(p * (times.length - 1))];
  console.log(`kv_aware select + complete, 100k-token request (6,250 blocks), 8 in flight on 2 workers: p50 ${q(0.5).toFixed(2)} ms, p90 ${q(0.9).toFixed(2)} ms (${times.length} requests)`);
}
