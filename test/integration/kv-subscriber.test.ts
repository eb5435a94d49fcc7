/**
 * KvEventSubscriber against kvgate's vLLM-format publisher (src/sim/kv-publisher.ts) over real ZMQ
 * on 127.0.0.1 (ephemeral ports). Every batch a test publishes carries a marker derived from its
 * seq, so "batch with seq s was applied" is checked against what the publisher sent as seq s.
 *
 * PUB/SUB slow joiner: a SUB only receives once its subscription has reached the PUB, so tests
 * publish probe batches until the subscriber has received one (probes are ordinary batches: they
 * are part of the sequence that must be applied exactly once).
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import * as zmq from 'zeromq';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KvEventPublisher, encodeKvEventBatch } from '../../src/sim/kv-publisher.js';
import type { KvEvent } from '../../src/sim/kv-events.js';
import { KvEventSubscriber, type KvEventSubscriberOptions, type KvResetReason, type KvSourceStats } from '../../src/events/subscriber.js';
import type { KvCacheEvent, KvEventBatch } from '../../src/events/types.js';
import { ManualClock } from '../../src/core/clock.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const BIG = 0xfedc_ba98_7654_3210n; // > 2^63
const WAIT = { timeout: 10_000, interval: 10 };

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});
function track<T extends { close(): unknown }>(x: T): T {
  cleanups.push(() => x.close());
  return x;
}

// ---- publisher side ----------------------------------------------------------------------------

/** A publisher plus what it published per seq (events are a function of seq and `tag`). */
interface Peer {
  pub: KvEventPublisher;
  tag: bigint;
  sent: Map<number, KvEvent[]>;
  /** Add an AllBlocksCleared every 11th batch (it also clears a subscriber's `inaccurate` flag). */
  clears?: boolean;
}

function eventsFor(tag: bigint, seq: number, clears: boolean): KvEvent[] {
  const s = BigInt(seq);
  const evs: KvEvent[] = [
    {
      type: 'BlockStored',
      blockHashes: [tag + s, BIG - s],
      parentBlockHash: seq % 2 === 0 ? null : BIG,
      tokenIds: [seq, seq + 1, seq + 2, seq + 3],
      blockSize: 2,
      loraId: null,
      medium: 'GPU',
      loraName: seq % 5 === 0 ? 'lora-a' : null,
    },
  ];
  if (seq % 3 === 1) evs.push({ type: 'BlockRemoved', blockHashes: [BIG - s + 1n], medium: 'GPU' });
  if (clears && seq % 11 === 10) evs.push({ type: 'AllBlocksCleared' });
  return evs;
}

function normalized(e: KvEvent): KvCacheEvent {
  switch (e.type) {
    case 'BlockStored':
      return { type: 'stored', blockHashes: e.blockHashes, parentBlockHash: e.parentBlockHash, tokenIds: e.tokenIds, blockSize: e.blockSize, medium: e.medium, loraName: e.loraName };
    case 'BlockRemoved':
      return { type: 'removed', blockHashes: e.blockHashes, medium: e.medium };
    case 'AllBlocksCleared':
      return { type: 'cleared' };
  }
}

function publishN(peer: Peer, n: number): void {
  for (let i = 0; i < n; i++) {
    const seq = peer.pub.lastSeq + 1;
    const evs = eventsFor(peer.tag, seq, peer.clears ?? false);
    peer.sent.set(seq, evs);
    peer.pub.publish(evs);
  }
}

async function startPublisherRetry(opts: ConstructorParameters<typeof KvEventPublisher>[0]): Promise<KvEventPublisher> {
  for (let attempt = 0; ; attempt++) {
    const pub = new KvEventPublisher(opts);
    try {
      await pub.start();
      return track(pub);
    } catch (err) {
      await pub.close();
      if (attempt >= 100) throw err;
      await sleep(50);
    }
  }
}

/** Waits until the publisher has handed every published batch to its PUB socket. */
async function flushed(peer: Peer): Promise<void> {
  await vi.waitFor(() => expect(peer.pub.stats.sent + peer.pub.stats.dropped).toBe(peer.pub.stats.published), WAIT);
}

