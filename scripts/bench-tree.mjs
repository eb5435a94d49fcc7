#!/usr/bin/env node
// Char-tree benchmark, exactly as in shared/reference/tree-benchmark.md.
//
//   npm run bench:tree                      L = 100, 1000, 10000; 3 fresh processes each
//   node scripts/bench-tree.mjs --runs 1 --lengths 100,1000
//
// The parent builds dist/ if the compiled tree is missing or older than its source, then runs
// every (L, run) in a fresh child process (--expose-gc for the memory figures, 8 GiB heap). Per
// run it prints the child's lines indented under a "run i/n" label, then for each L the median
// over the runs as a bare `tree L=...` line (the reference's format and keys, for mechanical
// comparison), a `mem L=...` line with heap- and RSS-based figures, and the ratio to Rust.
// `bytes_per_unique_char` follows the reference's definition: RSS growth over the inserts
// divided by the distinct characters stored in the tree.

import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const SRC = join(ROOT, 'src/cache/char-tree.ts');
const DIST = join(ROOT, 'dist/cache/char-tree.js');

const N_INSERTS = 20_000;
const N_QUERIES = 20_000;
const N_PREFIXES = 20;
const N_TENANTS = 8;
const SEED = 2463534242;
const ALPHABET = 'abcdefghijklmnopqrstuvwxyz ';

/** Rust reference (median of 3 processes): insert/s, match/s, bytes per unique char, evict ms. */
const RUST = {
  100: { insert: 358_154, match: 731_202, bytes: 36.2, evict: 129.5 },
  1000: { insert: 268_662, match: 417_171, bytes: 4.41, evict: 135.8 },
  10000: { insert: 59_070, match: 86_334, bytes: 1.34, evict: 165.6 },
};

/** Input checksums and samples from the reference, to prove the generator is the same. */
const EXPECTED = {
  100: {
    texts: 'fb2e89c1',
    queries: 'a5511663',
    text0: 'ywnquxnie tlfpukvzsalvgurgmvhngfdloshvvp',
    query0: 'gutwbx loxveibxxphtxsnziqygggqllbrwefufy',
    query1: 'gutwbx loxveibxxphtxsnziqygggqllbrwefufy',
  },
  1000: {
    texts: 'b72448b8',
    queries: '9264acf9',
    text0: 'oxnrldxkfjycjdreomukhenugsqdlljgmgkbdqa ',
    query0: 'z flgljalcvhmddppjjtexov yjdfnocfbbqkhcf',
    query1: 'klnkaejovyhtubnchkhkhgtrbmxeqmhwabjeftkg',
  },
  10000: {
    texts: '66ee49b1',
    queries: 'b47f1fdc',
    text0: 'ce kkyrrozcsknvbd crtlkjcjivllmsohyqpauf',
    query0: 'z pybtpvsbyrroscvjdgypppokpjzdqmjdjoxwdg',
    query1: 'jtxvbnmaellmvnkkdhnrikwqmwbiuoicjoat  zy',
  },
};
const FIRST_OUTPUTS = [723471715, 2497366906, 2064144800, 2008045182, 3532304609];

// ---------------------------------------------------------------------------------------------
// Input generation (child side)

