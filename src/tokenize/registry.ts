import type { RouteName } from '../core/context.js';
import { errors } from '../core/errors.js';
import { hasMediaContent, toolsOf } from './chat.js';
import { ChunkTokenizer } from './chunk.js';
import { HfTokenizer, type HfTokenizerOptions } from './hf.js';
import { LruCache } from './lru.js';
import type { ChatContentFormat, ChatMessage, ChatRenderOptions, EncodeOptions, Tokenizer } from './tokenizer.js';

type Json = Record<string, unknown>;

/** The tokenizer for `--tokenizer PATH` (a tokenizer.json or its directory), or the default chunk tokenizer; `deferred`: a DeferredTokenizer, loaded at its first use. */
export async function loadTokenizer(path?: string, opts?: HfTokenizerOptions, deferred = false): Promise<Tokenizer> {
  if (!path) return new ChunkTokenizer();
  return deferred ? new DeferredTokenizer(path, opts) : HfTokenizer.load(path, opts);
}

// ---------------------------------------------------------------------------------------------
// Whole-prompt cache
// ---------------------------------------------------------------------------------------------

export interface TokenCacheOptions {
  /** Prompts kept per tokenizer and mode (default 256). */
  maxEntries?: number;
  /** Tokens (or characters / 4, if more) kept per tokenizer and mode (default 1,000,000: 4 MB of ids plus ~4 MB of text). */
  maxTokens?: number;
}

/**
 * LRU of encoded prompts keyed by their full text (per tokenizer, and per add-special-tokens
 * mode), for repeated identical prompts. Hits return a copy. Hugging Face tokenizers also cache
 * the pieces between special tokens themselves (hf.ts), which covers shared chat prefixes; this
 * cache mainly helps tokenizers without that (e.g. Metaspace-based ones) and long plain prompts.
 */
export class TokenCache {
  private readonly caches = new WeakMap<Tokenizer, [LruCache<string, Uint32Array>, LruCache<string, Uint32Array>]>();
  private counters = { hits: 0, misses: 0 };
  readonly maxEntries: number;
  readonly maxTokens: number;

  constructor(opts: TokenCacheOptions = {}) {
    this.maxEntries = opts.maxEntries ?? 256;
    this.maxTokens = opts.maxTokens ?? 1_000_000;
  }

  encode(tokenizer: Tokenizer, text: string, addSpecialTokens: boolean, shouldStop?: () => boolean): Uint32Array {
    const hit = this.lookup(tokenizer, text, addSpecialTokens);
    if (hit !== undefined) return hit;
    const ids = tokenizer.encodeIds(text, { addSpecialTokens, shouldStop });
    this.store(tokenizer, text, addSpecialTokens, ids);
    return ids;
  }

  /** A copy of the cached ids of `text` (counted as a hit), or undefined (counted as a miss). */
  lookup(tokenizer: Tokenizer, text: string, addSpecialTokens: boolean): Uint32Array | undefined {
    const hit = this.lru(tokenizer, addSpecialTokens).get(text);
    if (hit !== undefined) {
      this.counters.hits++;
      return hit.slice();
    }
    this.counters.misses++;
    return undefined;
  }

  /** Keeps a copy of `ids` as the encoding of `text`. */
  store(tokenizer: Tokenizer, text: string, addSpecialTokens: boolean, ids: Uint32Array): void {
    // Weighed by tokens, or by characters / 4 if more, so that the keys are bounded too.
    this.lru(tokenizer, addSpecialTokens).set(text, ids.slice(), Math.max(1, ids.length, text.length >> 2));
  }

  private lru(tokenizer: Tokenizer, addSpecialTokens: boolean): LruCache<string, Uint32Array> {
    let pair = this.caches.get(tokenizer);
    if (pair === undefined) {
      pair = [new LruCache(this.maxEntries, this.maxTokens), new LruCache(this.maxEntries, this.maxTokens)];
      this.caches.set(tokenizer, pair);
    }
    return pair[addSpecialTokens ? 1 : 0];
  }

  stats(): { hits: number; misses: number } {
    return { ...this.counters };
  }
}

// ---------------------------------------------------------------------------------------------
// Request tokenization
// ---------------------------------------------------------------------------------------------

function optBool(body: Json, key: string, fallback: boolean): boolean {
  const v = body[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'boolean') throw errors.badRequest(`'${key}' must be a boolean`, 'invalid_type', key);
  return v;
}