async function startPeer(opts: Partial<ConstructorParameters<typeof KvEventPublisher>[0]> & { tag?: bigint; clears?: boolean } = {}): Promise<Peer> {
  const { tag = 1_000_000n, clears = false, ...rest } = opts;
  const pub = track(new KvEventPublisher({ endpoint: 'tcp://127.0.0.1:*', format: 'map', dpRank: 0, ...rest }));
  await pub.start();
  return { pub, tag, sent: new Map(), clears };
}

// ---- subscriber side ---------------------------------------------------------------------------

type Entry = { key: string; batch: KvEventBatch } | { key: string; reset: KvResetReason };

class Recorder {
  readonly entries: Entry[] = [];
  readonly onBatch = (key: string, batch: KvEventBatch): void => {
    this.entries.push({ key, batch });
  };
  readonly onReset = (key: string, reason: KvResetReason): void => {
    this.entries.push({ key, reset: reason });
  };
  /** Seqs applied for `key`, in application order, optionally only after entry index `from`. */
  seqs(key: string, from = 0): bigint[] {
    return this.entries.slice(from).flatMap((e) => (e.key === key && 'batch' in e ? [e.batch.seq] : []));
  }
  resets(key?: string): KvResetReason[] {
    return this.entries.flatMap((e) => ('reset' in e && (key === undefined || e.key === key) ? [e.reset] : []));
  }
  indexOfReset(key: string, reason: KvResetReason): number {
    return this.entries.findIndex((e) => e.key === key && 'reset' in e && e.reset === reason);
  }
}

type SubOpts = Omit<KvEventSubscriberOptions, 'onBatch' | 'onReset'>;

async function startSub(opts: SubOpts): Promise<{ sub: KvEventSubscriber; rec: Recorder }> {
  const rec = new Recorder();
  const sub = track(new KvEventSubscriber({ ...opts, onBatch: rec.onBatch, onReset: rec.onReset } as KvEventSubscriberOptions));
  await sub.start();
  return { sub, rec };
}

function st(sub: KvEventSubscriber, key: string): KvSourceStats {
  const s = sub.sourceStats(key);
  if (!s) throw new Error(`no stats for ${key} yet`);
  return s;
}

/** Publishes probe batches until the subscriber has received one more live message for `key`. */
async function probeUntilReceived(sub: KvEventSubscriber, key: string, peer: Peer): Promise<void> {
  const r0 = sub.sourceStats(key)?.received ?? 0;
  await vi.waitFor(() => {
    if ((sub.sourceStats(key)?.received ?? 0) > r0) return;
    publishN(peer, 1);
    throw new Error('not received yet');
  }, { timeout: 10_000, interval: 25 });
}

async function waitApplied(sub: KvEventSubscriber, key: string, peer: Peer): Promise<void> {
  await vi.waitFor(() => expect(sub.sourceStats(key)?.lastSeq).toBe(BigInt(peer.pub.lastSeq)), WAIT);
}

/**
 * Like waitApplied, for a lossy live stream (bind test: PUB hwm 1): when the subscriber sits idle
 * behind the publisher, the tail was dropped live and only the next batch can reveal the gap, so
 * publish one (as the next engine step would).
 */
async function catchUp(sub: KvEventSubscriber, key: string, peer: Peer): Promise<void> {
  let seen: bigint | null | undefined;
  await vi.waitFor(() => {
    const s = sub.sourceStats(key);
    if (s?.lastSeq === BigInt(peer.pub.lastSeq)) return;
    if (s && !s.replaying && s.lastSeq === seen) publishN(peer, 1);
    seen = s?.lastSeq;
    throw new Error(`${key} behind: ${s?.lastSeq} < ${peer.pub.lastSeq}`);
  }, { timeout: 10_000, interval: 50 });
}

const range = (from: number, to: number): bigint[] => Array.from({ length: to - from + 1 }, (_, i) => BigInt(from + i));

