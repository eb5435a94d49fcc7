/**
 * msgpack encoding of a vLLM KVEventBatch, byte-for-byte as vLLM's msgspec encoder writes it.
 *
 * Why a dedicated writer instead of msgpackr: msgpackr 1.12 cannot produce msgspec's bytes here.
 *  - every bigint becomes 9 bytes, and below 2^63 it is tagged int64 (0xd3), while msgspec writes
 *    the smallest *unsigned* form for any non-negative int (fixint, uint8/16/32, uint64 0xcf);
 *  - an integral JS number above 2^32 is written as float64 (0xcb), so "bigint < 2^53 → number"
 *    would turn such hashes into floats on the wire;
 *  - an integral `ts` (e.g. 1789095808) is written as uint32, while msgspec writes a Python float
 *    as float64 always.
 * The schema is small and fixed, so a ~100 line writer gives exact control.
 *
 * Shapes (see docs reference §1.3):
 *  - batch: positional array `[ts: float64, events: [...], data_parallel_rank: int]`;
 *  - 'array' events (vLLM ≤ 0.23): `["BlockStored", block_hashes, parent_block_hash, token_ids,
 *    block_size, lora_id, medium, lora_name]`, `["BlockRemoved", block_hashes, medium]`,
 *    `["AllBlocksCleared"]`;
 *  - 'map' events (vLLM ≥ 0.24): the same fields under their names, tag first under "type".
 */
import type { KvEvent } from './kv-events.js';

export type KvWireFormat = 'array' | 'map';

export interface EncodeKvEventBatchOptions {
  format: KvWireFormat;
  dpRank: number;
  /** Batch timestamp in seconds (time.time()); always written as float64. */
  ts: number;
}

const U64_LIMIT = 1n << 64n;
const I64_MIN = -(1n << 63n);

/** Growable big-endian msgpack writer with msgspec's choice of formats. */
class MsgpackWriter {
  private buf: Buffer;
  private pos = 0;

  constructor(initialSize = 256) {
    this.buf = Buffer.allocUnsafe(initialSize);
  }

  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = Buffer.allocUnsafe(size);
    this.buf.copy(next, 0, 0, this.pos);
    this.buf = next;
  }

  private byte(b: number): void {
    this.ensure(1);
    this.buf[this.pos++] = b;
  }

  nil(): void {
    this.byte(0xc0);
  }

  float64(v: number): void {
    this.ensure(9);
    this.buf[this.pos++] = 0xcb;
    this.buf.writeDoubleBE(v, this.pos);
    this.pos += 8;
  }

  /** Smallest msgpack int, unsigned forms for v ≥ 0 and signed forms for v < 0 (as msgspec). */
  int(v: number | bigint, what: string): void {
    if (typeof v === 'number') {
      if (!Number.isSafeInteger(v)) throw new TypeError(`${what}: expected an integer, got ${v}`);
      if (v >= 0 && v <= 0xffffffff) return this.smallUint(v);
      if (v < 0 && v >= -0x80000000) return this.smallNegInt(v);
      v = BigInt(v);
    }
    if (v >= 0n) {
      if (v <= 0xffffffffn) return this.smallUint(Number(v));
      if (v >= U64_LIMIT) throw new RangeError(`${what}: ${v} does not fit in uint64`);
      this.ensure(9);
      this.buf[this.pos++] = 0xcf;
      this.buf.writeBigUInt64BE(v, this.pos);
      this.pos += 8;
      return;
    }
    if (v >= -0x80000000n) return this.smallNegInt(Number(v));
    if (v < I64_MIN) throw new RangeError(`${what}: ${v} does not fit in int64`);
    this.ensure(9);
    this.buf[this.pos++] = 0xd3;
    this.buf.writeBigInt64BE(v, this.pos);
    this.pos += 8;
  }

  private smallUint(v: number): void {
    this.ensure(5);
    if (v < 0x80) {
      this.buf[this.pos++] = v;
    } else if (v < 0x100) {
      this.buf[this.pos++] = 0xcc;
      this.buf[this.pos++] = v;
    } else if (v < 0x10000) {
      this.buf[this.pos++] = 0xcd;
      this.buf.writeUInt16BE(v, this.pos);
      this.pos += 2;
    } else {
      this.buf[this.pos++] = 0xce;
      this.buf.writeUInt32BE(v, this.pos);
      this.pos += 4;
    }
  }

  private smallNegInt(v: number): void {
    this.ensure(5);
    if (v >= -32) {
      this.buf[this.pos++] = v & 0xff;
    } else if (v >= -0x80) {
      this.buf[this.pos++] = 0xd0;
      this.buf.writeInt8(v, this.pos);
      this.pos += 1;
    } else if (v >= -0x8000) {
      this.buf[this.pos++] = 0xd1;
      this.buf.writeInt16BE(v, this.pos);
      this.pos += 2;
    } else {
      this.buf[this.pos++] = 0xd2;
      this.buf.writeInt32BE(v, this.pos);
      this.pos += 4;
    }
  }

  str(s: string): void {
    const n = Buffer.byteLength(s, 'utf8');
    this.ensure(5 + n);
    if (n < 32) {
      this.buf[this.pos++] = 0xa0 | n;
    } else if (n < 0x100) {
      this.buf[this.pos++] = 0xd9;
      this.buf[this.pos++] = n;
    } else if (n < 0x10000) {
      this.buf[this.pos++] = 0xda;
      this.buf.writeUInt16BE(n, this.pos);
      this.pos += 2;
    } else {
      this.buf[this.pos++] = 0xdb;
      this.buf.writeUInt32BE(n, this.pos);
      this.pos += 4;
    }
    this.pos += this.buf.write(s, this.pos, 'utf8');
  }

  strOrNil(s: string | null): void {
    if (s === null) this.nil();
    else this.str(s);
  }

  intOrNil(v: number | bigint | null, what: string): void {
    if (v === null) this.nil();
    else this.int(v, what);
  }

  arrayHeader(n: number): void {
    this.header(n, 0x90, 0xdc, 0xdd);
  }

  mapHeader(n: number): void {
    this.header(n, 0x80, 0xde, 0xdf);
  }

  private header(n: number, fix: number, h16: number, h32: number): void {
    this.ensure(5);
    if (n < 16) {
      this.buf[this.pos++] = fix | n;
    } else if (n < 0x10000) {
      this.buf[this.pos++] = h16;
      this.buf.writeUInt16BE(n, this.pos);
      this.pos += 2;
    } else {
      this.buf[this.pos++] = h32;
      this.buf.writeUInt32BE(n, this.pos);
      this.pos += 4;
    }
  }

  intArray(values: readonly (number | bigint)[], what: string): void {
    this.arrayHeader(values.length);
    for (const v of values) this.int(v, what);
  }

  /** A copy of the bytes written so far (the internal buffer is oversized). */
  finish(): Buffer {
    return Buffer.from(this.buf.subarray(0, this.pos));
  }
}

