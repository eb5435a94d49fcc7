/**
 * The tokenizer contract shared by the simulated engine (`kvgate sim`) and the gateway (token-level,
 * KV-cache-aware routing). Two implementations: the deterministic chunk tokenizer (chunk.ts, the
 * simulator's default) and Hugging Face tokenizer.json + chat template (hf.ts).
 */

/** A text part of multi-part chat content (OpenAI format); other part types are carried as-is. */
export interface ChatContentPart {
  type: string;
  text?: string;
  [key: string]: unknown;
}

/**
 * A chat message as a chat template sees it: `role`, `content` (a string, or a list of parts for
 * templates that iterate over content), and whatever else the request carried (`tool_calls`,
 * `tool_call_id`, `name`, `reasoning_content`...). Renderers normalize messages the way vLLM does
 * before applying a template (see chat.ts), so request messages can be passed unchanged.
 */
export interface ChatMessage {
  role: string;
  content?: string | readonly (ChatContentPart | string)[] | null;
  [key: string]: unknown;
}

/** vLLM's `--chat-template-content-format`: content as one string, or as a list of typed parts. */
export type ChatContentFormat = 'string' | 'openai';

export interface ChatRenderOptions {
  /** Append the assistant turn header (vLLM's `add_generation_prompt`, default true). */
  addGenerationPrompt?: boolean;
  /** Leave the final message open so the model continues it (vLLM's `continue_final_message`, default false). */
  continueFinalMessage?: boolean;
  /** Tool definitions, passed to the template as `tools` (null when absent, as transformers does). */
  tools?: readonly unknown[] | null;
  /** RAG documents, passed to the template as `documents`. */
  documents?: readonly unknown[] | null;
  /** Extra template variables (vLLM's `chat_template_kwargs`, e.g. `{ enable_thinking: false }`). */
  kwargs?: Readonly<Record<string, unknown>>;
}

export interface EncodeOptions {
  /**
   * Add the tokenizer's special tokens (BOS/EOS from its post-processor). Default true, as in
   * transformers; vLLM uses true for completions and false for rendered chats. The chunk tokenizer
   * has no special tokens and ignores this.
   */
  addSpecialTokens?: boolean;
  /**
   * Polled between the pieces of a long encode (the segments between added tokens): when it
   * returns true the encode stops with an `EncodeCancelled` error. Pieces already encoded stay
   * in the segment cache. Tokenizers that encode in one piece may ignore it.
   */
  shouldStop?: () => boolean;
}

/** Thrown by an encode whose `shouldStop` said so (the client left). */
export class EncodeCancelled extends Error {
  constructor() {
    super('tokenization cancelled');
    this.name = 'EncodeCancelled';
  }
}

export interface Tokenizer {
  /** A label: `chunk4`, or the tokenizer.json path. */
  readonly name: string;
  /** Ids are in [0, vocabSize); the simulator draws generated tokens from this range. */
  readonly vocabSize: number;
  /**
   * True when `renderChat` reproduces what the engine renders: always for the chunk tokenizer (it is
   * the simulator's own template), and for a Hugging Face tokenizer that came with a chat template.
   */
  readonly hasChatTemplate: boolean;
  /** Encode text to a fresh array of ids. */
  encode(text: string, opts?: EncodeOptions): number[];
  /** The same ids as `encode`, as a fresh Uint32Array (cheaper to hash and to cache). */
  encodeIds(text: string, opts?: EncodeOptions): Uint32Array;
  /** Text of a sequence of ids (real tokenizers only: chunk ids are hashes). */
  decode?(ids: ArrayLike<number>, opts?: { skipSpecialTokens?: boolean }): string;
  /** Text of one generated token, streamed as a delta by the simulator. */
  decodeToken(id: number): string;
  /** The content format the chat template expects (for the template chosen by `opts.tools`). */
  chatContentFormat(opts?: ChatRenderOptions): ChatContentFormat;
  /** Render a chat to prompt text; by default with the assistant generation prompt appended. */
  renderChat(messages: readonly ChatMessage[], opts?: ChatRenderOptions): string;
  /** `renderChat` then encode without adding special tokens again (what vLLM's chat endpoint does). */
  encodeChat(messages: readonly ChatMessage[], opts?: ChatRenderOptions): number[];
}