/** Every applied batch of `key` (entries [from, to)) carries exactly what `peer` published under its seq. */
function expectContentMatches(rec: Recorder, key: string, peer: Peer, from = 0, to = rec.entries.length): void {
  const batches = rec.entries.slice(from, to).flatMap((e) => (e.key === key && 'batch' in e ? [e.batch] : []));
  expect(batches.length).toBeGreaterThan(0);
  for (const b of batches) {
    const sent = peer.sent.get(Number(b.seq));
    expect(sent, `seq ${b.seq} was never published`).toBeDefined();
    expect(b.events).toEqual(sent!.map(normalized));
    expect(b.malformed).toBe(0);
  }
}


/** A replay ROUTER in front of the publisher's that can hold its answer (for "live during replay"). */
async function startReplayProxy(upstream: string): Promise<{
  endpoint: string;
  requests: bigint[];
  /** Hold the next request's answer: resolves with the number of batches fetched upstream. */
  holdNext(): { fetched: Promise<number>; release: () => void };
}> {
  const router = track(new zmq.Router({ linger: 0 }));
  await router.bind('tcp://127.0.0.1:*');
  const requests: bigint[] = [];
  let hold: { onFetched: (n: number) => void; gate: Promise<void> } | null = null;
  void (async () => {
    for await (const [id, empty, start] of router) {
      requests.push(start!.readBigUInt64BE(0));
      const dealer = new zmq.Dealer({ linger: 0, receiveTimeout: 5000 });
      dealer.connect(upstream);
      await dealer.send([empty!, start!]);
      const replies: Buffer[][] = [];
      for (;;) {
        const f = await dealer.receive();
        replies.push(f);
        if (f[1]!.readBigUInt64BE(0) === 0xffff_ffff_ffff_ffffn) break;
      }
      dealer.close();
      const h = hold;
      hold = null;
      if (h) {
        h.onFetched(replies.length - 1);
        await h.gate;
      }
      for (const f of replies) await router.send([id!, ...f]);
    }
  })().catch(() => undefined);
  return {
    endpoint: router.lastEndpoint!,
    requests,
    holdNext() {
      let release!: () => void;
      let onFetched!: (n: number) => void;
      const fetched = new Promise<number>((r) => (onFetched = r));
      const gate = new Promise<void>((r) => (release = r));
      hold = { onFetched, gate };
      return { fetched, release };
    },
  };
}

// ------------------------------------------------------------------------------------------------

