import { readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { Tokenizer as CoreTokenizer } from '@huggingface/tokenizers';
import { errors } from '../core/errors.js';
import { conversationOf, cutAfterFinalMessage, detectContentFormat } from './chat.js';
import { LruCache } from './lru.js';
import { WordCache, type WordIds } from './word-cache.js';
import { EncodeCancelled, type ChatContentFormat, type ChatMessage, type ChatRenderOptions, type EncodeOptions, type Tokenizer } from './tokenizer.js';

/**
 * A Hugging Face tokenizer: tokenizer.json run by @huggingface/tokenizers, and the chat template
 * of tokenizer_config.json (or chat_template.jinja) run by @huggingface/jinja, applied to messages
 * the way vLLM's chat endpoint does (message normalization, content format, tools, special-token
 * variables, `add_generation_prompt`, `continue_final_message`).
 *
 * Encoding is cached per segment: the tokenizer cuts text at its added tokens (`<|im_start|>`,
 * `<|eot_id|>`...) before anything else and encodes the pieces independently, so a rendered chat
 * is a sequence of pieces that mostly repeat across a conversation's turns (one per message for
 * ChatML/Llama-style templates). Pieces are looked up in an LRU cache and only new ones are
 * encoded. This is exact, not an approximation: it is enabled only for tokenizers where the
 * pieces' encodings do not depend on their position (no lstrip/rstrip on added tokens, no
 * Metaspace `prepend_scheme: "first"`), and checked against a full encode when loading.
 */

type Json = Record<string, unknown>;
type TokenValue = string | { content?: string } | null | undefined;

function tokenText(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  return undefined;
}

const SPECIAL_TOKEN_KEYS = ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token'];

interface NamedTemplate {
  readonly source: string;
  readonly template: Template;
  readonly format: ChatContentFormat;
}

interface TrieNode {
  next: Map<number, TrieNode>;
  end?: string;
}

export interface HfTokenizerOptions {
  /** A label (default: the tokenizer.json path). */
  name?: string;
  /** A Jinja chat template to use instead of the tokenizer's (vLLM's `--chat-template`). */
  chatTemplate?: string;
  /** Segment cache bounds (defaults 16,384 segments, 8M characters); 0 entries disables it. */
  segmentCacheEntries?: number;
  segmentCacheChars?: number;
  /** Word cache bound (default 65,536 pre-tokens); 0 disables it. See `wordCaching`. */
  wordCacheEntries?: number;
}

/** The parts of @huggingface/tokenizers' Tokenizer the word cache calls (its own objects, not re-implementations). */
interface CoreParts {
  normalizer: ((text: string) => string) | null;
  pre_tokenizer: { tokenizers?: PreTokenizerPart[] } | null;
  model: ((tokens: string[]) => string[]) & { fuse_unk?: boolean; tokens_to_ids: Map<string, number>; unk_token_id?: number; constructor: { name: string } };
  added_tokens_map: Map<string, { id: number }>;
  splitter_normalized: { trie: Record<string, unknown> };
  remove_space?: unknown;
  do_lowercase_and_remove_accent?: unknown;
}
interface PreTokenizerPart {
  pre_tokenize_text(text: string, options?: unknown): string[];
}

export class HfTokenizer implements Tokenizer {
  readonly name: string;
  readonly vocabSize: number;
  readonly hasChatTemplate: boolean;
  /** Whether encoding goes through the segment cache (see the class comment). */
  readonly segmentCaching: boolean;
  /** Whether `addSpecialTokens: true` adds anything (e.g. a BOS) for this tokenizer. */
  readonly addsSpecialTokens: boolean;
  /**
   * Whether a segment may be cut into pieces encoded independently (on several threads) with the
   * same ids: see `cutPieces`. Only for the pre-tokenizers where that is provable.
   */
  readonly pieceSplitting: boolean;
  /**
   * Whether a segment is encoded pre-token by pre-token through the word cache: the library's
   * normalizer and Split pre-tokenizer cut the text, each pre-token's ids come from the cache,
   * and only new pre-tokens go through the library's byte-level mapping and BPE model. Exact
   * because byte-level BPE encodes every pre-token independently of its neighbours; enabled only
   * for the tokenizers `pieceSplitting` recognises (Qwen2/Qwen3, Llama-3: NFC or no normalizer,
   * [Split, ByteLevel] pre-tokenizer, BPE without dropout or fuse_unk, no normalized added
   * tokens) and checked against full encodes when loading.
   */
  readonly wordCaching: boolean;
  private readonly core: CoreTokenizer;
  private readonly words: WordCache | undefined;
  private wordParts: { normalizer: ((text: string) => string) | null; split: PreTokenizerPart; bytes: PreTokenizerPart; model: CoreParts['model']; addedIds: Map<string, { id: number }>; unkId: number | undefined } | undefined;
  private readonly templates = new Map<string, NamedTemplate>();
  private readonly templateVars: Json = {};
  private readonly decodeCache = new Map<number, string>();
  private readonly splitRoot: TrieNode = { next: new Map() };
  private readonly splitIds = new Map<string, number>();
  private readonly segments: LruCache<string, Uint32Array>;

  /**
   * @param tokenizerJson the parsed tokenizer.json
   * @param config the parsed tokenizer_config.json ({} when absent)
   */
  constructor(tokenizerJson: Json, config: Json, opts: HfTokenizerOptions = {}) {
    this.name = opts.name ?? 'hf';
    this.core = new CoreTokenizer(tokenizerJson, config);
    this.vocabSize = this.core.get_vocab(true).size;

    // Template variables transformers passes besides messages: its special_tokens_map.
    for (const key of SPECIAL_TOKEN_KEYS) {
      const t = tokenText(config[key] as TokenValue);
      if (t !== undefined) this.templateVars[key] = t;
    }
    const extra = config['additional_special_tokens'];
    if (Array.isArray(extra) && extra.length > 0) this.templateVars['additional_special_tokens'] = extra.map(tokenText).filter((t) => t !== undefined);

    const chat = opts.chatTemplate ?? config['chat_template'];
    if (typeof chat === 'string') this.addTemplate('default', chat);
    else if (Array.isArray(chat)) {
      for (const t of chat as { name?: unknown; template?: unknown }[]) {
        if (t && typeof t.name === 'string' && typeof t.template === 'string') this.addTemplate(t.name, t.template);
      }
    }
    this.hasChatTemplate = this.templates.size > 0;

    this.addsSpecialTokens = !sameIds(this.core.encode('a b', { add_special_tokens: true }).ids, this.core.encode('a b', { add_special_tokens: false }).ids);
    this.segments = new LruCache(opts.segmentCacheEntries ?? 16_384, opts.segmentCacheChars ?? 8_000_000);
    this.segmentCaching = this.segments.maxEntries > 0 && this.setUpSegments(tokenizerJson);
    const cutSafe = this.segmentCaching && hasCutSafePreTokenizer(tokenizerJson);
    const wordEntries = opts.wordCacheEntries ?? 65_536;
    this.words = cutSafe && wordEntries >= 2 ? new WordCache(wordEntries) : undefined;
    this.wordCaching = this.words !== undefined && this.setUpWords();
    if (!this.wordCaching) this.wordParts = undefined;
    this.pieceSplitting = cutSafe && this.checkPieces();
  }

  /**
   * Load from a tokenizer.json path, or a directory holding tokenizer.json. The directory's
   * tokenizer_config.json (special tokens, `chat_template`) and chat_template.jinja (which
   * takes precedence, as in transformers) are read when present.
   */
  static async load(path: string, opts: HfTokenizerOptions = {}): Promise<HfTokenizer> {
    return HfTokenizer.loadSync(path, opts);
  }

  /** `load`, synchronously (the main thread's deferred tokenizers: registry.ts `DeferredTokenizer`). */
  static loadSync(path: string, opts: HfTokenizerOptions = {}): HfTokenizer {
    let isDir: boolean;
    try {
      isDir = statSync(path).isDirectory();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new Error(`Tokenizer not found: ${path} (expected a tokenizer.json file or a directory holding one)`);
      }
      throw err;
    }
    const jsonPath = isDir ? join(path, 'tokenizer.json') : path;
    const dir = isDir ? path : dirname(path);
    const tokenizerJson = readJson(jsonPath, isDir ? `No tokenizer.json in directory ${path}` : undefined);
    if (tokenizerJson === undefined) throw new Error(`Tokenizer not found: ${jsonPath}`);
    if (!isObject(tokenizerJson) || !isObject(tokenizerJson['model']) || typeof tokenizerJson['model']['type'] !== 'string') {
      throw new Error(`Invalid tokenizer file ${jsonPath}: not a Hugging Face tokenizer.json (no "model" with a "type")`);
    }
    const configPath = join(dir, 'tokenizer_config.json');
    const config = readJson(configPath) ?? {};
    if (!isObject(config)) throw new Error(`Invalid ${configPath}: expected a JSON object`);
    let chatTemplate = opts.chatTemplate;
    if (chatTemplate === undefined) {
      try {
        chatTemplate = readFileSync(join(dir, 'chat_template.jinja'), 'utf8');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      }
    }
    try {
      return new HfTokenizer(tokenizerJson, config, { ...opts, name: opts.name ?? jsonPath, chatTemplate });
    } catch (err) {
      throw new Error(`Invalid tokenizer ${jsonPath}: ${(err as Error).message}`);
    }
  }

  encode(text: string, opts?: EncodeOptions): number[] {
    const add = opts?.addSpecialTokens ?? true;
    if (this.segmentCaching && !(add && this.addsSpecialTokens)) return Array.from(this.encodeSegments(text));
    return this.core.encode(text, { add_special_tokens: add }).ids;
  }

  encodeIds(text: string, opts?: EncodeOptions): Uint32Array {
    const add = opts?.addSpecialTokens ?? true;
    if (this.segmentCaching && !(add && this.addsSpecialTokens)) return this.encodeSegments(text, opts?.shouldStop);
    if (opts?.shouldStop?.()) throw new EncodeCancelled();
    return Uint32Array.from(this.core.encode(text, { add_special_tokens: add }).ids);
  }

  decode(ids: ArrayLike<number>, opts?: { skipSpecialTokens?: boolean }): string {
    if (ids.length === 0) return '';
    return this.core.decode(Array.from(ids), { skip_special_tokens: opts?.skipSpecialTokens ?? false });
  }

  decodeToken(id: number): string {
    const cached = this.decodeCache.get(id);
    if (cached !== undefined) return cached;
    const s = this.core.decode([id], { skip_special_tokens: true });
    this.decodeCache.set(id, s);
    return s;
  }

  /** Token id of a vocabulary entry (e.g. `<|im_start|>`), if any. */
  tokenToId(token: string): number | undefined {
    return this.core.token_to_id(token);
  }

  chatContentFormat(opts?: ChatRenderOptions): ChatContentFormat {
    return this.templateFor(opts)?.format ?? 'string';
  }

  /**
   * Render with the chat template, as vLLM does: messages normalized (chat.ts) to the template's
   * content format; variables `messages`, `tools`, `documents`, `add_generation_prompt` (default
   * true unless `continueFinalMessage`), the special tokens of tokenizer_config.json
   * (`bos_token`, `eos_token`...), then `kwargs` (chat_template_kwargs). A tokenizer without a
   * template renders `role: content` lines (for the simulator only: no engine does that).
   * Template errors (`raise_exception(...)`) become 400 errors.
   */
  renderChat(messages: readonly ChatMessage[], opts: ChatRenderOptions = {}): string {
    const named = this.templateFor(opts);
    if (named === undefined) {
      let s = '';
      for (const m of conversationOf(messages, 'string')) s += `${m.role}: ${m.content as string}\n`;
      return opts.addGenerationPrompt === false || opts.continueFinalMessage ? s : s + 'assistant: ';
    }
    const conversation = conversationOf(messages, named.format);
    const addGenerationPrompt = opts.addGenerationPrompt ?? !opts.continueFinalMessage;
    if (addGenerationPrompt && opts.continueFinalMessage) {
      throw errors.badRequest('Cannot set both `continue_final_message` and `add_generation_prompt` to True.', 'invalid_value', 'continue_final_message');
    }
    let text: string;
    try {
      text = named.template.render({
        ...this.templateVars,
        add_generation_prompt: addGenerationPrompt,
        tools: opts.tools ?? null,
        documents: opts.documents ?? null,
        ...opts.kwargs,
        messages: conversation,
      });
    } catch (err) {
      throw errors.badRequest(`Chat template error: ${(err as Error).message}`, 'chat_template_error', 'messages');
    }
    return opts.continueFinalMessage ? cutAfterFinalMessage(text, conversation) : text;
  }

  encodeChat(messages: readonly ChatMessage[], opts?: ChatRenderOptions): number[] {
    return this.encode(this.renderChat(messages, opts), { addSpecialTokens: false });
  }

  /** Segment cache counters. */
  segmentCacheStats(): { hits: number; misses: number; entries: number; chars: number } {
    return { hits: this.segments.hits, misses: this.segments.misses, entries: this.segments.size, chars: this.segments.weight };
  }

  clearSegmentCache(): void {
    this.segments.clear();
  }

  /**
   * The segments of `text` (cut at added tokens) for an encode done in parts: an added token's
   * id, the cached ids of a segment seen before, or a segment (string) still to encode — with
   * `encodePiece` on each of its `cutPieces`, then `rememberSegment`. Concatenated in order,
   * that is `encodeIds(text, { addSpecialTokens: false })`. Needs `segmentCaching`.
   */
  planSegments(text: string): (number | Uint32Array | string)[] {
    const out: (number | Uint32Array | string)[] = [];
    for (const s of this.split(text)) {
      const id = this.splitIds.get(s);
      if (id !== undefined) out.push(id);
      else out.push(this.segments.get(s) ?? s);
    }
    return out;
  }

  /**
   * `segment` cut into pieces of about `pieceChars` characters whose encodings, concatenated,
   * are the segment's. A cut is placed only (1) after a "\n" followed by a letter, or (2) after a
   * letter followed by a space and a letter. The Qwen2/Qwen3/Llama-3 pre-tokenizer regex (checked
   * when loading, with NFC or no normalizer and a byte-level BPE model) never matches across
   * either point: no alternative contains a line break and then a letter, nor a letter and then
   * a space; it has no look-behind, so a match starting at the cut is the same without the text
   * before it; and the text before the cut is matched the same without the text after it — a
   * letter run stops at the space anyway, and a blank run ending in "\n" is taken by
   * `\s*[\r\n]+` before the look-ahead alternative `\s+(?!\S)` is tried. So the pre-tokens,
   * hence the BPE output, are unchanged. NFC never composes across "\n" or a space. One piece
   * when the tokenizer is not such or the segment has no such point (checked on samples when
   * loading, and against whole encodes in test/unit/tokenize-pool.test.ts).
   */
  cutPieces(segment: string, pieceChars: number): string[] {
    return this.pieceSplitting ? cutAtSafePoints(segment, pieceChars) : [segment];
  }

  /** Ids of one piece (or segment) without added special tokens (through the word cache when `wordCaching`). */
  encodePiece(piece: string): Uint32Array {
    return this.wordCaching ? this.encodeWords(piece) : Uint32Array.from(this.core.encode(piece, { add_special_tokens: false }).ids);
  }

  /** Word cache counters (zeros when `wordCaching` is off). */
  wordCacheStats(): { hits: number; misses: number; entries: number } {
    const w = this.wordCaching ? this.words : undefined;
    return { hits: w?.hits ?? 0, misses: w?.misses ?? 0, entries: w?.size ?? 0 };
  }

  clearWordCache(): void {
    this.words?.clear();
  }

  /** Puts a segment encoded in parts into the segment cache. */
  rememberSegment(segment: string, ids: Uint32Array): void {
    this.segments.set((' ' + segment).slice(1), ids, segment.length);
  }

  // -------------------------------------------------------------------------------------------

  /** Checks on samples that cut pieces reproduce the whole encoding. */
  private checkPieces(): boolean {
    const samples = [
      'Hello world.\nThe next line\n\nAfter a blank line\n  indented\nx = 1;\n\tTabbed\nÉcole 日本語\n🙂 emoji\nfin',
      "it's\nwe'll see\n 'quoted'\nA.\r\nB\n123\nword \nword  two spaces ée X's 'twas Ünïcödé 한국어 텍스트 𝐀𝐁 𝐂 end",
    ];
    for (const s of samples) {
      const whole = this.encodePiece(s);
      const parts = cutAtSafePoints(s, 1).map((p) => this.encodePiece(p));
      if (parts.length < 2 || !sameIds(whole, concatIds(parts))) return false;
    }
    return true;
  }

  private addTemplate(name: string, source: string): void {
    let template: Template;
    try {
      template = new Template(source);
    } catch (err) {
      throw new Error(`chat template '${name}' does not parse: ${(err as Error).message}`);
    }
    this.templates.set(name, { source, template, format: detectContentFormat(template) });
  }

  /** transformers' choice among named templates: "tool_use" when tools are given and it exists, else "default". */
  private templateFor(opts?: ChatRenderOptions): NamedTemplate | undefined {
    if (this.templates.size === 0) return undefined;
    if (opts?.tools !== undefined && opts.tools !== null) {
      const t = this.templates.get('tool_use');
      if (t) return t;
    }
    const t = this.templates.get('default');
    if (t) return t;
    throw errors.badRequest(
      `The tokenizer has several chat templates (${[...this.templates.keys()].join(', ')}) and none is named "default"`,
      'chat_template_error',
      'messages',
    );
  }

  /** Decide whether segment caching is exact for this tokenizer, and build the added-token splitter. */
  private setUpSegments(tokenizerJson: Json): boolean {
    const hasNormalizer = tokenizerJson['normalizer'] !== null && tokenizerJson['normalizer'] !== undefined;
    const added = Array.isArray(tokenizerJson['added_tokens']) ? (tokenizerJson['added_tokens'] as Json[]) : [];
    for (const t of added) {
      const content = t['content'];
      const id = t['id'];
      if (typeof content !== 'string' || content.length === 0 || typeof id !== 'number') continue;
      const special = t['special'] === true;
      const normalized = typeof t['normalized'] === 'boolean' ? t['normalized'] : !special;
      if (normalized && hasNormalizer) continue; // split after normalization, inside a segment
      if (t['lstrip'] === true || t['rstrip'] === true) return false; // would strip neighbouring segments
      let node = this.splitRoot;
      for (let i = 0; i < content.length; i++) {
        const c = content.charCodeAt(i);
        let child = node.next.get(c);
        if (child === undefined) node.next.set(c, (child = { next: new Map() }));
        node = child;
      }
      node.end = content;
      this.splitIds.set(content, this.core.token_to_id(content) ?? id);
    }
    if (this.splitIds.size === 0) return false; // nothing to split on: a segment is the whole text
    if (containsPositionalPreTokenizer(tokenizerJson['pre_tokenizer'])) return false;
    // Check on a sample that contains added tokens that segments reproduce the full encoding.
    const tokens = [...this.splitIds.keys()].slice(0, 3);
    const a = tokens[0]!;
    const b = tokens[1] ?? a;
    const c = tokens[2] ?? b;
    const samples = [
      `${a}system\nYou are a helpful assistant.${b}\n${a}user\nHello,  world! ${c} é 日本 🙂\n\n${b}\n${a}assistant\n`,
      ` leading space${a}${a} x ${b}trailing  `,
      `${a}`,
      `no added tokens at all`,
    ];
    for (const s of samples) {
      if (!sameIds(Array.from(this.encodeSegmentsUncached(s)), this.core.encode(s, { add_special_tokens: false }).ids)) return false;
    }
    return true;
  }

  /** Greedy leftmost-longest split at added tokens, exactly as @huggingface/tokenizers' DictionarySplitter. */
  private split(text: string): string[] {
    const out: string[] = [];
    const n = text.length;
    const root = this.splitRoot.next;
    // Most tokenizers' added tokens all start with one character ("<"): jump between its
    // occurrences (indexOf) instead of looking up every character of a long prompt.
    const only = root.size === 1 ? String.fromCharCode(root.keys().next().value!) : undefined;
    let start = 0;
    let i = 0;
    while (i < n) {
      if (only !== undefined) {
        i = text.indexOf(only, i);
        if (i < 0) break;
      }
      let node = root.get(text.charCodeAt(i));
      if (node === undefined) {
        i++;
        continue;
      }
      let match: string | undefined = node.end;
      for (let j = i + 1; j < n; j++) {
        node = node.next.get(text.charCodeAt(j));
        if (node === undefined) break;
        if (node.end !== undefined) match = node.end;
      }
      if (match === undefined) {
        i++;
        continue;
      }
      if (i > start) out.push(text.slice(start, i));
      out.push(match);
      i += match.length;
      start = i;
    }
    if (start < n) out.push(text.slice(start));
    return out;
  }

  private encodeSegmentsUncached(text: string): Uint32Array {
    const ids: number[] = [];
    for (const s of this.split(text)) {
      const id = this.splitIds.get(s);
      if (id !== undefined) ids.push(id);
      else for (const x of this.core.encode(s, { add_special_tokens: false }).ids) ids.push(x);
    }
    return Uint32Array.from(ids);
  }

  /**
   * Takes the library's own normalizer, Split pre-tokenizer, ByteLevel pre-tokenizer and BPE
   * model, if it is built the way `hasCutSafePreTokenizer` saw in tokenizer.json, and checks
   * `encodeWords` against the library's full encode on samples (twice: cold and cached).
   */
  private setUpWords(): boolean {
    const core = this.core as unknown as CoreParts;
    const parts = core.pre_tokenizer?.tokenizers;
    if (!Array.isArray(parts) || parts.length !== 2) return false;
    const [split, bytes] = parts as [PreTokenizerPart, PreTokenizerPart];
    if (typeof split?.pre_tokenize_text !== 'function' || typeof bytes?.pre_tokenize_text !== 'function') return false;
    const model = core.model;
    if (typeof model !== 'function' || model.fuse_unk === true || !(model.tokens_to_ids instanceof Map)) return false;
    // Added tokens matched after normalization would be cut inside a segment: not handled here.
    if (Object.keys(core.splitter_normalized?.trie ?? {}).length > 0) return false;
    if (core.remove_space === true || core.do_lowercase_and_remove_accent === true) return false;
    this.wordParts = { normalizer: core.normalizer, split, bytes, model, addedIds: core.added_tokens_map, unkId: model.unk_token_id };
    const samples = [
      'Hello world.\nThe next line\n\nAfter a blank line\n  indented\nx = 1;\n\tTabbed\nÉcole 日本語\n🙂 emoji\nfin',
      "it's\nwe'll see\n 'quoted'\nA.\r\nB\n123456\nword \nword  two spaces ée X's 'twas Ünïcödé 한국어 텍스트 𝐀𝐁 𝐂 end   ",
      'Cafe\u0301 e\u0301 \u212b \ufb01 👨‍👩‍👧 \u00a0nbsp\u2003em  \t\n\n\n   x',
    ];
    for (let round = 0; round < 2; round++) {
      for (const s of samples) {
        if (!sameIds(this.encodeWords(s), this.core.encode(s, { add_special_tokens: false }).ids)) return false;
      }
    }
    this.words!.clear();
    this.words!.hits = 0;
    this.words!.misses = 0;
    return true;
  }

  /**
   * Ids of a segment (no added tokens in it) as the library computes them — normalize, split into
   * pre-tokens, then byte-level map and BPE each — with each pre-token's ids taken from the word
   * cache when seen before.
   */
  private encodeWords(text: string): Uint32Array {
    const w = this.wordParts!;
    const cache = this.words!;
    const normalized = w.normalizer === null ? text : w.normalizer(text);
    if (normalized.length === 0) return new Uint32Array(0);
    const words = w.split.pre_tokenize_text(normalized);
    let out = new Uint32Array(Math.max(16, words.length + (words.length >> 2)));
    let n = 0;
    for (let i = 0; i < words.length; i++) {
      const word = words[i]!;
      let ids = cache.get(word);
      if (ids === undefined) {
        ids = this.bpeWord(word);
        // Copy the key: a slice of `text` would keep the whole text alive while cached.
        if (word.length <= 256) cache.set(word.length >= 13 ? (' ' + word).slice(1) : word, ids);
      }
      const k = typeof ids === 'number' ? 1 : ids.length;
      if (n + k > out.length) {
        const grown = new Uint32Array(Math.max(out.length * 2, n + k));
        grown.set(out.subarray(0, n));
        out = grown;
      }
      if (typeof ids === 'number') out[n++] = ids;
      else {
        out.set(ids, n);
        n += k;
      }
    }
    return out.length === n ? out : out.slice(0, n);
  }

  /** One pre-token through the library's ByteLevel pre-tokenizer and BPE model; ids as its `encode` maps tokens. */
  private bpeWord(word: string): WordIds {
    const w = this.wordParts!;
    const tokens = w.model(w.bytes.pre_tokenize_text(word));
    const ids = new Uint32Array(tokens.length);
    for (let i = 0; i < tokens.length; i++) {
      const t = tokens[i]!;
      ids[i] = w.addedIds.get(t)?.id ?? w.model.tokens_to_ids.get(t) ?? w.unkId ?? 0;
    }
    return ids.length === 1 ? ids[0]! : ids;
  }

  private encodeSegments(text: string, shouldStop?: () => boolean): Uint32Array {
    const parts = this.split(text);
    const pieces: (Uint32Array | number)[] = [];
    let total = 0;
    for (const s of parts) {
      const id = this.splitIds.get(s);
      if (id !== undefined) {
        pieces.push(id);
        total++;
        continue;
      }
      let ids = this.segments.get(s);
      if (ids === undefined) {
        if (shouldStop?.()) throw new EncodeCancelled();
        ids = this.encodePiece(s);
        // Copy the key: a slice of `text` would keep the whole text alive while cached.
        this.segments.set((' ' + s).slice(1), ids, s.length);
      }
      pieces.push(ids);
      total += ids.length;
    }
    const out = new Uint32Array(total);
    let at = 0;
    for (const p of pieces) {
      if (typeof p === 'number') out[at++] = p;
      else {
        out.set(p, at);
        at += p.length;
      }
    }
    return out;
  }
}

