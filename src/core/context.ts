import type { IncomingHttpHeaders } from 'node:http';

/**
 * Block hashes of a request's tokens computed where the tokens were (a tokenizer thread,
 * cache/block-index.ts hashBlocksU64 and sequenceHashes), for the block size and seed (LoRA
 * adapter) they were asked for: a policy uses them only when both match its own.
 */
export interface BlockHashes {
  readonly blockSize: number;
  readonly seed: bigint;
  /** hashBlocks(tokens, blockSize, seed) */
  readonly local: BigUint64Array;
  /** sequenceHashes(local) */
  readonly seq: BigUint64Array;
}

export type RouteName = 'chat' | 'completions' | 'embeddings' | 'generate';

/** What a policy may look at to choose a worker. Built once per request by the HTTP front. */
export interface RequestContext {
  readonly requestId: string;
  readonly route: RouteName;
  /** Model named in the request, resolved to a served model. */
  readonly model: string;
  /**
   * LoRA adapter the request names (its `model` is an adapter a worker of `model` lists), or
   * undefined for the base model. Engines key an adapter's KV blocks apart from the base model's.
   */
  readonly loraName?: string;
  /** The text used for prefix affinity (all chat messages in order, the prompt, or /generate text). */
  readonly routingText: string;
  /** Token ids when the router knows them (tokenizer configured, or /generate input_ids). */
  readonly tokenIds?: ArrayLike<number>;
  /** Block hashes of `tokenIds` computed with them off the event loop (tokenizer threads), when asked for. */
  readonly blockHashes?: BlockHashes;
  readonly headers: IncomingHttpHeaders;
  readonly stream: boolean;
  /** Output tokens asked for (max_tokens and the like), when the request says. */
  readonly maxOutputTokens?: number;
  /** Arrival time on the policy clock (ms). */
  readonly arrivalMs: number;
}