function xorshift32(seed) {
  let x = seed >>> 0;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

function fnv1a(h, bytes, n) {
  for (let i = 0; i < n; i++) h = Math.imul(h ^ bytes[i], 16777619);
  return h >>> 0;
}

/**
 * Builds prefixes, texts and queries for one L. Strings are assembled in a byte buffer and
 * decoded once, so each is a flat one-byte V8 string (no ropes); checksums are taken from the
 * same bytes.
 */
function generateInputs(L) {
  const next = xorshift32(SEED);
  const codes = Uint8Array.from(ALPHABET, (c) => c.charCodeAt(0));
  const P = Math.floor(L / 2);
  const S = L - P;
  const E = Math.floor(L / 10);
  const buf = Buffer.allocUnsafe(L + E);
  const randInto = (off, n) => {
    for (let i = 0; i < n; i++) buf[off + i] = codes[next() % 27];
  };

  const prefixBytes = [];
  const prefixes = [];
  for (let p = 0; p < N_PREFIXES; p++) {
    randInto(0, P);
    prefixBytes.push(Buffer.from(buf.subarray(0, P)));
    prefixes.push(buf.toString('latin1', 0, P));
  }
  const texts = new Array(N_INSERTS);
  let fnvTexts = 0x811c9dc5;
  for (let i = 0; i < N_INSERTS; i++) {
    const p = next() % N_PREFIXES;
    prefixBytes[p].copy(buf, 0);
    randInto(P, S);
    fnvTexts = fnv1a(fnvTexts, buf, L);
    texts[i] = buf.toString('latin1', 0, L);
  }
  const queries = new Array(N_QUERIES);
  let fnvQueries = 0x811c9dc5;
  for (let j = 0; j < N_QUERIES; j++) {
    let n;
    if (j % 2 === 0) {
      const k = next() % N_INSERTS;
      buf.write(texts[k], 0, 'latin1');
      randInto(L, E);
      n = L + E;
    } else {
      const p = next() % N_PREFIXES;
      prefixBytes[p].copy(buf, 0);
      randInto(P, S);
      n = L;
    }
    fnvQueries = fnv1a(fnvQueries, buf, n);
    queries[j] = buf.toString('latin1', 0, n);
  }
  return { texts, queries, fnvTexts, fnvQueries };
}

function verifyInputs(L, inputs) {
  const next = xorshift32(SEED);
  const first = FIRST_OUTPUTS.map(() => next());
  const exp = EXPECTED[L];
  const hex = (h) => h.toString(16).padStart(8, '0');
  const problems = [];
  if (first.join() !== FIRST_OUTPUTS.join()) problems.push(`PRNG outputs ${first.join()}`);
  if (hex(inputs.fnvTexts) !== exp.texts) problems.push(`FNV(texts)=${hex(inputs.fnvTexts)} want ${exp.texts}`);
  if (hex(inputs.fnvQueries) !== exp.queries) problems.push(`FNV(queries)=${hex(inputs.fnvQueries)} want ${exp.queries}`);
  if (inputs.texts[0].slice(0, 40) !== exp.text0) problems.push('texts[0] sample');
  if (inputs.queries[0].slice(0, 40) !== exp.query0) problems.push('queries[0] sample');
  if (inputs.queries[1].slice(0, 40) !== exp.query1) problems.push('queries[1] sample');
  if (problems.length > 0) throw new Error(`L=${L}: inputs differ from the reference: ${problems.join('; ')}`);
}

// ---------------------------------------------------------------------------------------------
// One measurement (child process)

function settle() {
  globalThis.gc();
  globalThis.gc();
  return process.memoryUsage();
}

async function runChild(L) {
  if (typeof globalThis.gc !== 'function') throw new Error('child needs --expose-gc');
  const { CharTree } = await import(pathToFileURL(DIST).href);
  const inputs = generateInputs(L);
  verifyInputs(L, inputs);
  const { texts, queries } = inputs;
  const names = Array.from({ length: N_TENANTS }, (_, t) => `tenant-${t}`);
  const tree = new CharTree();

  const before = settle();
  let t0 = performance.now();
  for (let i = 0; i < N_INSERTS; i++) tree.insert(texts[i], names[i % N_TENANTS]);
  const insertMs = performance.now() - t0;
  const after = settle();
  const unique = tree.storedChars;
  const nodes = tree.nodeCount;
  const heapPerChar = (after.heapUsed - before.heapUsed) / unique;
  const rssPerChar = (after.rss - before.rss) / unique;
  const estimatePerChar = tree.memoryBytes() / unique;
  const tenantChars = names.map((n) => tree.tenantCharCount(n));

  let matchedAll = 0;
  let matchedEven = 0;
  t0 = performance.now();
  for (let j = 0; j < N_QUERIES; j++) {
    const m = tree.prefixMatch(queries[j]).matchedChars;
    matchedAll += m;
    if (j % 2 === 0) matchedEven += m;
  }
  const matchMs = performance.now() - t0;

  const max = Math.floor(Math.min(...tenantChars) / 2);
  t0 = performance.now();
  tree.evictTenantBySize(max);
  const evictMs = performance.now() - t0;
  const afterEvict = names.map((n) => tree.tenantCharCount(n));

  console.log(
    `tree L=${L} insert_per_s=${Math.round((N_INSERTS * 1000) / insertMs)}` +
      ` match_per_s=${Math.round((N_QUERIES * 1000) / matchMs)}` +
      ` bytes_per_unique_char=${rssPerChar.toFixed(2)} evict_ms=${evictMs.toFixed(1)}` +
      ` tenant_chars=${tenantChars.join(',')} matched_chars_all=${matchedAll}` +
      ` matched_chars_even=${matchedEven} tenant_chars_after_evict=${afterEvict.join(',')}`,
  );
  console.log(
    `mem L=${L} unique_chars=${unique} nodes=${nodes}` +
      ` heap_bytes_per_unique_char=${heapPerChar.toFixed(2)} rss_bytes_per_unique_char=${rssPerChar.toFixed(2)}` +
      ` estimate_bytes_per_unique_char=${estimatePerChar.toFixed(2)}`,
  );
}

// ---------------------------------------------------------------------------------------------
// Driver (parent process)

function buildIfNeeded() {
  if (existsSync(DIST) && statSync(DIST).mtimeMs >= statSync(SRC).mtimeMs) return;
  console.log('# building dist/ (tsc -p tsconfig.json)');
  try {
    execFileSync('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: ROOT, stdio: 'inherit' });
  } catch {
    // tsc still emits when other files have type errors; only a missing/stale tree is fatal.
    if (!existsSync(DIST) || statSync(DIST).mtimeMs < statSync(SRC).mtimeMs) {
      throw new Error('build failed: dist/cache/char-tree.js is missing or stale');
    }
  }
}

/** Parses `key=value` pairs of a result line. */
function fields(line) {
  return Object.fromEntries(line.split(' ').slice(1).map((kv) => kv.split('=')));
}

function median(values) {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/** Median of each numeric key over the runs; count keys must agree (the tree is deterministic). */
function medianLine(kind, lines, keys, decimals) {
  const runs = lines.map(fields);
  const out = { ...runs[0] };
  for (const key of Object.keys(out)) {
    if (keys.includes(key)) {
      const m = median(runs.map((r) => Number(r[key])));
      out[key] = decimals[key] === undefined ? String(Math.round(m)) : m.toFixed(decimals[key]);
    } else if (runs.some((r) => r[key] !== out[key])) {
      console.log(`# WARNING: ${kind} ${key} differs between runs: ${runs.map((r) => r[key]).join(' | ')}`);
    }
  }
  return `${kind} ${Object.entries(out).map(([k, v]) => `${k}=${v}`).join(' ')}`;
}

function runParent(argv) {
  let runs = 3;
  let lengths = [100, 1000, 10000];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--runs') runs = Number(argv[++i]);
    else if (argv[i] === '--lengths') lengths = argv[++i].split(',').map(Number);
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  for (const L of lengths) if (!(L in RUST)) throw new Error(`L=${L} is not in the reference`);
  buildIfNeeded();

  const script = fileURLToPath(import.meta.url);
  const medians = [];
  for (const L of lengths) {
    const treeLines = [];
    const memLines = [];
    for (let r = 1; r <= runs; r++) {
      const child = spawnSync(
        process.execPath,
        ['--expose-gc', '--max-old-space-size=8192', script, '--child', String(L)],
        { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] },
      );
      if (child.status !== 0) throw new Error(`L=${L} run ${r} failed (exit ${child.status ?? child.signal})`);
      const lines = child.stdout.trim().split('\n');
      treeLines.push(lines.find((l) => l.startsWith('tree ')));
      memLines.push(lines.find((l) => l.startsWith('mem ')));
      console.log(`# L=${L} run ${r}/${runs} (fresh process)`);
      for (const l of lines) console.log(`  ${l}`);
    }
    const treeLine = medianLine('tree', treeLines, ['insert_per_s', 'match_per_s', 'bytes_per_unique_char', 'evict_ms'], {
      bytes_per_unique_char: 2,
      evict_ms: 1,
    });
    const memLine = medianLine(
      'mem',
      memLines,
      ['heap_bytes_per_unique_char', 'rss_bytes_per_unique_char', 'estimate_bytes_per_unique_char'],
      { heap_bytes_per_unique_char: 2, rss_bytes_per_unique_char: 2, estimate_bytes_per_unique_char: 2 },
    );
    medians.push({ L, treeLine, memLine });
  }

  console.log(`\n# medians of ${runs} fresh process(es) per L, and ratio to the Rust reference`);
  for (const { L, treeLine, memLine } of medians) {
    const f = fields(treeLine);
    const rust = RUST[L];
    console.log(treeLine);
    console.log(memLine);
    console.log(
      `# L=${L} vs Rust: insert ${(f.insert_per_s / rust.insert).toFixed(2)}x, match ${(f.match_per_s / rust.match).toFixed(2)}x,` +
        ` bytes/char ${f.bytes_per_unique_char} vs ${rust.bytes}, evict ${f.evict_ms} ms vs ${rust.evict} ms`,
    );
  }
}

const argv = process.argv.slice(2);
if (argv[0] === '--child') await runChild(Number(argv[1]));
else runParent(argv);