function idsOf(v: readonly unknown[], field: string): Uint32Array {
  const out = new Uint32Array(v.length);
  for (let i = 0; i < v.length; i++) {
    const t = v[i];
    if (typeof t !== 'number' || !Number.isInteger(t) || t < 0 || t > 0xffffffff) {
      throw errors.badRequest(`'${field}' must contain non-negative integer token ids`, 'invalid_value', field);
    }
    out[i] = t;
  }
  return out;
}

/** What a request asks the engine to run: text to encode (and how), or token ids given as such. */
export type RequestPrompt = { text: string; addSpecialTokens: boolean; ids?: undefined } | { ids: Uint32Array; text?: undefined };

function encodeText(tokenizer: Tokenizer, text: string, addSpecialTokens: boolean, cache: TokenCache | undefined, shouldStop?: () => boolean): Uint32Array {
  return cache ? cache.encode(tokenizer, text, addSpecialTokens, shouldStop) : tokenizer.encodeIds(text, { addSpecialTokens, shouldStop });
}

/**
 * A prompt given as text, token ids, or a batch of either. A batch is routed by its first prompt
 * (all of a batch goes to one worker; the first prompt's blocks are the ones to look up).
 */
function promptOf(value: unknown, field: string, addSpecialTokens: boolean): RequestPrompt {
  if (typeof value === 'string') return { text: value, addSpecialTokens };
  if (Array.isArray(value)) {
    if (value.length === 0) throw errors.badRequest(`'${field}' must not be empty`, 'invalid_value', field);
    const first: unknown = value[0];
    if (typeof first === 'number') return { ids: idsOf(value, field) };
    if (typeof first === 'string') return { text: first, addSpecialTokens };
    if (Array.isArray(first)) {
      if (first.length === 0) throw errors.badRequest(`'${field}[0]' must not be empty`, 'invalid_value', field);
      return { ids: idsOf(first, field) };
    }
  }
  throw errors.badRequest(`'${field}' must be a string, an array of strings or an array of token ids`, 'invalid_type', field);
}

function chatPrompt(body: Json, tokenizer: Tokenizer, addGenerationPromptDefault: boolean): RequestPrompt | undefined {
  const messages = body['messages'];
  if (!Array.isArray(messages)) throw errors.badRequest("'messages' must be an array of messages", 'invalid_type', 'messages');
  if (messages.length === 0) throw errors.badRequest("'messages' must not be empty", 'invalid_value', 'messages');
  // Not reproducible here: a per-request template, media the engine expands, or no template at all.
  if (body['chat_template'] !== undefined && body['chat_template'] !== null) return undefined;
  if (!tokenizer.hasChatTemplate || hasMediaContent(messages)) return undefined;
  const continueFinalMessage = optBool(body, 'continue_final_message', false);
  const addGenerationPrompt = optBool(body, 'add_generation_prompt', addGenerationPromptDefault);
  if (continueFinalMessage && addGenerationPrompt) {
    throw errors.badRequest('Cannot set both `continue_final_message` and `add_generation_prompt` to True.', 'invalid_value', 'continue_final_message');
  }
  const documents = body['documents'];
  if (documents !== undefined && documents !== null && !Array.isArray(documents)) {
    throw errors.badRequest("'documents' must be an array", 'invalid_type', 'documents');
  }
  const kwargs = body['chat_template_kwargs'];
  if (kwargs !== undefined && kwargs !== null && (typeof kwargs !== 'object' || Array.isArray(kwargs))) {
    throw errors.badRequest("'chat_template_kwargs' must be an object", 'invalid_type', 'chat_template_kwargs');
  }
  const text = tokenizer.renderChat(messages as ChatMessage[], {
    addGenerationPrompt,
    continueFinalMessage,
    tools: toolsOf(body['tools']),
    documents: (documents as unknown[] | null | undefined) ?? null,
    kwargs: (kwargs as Json | null | undefined) ?? undefined,
  });
  // vLLM: the template already holds the special tokens, so none are added (add_special_tokens=false).
  return { text, addSpecialTokens: optBool(body, 'add_special_tokens', false) };
}

