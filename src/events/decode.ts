/**
 * Decoder for one vLLM / SGLang KV-event ZMQ message (docs reference §1.2, §1.3, §1.7) into the
 * normalized {@link KvEventBatch}.
 *
 * Wire contract accepted:
 *  - seq frame: exactly 8 bytes, big-endian unsigned;
 *  - payload: msgpack `[ts, [events...], dp_rank?]` (vLLM data_parallel_rank / SGLang attn_dp_rank,
 *    left off when None). An outer map `{ts, events, data_parallel_rank | attn_dp_rank}` is accepted
 *    defensively;
 *  - events, both shapes mixed freely in one batch:
 *      positional arrays tagged at [0] (vLLM's msgspec array_like structs, older SGLang), fields in
 *      vLLM's declaration order (trailing defaults omitted):
 *        ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
 *         lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window,
 *         locality, ownership, session_id]
 *        ["BlockRemoved", block_hashes, medium, group_idx, locality, ownership]
 *        ["AllBlocksCleared"]
 *      maps tagged under "type" (vLLM ≥ 0.24, newer SGLang), unknown keys ignored.
 *    Hybrid models publish one BlockStored per KV-cache group with `group_idx` and
 *    `kv_cache_spec_kind` (and BlockRemoved with `group_idx`); both are kept for the index.
 *    `extra_keys` (multimodal / LoRA / salt per block) is read past and not used. `lora_name` (vLLM)
 *    and the integer `lora_id` (vLLM's deprecated field, SGLang) are both kept: the index keys an
 *    adapter's blocks apart from the base model's and from other adapters'.
 *    SGLang's newer events are the same maps (tag under "type"); its HiCache tiers come as
 *    `medium` ("CPU_PINNED", "CPU_TIER1", "DISK", ...).
 *    Missing trailing fields take their defaults (parent/medium/lora_name null, token_ids []);
 *    extra positions / unknown keys are ignored.
 *  - block hashes: any msgpack int width (number or bigint), normalized to an unsigned 64-bit bigint
 *    (negative i64 reinterpreted two's complement); bin → its low 8 bytes, big-endian.
 *
 * Error policy: a single bad event (unknown tag, missing block_hashes / block_size, a hash that is
 * neither int nor bytes, ...) is skipped and counted in `malformed`; the rest of the batch is kept.
 * {@link KvDecodeError} is thrown only when the whole message is unusable (seq frame not 8 bytes,
 * payload not msgpack, outer value not an array/map, events not an array).
 */
import { Decoder } from '@msgpack/msgpack';
import type { KvCacheEvent, KvEventBatch } from './types.js';