function writeEvent(w: MsgpackWriter, ev: KvEvent, format: KvWireFormat): void {
  const asMap = format === 'map';
  switch (ev.type) {
    case 'BlockStored':
      if (asMap) {
        w.mapHeader(8);
        w.str('type');
      } else {
        w.arrayHeader(8);
      }
      w.str('BlockStored');
      if (asMap) w.str('block_hashes');
      w.intArray(ev.blockHashes, 'block_hashes');
      if (asMap) w.str('parent_block_hash');
      w.intOrNil(ev.parentBlockHash ?? null, 'parent_block_hash');
      if (asMap) w.str('token_ids');
      w.intArray(ev.tokenIds, 'token_ids');
      if (asMap) w.str('block_size');
      w.int(ev.blockSize, 'block_size');
      if (asMap) w.str('lora_id');
      w.intOrNil(ev.loraId ?? null, 'lora_id');
      if (asMap) w.str('medium');
      w.strOrNil(ev.medium ?? null);
      if (asMap) w.str('lora_name');
      w.strOrNil(ev.loraName ?? null);
      return;
    case 'BlockRemoved':
      if (asMap) {
        w.mapHeader(3);
        w.str('type');
      } else {
        w.arrayHeader(3);
      }
      w.str('BlockRemoved');
      if (asMap) w.str('block_hashes');
      w.intArray(ev.blockHashes, 'block_hashes');
      if (asMap) w.str('medium');
      w.strOrNil(ev.medium ?? null);
      return;
    case 'AllBlocksCleared':
      if (asMap) {
        w.mapHeader(1);
        w.str('type');
      } else {
        w.arrayHeader(1);
      }
      w.str('AllBlocksCleared');
      return;
    default: {
      const unknown: never = ev;
      throw new TypeError(`unknown KV event type: ${(unknown as { type?: unknown }).type}`);
    }
  }
}

/**
 * Encodes one KVEventBatch `[ts, [events...], dp_rank]` exactly as vLLM (msgspec) does:
 * ts as float64, hashes as the smallest unsigned int (uint64 from 2^32 up, exact up to 2^64-1),
 * null parent/lora/medium as nil. Throws on malformed input (non-integer token, hash ≥ 2^64).
 */
export function encodeKvEventBatch(events: readonly KvEvent[], opts: EncodeKvEventBatchOptions): Buffer {
  if (opts.format !== 'array' && opts.format !== 'map') {
    throw new TypeError(`format must be 'array' or 'map', got ${String(opts.format)}`);
  }
  if (!Number.isFinite(opts.ts)) throw new TypeError(`ts must be a finite number, got ${opts.ts}`);
  const w = new MsgpackWriter();
  w.arrayHeader(3);
  w.float64(opts.ts);
  w.arrayHeader(events.length);
  for (const ev of events) writeEvent(w, ev, opts.format);
  w.int(opts.dpRank, 'data_parallel_rank');
  return w.finish();
}
