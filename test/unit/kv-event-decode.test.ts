/**
 * decodeKvEventBatch against golden msgpack payloads written byte by byte from the documented
 * layout (docs reference §1.2, §1.3, §1.7): no kvgate encoder is involved. The helpers below only
 * spell msgpack headers as hex (fixarray 0x9n, fixmap 0x8n, fixstr 0xa0|len, nil 0xc0, ...).
 */
import { describe, expect, it } from 'vitest';
import { decodeKvEventBatch, decodeSeq, KvDecodeError, normalizeBlockHash } from '../../src/events/decode.js';
import type { KvEventBatch } from '../../src/events/types.js';

// ---- hand encoding (hex) ---------------------------------------------------------------------
const h8 = (n: number): string => n.toString(16).padStart(2, '0');
const arr = (n: number): string => (n < 16 ? h8(0x90 | n) : 'dc' + n.toString(16).padStart(4, '0'));
const map = (n: number): string => h8(0x80 | n); // n < 16 in these tests
const str = (s: string): string => {
  const b = Buffer.from(s, 'utf8');
  return (b.length < 32 ? h8(0xa0 | b.length) : 'd9' + h8(b.length)) + b.toString('hex');
};
const NIL = 'c0';
const f64 = (v: number): string => {
  const b = Buffer.alloc(8);
  b.writeDoubleBE(v);
  return 'cb' + b.toString('hex');
};
const bin = (bytesHex: string): string => 'c4' + h8(bytesHex.length / 2) + bytesHex;
const payload = (...parts: string[]): Buffer => Buffer.from(parts.join(''), 'hex');
const seq = (hex16: string): Buffer => Buffer.from(hex16, 'hex');
const SEQ7 = seq('0000000000000007');

const TS = 1789095808.83;

// Hash encodings (each with the exact u64 it must normalize to).
const H_U64_BIG = 'cffedcba9876543210'; // uint64 above 2^63
const V_U64_BIG = 0xfedc_ba98_7654_3210n;
const H_I8_NEG = 'd085'; // int8 -123
const V_I8_NEG = 2n ** 64n - 123n;
const H_I64_NEG = 'd38000000000000001'; // int64 -(2^63 - 1)
const V_I64_NEG = 2n ** 64n - (2n ** 63n - 1n); // = 2^63 + 1
const H_FIX = '2a'; // positive fixint 42
const V_FIX = 42n;
const BIN32 = Array.from({ length: 32 }, (_, i) => h8(i)).join(''); // 00 01 .. 1f (a raw sha256 digest)
const H_BIN = bin(BIN32);
const V_BIN = 0x18191a1b1c1d1e1fn; // low 8 bytes, big-endian

describe('decodeSeq', () => {
  it('reads 8 bytes big-endian unsigned', () => {
    expect(decodeSeq(seq('0000000000000000'))).toBe(0n);
    expect(decodeSeq(seq('0000000000000100'))).toBe(256n);
    expect(decodeSeq(seq('fffffffffffffffe'))).toBe(2n ** 64n - 2n);
    // a view into a larger buffer (ZMQ frames can be slices)
    const big = Buffer.from('aa0000000000000009bb', 'hex');
    expect(decodeSeq(big.subarray(1, 9))).toBe(9n);
  });

  it('rejects a seq frame that is not 8 bytes', () => {
    expect(() => decodeSeq(seq('00000000000007'))).toThrow(KvDecodeError);
    expect(() => decodeKvEventBatch(Buffer.alloc(9), payload(arr(2), f64(TS), arr(0)))).toThrow(KvDecodeError);
  });
});