/** The whole message could not be decoded; nothing in it is usable. */
export class KvDecodeError extends Error {
  override readonly name = 'KvDecodeError';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/**
 * One shared decoder (the functional `decode()` builds a new Decoder per call). Equivalent to
 * `decode(buf, { useBigInt64: true })`: int64/uint64 come back as bigint, narrower ints as number.
 * Non-string map keys (never sent by vLLM/SGLang) are stringified instead of failing the payload.
 */
const decoder = new Decoder({
  useBigInt64: true,
  mapKeyConverter: (key: unknown) => (typeof key === 'string' || typeof key === 'number' ? key : String(key)),
});

const U64_MASK = (1n << 64n) - 1n;

/** The seq frame as an unsigned 64-bit bigint; throws KvDecodeError unless it is exactly 8 bytes. */
export function decodeSeq(seqFrame: Uint8Array): bigint {
  if (seqFrame.length !== 8) throw new KvDecodeError(`seq frame must be 8 bytes, got ${seqFrame.length}`);
  const view = new DataView(seqFrame.buffer, seqFrame.byteOffset, 8);
  return view.getBigUint64(0, false);
}

/**
 * An engine block hash as an unsigned 64-bit bigint, or null when the value is not a hash
 * (not an integer and not bytes). Ints of any width; negative values are reinterpreted as u64;
 * bytes → the low (last) 8 bytes big-endian (fewer than 8 bytes: their big-endian value).
 */
export function normalizeBlockHash(v: unknown): bigint | null {
  switch (typeof v) {
    case 'number':
      if (!Number.isSafeInteger(v)) return null;
      return v >= 0 ? BigInt(v) : BigInt.asUintN(64, BigInt(v));
    case 'bigint':
      if (v >= 0n) return v <= U64_MASK ? v : null;
      return v >= -(1n << 63n) ? BigInt.asUintN(64, v) : null;
    case 'object': {
      if (!(v instanceof Uint8Array) || v.length === 0) return null;
      const n = v.length;
      if (n >= 8) return new DataView(v.buffer, v.byteOffset + n - 8, 8).getBigUint64(0, false);
      let out = 0n;
      for (let i = 0; i < n; i++) out = (out << 8n) | BigInt(v[i]!);
      return out;
    }
    default:
      return null;
  }
}

/** block_hashes → bigint[]; null when not an array or any element is not a hash. */
function hashList(v: unknown): bigint[] | null {
  if (!Array.isArray(v)) return null;
  const out = new Array<bigint>(v.length);
  for (let i = 0; i < v.length; i++) {
    const h = normalizeBlockHash(v[i]);
    if (h === null) return null;
    out[i] = h;
  }
  return out;
}

/** token_ids: absent/null → []; otherwise every element must be a non-negative safe integer. */
function tokenList(v: unknown): number[] | null {
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v)) return null;
  for (let i = 0; i < v.length; i++) {
    const t = v[i];
    if (typeof t !== 'number' || !Number.isSafeInteger(t) || t < 0) return null;
  }
  return v as number[];
}

/** Optional string field: anything but a string (absent, nil, wrong type) → null. */
function optString(v: unknown): string | null {
  return typeof v === 'string' ? v : null;
}

function smallInt(v: unknown): number | null {
  if (typeof v === 'number') return Number.isSafeInteger(v) ? v : null;
  if (typeof v === 'bigint') return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : null;
  return null;
}

/** Fields of an event, read positionally (array shape) or by name (map shape). */
interface RawStored {
  hashes: unknown;
  parent: unknown;
  tokens: unknown;
  blockSize: unknown;
  medium: unknown;
  loraName: unknown;
  loraId: unknown;
  groupIdx: unknown;
  kind: unknown;
}

/** group_idx: a non-negative integer, else null (absent, nil, nonsense). */
function groupOf(v: unknown): number | null {
  const g = smallInt(v);
  return g !== null && g >= 0 ? g : null;
}

function buildStored(f: RawStored): KvCacheEvent | null {
  const blockHashes = hashList(f.hashes);
  if (blockHashes === null) return null;
  let parentBlockHash: bigint | null = null;
  if (f.parent !== undefined && f.parent !== null) {
    parentBlockHash = normalizeBlockHash(f.parent);
    if (parentBlockHash === null) return null;
  }
  const tokenIds = tokenList(f.tokens);
  if (tokenIds === null) return null;
  const blockSize = smallInt(f.blockSize);
  if (blockSize === null || blockSize <= 0) return null;
  const ev: KvCacheEvent = { type: 'stored', blockHashes, parentBlockHash, tokenIds, blockSize, medium: optString(f.medium), loraName: optString(f.loraName) };
  const loraId = smallInt(f.loraId);
  if (loraId !== null) ev.loraId = loraId;
  const groupIdx = groupOf(f.groupIdx);
  const kind = optString(f.kind);
  if (groupIdx !== null) ev.groupIdx = groupIdx;
  if (kind !== null) ev.kvCacheSpecKind = kind;
  return ev;
}

function buildRemoved(hashes: unknown, medium: unknown, group: unknown): KvCacheEvent | null {
  const blockHashes = hashList(hashes);
  if (blockHashes === null) return null;
  const ev: KvCacheEvent = { type: 'removed', blockHashes, medium: optString(medium) };
  const groupIdx = groupOf(group);
  if (groupIdx !== null) ev.groupIdx = groupIdx;
  return ev;
}

