/**
 * A tokenizer thread of the TokenizePool (pool.ts): loads the same tokenizers as the main thread
 * (the --tokenizer entries) and answers one request at a time with the token ids
 * `tokenizeRequest` computes — the same code as the in-thread path, so the same ids. Its segment
 * and whole-prompt caches are its own; the pool sends the requests of one conversation to the
 * same thread so that they keep hitting.
 */
import { setPriority } from 'node:os';
import { parentPort, threadId, workerData } from 'node:worker_threads';
import type { RouteName } from '../core/context.js';
import { GatewayError } from '../core/errors.js';
import { HfTokenizer, type HfTokenizerOptions } from './hf.js';
import { ParallelEncoder } from './parallel-encode.js';
import { loadTokenizerEntries, TokenizerRegistry, type TokenCacheOptions } from './registry.js';
import { EncodeCancelled } from './tokenizer.js';
import { hashBlocksU64, sequenceHashes } from '../cache/block-index.js';
import { bodyHead, bodyView, parseJsonObject, type BodyView } from '../core/request-body.js';

export interface PoolWorkerData {
  entries: string[];
  cache: TokenCacheOptions | false;
  /** Int32Array view: [0] = id of the task to stop. */
  cancel: SharedArrayBuffer;
  /** Threads in the pool, and the BroadcastChannel they share long encodes on (parallel-encode.ts). */
  threads: number;
  channel: string;
  /** Prompts at least this long are spread over the threads (when the tokenizer allows it). */
  parallelChars: number;
  /** This thread's nice value (Linux only: per thread there). */
  nice: number;
  /** Options of the tokenizers loaded here (the main thread's). */
  tokenizerOptions: HfTokenizerOptions;
}

export interface PoolTask {
  kind?: 'encode';
  id: number;
  route: RouteName;
  model: string;
  /** The request body as JSON bytes (parsed here, off the main thread), or the parsed body. */
  raw?: Uint8Array;
  body?: Record<string, unknown>;
  /** Hash the ids' blocks too (block size, seed). */
  blocks?: { blockSize: number; seed: bigint };
}

/**
 * A body too large to parse on the event loop (--parse-off-loop-bytes): parsed, validated and
 * tokenized here; what the event loop needs comes back (`Prepared`), the body stays here.
 */
export interface PrepareTask {
  kind: 'prepare';
  id: number;
  route: RouteName;
  raw: Uint8Array;
  /** --max-json-depth */
  maxDepth: number;
  /** --max-tokenize-chars: a longer routing text is not tokenized. */
  maxChars: number;
  blocks?: { blockSize: number; seed: bigint };
}

/** A 400 found in a body, to be raised by the event loop at the point it would have found it. */
export interface BodyError {
  status: number;
  message: string;
  errType: string;
  code: string;
  param: string | null;
}

/** What a PrepareTask answers besides the ids and hashes. */
export interface Prepared {
  /** bodyHead: top-level fields, prompt fields omitted. */
  head: Record<string, unknown>;
  omitted: string[];
  /** bodyView, or the 400 it threw. */
  view?: BodyView;
  fieldError?: BodyError;
  /** The 400 tokenizing threw (malformed template fields and the like). */
  tokenError?: BodyError;
  /** The body's `model` (string) whose tokenizer encoded the ids; undefined: the default tokenizer. */
  tokenModel?: string;
  /** The routing text was over --max-tokenize-chars: not tokenized. */
  tooLong: boolean;
}

export type PoolReply =
  | { type: 'ready' }
  | { type: 'failed'; message: string }
  | { type: 'done'; id: number; ids: Uint32Array | null; local?: BigUint64Array; seq?: BigUint64Array }
  | { type: 'prepared'; id: number; prepared: Prepared; ids: Uint32Array | null; local?: BigUint64Array; seq?: BigUint64Array }
  | { type: 'cancelled'; id: number }
  | { type: 'error'; id: number; status: number; message: string; errType: string; code: string; param: string | null };

const port = parentPort!;
const data = workerData as PoolWorkerData;
const cancel = new Int32Array(data.cancel);
const registry = new TokenizerRegistry({ cache: data.cache });
const decoder = new TextDecoder();
// Below the event loop (Linux: setpriority on the calling thread only; elsewhere it would be the whole process).
if (data.nice > 0 && process.platform === 'linux') {
  try {
    setPriority(data.nice);
  } catch {
    // not allowed: keep the priority
  }
}
const parallel = data.threads > 1 ? new ParallelEncoder({ channel: data.channel, threadKey: String(threadId), tokenizerOf: (m) => registry.get(m) }) : undefined;

