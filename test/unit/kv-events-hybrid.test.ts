/**
 * KV events as current vLLM publishes them for hybrid-attention models (Gemma-3, gpt-oss): one
 * BlockStored per KV-cache group, with `group_idx` and `kv_cache_spec_kind`, the groups sharing
 * block hashes; BlockRemoved with `group_idx`. Payloads are built the way vLLM's msgspec structs
 * serialise (tagged maps with `type`, or positional arrays in field declaration order:
 * block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, extra_keys,
 * group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window), decoded by kvgate's decoder and
 * applied to the block index.
 */
import { Encoder } from '@msgpack/msgpack';
import { describe, expect, it } from 'vitest';
import { BlockIndex, hashBlocks } from '../../src/cache/block-index.js';
import { decodeKvEventBatch } from '../../src/events/decode.js';

const enc = new Encoder({ useBigInt64: true });
const BS = 16;
const SEQ = Buffer.from('0000000000000001', 'hex');
const tokens = (n: number, from = 100) => Array.from({ length: n * BS }, (_, i) => from + i);
/** 32-byte sha256-style hash (bytes, as vLLM's default sha256_cbor hashes are sent). */
const bytesHash = (i: number) => Uint8Array.from({ length: 32 }, (_, k) => (k === 31 ? i : k === 0 ? 0xab : 0));
const bytesValue = (i: number) => BigInt(i); // low 8 bytes big-endian

interface Stored {
  hashes: Array<Uint8Array | bigint | number>;
  parent: Uint8Array | bigint | number | null;
  tokenIds: number[];
  blockSize?: number;
  group: number;
  kind: string;
  window?: number | null;
  extraKeys?: Array<unknown[] | null> | null;
}

function storedMap(s: Stored) {
  return {
    type: 'BlockStored',
    block_hashes: s.hashes,
    parent_block_hash: s.parent,
    token_ids: s.tokenIds,
    block_size: s.blockSize ?? BS,
    lora_id: null,
    medium: 'GPU',
    lora_name: null,
    extra_keys: s.extraKeys ?? null,
    group_idx: s.group,
    kv_cache_spec_kind: s.kind,
    kv_cache_spec_sliding_window: s.window ?? null,
  };
}

function storedArray(s: Stored) {
  return ['BlockStored', s.hashes, s.parent, s.tokenIds, s.blockSize ?? BS, null, 'GPU', null, s.extraKeys ?? null, s.group, s.kind, s.window ?? null];
}

const removedMap = (hashes: Stored['hashes'], group: number) => ({ type: 'BlockRemoved', block_hashes: hashes, medium: 'GPU', group_idx: group });
const removedArray = (hashes: Stored['hashes'], group: number) => ['BlockRemoved', hashes, 'GPU', group];

function apply(index: BlockIndex, events: unknown[], source = 'w1') {
  const batch = decodeKvEventBatch(SEQ, Buffer.from(enc.encode([1_790_000_000.5, events, 0])));
  expect(batch.malformed).toBe(0);
  index.apply(source, batch.events);
  return batch;
}

