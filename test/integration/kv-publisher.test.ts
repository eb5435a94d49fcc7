/**
 * KvEventPublisher against the documented vLLM KV-event wire format (docs reference §1.2–1.5).
 * The consumer side here is written only from the spec: zeromq sockets + @msgpack/msgpack
 * (useBigInt64) — no kvgate decoding code. Real ZMQ over tcp on 127.0.0.1, ephemeral ports
 * ("tcp://127.0.0.1:*" binds; the actual port is read back from the socket).
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import * as zmq from 'zeromq';
import { decode } from '@msgpack/msgpack';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { endpointForRank } from '../../src/events/endpoints.js';
import { encodeKvEventBatch, KvEventPublisher } from '../../src/sim/kv-publisher.js';
import type { KvEvent } from '../../src/sim/kv-events.js';

const END_SEQ = 0xffff_ffff_ffff_ffffn;
const BIG_HASH = 0xfedc_ba98_7654_3210n; // > 2^63: must arrive as uint64, exactly
const MID_HASH = (1n << 40n) + 7n; // between 2^32 and 2^63

const wireDecode = (b: Uint8Array): unknown => decode(b, { useBigInt64: true });

function stored(hashes: bigint[], parent: bigint | null, blockSize = 4): KvEvent {
  const tokenIds = Array.from({ length: hashes.length * blockSize }, (_, i) => 1000 + i);
  return { type: 'BlockStored', blockHashes: hashes, parentBlockHash: parent, tokenIds, blockSize, loraId: null, medium: 'GPU', loraName: null };
}

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

function track<T extends { close(): unknown }>(x: T): T {
  cleanups.push(() => x.close());
  return x;
}

async function startPublisher(opts: Partial<ConstructorParameters<typeof KvEventPublisher>[0]> = {}): Promise<KvEventPublisher> {
  const pub = track(new KvEventPublisher({ endpoint: 'tcp://127.0.0.1:*', format: 'array', dpRank: 0, ...opts }));
  await pub.start();
  return pub;
}

function subscriber(endpoint: string, prefix?: string): zmq.Subscriber {
  const sub = track(new zmq.Subscriber({ linger: 0, receiveTimeout: 5000 }));
  sub.connect(endpoint);
  if (prefix === undefined) sub.subscribe();
  else sub.subscribe(prefix);
  return sub;
}

interface WireMsg {
  topic: string;
  seq: bigint;
  payload: Buffer;
}

function parseFrames(frames: Buffer[]): WireMsg {
  expect(frames).toHaveLength(3);
  expect(frames[1]).toHaveLength(8);
  return { topic: frames[0]!.toString('utf8'), seq: frames[1]!.readBigUInt64BE(0), payload: frames[2]! };
}

/**
 * PUB/SUB slow joiner: batches published before the subscription reaches the PUB are dropped.
 * Publish probe batches until one arrives, then drain until the subscriber has seen the last probe,
 * so the next batch published is the next message received. Returns the probes received.
 */
async function syncSubscriber(pub: KvEventPublisher, sub: zmq.Subscriber): Promise<WireMsg[]> {
  const got: WireMsg[] = [];
  sub.receiveTimeout = 50;
  for (let i = 0; i < 200 && got.length === 0; i++) {
    pub.publish([{ type: 'AllBlocksCleared' }]);
    try {
      got.push(parseFrames(await sub.receive()));
    } catch (err) {
      if ((err as { code?: string }).code !== 'EAGAIN') throw err;
    }
  }
  expect(got.length, 'subscriber never received a probe').toBe(1);
  sub.receiveTimeout = 5000;
  while (got[got.length - 1]!.seq < BigInt(pub.lastSeq)) got.push(parseFrames(await sub.receive()));
  return got;
}

function seqBytes(seq: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(seq);
  return b;
}

