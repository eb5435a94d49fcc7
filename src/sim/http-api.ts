import { STATUS_CODES } from 'node:http';
import type { ChatMessage } from '../tokenize/index.js';

/**
 * Request parsing and response shapes of the simulator's HTTP API (OpenAI / vLLM and SGLang
 * flavours). Pure functions: no engine, no sockets.
 */

/** An error answered as vLLM does: `{"error":{"message","type","param","code"}}`, code = HTTP status. */
export class SimHttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
  ) {
    super(message);
  }

  /** vLLM's error type: the status phrase in CamelCase + "Error" (BadRequestError, NotFoundError...). */
  get type(): string {
    const phrase = (STATUS_CODES[this.status] ?? 'Unknown').replace(/[^A-Za-z]/g, '');
    return phrase.endsWith('Error') ? phrase : `${phrase}Error`;
  }

  toBody(): { error: { message: string; type: string; param: string | null; code: number } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.status } };
  }
}

const bad = (message: string, param: string | null = null): SimHttpError => new SimHttpError(400, message, param);

/** What every generation endpoint reduces its body to. */
export interface ParsedGeneration {
  kind: 'chat' | 'completions' | 'generate';
  /** Chat messages to render, text to tokenize, or token ids given by the client. */
  prompt: { messages: ChatMessage[] } | { text: string } | { tokenIds: number[] };
  /** undefined → the server's default. */
  maxTokens: number | undefined;
  stream: boolean;
  includeUsage: boolean;
  /** data_parallel_rank from the body, if any. */
  dpRank: number | undefined;
  model: string | undefined;
  /** SGLang `return_logprob` (/generate only): fake input/output token logprobs in meta_info. */
  returnLogprob: boolean;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function optBool(body: Record<string, unknown>, key: string): boolean | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'boolean') throw bad(`'${key}' must be a boolean`, key);
  return v;
}

function optPositiveInt(obj: Record<string, unknown>, key: string, param = key): number | undefined {
  const v = obj[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v)) throw bad(`'${param}' must be an integer`, param);
  if (v < 1) throw bad(`'${param}' must be at least 1, got ${v}.`, param);
  return v;
}

function optString(body: Record<string, unknown>, key: string): string | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') throw bad(`'${key}' must be a string`, key);
  return v;
}

function optRank(body: Record<string, unknown>): number | undefined {
  const v = body['data_parallel_rank'];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) throw bad(`'data_parallel_rank' must be a non-negative integer`, 'data_parallel_rank');
  return v;
}

function tokenIds(v: unknown, param: string): number[] {
  if (!Array.isArray(v) || v.length === 0) throw bad(`'${param}' must be a non-empty array of token ids`, param);
  for (const t of v) {
    if (typeof t !== 'number' || !Number.isInteger(t) || t < 0 || t > 0xffffffff) {
      throw bad(`'${param}' must contain non-negative integer token ids`, param);
    }
  }
  return v as number[];
}

/** Fields shared by the two OpenAI endpoints. */
function openAiCommon(body: Record<string, unknown>): Omit<ParsedGeneration, 'kind' | 'prompt' | 'maxTokens'> {
  const n = body['n'];
  if (n !== undefined && n !== null && n !== 1) throw bad(`The simulator supports only n=1 (got n=${JSON.stringify(n)})`, 'n');
  const stream = optBool(body, 'stream') ?? false;
  const so = body['stream_options'];
  let includeUsage = false;
  if (so !== undefined && so !== null) {
    if (!isObject(so)) throw bad(`'stream_options' must be an object`, 'stream_options');
    if (!stream) throw bad('Stream options can only be defined when `stream=True`.', 'stream_options');
    includeUsage = optBool(so, 'include_usage') ?? false;
  }
  optBool(body, 'ignore_eos');
  return { stream, includeUsage, dpRank: optRank(body), model: optString(body, 'model'), returnLogprob: false };
}