describe.each([
  ['maps tagged type', storedMap, removedMap],
  ['positional arrays', storedArray, removedArray],
] as const)('vLLM hybrid-model KV events (%s)', (_shape, stored, removed) => {
  it('decodes group_idx, kv_cache_spec_kind, bytes and int hashes, extra_keys', () => {
    const batch = decodeKvEventBatch(
      SEQ,
      Buffer.from(
        enc.encode([
          1.5,
          [
            stored({ hashes: [bytesHash(1), bytesHash(2)], parent: null, tokenIds: tokens(2), group: 0, kind: 'full_attention', extraKeys: [null, ['salt']] }),
            stored({ hashes: [0xfedcba9876543210n, -5n], parent: 7, tokenIds: tokens(2), group: 1, kind: 'sliding_window', window: 1024 }),
            removed([bytesHash(2)], 1),
          ],
          0,
        ]),
      ),
    );
    expect(batch.malformed).toBe(0);
    expect(batch.events[0]).toMatchObject({ type: 'stored', blockHashes: [bytesValue(1), bytesValue(2)], groupIdx: 0, kvCacheSpecKind: 'full_attention', blockSize: BS });
    expect(batch.events[1]).toMatchObject({ blockHashes: [0xfedcba9876543210n, 2n ** 64n - 5n], parentBlockHash: 7n, groupIdx: 1, kvCacheSpecKind: 'sliding_window' });
    expect(batch.events[2]).toEqual({ type: 'removed', blockHashes: [bytesValue(2)], medium: 'GPU', groupIdx: 1 });
  });

  it('two groups sharing hashes: the sliding-window group evicting leaves the full-attention prefix routable', () => {
    const index = new BlockIndex();
    const prompt = tokens(4);
    const hashes = [1, 2, 3, 4].map(bytesHash);
    apply(index, [
      stored({ hashes, parent: null, tokenIds: prompt, group: 0, kind: 'full_attention' }),
      stored({ hashes, parent: null, tokenIds: prompt, group: 1, kind: 'sliding_window', window: 32 }),
    ]);
    expect(index.matchTokens(prompt).get('w1')).toBe(4);
    // The sliding-window group frees everything outside its window (the same hashes).
    apply(index, [removed(hashes.slice(0, 3), 1)]);
    expect(index.matchTokens(prompt).get('w1')).toBe(4);
    expect(index.stats().unknownRemoved).toBe(0);
    // The full-attention group evicting does remove them.
    apply(index, [removed([hashes[3]], 0)]);
    expect(index.matchTokens(prompt).get('w1')).toBe(3);
    apply(index, [removed(hashes.slice(0, 3), 0)]);
    expect(index.matchTokens(prompt).get('w1') ?? 0).toBe(0);
  });

  it('two full-attention groups sharing hashes each hold their own reference', () => {
    const index = new BlockIndex();
    const prompt = tokens(2);
    const hashes = [11, 12].map(bytesHash);
    apply(index, [
      stored({ hashes, parent: null, tokenIds: prompt, group: 0, kind: 'full_attention' }),
      stored({ hashes, parent: null, tokenIds: prompt, group: 2, kind: 'mla_attention' }),
    ]);
    apply(index, [removed(hashes, 2)]);
    expect(index.matchTokens(prompt).get('w1')).toBe(2);
    apply(index, [removed(hashes, 0)]);
    expect(index.matchTokens(prompt).get('w1') ?? 0).toBe(0);
  });

  it('a group with another block size never sets or breaks the index block size', () => {
    const index = new BlockIndex();
    // The sliding-window group (block size 32) reports first: it must not fix the block size.
    apply(index, [stored({ hashes: [bytesHash(21)], parent: null, tokenIds: tokens(2), blockSize: 32, group: 1, kind: 'sliding_window' })]);
    expect(index.blockSize).toBeNull();
    apply(index, [stored({ hashes: [21, 22].map(bytesHash), parent: null, tokenIds: tokens(2), group: 0, kind: 'full_attention' })]);
    expect(index.blockSize).toBe(BS);
    // A Mamba group with a huge block later: ignored, the full-attention blocks still match.
    apply(index, [stored({ hashes: [bytesHash(23)], parent: null, tokenIds: tokens(8), blockSize: 8 * BS, group: 3, kind: 'mamba' })]);
    expect(index.blockSize).toBe(BS);
    expect(index.stats().blockSizeMismatch).toBe(0);
    expect(index.stats().ignoredGroup).toBe(2);
    expect(index.matchTokens(tokens(2)).get('w1')).toBe(2);
    // Its removals are ignored too.
    apply(index, [removed([bytesHash(21)], 3)]);
    expect(index.matchTokens(tokens(2)).get('w1')).toBe(2);
  });

  it('a parent named by a full-attention group is found in that group', () => {
    const index = new BlockIndex();
    apply(index, [stored({ hashes: [31n], parent: null, tokenIds: tokens(1), group: 2, kind: 'full_attention' })]);
    apply(index, [stored({ hashes: [32n], parent: 31n, tokenIds: tokens(1, 100 + BS), group: 2, kind: 'full_attention' })]);
    expect(index.matchTokens(tokens(2)).get('w1')).toBe(2);
    expect(index.stats().unknownParent).toBe(0);
    expect(hashBlocks(tokens(2), BS)).toHaveLength(2);
  });
});

it('single-group events (no group_idx) behave as before', () => {
  const index = new BlockIndex();
  const ev = { type: 'BlockStored', block_hashes: [1, 2], parent_block_hash: null, token_ids: tokens(2), block_size: BS, lora_id: null, medium: 'GPU' };
  apply(index, [ev]);
  expect(index.matchTokens(tokens(2)).get('w1')).toBe(2);
  apply(index, [{ type: 'BlockRemoved', block_hashes: [2], medium: 'GPU' }]);
  expect(index.matchTokens(tokens(2)).get('w1')).toBe(1);
});