describe('decodeKvEventBatch: legacy positional events (vLLM ≤ 0.23)', () => {
  it('decodes a full batch: every field, every hash encoding, exact bigints', () => {
    const buf = payload(
      arr(3), f64(TS), arr(3),
      // ["BlockStored", [u64, int8, i64, fixint, bin], parent(u64), tokens, block_size, lora_id, medium, lora_name]
      arr(8), str('BlockStored'), arr(5), H_U64_BIG, H_I8_NEG, H_I64_NEG, H_FIX, H_BIN,
      'cf8000000000000000', // parent 2^63 as uint64
      arr(5), '01', 'ccc8', 'cd1234', 'ce00011170', '7f', // tokens 1, 200, 0x1234, 70000, 127
      '04', NIL, str('GPU'), str('my-lora'),
      // ["BlockRemoved", [fixint, u64], "CPU"]
      arr(3), str('BlockRemoved'), arr(2), H_FIX, H_U64_BIG, str('CPU'),
      arr(1), str('AllBlocksCleared'),
      '02', // data_parallel_rank
    );
    const b = decodeKvEventBatch(SEQ7, buf);
    expect(b).toEqual<KvEventBatch>({
      seq: 7n,
      ts: TS,
      dpRank: 2,
      malformed: 0,
      events: [
        {
          type: 'stored',
          blockHashes: [V_U64_BIG, V_I8_NEG, V_I64_NEG, V_FIX, V_BIN],
          parentBlockHash: 2n ** 63n,
          tokenIds: [1, 200, 0x1234, 70000, 127],
          blockSize: 4,
          medium: 'GPU',
          loraName: 'my-lora',
        },
        { type: 'removed', blockHashes: [V_FIX, V_U64_BIG], medium: 'CPU' },
        { type: 'cleared' },
      ],
    });
    for (const h of (b.events[0] as { blockHashes: bigint[] }).blockHashes) expect(typeof h).toBe('bigint');
    expect(V_I64_NEG).toBe(0x8000_0000_0000_0001n);
  });

  it('missing trailing fields take their defaults; a 2-element batch has no dp rank', () => {
    const buf = payload(
      arr(2), f64(TS), arr(3),
      arr(5), str('BlockStored'), arr(1), '07', NIL, arr(2), '0a', '0b', '02', // no lora_id / medium / lora_name
      arr(7), str('BlockStored'), arr(1), '08', '07', arr(0), '02', NIL, str('CPU_PINNED'), // SGLang 7-field form, empty tokens
      arr(2), str('BlockRemoved'), arr(1), '07', // no medium
    );
    const b = decodeKvEventBatch(SEQ7, buf);
    expect(b.dpRank).toBeNull();
    expect(b.malformed).toBe(0);
    expect(b.events).toEqual([
      { type: 'stored', blockHashes: [7n], parentBlockHash: null, tokenIds: [10, 11], blockSize: 2, medium: null, loraName: null },
      { type: 'stored', blockHashes: [8n], parentBlockHash: 7n, tokenIds: [], blockSize: 2, medium: 'CPU_PINNED', loraName: null },
      { type: 'removed', blockHashes: [7n], medium: null },
    ]);
  });

  it('reads group_idx and kv_cache_spec_kind at their positions, ignores extra_keys and future fields', () => {
    const buf = payload(
      arr(3), f64(TS), arr(3),
      // 8 known + extra_keys [nil], group_idx 0, kv_cache_spec_kind, sliding_window nil, 2 unknown future fields
      arr(14), str('BlockStored'), arr(1), H_FIX, NIL, arr(1), '05', '01', NIL, str('GPU'), NIL,
      arr(1), NIL, '00', str('full_attention'), NIL, str('local'), arr(2), '01', '02',
      arr(5), str('BlockRemoved'), arr(1), H_FIX, str('GPU'), '01', str('owned'),
      arr(2), str('AllBlocksCleared'), map(0),
      '00',
    );
    const b = decodeKvEventBatch(SEQ7, buf);
    expect(b.malformed).toBe(0);
    expect(b.dpRank).toBe(0);
    expect(b.events).toEqual([
      { type: 'stored', blockHashes: [42n], parentBlockHash: null, tokenIds: [5], blockSize: 1, medium: 'GPU', loraName: null, groupIdx: 0, kvCacheSpecKind: 'full_attention' },
      { type: 'removed', blockHashes: [42n], medium: 'GPU', groupIdx: 1 },
      { type: 'cleared' },
    ]);
  });
});

