// A subscriber written only against vLLM's documented KV-event format (zeromq + an independent
// msgpack decoder, none of kvgate's code) rebuilds the simulator's cached block set.
import { decode } from '@msgpack/msgpack';
import { afterEach, describe, expect, it } from 'vitest';
import * as zmq from 'zeromq';
import { startSimServer, type SimServer } from '../../src/sim/server.js';

const END_SEQ = 0xffffffffffffffffn;
const servers: SimServer[] = [];
afterEach(async () => {
  while (servers.length) await servers.pop()!.close();
});

const u64 = (x: unknown): bigint => (typeof x === 'bigint' ? BigInt.asUintN(64, x) : BigInt(x as number));
const seqOf = (b: Buffer): bigint => b.readBigUInt64BE(0);

/** Applies one decoded batch `[ts, events, dp_rank]` to a block set, per vLLM's documented layout. */
function apply(blocks: Set<bigint>, payload: Buffer): void {
  const batch = decode(payload, { useBigInt64: true }) as [number, unknown[], number?];
  expect(Array.isArray(batch)).toBe(true);
  expect(typeof batch[0]).toBe('number');
  for (const ev of batch[1]) {
    let tag: string;
    let hashes: unknown[] = [];
    if (Array.isArray(ev)) {
      tag = ev[0] as string; // legacy positional: [tag, block_hashes, ...]
      if (tag !== 'AllBlocksCleared') hashes = ev[1] as unknown[];
    } else {
      const m = ev as Record<string, unknown>;
      tag = m.type as string; // vLLM >= 0.24: maps tagged under "type"
      if (tag !== 'AllBlocksCleared') hashes = m.block_hashes as unknown[];
    }
    if (tag === 'BlockStored') for (const h of hashes) blocks.add(u64(h));
    else if (tag === 'BlockRemoved') for (const h of hashes) blocks.delete(u64(h));
    else if (tag === 'AllBlocksCleared') blocks.clear();
    else throw new Error(`unknown event tag ${tag}`);
  }
}

async function generate(url: string, prompt: string, maxTokens = 4): Promise<void> {
  const r = await fetch(url + '/v1/completions', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt, max_tokens: maxTokens }),
  });
  expect(r.status).toBe(200);
  await r.json();
}

describe.each(['array', 'map'] as const)('KV events in %s format', (format) => {
  it('rebuild the cached block set (stored − removed, cleared), live and through replay', async () => {
    const s = await startSimServer({
      host: '127.0.0.1',
      port: 0,
      speed: 50,
      seed: 3,
      numGpuBlocks: 48, // small: forces LRU evictions (BlockRemoved)
      kvEvents: { endpoint: 'tcp://127.0.0.1:*', replayEndpoint: 'tcp://127.0.0.1:*', format },
    });
    servers.push(s);
    const pub = s.engines[0]!.publisher!;
    const sub = new zmq.Subscriber();
    sub.connect(pub.boundEndpoint!);
    sub.subscribe('');
    const live = new Map<bigint, Buffer>();
    const reading = (async () => {
      for await (const [topic, seq, payload] of sub) {
        expect(topic!.length).toBe(0);
        expect(seq!.length).toBe(8);
        live.set(seqOf(seq!), Buffer.from(payload!));
      }
    })().catch(() => undefined);

    const base = 'the quick brown fox jumps over the lazy dog and keeps running through the field. ';
    for (let i = 0; i < 12; i++) await generate(s.url, `variant ${i % 5}: ${base.repeat(6)} ${String(i).repeat(60 * (1 + (i % 3)))}`);
    await fetch(s.url + '/reset_prefix_cache', { method: 'POST' }).then((r) => r.text());
    for (let i = 0; i < 6; i++) await generate(s.url, `after reset ${i} ${base.repeat(2)}`);
    await new Promise((r) => setTimeout(r, 200)); // let the last batches leave the socket

    // Replay everything from seq 0 over a DEALER: [b"", start_seq] → [b"", seq, payload]... then the sentinel.
    const dealer = new zmq.Dealer({ receiveTimeout: 5000 });
    dealer.connect(pub.boundReplayEndpoint!);
    const start = Buffer.alloc(8);
    await dealer.send([Buffer.alloc(0), start]);
    const replayed = new Map<bigint, Buffer>();
    for (;;) {
      const [empty, seq, payload] = await dealer.receive();
      expect(empty!.length).toBe(0);
      const n = seqOf(seq!);
      if (n === END_SEQ) {
        expect(payload!.length).toBe(0);
        break;
      }
      replayed.set(n, Buffer.from(payload!));
    }
    dealer.close();
    sub.close();
    await reading;

    const seqs = [...replayed.keys()].sort((a, b) => (a < b ? -1 : 1));
    expect(seqs[0]).toBe(0n);
    expect(seqs.at(-1)).toBe(BigInt(seqs.length - 1)); // contiguous from 0
    // Whatever arrived live is byte-identical to its replayed copy; replay filled what the slow joiner missed.
    expect(live.size).toBeGreaterThan(0);
    for (const [n, p] of live) expect(replayed.get(n)?.equals(p)).toBe(true);

    const blocks = new Set<bigint>();
    for (const n of seqs) apply(blocks, replayed.get(n)!);
    const truth = s.engines[0]!.engine.cachedBlockHashes();
    expect(truth.size).toBeGreaterThan(0);
    expect(s.engines[0]!.engine.stats().cachedBlocks).toBeLessThanOrEqual(48);
    expect([...blocks].sort()).toEqual([...truth].sort());
    // Evictions happened, so the equality above exercised BlockRemoved as well as BlockStored.
    const removed = seqs.some((n) => replayed.get(n)!.includes(Buffer.from('BlockRemoved')));
    expect(removed).toBe(true);
  });
});
