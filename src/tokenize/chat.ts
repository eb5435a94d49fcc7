import type { Template } from '@huggingface/jinja';
import { errors } from '../core/errors.js';
import type { ChatContentFormat, ChatContentPart, ChatMessage } from './tokenizer.js';

/**
 * Chat messages as vLLM hands them to a chat template (vllm/entrypoints/chat_utils.py:
 * `_parse_chat_message_content`, `_postprocess_messages`), and vLLM's detection of the content
 * format a template expects (`_detect_content_format`). Pure functions; request bodies are never
 * mutated.
 */

type Json = Record<string, unknown>;

const isObject = (v: unknown): v is Json => v !== null && typeof v === 'object' && !Array.isArray(v);

/** Part types whose payload is text, and the field holding it. */
const TEXT_PART_FIELD: Readonly<Record<string, string>> = {
  text: 'text',
  input_text: 'text',
  output_text: 'text',
  refusal: 'refusal',
  thinking: 'thinking',
};

/** Part types vLLM turns into multimodal items (placeholders expanded by the engine's processor). */
const MEDIA_PART_TYPES: ReadonlySet<string> = new Set([
  'image_url',
  'input_image',
  'image_embeds',
  'image_pil',
  'audio_url',
  'input_audio',
  'audio_embeds',
  'video_url',
  'prompt_embeds',
]);
const MEDIA_PART_KEYS = ['image_url', 'image_pil', 'image_embeds', 'audio_embeds', 'prompt_embeds', 'audio_url', 'input_audio', 'video_url'];
const MODALITY: Readonly<Record<string, string>> = {
  image_url: 'image',
  input_image: 'image',
  image_embeds: 'image',
  image_pil: 'image',
  audio_url: 'audio',
  input_audio: 'audio',
  audio_embeds: 'audio',
  video_url: 'video',
};

type ParsedPart = { kind: 'text'; text: string | null } | { kind: 'media'; type: string } | { kind: 'tool_reference'; name: unknown };

function parsePart(part: unknown, field: string): ParsedPart {
  if (typeof part === 'string') return { kind: 'text', text: part };
  if (!isObject(part)) throw errors.badRequest(`'${field}' must be a string or an object`, 'invalid_type', 'messages');
  const type = part['type'];
  if (typeof type === 'string' && part['uuid'] == null) {
    const textField = TEXT_PART_FIELD[type];
    if (textField !== undefined) {
      const text = part[textField];
      if (text !== undefined && text !== null && typeof text !== 'string') {
        throw errors.badRequest(`'${field}.${textField}' must be a string`, 'invalid_type', 'messages');
      }
      return { kind: 'text', text: (text as string | null | undefined) ?? null };
    }
    if (type === 'tool_reference') return { kind: 'tool_reference', name: part['name'] };
    if (MEDIA_PART_TYPES.has(type)) return { kind: 'media', type };
    throw errors.badRequest(`Unsupported chat content part type: '${type}' in '${field}'`, 'invalid_value', 'messages');
  }
  if (type === undefined || type === null || part['uuid'] != null) {
    for (const key of MEDIA_PART_KEYS) if (key in part) return { kind: 'media', type: key };
    if ('tool_reference' in part) return { kind: 'tool_reference', name: part['name'] };
    throw errors.badRequest(`Missing 'type' field in '${field}'`, 'missing_field', 'messages');
  }
  throw errors.badRequest(`Invalid 'type' field in '${field}'`, 'invalid_type', 'messages');
}

function contentParts(content: unknown, field: string): unknown[] {
  if (content === undefined || content === null) return [];
  if (typeof content === 'string') return [content];
  if (Array.isArray(content)) return content;
  throw errors.badRequest(`'${field}' must be a string, an array of content parts or null`, 'invalid_type', 'messages');
}

/** True when any message carries image/audio/video parts: the engine expands those into tokens we can't reproduce. */
export function hasMediaContent(messages: readonly unknown[]): boolean {
  for (const m of messages) {
    if (!isObject(m) || !Array.isArray(m['content'])) continue;
    for (const part of m['content'] as unknown[]) {
      if (!isObject(part)) continue;
      const type = part['type'];
      if (typeof type === 'string' ? MEDIA_PART_TYPES.has(type) : MEDIA_PART_KEYS.some((k) => k in part)) return true;
    }
  }
  return false;
}