/** Replay client per §1.5: DEALER sends ["", start_seq], reads ["", seq, payload]* then the END_SEQ. */
async function replay(endpoint: string, startSeq: bigint): Promise<Array<{ seq: bigint; payload: Buffer }>> {
  const dealer = new zmq.Dealer({ linger: 0, receiveTimeout: 5000 });
  try {
    dealer.connect(endpoint);
    await dealer.send([Buffer.alloc(0), seqBytes(startSeq)]);
    const out: Array<{ seq: bigint; payload: Buffer }> = [];
    for (;;) {
      const frames = await dealer.receive();
      expect(frames).toHaveLength(3);
      expect(frames[0]).toHaveLength(0);
      expect(frames[1]).toHaveLength(8);
      const seq = frames[1]!.readBigUInt64BE(0);
      if (seq === END_SEQ) {
        expect(frames[2]).toHaveLength(0);
        return out;
      }
      out.push({ seq, payload: frames[2]! });
    }
  } finally {
    dealer.close();
  }
}

describe('encodeKvEventBatch (pure)', () => {
  const ev = (): KvEvent[] => [
    { type: 'BlockStored', blockHashes: [5n, MID_HASH, 2n ** 64n - 1n], parentBlockHash: null, tokenIds: [1, 200, 70000], blockSize: 1, loraId: null, medium: 'GPU', loraName: null },
    { type: 'BlockRemoved', blockHashes: [0x80n], medium: 'GPU' },
    { type: 'AllBlocksCleared' },
  ];

  it('array format: exact msgspec bytes (float64 ts even when integral, smallest uint, uint64 ≥ 2^32)', () => {
    const buf = encodeKvEventBatch(ev(), { format: 'array', dpRank: 2, ts: 1789095808 });
    const expected = [
      '93', // [ts, events, dp_rank]
      'cb41daa8dbe0000000', // float64 1789095808.0
      '93', // 3 events
      '98', 'ab' + Buffer.from('BlockStored').toString('hex'),
      '93', '05', 'cf0000010000000007', 'cfffffffffffffffff', // hashes: fixint, uint64, uint64
      'c0', // parent null
      '93', '01', 'ccc8', 'ce00011170', // token ids 1, 200, 70000
      '01', // block_size
      'c0', 'a3' + Buffer.from('GPU').toString('hex'), 'c0', // lora_id, medium, lora_name
      '93', 'ac' + Buffer.from('BlockRemoved').toString('hex'), '91', 'cc80', 'a3' + Buffer.from('GPU').toString('hex'),
      '91', 'b0' + Buffer.from('AllBlocksCleared').toString('hex'),
      '02', // dp rank
    ].join('');
    expect(buf.toString('hex')).toBe(expected);
  });

  it('map format: tag under "type" first, every field present (nulls included), fixmap headers', () => {
    const buf = encodeKvEventBatch(ev(), { format: 'map', dpRank: 0, ts: 12.5 });
    const s = (x: string): string => (x.length < 32 ? (0xa0 | x.length).toString(16) : 'd9' + x.length.toString(16).padStart(2, '0')) + Buffer.from(x).toString('hex');
    const expected = [
      '93', 'cb4029000000000000', '93',
      '88', s('type'), s('BlockStored'),
      s('block_hashes'), '93', '05', 'cf0000010000000007', 'cfffffffffffffffff',
      s('parent_block_hash'), 'c0',
      s('token_ids'), '93', '01', 'ccc8', 'ce00011170',
      s('block_size'), '01', s('lora_id'), 'c0', s('medium'), s('GPU'), s('lora_name'), 'c0',
      '83', s('type'), s('BlockRemoved'), s('block_hashes'), '91', 'cc80', s('medium'), s('GPU'),
      '81', s('type'), s('AllBlocksCleared'),
      '00',
    ].join('');
    expect(buf.toString('hex')).toBe(expected);
    const decoded = wireDecode(buf) as [number, Array<Record<string, unknown>>, number];
    expect(decoded[1][0]).toEqual({
      type: 'BlockStored', block_hashes: [5, MID_HASH, 2n ** 64n - 1n], parent_block_hash: null,
      token_ids: [1, 200, 70000], block_size: 1, lora_id: null, medium: 'GPU', lora_name: null,
    });
  });

  it('rejects values that cannot be encoded faithfully', () => {
    const bad = (e: KvEvent): (() => Buffer) => () => encodeKvEventBatch([e], { format: 'array', dpRank: 0, ts: 1 });
    expect(bad({ type: 'BlockRemoved', blockHashes: [2n ** 64n], medium: 'GPU' })).toThrow(RangeError);
    expect(bad({ ...(stored([1n], null) as Extract<KvEvent, { type: 'BlockStored' }>), tokenIds: [1.5] })).toThrow(TypeError);
    expect(() => encodeKvEventBatch([], { format: 'array', dpRank: 0, ts: Number.NaN })).toThrow(TypeError);
  });
});