/**
 * `segment` cut into pieces of `pieceChars` characters or a little more, each cut after a "\n"
 * followed by a letter or between a letter and a space followed by a letter (see cutPieces).
 */
export function cutAtSafePoints(segment: string, pieceChars: number): string[] {
  if (segment.length <= pieceChars) return [segment];
  const out: string[] = [];
  const re = /\n(?=\p{L})|\p{L}(?= \p{L})/gu;
  let start = 0;
  while (segment.length - start > pieceChars) {
    re.lastIndex = start + pieceChars;
    const m = re.exec(segment);
    if (m === null) break;
    const cut = m.index + m[0].length;
    out.push(segment.slice(start, cut));
    start = cut;
  }
  out.push(segment.slice(start));
  return out;
}

function concatIds(parts: readonly Uint32Array[]): Uint32Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint32Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Pre-tokenizer split regexes under which no pre-token spans "\n"|letter or letter|" "+letter (Qwen2/3, Llama 3). */
const NEWLINE_SAFE_PATTERNS: ReadonlySet<string> = new Set([
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
]);

/**
 * Whether the tokenizer is a byte-level BPE whose pre-tokenizer is exactly [Split(one of
 * NEWLINE_SAFE_PATTERNS, Isolated), ByteLevel without its own regex], with NFC or no normalizer.
 */