/**
 * The token ids the engine will see for a request, computed as vLLM (OpenAI routes) and SGLang
 * (/generate) do:
 * - chat: the chat template rendered with the generation prompt (request fields
 *   `add_generation_prompt`, `continue_final_message`, `tools`, `documents`,
 *   `chat_template_kwargs` honoured), encoded without adding special tokens
 *   (`add_special_tokens`, default false);
 * - completions: `prompt` text encoded with the tokenizer's special tokens (`add_special_tokens`,
 *   default true), or token ids passed through; a batch by its first prompt;
 * - embeddings: `input` like a completion prompt, or `messages` like a chat without generation prompt;
 * - generate: `input_ids` passed through, or `text` (or `prompt`) encoded with special tokens.
 *
 * Returns undefined when the request can't be reproduced (a chat with image/audio/video parts or
 * its own `chat_template`, or a tokenizer without a chat template): the router then routes by
 * text. Throws a 400 GatewayError for malformed fields. Token ids come back as a fresh array.
 * `shouldStop` is polled between the pieces of a long encode (EncodeCancelled when it says so).
 */
export function tokenizeRequest(route: RouteName, body: Json, tokenizer: Tokenizer, cache?: TokenCache, shouldStop?: () => boolean): Uint32Array | undefined {
  const p = requestPrompt(route, body, tokenizer);
  if (p === undefined) return undefined;
  return p.ids ?? encodeText(tokenizer, p.text, p.addSpecialTokens, cache, shouldStop);
}

/**
 * The first half of `tokenizeRequest`: the prompt text (chat template rendered) and how to encode
 * it, or the token ids the request gives; undefined when not reproducible. Throws the same 400s.
 */