describe('endpointForRank', () => {
  it('follows vLLM offset_endpoint_port', () => {
    expect(endpointForRank('tcp://*:5557', 0)).toBe('tcp://*:5557');
    expect(endpointForRank('tcp://*:5557', 3)).toBe('tcp://*:5560');
    expect(endpointForRank('tcp://[::1]:5557', 1)).toBe('tcp://[::1]:5558');
    expect(endpointForRank('tcp://router-host:5557', 2)).toBe('tcp://router-host:5559');
    expect(endpointForRank('inproc://cache', 2)).toBe('inproc://cache_dp2');
    expect(endpointForRank('ipc:///tmp/kv', 0)).toBe('ipc:///tmp/kv');
    expect(() => endpointForRank('ipc:///tmp/kv', 1)).toThrow();
    expect(() => endpointForRank('tcp://*:65535', 1)).toThrow(RangeError);
    expect(() => endpointForRank('tcp://*:5557', -1)).toThrow(RangeError);
  });
});

describe('KvEventPublisher over ZMQ', () => {
  it('array format: 3 frames, contiguous seqs from 0, legacy positional events, exact uint64 hashes', async () => {
    const pub = await startPublisher({ format: 'array', dpRank: 3 });
    expect(pub.lastSeq).toBe(-1);
    const sub = subscriber(pub.boundEndpoint!.replace('0.0.0.0', '127.0.0.1'));
    const probes = await syncSubscriber(pub, sub);
    for (let i = 1; i < probes.length; i++) expect(probes[i]!.seq).toBe(probes[i - 1]!.seq + 1n);

    const before = Date.now() / 1000;
    pub.publish([stored([BIG_HASH, MID_HASH], null), stored([3n], BIG_HASH)]);
    pub.publish([]); // no-op: consumes no seq
    pub.publish([{ type: 'BlockRemoved', blockHashes: [BIG_HASH, 7n], medium: 'GPU' }]);
    pub.publish([{ type: 'AllBlocksCleared' }]);
    const msgs = [parseFrames(await sub.receive()), parseFrames(await sub.receive()), parseFrames(await sub.receive())];
    const base = probes[probes.length - 1]!.seq + 1n;
    expect(msgs.map((m) => m.seq)).toEqual([base, base + 1n, base + 2n]);
    expect(pub.lastSeq).toBe(Number(base + 2n));
    expect(msgs.every((m) => m.topic === '')).toBe(true);

    const [ts, events, dp] = wireDecode(msgs[0]!.payload) as [number, unknown[][], number];
    expect(ts).toBeGreaterThanOrEqual(before - 1);
    expect(ts).toBeLessThanOrEqual(Date.now() / 1000 + 1);
    expect(msgs[0]!.payload[0]).toBe(0x93); // outer fixarray(3)
    expect(msgs[0]!.payload[1]).toBe(0xcb); // ts is a float64 on the wire
    expect(dp).toBe(3);
    expect(events).toHaveLength(2);
    expect(events[0]).toEqual(['BlockStored', [BIG_HASH, MID_HASH], null, [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007], 4, null, 'GPU', null]);
    expect(events[1]![0]).toBe('BlockStored');
    expect(events[1]![2]).toBe(BIG_HASH); // parent hash above 2^63, exact
    expect(typeof (events[0]![1] as unknown[])[1]).toBe('bigint'); // 2^40+7 sent as a 64-bit int, not a float

    const removed = (wireDecode(msgs[1]!.payload) as [number, unknown[][], number])[1];
    expect(removed).toEqual([['BlockRemoved', [BIG_HASH, 7], 'GPU']]);
    const cleared = (wireDecode(msgs[2]!.payload) as [number, unknown[][], number])[1];
    expect(cleared).toEqual([['AllBlocksCleared']]);

    // seq 0 really was the first batch this publisher produced (probes may have been dropped live).
    expect(pub.stats).toMatchObject({ published: pub.lastSeq + 1, dropped: 0 });
  });

  it('map format with an llm-d style topic: events are maps tagged under "type"', async () => {
    const topic = 'kv@10.0.0.7:8000@Qwen/Qwen3-0.6B';
    const pub = await startPublisher({ format: 'map', dpRank: 1, topic });
    const sub = subscriber(pub.boundEndpoint!, 'kv@');
    await syncSubscriber(pub, sub);
    pub.publish([stored([BIG_HASH], 42n, 2), { type: 'BlockRemoved', blockHashes: [BIG_HASH], medium: null }, { type: 'AllBlocksCleared' }]);
    const msg = parseFrames(await sub.receive());
    expect(msg.topic).toBe(topic);
    expect(msg.seq).toBe(BigInt(pub.lastSeq));
    const [, events, dp] = wireDecode(msg.payload) as [number, Array<Record<string, unknown>>, number];
    expect(dp).toBe(1);
    expect(events.map((e) => e.type)).toEqual(['BlockStored', 'BlockRemoved', 'AllBlocksCleared']);
    expect(events[0]).toEqual({
      type: 'BlockStored', block_hashes: [BIG_HASH], parent_block_hash: 42, token_ids: [1000, 1001],
      block_size: 2, lora_id: null, medium: 'GPU', lora_name: null,
    });
    expect(events[1]).toEqual({ type: 'BlockRemoved', block_hashes: [BIG_HASH], medium: null });
    expect(events[2]).toEqual({ type: 'AllBlocksCleared' });
  });

  it('connects (instead of binding) when the endpoint has no wildcard: centralized mode, SUB binds', async () => {
    const sub = track(new zmq.Subscriber({ linger: 0, receiveTimeout: 5000 }));
    await sub.bind('tcp://127.0.0.1:*');
    sub.subscribe();
    const pub = await startPublisher({ endpoint: sub.lastEndpoint! });
    await syncSubscriber(pub, sub);
    pub.publish([stored([BIG_HASH], null)]);
    const msg = parseFrames(await sub.receive());
    expect(msg.seq).toBe(BigInt(pub.lastSeq));
    expect((wireDecode(msg.payload) as [number, unknown[][]])[1][0]![1]).toEqual([BIG_HASH]);
  });

  it('replay: DEALER asks for seq 2 and gets batches 2..N-1 then the all-ones sentinel', async () => {
    const pub = await startPublisher({ replayEndpoint: 'tcp://127.0.0.1:*', format: 'map', dpRank: 0 });
    const sub = subscriber(pub.boundEndpoint!);
    const N = 7;
    for (let i = 0; i < N; i++) pub.publish([stored([BigInt(i) + BIG_HASH - 100n], i === 0 ? null : BigInt(i - 1) + BIG_HASH - 100n)]);
    expect(pub.lastSeq).toBe(N - 1);

    const got = await replay(pub.boundReplayEndpoint!, 2n);
    expect(got.map((g) => g.seq)).toEqual([2n, 3n, 4n, 5n, 6n]);
    got.forEach((g, k) => {
      const [, events, dp] = wireDecode(g.payload) as [number, Array<Record<string, unknown>>, number];
      expect(dp).toBe(0);
      expect(events[0]!.block_hashes).toEqual([BigInt(k + 2) + BIG_HASH - 100n]);
    });

    // Live messages and replayed messages carry identical payload bytes for the same seq.
    await syncSubscriber(pub, sub);
    pub.publish([{ type: 'AllBlocksCleared' }]);
    const live = parseFrames(await sub.receive());
    const again = await replay(pub.boundReplayEndpoint!, live.seq);
    expect(again).toHaveLength(1);
    expect(again[0]!.seq).toBe(live.seq);
    expect(again[0]!.payload.equals(live.payload)).toBe(true);

    // Replay from 0 returns everything, starting at seq 0.
    const all = await replay(pub.boundReplayEndpoint!, 0n);
    expect(all.map((g) => Number(g.seq))).toEqual(Array.from({ length: pub.lastSeq + 1 }, (_, i) => i));
    expect(pub.stats.replays).toBe(3);
  });

  it('replay of an evicted start returns what remains without error; past-the-end gets only the sentinel', async () => {
    const pub = await startPublisher({ replayEndpoint: 'tcp://127.0.0.1:*', bufferSteps: 3 });
    for (let i = 0; i < 6; i++) pub.publish([stored([BigInt(i)], null)]);
    const ep = pub.boundReplayEndpoint!;
    expect((await replay(ep, 1n)).map((g) => g.seq)).toEqual([3n, 4n, 5n]);
    expect((await replay(ep, 4n)).map((g) => g.seq)).toEqual([4n, 5n]);
    expect(await replay(ep, 6n)).toEqual([]);
    expect(await replay(ep, END_SEQ - 1n)).toEqual([]);

    // A malformed request (wrong frame count) is ignored and the server keeps serving.
    const dealer = track(new zmq.Dealer({ linger: 0, receiveTimeout: 300 }));
    dealer.connect(ep);
    await dealer.send([Buffer.alloc(0), seqBytes(0n), Buffer.from('extra')]);
    await expect(dealer.receive()).rejects.toMatchObject({ code: 'EAGAIN' });
    expect((await replay(ep, 0n)).map((g) => g.seq)).toEqual([3n, 4n, 5n]);
    expect(pub.stats.invalidReplayRequests).toBe(1);
  });

  it('never throws or blocks on a subscriber that does not read (HWM drops, queue keeps order)', async () => {
    const pub = await startPublisher({ hwm: 5, replayEndpoint: 'tcp://127.0.0.1:*', bufferSteps: 50 });
    const sub = subscriber(pub.boundEndpoint!);
    sub.receiveHighWaterMark = 5;
    await syncSubscriber(pub, sub);
    // ~15 KB per batch, 4000 batches: far more than the HWMs plus loopback socket buffers can hold.
    const bigTokens = stored(Array.from({ length: 256 }, (_, i) => BIG_HASH - BigInt(i)), null, 16);
    const t0 = performance.now();
    for (let i = 0; i < 4000; i++) pub.publish([bigTokens]);
    expect(performance.now() - t0).toBeLessThan(5000);
    // The send queue drains asynchronously (one zeromq send in flight at a time).
    await vi.waitFor(() => expect(pub.stats.sent + pub.stats.dropped).toBe(pub.stats.published), { timeout: 10_000, interval: 20 });
    const s = pub.stats;
    expect(s.published).toBe(pub.lastSeq + 1);
    // The subscriber sees a seq gap (dropped by ZMQ at the HWM) but every seq it sees increases.
    sub.receiveTimeout = 200;
    let prev = -1n;
    let received = 0;
    for (;;) {
      try {
        const m = parseFrames(await sub.receive());
        expect(m.seq).toBeGreaterThan(prev);
        prev = m.seq;
        received++;
      } catch (err) {
        if ((err as { code?: string }).code === 'EAGAIN') break;
        throw err;
      }
    }
    expect(received).toBeLessThan(4000);
    // ...and can repair the tail from the replay buffer.
    const tail = await replay(pub.boundReplayEndpoint!, BigInt(pub.lastSeq - 49));
    expect(tail).toHaveLength(50);
    await pub.close();
    await pub.close(); // idempotent
    pub.publish([bigTokens]); // after close: ignored, does not throw
    expect(pub.lastSeq).toBe(s.published - 1);
    await expect(pub.start()).rejects.toThrow(/after close/);
  });

  it('batches published before start() are sent once the socket is up, in order', async () => {
    const sub = track(new zmq.Subscriber({ linger: 0, receiveTimeout: 5000 }));
    await sub.bind('tcp://127.0.0.1:*');
    sub.subscribe();
    const pub = track(new KvEventPublisher({ endpoint: sub.lastEndpoint!, replayEndpoint: 'tcp://127.0.0.1:*', format: 'array', dpRank: 0 }));
    pub.publish([stored([1n], null)]);
    pub.publish([stored([2n], 1n)]);
    expect(pub.lastSeq).toBe(1);
    await pub.start();
    // Early batches may be lost to the slow joiner live, but replay has them with their seqs.
    expect((await replay(pub.boundReplayEndpoint!, 0n)).map((g) => g.seq)).toEqual([0n, 1n]);
    expect(pub.stats.sent + pub.stats.dropped).toBe(2);
  });
});