/** The request's ids: as registry.tokenize computes them, a long prompt spread over the threads. */
async function idsOf(task: { route: RouteName; model?: string }, body: Record<string, unknown>, stop: () => boolean): Promise<Uint32Array | undefined> {
  const { tokenizer, prompt } = registry.prompt(task.route, body, task.model);
  if (prompt === undefined) return undefined;
  if (prompt.ids) return prompt.ids;
  const { text, addSpecialTokens } = prompt;
  if (!parallel || text.length < data.parallelChars || !(tokenizer instanceof HfTokenizer) || !tokenizer.pieceSplitting || (addSpecialTokens && tokenizer.addsSpecialTokens)) {
    return registry.cache ? registry.cache.encode(tokenizer, text, addSpecialTokens, stop) : tokenizer.encodeIds(text, { addSpecialTokens, shouldStop: stop });
  }
  const hit = registry.cache?.lookup(tokenizer, text, addSpecialTokens);
  if (hit) return hit;
  // Pieces small enough that every thread gets several (claimed as they go, so uneven speeds even out).
  const pieceChars = Math.max(4096, Math.ceil(text.length / (data.threads * 8)));
  const ids = await parallel.encode(tokenizer, task.model ?? '', text, pieceChars, stop);
  registry.cache?.store(tokenizer, text, addSpecialTokens, ids);
  return ids;
}

try {
  await loadTokenizerEntries(registry, data.entries, data.tokenizerOptions);
  port.postMessage({ type: 'ready' } satisfies PoolReply);
} catch (e) {
  port.postMessage({ type: 'failed', message: (e as Error).message } satisfies PoolReply);
}

port.on('message', (task: PoolTask | PrepareTask) => void run(task));

function bodyError(e: unknown): BodyError | undefined {
  if (!(e instanceof GatewayError) || e.status >= 500) return undefined;
  return { status: e.status, message: e.message, errType: e.type, code: e.code, param: e.param ?? null };
}

/** parse, validate, routing text, ids: what the event loop would do for a body, in the order it would. */
async function prepare(task: PrepareTask, stop: () => boolean): Promise<{ prepared: Prepared; ids: Uint32Array | undefined }> {
  const body = parseJsonObject(task.raw, task.maxDepth);
  const { head, omitted } = bodyHead(task.route, body);
  const tokenModel = typeof body.model === 'string' ? body.model : undefined;
  const prepared: Prepared = { head, omitted, tokenModel, tooLong: false };
  try {
    prepared.view = bodyView(task.route, body);
  } catch (e) {
    if (!(prepared.fieldError = bodyError(e))) throw e;
    return { prepared, ids: undefined };
  }
  if (prepared.view.tokenIds !== undefined) return { prepared, ids: undefined };
  if (prepared.view.text.length > task.maxChars) {
    prepared.tooLong = true;
    return { prepared, ids: undefined };
  }
  try {
    return { prepared, ids: await idsOf({ route: task.route, model: tokenModel }, body, stop) };
  } catch (e) {
    if (!(prepared.tokenError = bodyError(e))) throw e;
    return { prepared, ids: undefined };
  }
}

async function run(task: PoolTask | PrepareTask): Promise<void> {
  const stop = () => Atomics.load(cancel, 0) === task.id;
  try {
    if (stop()) {
      port.postMessage({ type: 'cancelled', id: task.id } satisfies PoolReply);
      return;
    }
    let prepared: Prepared | undefined;
    let found: Uint32Array | undefined;
    if (task.kind === 'prepare') ({ prepared, ids: found } = await prepare(task, stop));
    else found = await idsOf(task, task.body ?? (JSON.parse(decoder.decode(task.raw)) as Record<string, unknown>), stop);
    let ids = found ?? null;
    if (ids && (ids.byteOffset !== 0 || ids.buffer.byteLength !== ids.byteLength)) ids = ids.slice();
    // Block hashes here too (kv_aware would otherwise compute them on the event loop), as typed
    // arrays whose buffers are transferred, not copied.
    const local = ids && task.blocks ? hashBlocksU64(ids, task.blocks.blockSize, task.blocks.seed) : undefined;
    const seq = local ? sequenceHashes(local) : undefined;
    const transfer = [ids, local, seq].filter((a) => a !== undefined && a !== null).map((a) => a.buffer as ArrayBuffer);
    if (prepared) port.postMessage({ type: 'prepared', id: task.id, prepared, ids, local, seq } satisfies PoolReply, transfer);
    else port.postMessage({ type: 'done', id: task.id, ids, local, seq } satisfies PoolReply, transfer);
  } catch (e) {
    if (e instanceof EncodeCancelled) {
      port.postMessage({ type: 'cancelled', id: task.id } satisfies PoolReply);
      return;
    }
    const g = e instanceof GatewayError ? e : undefined;
    port.postMessage({
      type: 'error',
      id: task.id,
      status: g?.status ?? 500,
      message: (e as Error)?.message ?? String(e),
      errType: g?.type ?? 'internal_error',
      code: g?.code ?? 'tokenizer_error',
      param: g?.param ?? null,
    } satisfies PoolReply);
  }
}