export function requestPrompt(route: RouteName, body: Json, tokenizer: Tokenizer): RequestPrompt | undefined {
  switch (route) {
    case 'chat':
      return chatPrompt(body, tokenizer, true);
    case 'completions':
      if (body['prompt'] === undefined || body['prompt'] === null) throw errors.badRequest("'prompt' is required", 'missing_field', 'prompt');
      return promptOf(body['prompt'], 'prompt', optBool(body, 'add_special_tokens', true));
    case 'embeddings':
      if (body['messages'] !== undefined && body['messages'] !== null) return chatPrompt(body, tokenizer, false);
      if (body['input'] === undefined || body['input'] === null) throw errors.badRequest("'input' is required", 'missing_field', 'input');
      return promptOf(body['input'], 'input', optBool(body, 'add_special_tokens', true));
    case 'generate': {
      if (body['input_ids'] !== undefined && body['input_ids'] !== null) return promptOf(body['input_ids'], 'input_ids', true);
      for (const field of ['text', 'prompt']) {
        const v = body[field];
        if (v !== undefined && v !== null) return promptOf(v, field, true);
      }
      throw errors.badRequest("'/generate' needs 'text' or 'input_ids'", 'missing_field', 'text');
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

export interface TokenizerRegistryOptions {
  /** Tokenizer for models without their own (default: the chunk tokenizer, as the simulator's). */
  default?: Tokenizer;
  /** Whole-prompt cache options, or false for none. */
  cache?: TokenCacheOptions | false;
}

/** The tokenizer of each served model, with a default for the others. */
export class TokenizerRegistry {
  default: Tokenizer;
  readonly cache: TokenCache | undefined;
  private readonly byModel = new Map<string, Tokenizer>();
  private readonly loading = new Map<string, Promise<Tokenizer>>();

  constructor(opts: TokenizerRegistryOptions = {}) {
    this.default = opts.default ?? new ChunkTokenizer();
    this.cache = opts.cache === false ? undefined : new TokenCache(opts.cache);
  }

  set(model: string, tokenizer: Tokenizer): this {
    this.byModel.set(model, tokenizer);
    return this;
  }

  /** The model's tokenizer, or the default. */
  get(model?: string): Tokenizer {
    return (model !== undefined ? this.byModel.get(model) : undefined) ?? this.default;
  }

  has(model: string): boolean {
    return this.byModel.has(model);
  }

  delete(model: string): boolean {
    return this.byModel.delete(model);
  }

  get models(): string[] {
    return [...this.byModel.keys()];
  }

  /**
   * Load a Hugging Face tokenizer for a model; models given the same path share one instance (and
   * its caches). `deferred`: a DeferredTokenizer, loaded at its first use.
   */
  async load(model: string, path: string, opts?: HfTokenizerOptions, deferred = false): Promise<Tokenizer> {
    let p = this.loading.get(path);
    if (p === undefined) {
      p = loadTokenizer(path, opts, deferred);
      this.loading.set(path, p);
      p.catch(() => this.loading.delete(path));
    }
    const tokenizer = await p;
    this.set(model, tokenizer);
    return tokenizer;
  }

  /** `requestPrompt` with the tokenizer of `model` (default: the body's `model`), and that tokenizer. */
  prompt(route: RouteName, body: Json, model?: string): { tokenizer: Tokenizer; prompt: RequestPrompt | undefined } {
    const m = model ?? (typeof body['model'] === 'string' ? body['model'] : undefined);
    const tokenizer = this.get(m);
    return { tokenizer, prompt: requestPrompt(route, body, tokenizer) };
  }

  /** `tokenizeRequest` with the tokenizer of `model` (default: the body's `model`) and this registry's cache. */
  tokenize(route: RouteName, body: Json, model?: string, shouldStop?: () => boolean): Uint32Array | undefined {
    const m = model ?? (typeof body['model'] === 'string' ? body['model'] : undefined);
    return tokenizeRequest(route, body, this.get(m), this.cache, shouldStop);
  }
}

/**
 * A Hugging Face tokenizer loaded at its first use (synchronously), not before. The main thread
 * holds these when every request's tokens come from the tokenizer threads (--inline-tokenize-chars
 * 0 with the short lane): a loaded tokenizer is tens of MB of small objects that each of the main
 * thread's full garbage collections would have to mark. Only what still tokenizes on the event
 * loop (/debug/route, a model whose tokenizer the threads do not hold) loads it, once, which then
 * holds the event loop for as long as loading takes (about a second for Qwen3). Its identity
 * stands for the tokenizer in the registry (which models share one, which the threads hold).
 */
export class DeferredTokenizer implements Tokenizer {
  private loaded: Tokenizer | undefined;

  constructor(
    readonly path: string,
    private readonly opts?: HfTokenizerOptions,
  ) {}

  /** Whether the tokenizer was loaded (something used it). */
  get isLoaded(): boolean {
    return this.loaded !== undefined;
  }

  private get t(): Tokenizer {
    return (this.loaded ??= HfTokenizer.loadSync(this.path, this.opts));
  }

  get name(): string {
    return this.t.name;
  }
  get vocabSize(): number {
    return this.t.vocabSize;
  }
  get hasChatTemplate(): boolean {
    return this.t.hasChatTemplate;
  }
  encode(text: string, opts?: EncodeOptions): number[] {
    return this.t.encode(text, opts);
  }
  encodeIds(text: string, opts?: EncodeOptions): Uint32Array {
    return this.t.encodeIds(text, opts);
  }
  decode(ids: ArrayLike<number>, opts?: { skipSpecialTokens?: boolean }): string {
    return this.t.decode!(ids, opts);
  }
  decodeToken(id: number): string {
    return this.t.decodeToken(id);
  }
  chatContentFormat(opts?: ChatRenderOptions): ChatContentFormat {
    return this.t.chatContentFormat(opts);
  }
  renderChat(messages: readonly ChatMessage[], opts?: ChatRenderOptions): string {
    return this.t.renderChat(messages, opts);
  }
  encodeChat(messages: readonly ChatMessage[], opts?: ChatRenderOptions): number[] {
    return this.t.encodeChat(messages, opts);
  }
}

/**
 * Loads `--tokenizer` entries into a registry: `PATH` sets the default tokenizer, `MODEL=PATH`
 * one model's. Returns the tokenizers loaded (the tokenizer threads load the same entries).
 * `deferred`: DeferredTokenizers, loaded at their first use (the tokenizer threads load the entries
 * at start, so a bad path still fails the start).
 */
export async function loadTokenizerEntries(registry: TokenizerRegistry, entries: readonly string[], opts?: HfTokenizerOptions, deferred = false): Promise<Tokenizer[]> {
  const loaded: Tokenizer[] = [];
  for (const entry of entries) {
    const eq = entry.indexOf('=');
    if (eq > 0 && !/^[a-zA-Z]:[\\/]/.test(entry)) loaded.push(await registry.load(entry.slice(0, eq), entry.slice(eq + 1), opts, deferred));
    else loaded.push((registry.default = await loadTokenizer(entry, opts, deferred)));
  }
  return loaded;
}