describe('KvEventSubscriber (connect mode) against KvEventPublisher', () => {
  it('first contact replays the engine history from seq 0, then delivers live batches in order', async () => {
    const peer = await startPeer({ replayEndpoint: 'tcp://127.0.0.1:*', dpRank: 2, format: 'array', clears: true });
    publishN(peer, 10); // history before the router connects
    const { sub, rec } = await startSub({ endpoint: peer.pub.boundEndpoint!, replayEndpoint: peer.pub.boundReplayEndpoint!, sourceKey: 'w0' });
    await probeUntilReceived(sub, 'w0', peer);
    await waitApplied(sub, 'w0', peer);
    const s0 = st(sub, 'w0');
    expect(s0.replayRequests).toBe(1);
    expect(s0.replayed).toBeGreaterThanOrEqual(11); // 10 history batches + at least one probe

    publishN(peer, 60);
    await waitApplied(sub, 'w0', peer);
    expect(rec.seqs('w0')).toEqual(range(0, peer.pub.lastSeq));
    expectContentMatches(rec, 'w0', peer);
    expect(rec.entries.every((e) => 'batch' in e && e.batch.dpRank === 2)).toBe(true);
    expect(rec.resets()).toEqual([]);
    const s = st(sub, 'w0');
    expect(s).toMatchObject({ applied: peer.pub.lastSeq + 1, lost: 0, malformed: 0, restarts: 0, resets: 0, replaying: false, pending: 0, inaccurate: false, stale: false });
    expect(s.replayRequests).toBe(1); // no gap in the live stream
    expect(s.dropped).toBe(s.duplicates);
    expect(s.received).toBeGreaterThanOrEqual(61);
    expect(s.lastEventLagS).not.toBeNull();
    expect(Math.abs(s.lastEventLagS!)).toBeLessThan(5);
    expect(s.lastBatchAt).not.toBeNull();
    expect(sub.stats()).toMatchObject({ undecodable: 0, unroutable: 0 });
    expect(Object.keys(sub.stats().sources)).toEqual(['w0']);
  });

  it('a forced gap is repaired by replay; live batches arriving during the replay are buffered and applied after it, none twice', async () => {
    const peer = await startPeer({ replayEndpoint: 'tcp://127.0.0.1:*' });
    const proxy = await startReplayProxy(peer.pub.boundReplayEndpoint!);
    const { sub, rec } = await startSub({ endpoint: peer.pub.boundEndpoint!, replayEndpoint: proxy.endpoint, sourceKey: 'w1' });
    await probeUntilReceived(sub, 'w1', peer);
    publishN(peer, 5);
    await waitApplied(sub, 'w1', peer);
    const lastBefore = peer.pub.lastSeq;
    const requestsBefore = proxy.requests.length;

    await sub.pause();
    publishN(peer, 8); // missed: nobody is subscribed
    await flushed(peer);
    await sub.resume();
    const held = proxy.holdNext();
    await probeUntilReceived(sub, 'w1', peer); // first live message after the gap: starts the replay
    const fetched = await held.fetched; // the engine answered; the proxy holds the answer
    const replaySnapshotEnd = lastBefore + fetched;
    expect(proxy.requests.slice(requestsBefore)).toEqual([BigInt(lastBefore + 1)]);

    // Live batches published now arrive while the replay is still in flight.
    const r0 = st(sub, 'w1').received;
    publishN(peer, 12);
    await vi.waitFor(() => expect(st(sub, 'w1').received).toBe(r0 + 12), WAIT);
    const during = st(sub, 'w1');
    expect(during.replaying).toBe(true);
    expect(during.lastSeq).toBe(BigInt(lastBefore)); // nothing applied out of order
    expect(during.pending).toBeGreaterThanOrEqual(13); // the trigger probe(s) + 12
    expect(rec.seqs('w1').at(-1)).toBe(BigInt(lastBefore));

    held.release();
    await waitApplied(sub, 'w1', peer);
    expect(rec.seqs('w1')).toEqual(range(0, peer.pub.lastSeq)); // the publisher's full sequence, exactly once each
    expectContentMatches(rec, 'w1', peer);
    const s = st(sub, 'w1');
    expect(s.replayed).toBeGreaterThanOrEqual(replaySnapshotEnd - lastBefore);
    expect(s.duplicates).toBeGreaterThanOrEqual(1); // the probe(s) that triggered the replay came back in it
    expect(s).toMatchObject({ lost: 0, resets: 0, restarts: 0, pending: 0, replaying: false, inaccurate: false, replayFailures: 0 });
    expect(rec.resets()).toEqual([]);
  });

  it('engine restart (seq back to 0 on the same endpoint) calls onReset("restart") and restarts the sequence', async () => {
    const a: Peer = await startPeer({ endpoint: 'tcp://*:*', replayEndpoint: 'tcp://*:*', tag: 1_000_000n });
    const port = new URL(a.pub.boundEndpoint!.replace('tcp://', 'http://')).port;
    const replayPort = new URL(a.pub.boundReplayEndpoint!.replace('tcp://', 'http://')).port;
    const { sub, rec } = await startSub({
      endpoint: `tcp://127.0.0.1:${port}`,
      replayEndpoint: `tcp://127.0.0.1:${replayPort}`,
      sourceKey: 'w2',
    });
    await probeUntilReceived(sub, 'w2', a);
    publishN(a, 150); // the restarted engine's first seqs must be below this
    await waitApplied(sub, 'w2', a);
    expect(rec.seqs('w2')).toEqual(range(0, a.pub.lastSeq));
    await a.pub.close();

    // Same ports: ZMQ releases the old listeners asynchronously, so retry with fresh publishers.
    const b: Peer = { pub: await startPublisherRetry({ endpoint: `tcp://*:${port}`, replayEndpoint: `tcp://*:${replayPort}`, format: 'array', dpRank: 0 }), tag: 9_000_000n, sent: new Map() };
    await probeUntilReceived(sub, 'w2', b);
    publishN(b, 10);
    await waitApplied(sub, 'w2', b);

    expect(rec.resets('w2')).toEqual(['restart']);
    const at = rec.indexOfReset('w2', 'restart');
    expect(rec.seqs('w2', at)).toEqual(range(0, b.pub.lastSeq)); // the new engine's whole sequence, from 0
    expectContentMatches(rec, 'w2', b, at);
    expectContentMatches(rec, 'w2', a, 0, at);
    expect(st(sub, 'w2')).toMatchObject({ restarts: 1, resets: 1, lost: 0, inaccurate: false });
  });

  it('replay of an evicted range calls onReset("replay-incomplete") and continues from what the engine still has', async () => {
    const peer = await startPeer({ replayEndpoint: 'tcp://127.0.0.1:*', bufferSteps: 4 });
    publishN(peer, 20); // first contact: history mostly evicted
    const { sub, rec } = await startSub({ endpoint: peer.pub.boundEndpoint!, replayEndpoint: peer.pub.boundReplayEndpoint!, sourceKey: 'w3' });
    await probeUntilReceived(sub, 'w3', peer);
    await waitApplied(sub, 'w3', peer);
    // Cold start with partial history is normal: no reset, the index just starts later.
    expect(rec.resets()).toEqual([]);
    const first = rec.seqs('w3')[0]!;
    expect(first).toBeGreaterThan(0n);
    expect(rec.seqs('w3')).toEqual(range(Number(first), peer.pub.lastSeq));

    const lastBefore = peer.pub.lastSeq;
    await sub.pause();
    publishN(peer, 10); // more than bufferSteps: the start of the gap is evicted
    await flushed(peer);
    await sub.resume();
    await probeUntilReceived(sub, 'w3', peer);
    publishN(peer, 3);
    await waitApplied(sub, 'w3', peer);

    expect(rec.resets('w3')).toEqual(['replay-incomplete']);
    const at = rec.indexOfReset('w3', 'replay-incomplete');
    expect(rec.seqs('w3', 0).slice(0, at)).toEqual(range(Number(first), lastBefore));
    const after = rec.seqs('w3', at);
    expect(after[0]).toBeGreaterThan(BigInt(lastBefore + 1)); // seqs lastBefore+1.. were gone
    expect(after).toEqual(range(Number(after[0]), peer.pub.lastSeq));
    expectContentMatches(rec, 'w3', peer);
    expect(st(sub, 'w3')).toMatchObject({ resets: 1, restarts: 0, lost: 0, inaccurate: false, replaying: false });
  });

  it('without a replay endpoint a gap is counted lost and flags the source; AllBlocksCleared clears the flag', async () => {
    const peer = await startPeer({});
    const { sub, rec } = await startSub({ endpoint: peer.pub.boundEndpoint!, sourceKey: 'w4' });
    await probeUntilReceived(sub, 'w4', peer);
    await waitApplied(sub, 'w4', peer);
    const first = Number(rec.seqs('w4')[0]!);
    await sub.pause();
    const gapFrom = peer.pub.lastSeq + 1;
    publishN(peer, 7);
    await flushed(peer);
    await sub.resume();
    await probeUntilReceived(sub, 'w4', peer);
    await waitApplied(sub, 'w4', peer);
    const seqs = rec.seqs('w4');
    const resumedAt = seqs.findIndex((q) => q >= BigInt(gapFrom));
    const missing = Number(seqs[resumedAt]!) - gapFrom;
    expect(missing).toBeGreaterThanOrEqual(7);
    expect(seqs).toEqual([...range(first, gapFrom - 1), ...range(gapFrom + missing, peer.pub.lastSeq)]);
    expect(st(sub, 'w4')).toMatchObject({ lost: missing, dropped: missing, inaccurate: true, resets: 0, replayRequests: 0 });
    expect(rec.resets()).toEqual([]);

    // The engine's prefix cache is reset: from here on the index is exact again.
    peer.pub.publish([{ type: 'AllBlocksCleared' }]);
    await waitApplied(sub, 'w4', peer);
    expect(st(sub, 'w4').inaccurate).toBe(false);
  });

  it('a replay that times out counts the gap as lost and keeps going', async () => {
    const peer = await startPeer({});
    const deaf = track(new zmq.Router({ linger: 0 })); // accepts requests, never answers
    await deaf.bind('tcp://127.0.0.1:*');
    const { sub, rec } = await startSub({ endpoint: peer.pub.boundEndpoint!, replayEndpoint: deaf.lastEndpoint!, sourceKey: 'w5', replayTimeoutMs: 300 });
    await probeUntilReceived(sub, 'w5', peer);
    await waitApplied(sub, 'w5', peer); // first contact: replay timed out, started live
    expect(st(sub, 'w5')).toMatchObject({ replayFailures: rec.seqs('w5')[0] === 0n ? 0 : 1, lost: 0, inaccurate: false });
    const failures0 = st(sub, 'w5').replayFailures;

    await sub.pause();
    publishN(peer, 4);
    await flushed(peer);
    await sub.resume();
    await probeUntilReceived(sub, 'w5', peer);
    publishN(peer, 3); // buffered during the doomed replay
    await waitApplied(sub, 'w5', peer);
    const s = st(sub, 'w5');
    expect(s.replayFailures).toBe(failures0 + 1);
    expect(s.lost).toBeGreaterThanOrEqual(4);
    expect(s.inaccurate).toBe(true);
    const seqs = rec.seqs('w5');
    for (let i = 1; i < seqs.length; i++) expect(seqs[i]!).toBeGreaterThan(seqs[i - 1]!);
    expect(seqs.length + s.lost).toBe(peer.pub.lastSeq + 1 - Number(seqs[0]!));
  });

  it('close() is idempotent and stops all callbacks', async () => {
    const peer = await startPeer({ replayEndpoint: 'tcp://127.0.0.1:*' });
    const { sub, rec } = await startSub({ endpoint: peer.pub.boundEndpoint!, replayEndpoint: peer.pub.boundReplayEndpoint!, sourceKey: 'w6' });
    await probeUntilReceived(sub, 'w6', peer);
    await waitApplied(sub, 'w6', peer);
    await Promise.all([sub.close(), sub.close()]);
    await sub.close();
    const n = rec.entries.length;
    publishN(peer, 5);
    await sleep(200);
    expect(rec.entries.length).toBe(n);
    await sub.resume(); // no-op after close
    await sub.pause();
    publishN(peer, 1);
    await sleep(100);
    expect(rec.entries.length).toBe(n);
  });
});

