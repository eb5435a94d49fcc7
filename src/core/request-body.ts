import { isUtf8 } from 'node:buffer';
import type { RouteName } from './context.js';
import { errors } from './errors.js';
import { routingTextOf } from './routing-text.js';

/**
 * What kvgate reads from a generation request's JSON body, in one place for both sides that read
 * it: the event loop (small bodies, server/gateway.ts and routers/request.ts) and a tokenizer
 * thread (bodies over --parse-off-loop-bytes, tokenize/pool-worker.ts). Same functions, so the
 * same 400s with the same messages, and the same routing text, on either side.
 */

/**
 * Whether a parsed JSON value nests arrays/objects deeper than `limit`. Visits containers only
 * (cost grows with the number of JSON nodes, not bytes) and stops at limit + 1, so it never
 * recurses deeper than that. (V8's JSON.parse is iterative, so parsing itself is safe.)
 */
export function deeperThan(value: unknown, limit: number, depth = 0): boolean {
  if (value === null || typeof value !== 'object') return false;
  if (depth + 1 > limit) return true;
  if (Array.isArray(value)) {
    for (const v of value) if (v !== null && typeof v === 'object' && deeperThan(v, limit, depth + 1)) return true;
    return false;
  }
  for (const k in value) {
    const v = (value as Record<string, unknown>)[k];
    if (v !== null && typeof v === 'object' && deeperThan(v, limit, depth + 1)) return true;
  }
  return false;
}

/**
 * Parses a JSON object body; anything else is a 400 naming the problem: empty, invalid UTF-8,
 * nested deeper than `maxDepth`, not JSON, or not an object.
 */
export function parseJsonObject(buf: Uint8Array, maxDepth = 64): Record<string, unknown> {
  if (buf.length === 0) throw errors.badRequest('Request body is empty; expected a JSON object', 'invalid_json');
  if (!isUtf8(buf)) throw errors.badRequest('Request body is not valid UTF-8', 'invalid_utf8');
  let value: unknown;
  try {
    value = JSON.parse(Buffer.from(buf.buffer, buf.byteOffset, buf.length).toString('utf8'));
  } catch (e) {
    throw errors.badRequest(`Request body is not valid JSON: ${(e as Error).message}`, 'invalid_json');
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw errors.badRequest('Request body must be a JSON object', 'invalid_json');
  if (deeperThan(value, maxDepth)) throw errors.badRequest(`Request body nests JSON deeper than ${maxDepth} levels`, 'json_too_deep');
  return value as Record<string, unknown>;
}

/** What the request context takes from a body (besides its `model`): validated. */
export interface BodyView {
  /** Routing text (all messages in order, the prompt, or /generate text). */
  text: string;
  /** Token ids the request gives as such (an integer-array prompt). */
  tokenIds?: number[];
  stream: boolean;
  maxOutputTokens?: number;
}

/**
 * The body's routing text, stream flag and output-token limit; throws the 400 of the first
 * malformed field (routing fields first, then `stream`).
 */
export function bodyView(route: RouteName, body: Record<string, unknown>): BodyView {
  const routing = routingTextOf(route, body);
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== 'boolean') {
    throw errors.badRequest("'stream' must be a boolean", 'invalid_type', 'stream');
  }
  return { text: routing.text, tokenIds: routing.tokenIds, stream: body.stream === true, maxOutputTokens: maxOutputTokens(body) };
}

function maxOutputTokens(body: Record<string, unknown>): number | undefined {
  const sp = body.sampling_params as Record<string, unknown> | undefined;
  const v = body.max_completion_tokens ?? body.max_tokens ?? (sp && typeof sp === 'object' ? sp.max_new_tokens : undefined);
  return typeof v === 'number' && Number.isInteger(v) && v > 0 ? v : undefined;
}

/** Top-level fields that carry a route's prompt (the large ones): left out of `bodyHead`. */
const PROMPT_FIELDS: Record<RouteName, readonly string[]> = {
  chat: ['messages'],
  completions: ['prompt'],
  embeddings: ['input', 'messages'],
  generate: ['text', 'input_ids', 'prompt'],
};

/**
 * The body's top-level fields in order, the prompt-carrying ones (present in the body) listed in
 * `omitted` instead of copied: what a tokenizer thread hands back so that the event loop reads
 * `model`, `max_tokens` and the like without parsing the whole body.
 */
export function bodyHead(route: RouteName, body: Record<string, unknown>): { head: Record<string, unknown>; omitted: string[] } {
  const head: Record<string, unknown> = {};
  const omitted: string[] = [];
  const prompt = PROMPT_FIELDS[route];
  for (const k of Object.keys(body)) {
    if (prompt.includes(k)) {
      omitted.push(k);
      head[k] = null;
    } else head[k] = body[k];
  }
  return { head, omitted };
}

/**
 * A body whose prompt fields are read only when asked for: `head`'s fields as they are, and for
 * each `omitted` one a getter that parses `raw` (once) and returns the real value. The fast path
 * reads `model`, `stream`, `max_tokens` and never parses; a rewrite (`{ ...body, model }`, a
 * pinned data-parallel rank) reads every field and so gets the whole body.
 */
export function lazyBody(head: Record<string, unknown>, omitted: readonly string[], raw: Uint8Array, maxDepth: number): Record<string, unknown> {
  const body: Record<string, unknown> = { ...head };
  let full: Record<string, unknown> | undefined;
  for (const k of omitted) {
    Object.defineProperty(body, k, {
      enumerable: true,
      configurable: true,
      get: () => (full ??= parseJsonObject(raw, maxDepth))[k],
      set: (v: unknown) => Object.defineProperty(body, k, { value: v, enumerable: true, configurable: true, writable: true }),
    });
  }
  return body;
}