function hasCutSafePreTokenizer(json: Json): boolean {
  const model = json['model'];
  if (!isObject(model) || model['type'] !== 'BPE' || (model['dropout'] !== null && model['dropout'] !== undefined)) return false;
  const norm = json['normalizer'];
  if (norm !== null && norm !== undefined && !(isObject(norm) && norm['type'] === 'NFC')) return false;
  const pre = json['pre_tokenizer'];
  if (!isObject(pre) || pre['type'] !== 'Sequence' || !Array.isArray(pre['pretokenizers']) || pre['pretokenizers'].length !== 2) return false;
  const [split, bytes] = pre['pretokenizers'] as unknown[];
  if (!isObject(split) || split['type'] !== 'Split' || split['behavior'] !== 'Isolated' || split['invert'] === true) return false;
  const pattern = split['pattern'];
  if (!isObject(pattern) || typeof pattern['Regex'] !== 'string' || !NEWLINE_SAFE_PATTERNS.has(pattern['Regex'])) return false;
  return isObject(bytes) && bytes['type'] === 'ByteLevel' && bytes['use_regex'] === false && bytes['add_prefix_space'] === false;
}

function isObject(v: unknown): v is Json {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function sameIds(a: ArrayLike<number>, b: ArrayLike<number>): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** A Metaspace pre-tokenizer with prepend_scheme "first" treats the first segment differently. */
function containsPositionalPreTokenizer(node: unknown): boolean {
  if (Array.isArray(node)) return node.some(containsPositionalPreTokenizer);
  if (!isObject(node)) return false;
  if (node['type'] === 'Metaspace' && node['prepend_scheme'] === 'first') return true;
  return Object.values(node).some((v) => v !== null && typeof v === 'object' && containsPositionalPreTokenizer(v));
}

/** Parsed JSON of a file; undefined when it does not exist (or `missing` is thrown as the message). */
function readJson(path: string, missing?: string): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      if (missing !== undefined) throw new Error(missing);
      return undefined;
    }
    throw err;
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new Error(`Invalid ${path}: not valid JSON (${(err as Error).message})`);
  }
}
