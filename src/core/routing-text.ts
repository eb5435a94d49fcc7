import { errors } from './errors.js';
import type { RouteName } from './context.js';

type Json = Record<string, unknown>;

/** Text of a JSON scalar for routing; objects become JSON (never calls a client-supplied toString). */
function scalarText(v: unknown): string {
  if (typeof v === 'string') return v;
  if (v === undefined || v === null) return '';
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  return JSON.stringify(v);
}

function contentText(content: unknown, field: string): string {
  if (content === null || content === undefined) return '';
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    let out = '';
    for (let i = 0; i < content.length; i++) {
      const part = content[i] as Json | null;
      if (part === null || typeof part !== 'object') throw errors.badRequest(`'${field}[${i}]' must be an object`, 'invalid_type', field);
      if (typeof part.text === 'string') out += part.text;
      else if (part.image_url && typeof part.image_url === 'object') out += `<image:${scalarText((part.image_url as Json).url)}>`;
      else if (part.input_audio) out += '<audio>';
    }
    return out;
  }
  throw errors.badRequest(`'${field}' must be a string or an array of content parts`, 'invalid_type', field);
}

/** Every message's role and content, in order; text parts of multi-part content included. */
function chatText(body: Json): string {
  const messages = body.messages;
  if (!Array.isArray(messages)) throw errors.badRequest("'messages' must be an array of messages", 'invalid_type', 'messages');
  if (messages.length === 0) throw errors.badRequest("'messages' must not be empty", 'invalid_value', 'messages');
  let out = '';
  for (let i = 0; i < messages.length; i++) {
    const m = messages[i] as Json | null;
    if (m === null || typeof m !== 'object' || Array.isArray(m)) throw errors.badRequest(`'messages[${i}]' must be an object`, 'invalid_type', 'messages');
    if (typeof m.role !== 'string') throw errors.badRequest(`'messages[${i}].role' must be a string`, 'invalid_type', 'messages');
    out += `<|${m.role}|>`;
    out += contentText(m.content, `messages[${i}].content`);
    if (Array.isArray(m.tool_calls)) out += JSON.stringify(m.tool_calls);
    out += '\n';
  }
  return out;
}

function promptText(value: unknown, field: string, required: boolean): { text: string; tokenIds?: number[] } {
  if (value === undefined || value === null) {
    if (required) throw errors.badRequest(`'${field}' is required`, 'missing_field', field);
    return { text: '' };
  }
  if (typeof value === 'string') return { text: value };
  if (Array.isArray(value)) {
    if (value.length === 0) return { text: '' };
    if (value.every((x) => typeof x === 'string')) return { text: (value as string[]).join('\n') };
    if (value.every((x) => Number.isInteger(x))) return { text: (value as number[]).join(' '), tokenIds: value as number[] };
    if (value.every((x) => Array.isArray(x) && x.every((t) => Number.isInteger(t)))) {
      return { text: (value as number[][]).map((x) => x.join(' ')).join('\n') };
    }
  }
  throw errors.badRequest(`'${field}' must be a string, an array of strings, an array of token ids or an array of token-id arrays`, 'invalid_type', field);
}

/** The text a policy uses for prefix affinity, per route; also validates routing-relevant fields. */
export function routingTextOf(route: RouteName, body: Json): { text: string; tokenIds?: number[] } {
  switch (route) {
    case 'chat':
      return { text: chatText(body) };
    case 'completions':
      return promptText(body.prompt, 'prompt', true);
    case 'embeddings':
      return promptText(body.input, 'input', true);
    case 'generate': {
      if (body.text !== undefined) return promptText(body.text, 'text', true);
      if (body.input_ids !== undefined) return promptText(body.input_ids, 'input_ids', true);
      if (body.prompt !== undefined) return promptText(body.prompt, 'prompt', true);
      throw errors.badRequest("'/generate' needs 'text' or 'input_ids'", 'missing_field', 'text');
    }
  }
}