function contentText(content: unknown, i: number): string {
  if (content === undefined || content === null) return '';
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    const texts: string[] = [];
    for (const part of content) {
      if (!isObject(part) || part['type'] !== 'text' || typeof part['text'] !== 'string') {
        throw bad(`messages[${i}].content: the simulator supports only text content parts`, 'messages');
      }
      if (part['text']) texts.push(part['text']);
    }
    // vLLM's "string" content format: non-empty text parts joined by newlines (as the gateway's tokenizer does).
    return texts.join('\n');
  }
  throw bad(`messages[${i}].content must be a string, an array of text parts or null`, 'messages');
}

export function parseChat(body: Record<string, unknown>): ParsedGeneration {
  const msgs = body['messages'];
  if (msgs === undefined) throw bad("Field required: 'messages'", 'messages');
  if (!Array.isArray(msgs) || msgs.length === 0) throw bad("'messages' must be a non-empty array", 'messages');
  const messages: ChatMessage[] = msgs.map((m, i) => {
    if (!isObject(m)) throw bad(`messages[${i}] must be an object`, 'messages');
    if (typeof m['role'] !== 'string' || m['role'].length === 0) throw bad(`messages[${i}].role must be a non-empty string`, 'messages');
    return { role: m['role'], content: contentText(m['content'], i) };
  });
  const maxTokens = optPositiveInt(body, 'max_completion_tokens') ?? optPositiveInt(body, 'max_tokens');
  return {
    kind: 'chat',
    prompt: { messages },
    maxTokens,
    ...openAiCommon(body),
  };
}

export function parseCompletion(body: Record<string, unknown>): ParsedGeneration {
  let prompt = body['prompt'];
  if (prompt === undefined || prompt === null) throw bad("Field required: 'prompt'", 'prompt');
  // A batch of exactly one prompt is accepted; larger batches are not simulated.
  if (Array.isArray(prompt) && prompt.length > 0 && (typeof prompt[0] === 'string' || Array.isArray(prompt[0]))) {
    if (prompt.length !== 1) throw bad('The simulator supports one prompt per request', 'prompt');
    prompt = prompt[0];
  }
  let p: ParsedGeneration['prompt'];
  if (typeof prompt === 'string') {
    if (prompt.length === 0) throw bad("'prompt' must not be empty", 'prompt');
    p = { text: prompt };
  } else p = { tokenIds: tokenIds(prompt, 'prompt') };
  return { kind: 'completions', prompt: p, maxTokens: optPositiveInt(body, 'max_tokens'), ...openAiCommon(body) };
}

/** SGLang /generate: `text` or `input_ids`, `sampling_params.max_new_tokens`, `stream`, `return_logprob`. */
export function parseGenerate(body: Record<string, unknown>): ParsedGeneration {
  const text = body['text'];
  const ids = body['input_ids'];
  let p: ParsedGeneration['prompt'];
  if (text !== undefined && text !== null) {
    if (typeof text !== 'string' || text.length === 0) throw bad("'text' must be a non-empty string", 'text');
    p = { text };
  } else if (ids !== undefined && ids !== null) p = { tokenIds: tokenIds(ids, 'input_ids') };
  else throw bad("Either 'text' or 'input_ids' must be provided", 'text');
  const sp = body['sampling_params'];
  let maxTokens: number | undefined;
  if (sp !== undefined && sp !== null) {
    if (!isObject(sp)) throw bad("'sampling_params' must be an object", 'sampling_params');
    maxTokens = optPositiveInt(sp, 'max_new_tokens', 'sampling_params.max_new_tokens');
  }
  return {
    kind: 'generate',
    prompt: p,
    maxTokens,
    stream: optBool(body, 'stream') ?? false,
    includeUsage: false,
    dpRank: optRank(body),
    model: undefined,
    returnLogprob: optBool(body, 'return_logprob') ?? false,
  };
}

export interface Usage {
  prompt_tokens: number;
  total_tokens: number;
  completion_tokens: number;
  prompt_tokens_details: { cached_tokens: number };
}

export function usageOf(promptTokens: number, completionTokens: number, cachedTokens: number): Usage {
  return {
    prompt_tokens: promptTokens,
    total_tokens: promptTokens + completionTokens,
    completion_tokens: completionTokens,
    prompt_tokens_details: { cached_tokens: cachedTokens },
  };
}