describe('KvEventSubscriber (connect mode) against a raw PUB: undecodable payloads, lag, staleness', () => {
  it('skips undecodable payloads without replaying them, measures lag against ts, reports staleness', async () => {
    const pub = track(new zmq.Publisher({ linger: 0 }));
    await pub.bind('tcp://127.0.0.1:*');
    const clock = new ManualClock(1000);
    const rec = new Recorder();
    let throwOnce = true;
    const sub = track(
      new KvEventSubscriber({
        endpoint: pub.lastEndpoint!,
        sourceKey: 'raw',
        onBatch: (k, b) => {
          rec.onBatch(k, b);
          if (throwOnce) {
            throwOnce = false;
            throw new Error('callback bug'); // must not stop the stream
          }
        },
        onReset: rec.onReset,
        clock,
        epochMs: () => 1_700_000_010_500,
        staleAfterMs: 1000,
      }),
    );
    await sub.start();
    const seqFrame = (s: number): Buffer => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(BigInt(s));
      return b;
    };
    const good = (ts = 1_700_000_010): Buffer => encodeKvEventBatch([{ type: 'BlockRemoved', blockHashes: [BIG], medium: 'GPU' }], { format: 'map', dpRank: 0, ts });
    let seq = 0;
    await vi.waitFor(async () => {
      if ((sub.sourceStats('raw')?.received ?? 0) > 0) return;
      await pub.send([Buffer.alloc(0), seqFrame(seq++), good()]);
      throw new Error('not yet');
    }, { timeout: 10_000, interval: 25 });
    await vi.waitFor(() => expect(st(sub, 'raw').lastSeq).toBe(BigInt(seq - 1)), WAIT);
    const base = seq;
    await pub.send([Buffer.alloc(0), seqFrame(seq++), Buffer.from('c1', 'hex')]); // not msgpack
    await pub.send([Buffer.alloc(0), seqFrame(seq++), good(1_700_000_008)]);
    await pub.send([Buffer.alloc(0), seqFrame(seq++), Buffer.from('a3616263', 'hex')]); // "abc": outer not an array
    await pub.send([Buffer.alloc(0), Buffer.from('0001', 'hex'), good()]); // bad seq frame: no seq consumed
    await pub.send([Buffer.alloc(0), seqFrame(seq)]); // 2 frames
    await pub.send([Buffer.alloc(0), seqFrame(seq++), good(1_700_000_010)]);
    await vi.waitFor(() => expect(st(sub, 'raw').lastSeq).toBe(BigInt(seq - 1)), WAIT);

    const applied = rec.seqs('raw');
    expect(applied.slice(-2)).toEqual([BigInt(base + 1), BigInt(base + 3)]);
    const s = st(sub, 'raw');
    expect(s).toMatchObject({ malformed: 2, lost: 0, duplicates: 0, inaccurate: true, replayRequests: 0, resets: 0 });
    expect(s.lastEventLagS).toBeCloseTo(0.5, 6);
    expect(sub.stats().undecodable).toBe(4);
    expect(s.lastBatchAt).toBe(1000);
    expect(s.stale).toBe(false);
    clock.advance(1000);
    expect(st(sub, 'raw').stale).toBe(false);
    clock.advance(1);
    expect(st(sub, 'raw').stale).toBe(true);
  });
});

