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
  id: number;
  route: RouteName;
  model: string;
  /** The request body as JSON bytes (parsed here, off the main thread), or the parsed body. */
  raw?: Uint8Array;
  body?: Record<string, unknown>;
  /** Hash the ids' blocks too (block size, seed). */
  blocks?: { blockSize: number; seed: bigint };
}

export type PoolReply =
  | { type: 'ready' }
  | { type: 'failed'; message: string }
  | { type: 'done'; id: number; ids: Uint32Array | null; local?: BigUint64Array; seq?: BigUint64Array }
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
async function idsOf(task: PoolTask, body: Record<string, unknown>, stop: () => boolean): Promise<Uint32Array | undefined> {
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
  const ids = await parallel.encode(tokenizer, task.model, text, pieceChars, stop);
  registry.cache?.store(tokenizer, text, addSpecialTokens, ids);
  return ids;
}

try {
  await loadTokenizerEntries(registry, data.entries, data.tokenizerOptions);
  port.postMessage({ type: 'ready' } satisfies PoolReply);
} catch (e) {
  port.postMessage({ type: 'failed', message: (e as Error).message } satisfies PoolReply);
}

port.on('message', (task: PoolTask) => void run(task));

async function run(task: PoolTask): Promise<void> {
  const stop = () => Atomics.load(cancel, 0) === task.id;
  try {
    if (stop()) {
      port.postMessage({ type: 'cancelled', id: task.id } satisfies PoolReply);
      return;
    }
    const body = task.body ?? (JSON.parse(decoder.decode(task.raw)) as Record<string, unknown>);
    let ids = (await idsOf(task, body, stop)) ?? null;
    if (ids && (ids.byteOffset !== 0 || ids.buffer.byteLength !== ids.byteLength)) ids = ids.slice();
    // Block hashes here too (kv_aware would otherwise compute them on the event loop), as typed
    // arrays whose buffers are transferred, not copied.
    const local = ids && task.blocks ? hashBlocksU64(ids, task.blocks.blockSize, task.blocks.seed) : undefined;
    const seq = local ? sequenceHashes(local) : undefined;
    const transfer = [ids, local, seq].filter((a) => a !== undefined && a !== null).map((a) => a.buffer as ArrayBuffer);
    port.postMessage({ type: 'done', id: task.id, ids, local, seq } satisfies PoolReply, transfer);
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