/** Text content as vLLM's "string" format makes it: the non-empty text parts joined with "\n". */
export function flattenContent(content: unknown, field = 'content'): string {
  if (typeof content === 'string') return content;
  const texts: string[] = [];
  for (const [i, raw] of contentParts(content, field).entries()) {
    const p = parsePart(raw, `${field}[${i}]`);
    if (p.kind === 'text' && p.text) texts.push(p.text);
    else if (p.kind === 'tool_reference' && typeof p.name === 'string' && p.name) texts.push(p.name);
  }
  return texts.join('\n');
}

function partsContent(content: unknown, field: string): ChatContentPart[] {
  const out: ChatContentPart[] = [];
  for (const [i, raw] of contentParts(content, field).entries()) {
    const p = parsePart(raw, `${field}[${i}]`);
    if (p.kind === 'text') {
      if (p.text !== null) out.push({ type: 'text', text: p.text });
    } else if (p.kind === 'tool_reference') out.push({ type: 'tool_reference', name: p.name });
    else out.push({ type: MODALITY[p.type] ?? p.type });
  }
  return out;
}

/** `function.arguments` of a tool call as a template expects it: parsed JSON (vLLM: `{}` when not JSON). */
function toolCallsOf(toolCalls: unknown[]): unknown[] {
  return toolCalls.map((tc) => {
    if (!isObject(tc) || !isObject(tc['function'])) return tc;
    const fn = tc['function'];
    let args = fn['arguments'];
    if (typeof args === 'string') {
      try {
        args = JSON.parse(args);
      } catch {
        args = {};
      }
    } else if (args === null || typeof args !== 'object') args = {};
    return { ...tc, function: { ...fn, arguments: args } };
  });
}

/**
 * Messages of a request (or already-normalized ones: this is idempotent) as vLLM passes them to
 * the template: only role, content (a string, or `{type,text}` parts for "openai"-format
 * templates), tool_calls (arguments parsed to objects; an empty list dropped), reasoning and
 * reasoning_content, tool_call_id, name, task and a developer message's tools.
 */
export function conversationOf(messages: readonly unknown[], format: ChatContentFormat): ChatMessage[] {
  return messages.map((raw, i): ChatMessage => {
    if (!isObject(raw)) throw errors.badRequest(`'messages[${i}]' must be an object`, 'invalid_type', 'messages');
    const role = raw['role'];
    if (typeof role !== 'string') throw errors.badRequest(`'messages[${i}].role' must be a string`, 'invalid_type', 'messages');
    const field = `messages[${i}].content`;
    let content: ChatMessage['content'];
    if (format === 'string') content = flattenContent(raw['content'], field);
    else {
      const parts = partsContent(raw['content'], field);
      // vLLM joins a tool result's text parts into one string: most templates expect that.
      content = role === 'tool' && parts.every((p) => p.type === 'text') ? (parts.length ? parts.map((p) => p.text).join('\n') : '') : parts;
    }
    const msg: ChatMessage = { role, content };
    if (role === 'assistant') {
      const calls = raw['tool_calls'];
      if (Array.isArray(calls) && calls.length > 0) msg['tool_calls'] = toolCallsOf(calls);
      else if (calls !== undefined && calls !== null && !Array.isArray(calls)) msg['tool_calls'] = calls;
      const reasoning = raw['reasoning'] ?? raw['reasoning_content'];
      if (reasoning !== undefined && reasoning !== null) {
        msg['reasoning'] = reasoning;
        msg['reasoning_content'] = reasoning;
      }
    } else if (role === 'tool' && 'tool_call_id' in raw) msg['tool_call_id'] = raw['tool_call_id'];
    if (typeof raw['name'] === 'string') msg['name'] = raw['name'];
    if (typeof raw['task'] === 'string') msg['task'] = raw['task'];
    if (role === 'developer') msg['tools'] = raw['tools'] ?? null;
    return msg;
  });
}

/**
 * Tools as vLLM passes them to the template: its pydantic `model_dump()` of each tool, i.e.
 * `{type, function: {name, description, parameters, ...}}` with absent description/parameters as null.
 */
export function toolsOf(tools: unknown): unknown[] | null {
  if (tools === undefined || tools === null) return null;
  if (!Array.isArray(tools)) throw errors.badRequest("'tools' must be an array", 'invalid_type', 'tools');
  return tools.map((t, i) => {
    if (!isObject(t) || !isObject(t['function'])) throw errors.badRequest(`'tools[${i}].function' must be an object`, 'invalid_type', 'tools');
    const { type, function: fn, ...rest } = t;
    const { name, description, parameters, ...fnRest } = fn;
    if (typeof name !== 'string') throw errors.badRequest(`'tools[${i}].function.name' must be a string`, 'invalid_type', 'tools');
    return {
      type: type ?? 'function',
      function: { name, description: description ?? null, parameters: parameters ?? null, ...fnRest },
      ...rest,
    };
  });
}

