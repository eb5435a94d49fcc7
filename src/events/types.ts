/**
 * KV-cache events after decoding, whatever the wire shape (vLLM positional arrays or maps,
 * SGLang), ready to apply to the block index. Engine block hashes are normalised to unsigned
 * 64-bit bigints (negative i64 reinterpreted, bytes → low 8 bytes big-endian). They are only
 * identifiers for parent links and removals: the index hashes `tokenIds` itself.
 */
export type KvCacheEvent =
  | {
      type: 'stored';
      blockHashes: bigint[];
      parentBlockHash: bigint | null;
      /** Concatenated tokens of the stored blocks (may be empty for CPU-offload stores). */
      tokenIds: number[];
      blockSize: number;
      medium: string | null;
      loraName: string | null;
      /**
       * Deprecated integer adapter id (vLLM `lora_id`, SGLang `lora_id`). Used only to keep an
       * adapter's blocks apart when the engine sends no `lora_name`.
       */
      loraId?: number | null;
      /**
       * vLLM hybrid models (one KV-cache group per attention kind): the group that stored the
       * blocks and its kind (`full_attention`, `mla_attention`, `sink_full_attention`,
       * `sliding_window`, `sliding_window_mla`, `mamba`, `unknown`). Absent/null: one group.
       */
      groupIdx?: number | null;
      kvCacheSpecKind?: string | null;
    }
  | { type: 'removed'; blockHashes: bigint[]; medium: string | null; groupIdx?: number | null }
  | { type: 'cleared' };

/** One decoded ZMQ message: `[ts, events, dp_rank]` with its sequence number. */
export interface KvEventBatch {
  seq: bigint;
  /** Publisher timestamp, seconds since the epoch (float). */
  ts: number;
  /** data_parallel_rank (vLLM) or attn_dp_rank (SGLang); null when absent. */
  dpRank: number | null;
  events: KvCacheEvent[];
  /** Events in this batch that could not be decoded (counted, skipped). */
  malformed: number;
}
