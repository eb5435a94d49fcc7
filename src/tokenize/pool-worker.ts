/**
 * A tokenizer thread of the TokenizePool (pool.ts): loads the same tokenizers as the main thread
 * (the --tokenizer entries) and answers one request at a time with the token ids
 * `tokenizeRequest` computes — the same code as the in-thread path, so the same ids. Its segment
 * and whole-prompt caches are its own; the pool sends the requests of one conversation to the
 * same thread so that they keep hitting.
 */
import { parentPort, workerData } from 'node:worker_threads';
import type { RouteName } from '../core/context.js';
import { GatewayError } from '../core/errors.js';
import { loadTokenizerEntries, TokenizerRegistry, type TokenCacheOptions } from './registry.js';
import { EncodeCancelled } from './tokenizer.js';

export interface PoolWorkerData {
  entries: string[];
  cache: TokenCacheOptions | false;
  /** Int32Array view: [0] = id of the task to stop. */
  cancel: SharedArrayBuffer;
}

export interface PoolTask {
  id: number;
  route: RouteName;
  model: string;
  /** The request body as JSON bytes (parsed here, off the main thread), or the parsed body. */
  raw?: Uint8Array;
  body?: Record<string, unknown>;
}

export type PoolReply =
  | { type: 'ready' }
  | { type: 'failed'; message: string }
  | { type: 'done'; id: number; ids: Uint32Array | null }
  | { type: 'cancelled'; id: number }
  | { type: 'error'; id: number; status: number; message: string; errType: string; code: string; param: string | null };

const port = parentPort!;
const data = workerData as PoolWorkerData;
const cancel = new Int32Array(data.cancel);
const registry = new TokenizerRegistry({ cache: data.cache });
const decoder = new TextDecoder();

try {
  await loadTokenizerEntries(registry, data.entries);
  port.postMessage({ type: 'ready' } satisfies PoolReply);
} catch (e) {
  port.postMessage({ type: 'failed', message: (e as Error).message } satisfies PoolReply);
}

port.on('message', (task: PoolTask) => {
  const stop = () => Atomics.load(cancel, 0) === task.id;
  try {
    if (stop()) {
      port.postMessage({ type: 'cancelled', id: task.id } satisfies PoolReply);
      return;
    }
    const body = task.body ?? (JSON.parse(decoder.decode(task.raw)) as Record<string, unknown>);
    let ids = registry.tokenize(task.route, body, task.model, stop) ?? null;
    if (ids && (ids.byteOffset !== 0 || ids.buffer.byteLength !== ids.byteLength)) ids = ids.slice();
    port.postMessage({ type: 'done', id: task.id, ids } satisfies PoolReply, ids ? [ids.buffer as ArrayBuffer] : []);
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
});