describe('decodeKvEventBatch: map events tagged under "type" (vLLM ≥ 0.24)', () => {
  it('reads fields by name in any order and ignores unknown keys', () => {
    const buf = payload(
      arr(3), f64(TS), arr(3),
      map(12),
      str('token_ids'), arr(4), '01', '02', '03', '04',
      str('extra_keys'), arr(2), NIL, arr(1), str('salt'),
      str('type'), str('BlockStored'),
      str('block_size'), '02',
      str('lora_name'), NIL,
      str('block_hashes'), arr(2), H_I64_NEG, H_BIN,
      str('medium'), str('GPU'),
      str('group_idx'), '00',
      str('parent_block_hash'), H_I8_NEG,
      str('kv_cache_spec_kind'), str('full_attention'),
      str('lora_id'), NIL,
      str('some_future_field'), map(1), str('x'), '01',
      map(4), str('medium'), NIL, str('type'), str('BlockRemoved'), str('block_hashes'), arr(1), H_U64_BIG, str('group_idx'), '03',
      map(2), str('type'), str('AllBlocksCleared'), str('reason'), str('reset_prefix_cache'),
      '01',
    );
    const b = decodeKvEventBatch(SEQ7, buf);
    expect(b).toEqual<KvEventBatch>({
      seq: 7n,
      ts: TS,
      dpRank: 1,
      malformed: 0,
      events: [
        { type: 'stored', blockHashes: [V_I64_NEG, V_BIN], parentBlockHash: V_I8_NEG, tokenIds: [1, 2, 3, 4], blockSize: 2, medium: 'GPU', loraName: null, groupIdx: 0, kvCacheSpecKind: 'full_attention' },
        { type: 'removed', blockHashes: [V_U64_BIG], medium: null, groupIdx: 3 },
        { type: 'cleared' },
      ],
    });
  });

  it('omitted optional keys (omit_defaults) default to null', () => {
    const buf = payload(
      arr(3), f64(TS), arr(2),
      map(4), str('type'), str('BlockStored'), str('block_hashes'), arr(1), H_FIX, str('token_ids'), arr(1), '09', str('block_size'), '01',
      map(2), str('type'), str('BlockRemoved'), str('block_hashes'), arr(0),
      '00',
    );
    expect(decodeKvEventBatch(SEQ7, buf).events).toEqual([
      { type: 'stored', blockHashes: [42n], parentBlockHash: null, tokenIds: [9], blockSize: 1, medium: null, loraName: null },
      { type: 'removed', blockHashes: [], medium: null },
    ]);
  });
});