/**
 * One event of either shape; null when malformed. SGLang's `BlockStoredWithMetadata`
 * (BlockStored + a trailing metadata field) is read as a BlockStored (metadata ignored).
 */
function decodeEvent(raw: unknown): KvCacheEvent | null {
  if (Array.isArray(raw)) {
    switch (raw[0]) {
      case 'BlockStored':
      case 'BlockStoredWithMetadata':
        // [tag, block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
        //  extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window, ...]
        return buildStored({ hashes: raw[1], parent: raw[2], tokens: raw[3], blockSize: raw[4], medium: raw[6], loraName: raw[7], loraId: raw[5], groupIdx: raw[9], kind: raw[10] });
      case 'BlockRemoved':
        // [tag, block_hashes, medium, group_idx, ...]
        return buildRemoved(raw[1], raw[2], raw[3]);
      case 'AllBlocksCleared':
        return { type: 'cleared' };
      default:
        return null;
    }
  }
  if (raw !== null && typeof raw === 'object' && !(raw instanceof Uint8Array)) {
    const m = raw as Record<string, unknown>;
    switch (m.type) {
      case 'BlockStored':
      case 'BlockStoredWithMetadata':
        return buildStored({
          hashes: m.block_hashes,
          parent: m.parent_block_hash,
          tokens: m.token_ids,
          blockSize: m.block_size,
          medium: m.medium,
          loraName: m.lora_name,
          loraId: m.lora_id,
          groupIdx: m.group_idx,
          kind: m.kv_cache_spec_kind,
        });
      case 'BlockRemoved':
        return buildRemoved(m.block_hashes, m.medium, m.group_idx);
      case 'AllBlocksCleared':
        return { type: 'cleared' };
      default:
        return null;
    }
  }
  return null;
}

/** Non-negative integer rank, else null (absent, nil, or nonsense). */
function dpRankOf(v: unknown): number | null {
  const r = smallInt(v);
  return r !== null && r >= 0 ? r : null;
}

/** ts as float seconds; NaN when absent or not numeric (the events are still usable). */
function tsOf(v: unknown): number {
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  return Number.NaN;
}

/**
 * Decodes one message: seq frame (8 bytes BE) and msgpack payload. Malformed events are skipped
 * and counted; throws KvDecodeError only when the whole message is unusable.
 * `ts` is NaN when the batch carries no numeric timestamp.
 */
export function decodeKvEventBatch(seqFrame: Buffer, payload: Buffer): KvEventBatch {
  const seq = decodeSeq(seqFrame);
  let outer: unknown;
  try {
    outer = decoder.decode(payload);
  } catch (err) {
    throw new KvDecodeError(`payload is not valid msgpack: ${(err as Error).message}`, { cause: err });
  }
  let tsRaw: unknown;
  let eventsRaw: unknown;
  let rankRaw: unknown;
  if (Array.isArray(outer)) {
    tsRaw = outer[0];
    eventsRaw = outer[1];
    rankRaw = outer[2];
  } else if (outer !== null && typeof outer === 'object' && !(outer instanceof Uint8Array)) {
    const m = outer as Record<string, unknown>;
    tsRaw = m.ts;
    eventsRaw = m.events;
    rankRaw = m.data_parallel_rank ?? m.attn_dp_rank ?? m.dp_rank;
  } else {
    throw new KvDecodeError(`batch must be a msgpack array or map, got ${outer === null ? 'nil' : typeof outer}`);
  }
  if (!Array.isArray(eventsRaw)) throw new KvDecodeError('batch has no events array');

  const events: KvCacheEvent[] = [];
  let malformed = 0;
  for (let i = 0; i < eventsRaw.length; i++) {
    const ev = decodeEvent(eventsRaw[i]);
    if (ev === null) malformed++;
    else events.push(ev);
  }
  return { seq, ts: tsOf(tsRaw), dpRank: dpRankOf(rankRaw), events, malformed };
}
