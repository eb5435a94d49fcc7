/**
 * KV-cache events as the simulated engine produces them, before wire encoding.
 * Mirrors vLLM's KVEventBatch events (vllm/distributed/kv_events.py). Block hashes are
 * unsigned 64-bit integers (bigint), exactly as vLLM sends them with int block hashes.
 */
export type KvEvent =
  | {
      type: 'BlockStored';
      /** N consecutive full blocks stored by this event. */
      blockHashes: bigint[];
      /** Hash of the block before blockHashes[0]; null for the first block of a sequence. */
      parentBlockHash: bigint | null;
      /** Concatenated tokens of all N blocks (length N * blockSize). */
      tokenIds: number[];
      blockSize: number;
      loraId: number | null;
      medium: string | null;
      loraName: string | null;
    }
  | { type: 'BlockRemoved'; blockHashes: bigint[]; medium: string | null }
  | { type: 'AllBlocksCleared' };

/** Where an engine sends its events; the publisher batches them once per scheduler step. */
export type KvEventSink = (events: KvEvent[]) => void;