describe('decodeKvEventBatch: mixed shapes, SGLang, robustness', () => {
  it('decodes both event shapes in one batch, in order', () => {
    const buf = payload(
      arr(3), f64(TS), arr(4),
      arr(8), str('BlockStored'), arr(1), '01', NIL, arr(1), '64', '01', NIL, str('GPU'), NIL,
      map(3), str('type'), str('BlockRemoved'), str('block_hashes'), arr(1), '01', str('medium'), str('GPU'),
      arr(1), str('AllBlocksCleared'),
      map(8), str('type'), str('BlockStored'), str('block_hashes'), arr(1), '02', str('parent_block_hash'), '01',
      str('token_ids'), arr(1), '65', str('block_size'), '01', str('lora_id'), NIL, str('medium'), str('GPU'), str('lora_name'), NIL,
      '00',
    );
    const b = decodeKvEventBatch(SEQ7, buf);
    expect(b.malformed).toBe(0);
    expect(b.events.map((e) => e.type)).toEqual(['stored', 'removed', 'cleared', 'stored']);
    expect(b.events[3]).toEqual({ type: 'stored', blockHashes: [2n], parentBlockHash: 1n, tokenIds: [101], blockSize: 1, medium: 'GPU', loraName: null });
  });

  it('SGLang: attn_dp_rank in position 2, signed i64 page hashes', () => {
    const buf = payload(
      arr(3), f64(TS), arr(1),
      arr(7), str('BlockStored'), arr(2), 'd3fffffffffffffffe', 'd3000000010000000a', 'd3c000000000000000',
      arr(2), '0b', '0c', '01', NIL, str('GPU'),
      '03', // attn_dp_rank
    );
    const b = decodeKvEventBatch(SEQ7, buf);
    expect(b.dpRank).toBe(3);
    expect(b.events).toEqual([
      {
        type: 'stored',
        blockHashes: [0xffff_ffff_ffff_fffen, 0x1_0000_000an],
        parentBlockHash: 0xc000_0000_0000_0000n,
        tokenIds: [11, 12],
        blockSize: 1,
        medium: 'GPU',
        loraName: null,
      },
    ]);
  });

  it('accepts an outer map defensively (data_parallel_rank or attn_dp_rank), integer ts', () => {
    const ev = arr(2) + str('BlockRemoved') + arr(1) + H_FIX;
    const a = decodeKvEventBatch(SEQ7, payload(map(3), str('ts'), 'ce6aa2b5c0', str('events'), arr(1), ev, str('data_parallel_rank'), '05'));
    expect(a).toEqual({ seq: 7n, ts: 0x6aa2b5c0, dpRank: 5, malformed: 0, events: [{ type: 'removed', blockHashes: [42n], medium: null }] });
    const b = decodeKvEventBatch(SEQ7, payload(map(3), str('events'), arr(1), ev, str('attn_dp_rank'), '01', str('ts'), f64(1.5)));
    expect([b.ts, b.dpRank, b.events.length]).toEqual([1.5, 1, 1]);
  });

  it('counts and skips malformed events, keeping the rest of the batch in order', () => {
    const good1 = arr(3) + str('BlockRemoved') + arr(1) + '01' + str('GPU');
    const good2 = map(2) + str('type') + str('AllBlocksCleared') + str('x') + NIL;
    const good3 = arr(5) + str('BlockStored') + arr(1) + '03' + NIL + arr(0) + '10';
    const bad = [
      arr(3) + str('BlockStored') + str('not-a-list') + NIL, // block_hashes not an array
      arr(4) + str('BlockStored') + arr(1) + '01' + NIL + arr(1) + '01', // no block_size (required)
      arr(5) + str('BlockStored') + arr(1) + '01' + str('parent?') + arr(0) + '01', // parent not a hash
      arr(5) + str('BlockStored') + arr(1) + '01' + NIL + arr(1) + str('tok') + '01', // token not an int
      arr(2) + str('BlockStored') + arr(1) + f64(1.5), // float hash
      arr(2) + str('BlockRemoved') + arr(2) + '01' + str('abc'), // string hash
      arr(2) + str('BlockRemoved') + arr(1) + bin(''), // empty bytes
      arr(2) + str('BlockUpdated') + arr(0), // unknown tag
      map(1) + str('block_hashes') + arr(0), // map without "type"
      arr(0), // empty array
      str('BlockStored'), // neither array nor map
      '2a', // an int
      NIL,
    ];
    const buf = payload(arr(3), f64(TS), arr(bad.length + 3), bad[0]!, good1, ...bad.slice(1, 7), good2, ...bad.slice(7), good3, '00');
    const b = decodeKvEventBatch(SEQ7, buf);
    expect(b.malformed).toBe(bad.length);
    expect(b.events).toEqual([
      { type: 'removed', blockHashes: [1n], medium: 'GPU' },
      { type: 'cleared' },
      { type: 'stored', blockHashes: [3n], parentBlockHash: null, tokenIds: [], blockSize: 16, medium: null, loraName: null },
    ]);
  });

  it('a non-numeric ts or dp rank does not make the batch unusable', () => {
    const b = decodeKvEventBatch(SEQ7, payload(arr(3), str('yesterday'), arr(1), arr(1), str('AllBlocksCleared'), str('rank0')));
    expect(Number.isNaN(b.ts)).toBe(true);
    expect(b.dpRank).toBeNull();
    expect(b.events).toEqual([{ type: 'cleared' }]);
    expect(decodeKvEventBatch(SEQ7, payload(arr(3), f64(TS), arr(0), NIL)).dpRank).toBeNull();
    expect(decodeKvEventBatch(SEQ7, payload(arr(3), f64(TS), arr(0), 'ff')).dpRank).toBeNull(); // -1
  });

  it('throws KvDecodeError only when the whole payload is unusable', () => {
    const cases: Array<[string, Buffer]> = [
      ['empty', Buffer.alloc(0)],
      ['reserved byte 0xc1', payload('c1')],
      ['truncated', payload(arr(3), f64(TS), arr(2), arr(1))],
      ['trailing garbage', payload(arr(2), f64(TS), arr(0), '00')],
      ['outer is a string', payload(str('hello'))],
      ['outer is an int', payload('05')],
      ['outer is nil', payload(NIL)],
      ['events not an array', payload(arr(3), f64(TS), str('events'), '00')],
      ['events missing', payload(arr(1), f64(TS))],
      ['map without events', payload(map(1), str('ts'), f64(TS))],
    ];
    for (const [name, buf] of cases) {
      expect(() => decodeKvEventBatch(SEQ7, buf), name).toThrow(KvDecodeError);
    }
    try {
      decodeKvEventBatch(SEQ7, payload('c1'));
    } catch (err) {
      expect((err as Error).name).toBe('KvDecodeError');
    }
  });
});