describe('process lifetime', () => {
  const here = fileURLToPath(new URL('.', import.meta.url));
  const root = join(here, '..', '..');
  const modulePath = join(root, 'src', 'sim', 'kv-publisher.ts');
  const viteNode = join(root, 'node_modules', '.bin', 'vite-node');

  function runChild(doClose: boolean, limitMs: number): Promise<{ code: number | null; timedOut: boolean; out: string }> {
    const dir = mkdtempSync(join(tmpdir(), 'kvgate-kvpub-'));
    const script = join(dir, 'child.ts');
    writeFileSync(
      script,
      [
        `import * as zmq from 'zeromq';`,
        `import { KvEventPublisher } from ${JSON.stringify(modulePath)};`,
        `const pub = new KvEventPublisher({ endpoint: 'tcp://127.0.0.1:*', replayEndpoint: 'tcp://127.0.0.1:*', format: 'map', dpRank: 0 });`,
        `await pub.start();`,
        `for (let i = 0; i < 10; i++) pub.publish([{ type: 'AllBlocksCleared' }]);`,
        `const d = new zmq.Dealer({ linger: 0 }); d.connect(pub.boundReplayEndpoint!);`,
        `await d.send([Buffer.alloc(0), Buffer.alloc(8)]);`,
        `let n = 0; for (;;) { const f = await d.receive(); n++; if (f[1]!.readBigUInt64BE(0) === 0xffffffffffffffffn) break; }`,
        `d.close();`,
        `console.log('replayed', n);`,
        doClose ? `await pub.close(); console.log('closed');` : `console.log('not closing');`,
      ].join('\n'),
    );
    return new Promise((resolve, reject) => {
      const child = spawn(viteNode, [script], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr.on('data', (d: Buffer) => (out += d.toString()));
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, limitMs);
      child.on('error', reject);
      child.on('exit', (code) => {
        clearTimeout(timer);
        rmSync(dir, { recursive: true, force: true });
        resolve({ code, timedOut, out });
      });
    });
  }

  it('close() releases every handle: the process exits by itself (and does not without close)', async () => {
    const closed = await runChild(true, 15_000);
    expect(closed.out).toContain('replayed 11');
    expect(closed.out).toContain('closed');
    expect(closed.timedOut).toBe(false);
    expect(closed.code).toBe(0);

    const leaked = await runChild(false, 4_000);
    expect(leaked.out).toContain('replayed 11');
    expect(leaked.timedOut).toBe(true); // control: the open replay ROUTER keeps the process alive
  }, 30_000);
});