describe('KvEventSubscriber (bind mode): engines connect to one bound SUB', () => {
  it('identifies sources by topic + dp rank, repairs each one with its own replay endpoint, survives pause/resume', async () => {
    const replayOf = new Map<string, string>();
    const calls: Array<[string, number | null]> = [];
    const { sub, rec } = await startSub({
      mode: 'bind',
      endpoint: 'tcp://127.0.0.1:*',
      topicPrefix: 'kv@',
      resolveSource: (topic, dpRank) => {
        calls.push([topic, dpRank]);
        const replayEndpoint = replayOf.get(topic);
        return replayEndpoint ? { key: `${topic}#${dpRank}`, replayEndpoint } : null;
      },
    });
    const ep = sub.boundEndpoint!;
    expect(ep).toMatch(/^tcp:\/\/127\.0\.0\.1:\d+$/);
    // No "*" in the endpoint: the publishers connect to the subscriber.
    const a = await startPeer({ endpoint: ep, replayEndpoint: 'tcp://127.0.0.1:*', topic: 'kv@10.0.0.1:8000@m', dpRank: 0, format: 'map', tag: 1_000_000n, hwm: 1 });
    const b = await startPeer({ endpoint: ep, replayEndpoint: 'tcp://127.0.0.1:*', topic: 'kv@10.0.0.2:8000@m', dpRank: 3, format: 'array', tag: 5_000_000n, clears: true });
    const stranger = await startPeer({ endpoint: ep, topic: 'kv@unknown@m', tag: 7_000_000n });
    const other = await startPeer({ endpoint: ep, topic: 'metrics', tag: 8_000_000n }); // filtered by the prefix
    replayOf.set('kv@10.0.0.1:8000@m', a.pub.boundReplayEndpoint!);
    replayOf.set('kv@10.0.0.2:8000@m', b.pub.boundReplayEndpoint!);
    const KA = 'kv@10.0.0.1:8000@m#0';
    const KB = 'kv@10.0.0.2:8000@m#3';

    publishN(a, 6);
    publishN(b, 3);
    await probeUntilReceived(sub, KA, a);
    await probeUntilReceived(sub, KB, b);
    for (let i = 0; i < 20; i++) {
      publishN(a, 1);
      publishN(b, 1);
    }
    await catchUp(sub, KA, a);
    await catchUp(sub, KB, b);
    expect(rec.seqs(KA)).toEqual(range(0, a.pub.lastSeq));
    expect(rec.seqs(KB)).toEqual(range(0, b.pub.lastSeq));
    expectContentMatches(rec, KA, a);
    expectContentMatches(rec, KB, b);
    expect(calls.some(([t, r]) => t === 'kv@10.0.0.2:8000@m' && r === 3)).toBe(true);

    await vi.waitFor(() => {
      if (sub.stats().unroutable > 0) return;
      publishN(stranger, 1);
      publishN(other, 1);
      throw new Error('stranger not seen yet');
    }, { timeout: 10_000, interval: 25 });
    expect(calls.some(([t]) => t === 'metrics')).toBe(false);
    expect(Object.keys(sub.stats().sources).sort()).toEqual([KA, KB]);

    // Pause (SUB closed, rebound on the same port by resume): engine A's batches meanwhile are lost
    // live (a connecting PUB queues for a disconnected peer only up to its HWM, 1 here) and
    // recovered from A's replay endpoint.
    const replaysBefore = st(sub, KA).replayRequests;
    await sub.pause();
    publishN(a, 5);
    await flushed(a);
    await sub.resume();
    expect(sub.boundEndpoint).toBe(ep);
    await probeUntilReceived(sub, KA, a);
    await probeUntilReceived(sub, KB, b);
    await catchUp(sub, KA, a);
    await catchUp(sub, KB, b);
    expect(rec.seqs(KA)).toEqual(range(0, a.pub.lastSeq));
    expect(rec.seqs(KB)).toEqual(range(0, b.pub.lastSeq));
    expectContentMatches(rec, KA, a);
    expect(st(sub, KA).replayRequests).toBeGreaterThan(replaysBefore); // the gap was repaired by a replay
    expect(rec.resets()).toEqual([]);
    expect(rec.entries.every((e) => !('batch' in e) || e.batch.dpRank === (e.key === KB ? 3 : 0))).toBe(true);
  });
});