describe('block hash normalization: every msgpack int width, bytes', () => {
  const cases: Array<[string, string, bigint]> = [
    ['positive fixint', '00', 0n],
    ['positive fixint max', '7f', 127n],
    ['negative fixint -1', 'ff', 2n ** 64n - 1n],
    ['negative fixint -32', 'e0', 2n ** 64n - 32n],
    ['uint8', 'ccff', 255n],
    ['uint16', 'cdbeef', 0xbeefn],
    ['uint32', 'cedeadbeef', 0xdeadbeefn],
    ['uint64 small', 'cf0000000000000005', 5n],
    ['uint64 2^53+1 (not a safe double)', 'cf0020000000000001', 2n ** 53n + 1n],
    ['uint64 max', 'cfffffffffffffffff', 2n ** 64n - 1n],
    ['uint64 > 2^63', H_U64_BIG, V_U64_BIG],
    ['int8 positive', 'd005', 5n],
    ['int8 negative', H_I8_NEG, V_I8_NEG],
    ['int16 negative', 'd1ff00', 2n ** 64n - 256n],
    ['int32 negative', 'd280000000', 2n ** 64n - 2n ** 31n],
    ['int64 positive', 'd30000000100000000', 2n ** 32n],
    ['int64 min', 'd38000000000000000', 2n ** 63n],
    ['int64 negative', H_I64_NEG, V_I64_NEG],
    ['bin 32 (digest) → low 8 bytes', H_BIN, V_BIN],
    ['bin 8', bin('0102030405060708'), 0x0102030405060708n],
    ['bin 3', bin('010203'), 0x010203n],
  ];
  it.each(cases)('%s', (_name, hashHex, expected) => {
    const b = decodeKvEventBatch(SEQ7, payload(arr(3), f64(TS), arr(1), arr(3), str('BlockRemoved'), arr(1), hashHex, NIL, '00'));
    expect(b.malformed).toBe(0);
    expect(b.events).toEqual([{ type: 'removed', blockHashes: [expected], medium: null }]);
  });

  it('normalizeBlockHash rejects non-hashes', () => {
    for (const v of [1.5, Number.NaN, 'ab', null, undefined, true, {}, [1], new Uint8Array(0), 2n ** 64n, -(2n ** 63n) - 1n]) {
      expect(normalizeBlockHash(v)).toBeNull();
    }
    expect(normalizeBlockHash(-1)).toBe(2n ** 64n - 1n);
    expect(normalizeBlockHash(Buffer.from(BIN32, 'hex').subarray(4, 20))).toBe(0x0c0d0e0f10111213n); // view with an offset
  });
});