// ---------------------------------------------------------------------------------------------
// Content format detection (vLLM `_detect_content_format`): "openai" when the template loops over
// a message's content (`{% for part in message['content'] %}`), "string" otherwise.
// ---------------------------------------------------------------------------------------------

interface Node {
  type: string;
  [key: string]: unknown;
}

const isNode = (v: unknown): v is Node => v !== null && typeof v === 'object' && typeof (v as Node).type === 'string';

function walk(node: unknown, visit: (n: Node) => void): void {
  if (Array.isArray(node)) {
    for (const x of node) walk(x, visit);
    return;
  }
  if (node instanceof Map) {
    for (const [k, v] of node) {
      walk(k, visit);
      walk(v, visit);
    }
    return;
  }
  if (!isNode(node)) return;
  visit(node);
  for (const v of Object.values(node)) if (v !== null && typeof v === 'object') walk(v, visit);
}

const isVar = (n: unknown, name: string): boolean => isNode(n) && n.type === 'Identifier' && n['value'] === name;

/** `name`, `name.key` or `name['key']`, possibly sliced, filtered, tested or selected (`... if cond`). */
function isVarOrElems(n: unknown, name: string, key?: string): boolean {
  if (!isNode(n)) return false;
  switch (n.type) {
    case 'FilterExpression':
    case 'TestExpression':
      return isVarOrElems(n['operand'], name, key);
    case 'SelectExpression':
      return isVarOrElems(n['lhs'], name, key);
    case 'MemberExpression': {
      const prop = n['property'];
      if (isNode(prop) && prop.type === 'SliceExpression') return isVarOrElems(n['object'], name, key);
      if (key === undefined || !isVar(n['object'], name)) return false;
      return n['computed'] ? isNode(prop) && prop.type === 'StringLiteral' && prop['value'] === key : isVar(prop, key);
    }
    default:
      return key === undefined && isVar(n, name);
  }
}

export function detectContentFormat(template: Template): ChatContentFormat {
  const fors: Node[] = [];
  const sets: Node[] = [];
  walk(template.parsed, (n) => {
    if (n.type === 'For') fors.push(n);
    else if (n.type === 'Set') sets.push(n);
  });
  // Names bound to `messages` (or slices/filters of it) by {% set %}.
  const messageLists = ['messages'];
  for (let i = 0; i < messageLists.length; i++) {
    for (const s of sets) {
      const target = s['assignee'];
      if (isNode(target) && target.type === 'Identifier' && isVarOrElems(s['value'], messageLists[i]!)) {
        const name = target['value'] as string;
        if (!messageLists.includes(name)) messageLists.push(name);
      }
    }
  }
  const loopVar = (f: Node): string | undefined => {
    const v = f['loopvar'];
    return isNode(v) && v.type === 'Identifier' ? (v['value'] as string) : undefined;
  };
  const messageVars = fors.filter((f) => messageLists.some((m) => isVarOrElems(f['iterable'], m))).map(loopVar);
  const loopsOverContent = fors.some((f) => messageVars.some((m) => m !== undefined && isVarOrElems(f['iterable'], m, 'content')));
  return loopsOverContent ? 'openai' : 'string';
}

/**
 * transformers' `continue_final_message`: cut the rendered chat right after the final message's
 * text, so the model continues it instead of starting a new turn.
 */
export function cutAfterFinalMessage(rendered: string, messages: readonly ChatMessage[]): string {
  const last = messages[messages.length - 1];
  let final: unknown = last?.content;
  if (Array.isArray(final)) {
    const textPart = [...(final as (ChatContentPart | string)[])].reverse().find((p) => typeof p === 'object' && p !== null && 'text' in p) as ChatContentPart | undefined;
    if (textPart === undefined) throw errors.badRequest('continue_final_message is set but the final message has no text to continue', 'invalid_value', 'messages');
    final = textPart.text;
  }
  const text = typeof final === 'string' ? final : '';
  const at = rendered.lastIndexOf(text.trim());
  if (at < 0) {
    throw errors.badRequest('continue_final_message is set but the final message does not appear in the rendered chat', 'invalid_value', 'messages');
  }
  const lstripped = text.trimStart();
  const end = rendered.slice(at, at + lstripped.length) === text ? at + lstripped.length : at + text.trim().length;
  return rendered.slice(0, end);
}