describe('process lifetime', () => {
  const here = fileURLToPath(new URL('.', import.meta.url));
  const root = join(here, '..', '..');
  const subPath = join(root, 'src', 'events', 'subscriber.ts');
  const pubPath = join(root, 'src', 'sim', 'kv-publisher.ts');
  const viteNode = join(root, 'node_modules', '.bin', 'vite-node');

  function runChild(closeSubscriber: boolean, limitMs: number): Promise<{ code: number | null; timedOut: boolean; out: string }> {
    const dir = mkdtempSync(join(tmpdir(), 'kvgate-kvsub-'));
    const script = join(dir, 'child.ts');
    writeFileSync(
      script,
      [
        `import { KvEventPublisher } from ${JSON.stringify(pubPath)};`,
        `import { KvEventSubscriber } from ${JSON.stringify(subPath)};`,
        `const pub = new KvEventPublisher({ endpoint: 'tcp://127.0.0.1:*', replayEndpoint: 'tcp://127.0.0.1:*', format: 'map', dpRank: 0 });`,
        `await pub.start();`,
        `for (let i = 0; i < 5; i++) pub.publish([{ type: 'AllBlocksCleared' }]);`,
        `let applied = 0;`,
        `const sub = new KvEventSubscriber({ endpoint: pub.boundEndpoint!, replayEndpoint: pub.boundReplayEndpoint!, sourceKey: 'w', onBatch: () => { applied++; }, onReset: () => {} });`,
        `await sub.start();`,
        `while (applied < 8) { pub.publish([{ type: 'AllBlocksCleared' }]); await new Promise((r) => setTimeout(r, 20)); }`,
        `await sub.pause(); await sub.resume();`,
        `console.log('applied', sub.sourceStats('w')!.lastSeq === BigInt(applied - 1) ? 'contiguous' : 'broken');`,
        `await pub.close();`,
        closeSubscriber ? `await sub.close(); console.log('closed');` : `console.log('not closing');`,
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
    const [closed, leaked] = await Promise.all([runChild(true, 15_000), runChild(false, 6_000)]);
    expect(closed.out).toContain('applied contiguous');
    expect(closed.out).toContain('closed');
    expect(closed.timedOut).toBe(false);
    expect(closed.code).toBe(0);

    expect(leaked.out).toContain('applied contiguous');
    expect(leaked.timedOut).toBe(true); // control: the open SUB keeps the process alive
  }, 30_000);
});
