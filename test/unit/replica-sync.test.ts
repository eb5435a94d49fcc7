import { describe, expect, it } from 'vitest';
import { encode } from '@msgpack/msgpack';
import { BlockIndex } from '../../src/cache/block-index.js';
import type { RequestContext } from '../../src/core/context.js';
import { WorkerRegistry } from '../../src/core/registry.js';
import { SeededRng } from '../../src/core/rng.js';
import { Worker } from '../../src/core/worker.js';
import { CharTree } from '../../src/cache/char-tree.js';
import type { TreesByModel } from '../../src/cache/trees-by-model.js';
import { CacheAwarePolicy } from '../../src/policies/cache-aware.js';
import { KvAwarePolicy, defaultKvAwareConfig } from '../../src/policies/kv-aware.js';
import type { PeerRoutingEvent, RoutingPolicy } from '../../src/policies/policy.js';
import { ChunkDictionary, TEXT_CHUNK } from '../../src/sync/chunks.js';
import { MemoryBus, type MemoryTransport } from '../../src/sync/memory-transport.js';
import { ReplicaSync, type AdminChange } from '../../src/sync/replica-sync.js';
import { VirtualTime } from '../helpers/virtual-time.js';

const URLS = ['http://w0:8000', 'http://w1:8000', 'http://w2:8000', 'http://w3:8000'];

function ctx(text: string, id = Math.random().toString(36).slice(2), tokens?: number[]): RequestContext {
  return { requestId: id, route: 'chat', model: 'm', routingText: text, tokenIds: tokens, headers: {}, stream: true, arrivalMs: 0 };
}

interface Replica {
  id: string;
  registry: WorkerRegistry;
  policy: RoutingPolicy;
  sync: ReplicaSync;
  transport: MemoryTransport;
  admin: AdminChange[];
  logs: string[];
  rate: Array<[string, number]>;
}

function cluster(vt: VirtualTime, bus: MemoryBus, kind: 'cache_aware' | 'kv_aware' = 'cache_aware') {
  const make = (id: string): Replica => {
    const registry = new WorkerRegistry();
    for (const url of URLS) {
      const w = new Worker({ url, modelId: 'm' });
      w.healthy = true;
      registry.add(w);
    }
    const transport = bus.transport();
    const logs: string[] = [];
    const admin: AdminChange[] = [];
    const policies = new Map<string, RoutingPolicy>();
    const log = { info: (_o: object, m: string) => logs.push(m), warn: (_o: object, m: string) => logs.push(m), error: (_o: object, m: string) => logs.push(m) };
    let sync!: ReplicaSync;
    const deps = {
      clock: vt.clock,
      rng: new SeededRng(1),
      get share() {
        return sync?.shareFor('main');
      },
    };
    const policy =
      kind === 'cache_aware'
        ? new CacheAwarePolicy(deps)
        : new KvAwarePolicy(deps, { index: new BlockIndex(), lastEventAtMs: () => undefined, isAccurate: () => false, resetCount: () => 0 }, defaultKvAwareConfig);
    policies.set('main', policy);
    const rate: Array<[string, number]> = [];
    sync = new ReplicaSync(
      transport,
      { registry, policies, clock: vt.clock, timers: vt.timers, log, applyAdmin: (c) => admin.push(c), consumeRateLimit: (k, n) => rate.push([k, n]) },
      { replicaId: id, flushMs: 2 },
    );
    sync.start();
    return { id, registry, policy, sync, transport, admin, logs, rate };
  };
  return make;
}

/** Two replicas on one in-memory bus (1 ms delay) in virtual time, past their start-up (synced). */
function twoPeers(kind: 'cache_aware' | 'kv_aware' = 'cache_aware') {
  const vt = new VirtualTime();
  const bus = new MemoryBus((ms, fn) => vt.at(ms, fn), 1);
  const make = cluster(vt, bus, kind);
  const a = make('a');
  const b = make('b');
  vt.advance(2000);
  return { vt, a, b };
}

const systemPrompt = 'You are a careful assistant. '.repeat(150); // ~4,350 characters

describe('replica sync (in-memory bus, virtual time)', () => {
  it('shares tree inserts and in-flight load; a shared prefix costs bytes only once', () => {
    const { vt, a, b } = twoPeers();
    expect(a.sync.syncState).toBe('synced');
    expect(a.sync.peerCount).toBe(1);

    const first = a.policy.selectWorker(a.registry.all(), ctx(systemPrompt + 'Q1'))!;
    vt.advance(10);
    // b never routed this prompt, yet its tree knows where it went.
    const onB = b.policy.selectWorker(b.registry.all(), ctx(systemPrompt + 'Q2'))!;
    expect(onB.id).toBe(first.id);

    // A third request with the same prefix crosses the wire as a chunk reference plus its suffix.
    vt.advance(10);
    const before = b.sync.stats.bytesSent;
    b.policy.selectWorker(b.registry.all(), ctx(systemPrompt + 'Q3 is a new question'));
    vt.advance(10);
    const sent = b.sync.stats.bytesSent - before;
    expect(sent).toBeGreaterThan(0);
    expect(sent).toBeLessThan(TEXT_CHUNK * 2 + 200);

    // Load: a request in flight on a is counted on b, and released there when it ends.
    const guard = a.registry.get(first.id)!.acquire();
    vt.advance(10);
    expect(b.registry.get(first.id)!.load).toBe(1);
    expect(b.registry.get(first.id)!.localLoad).toBe(0);
    guard.release();
    vt.advance(10);
    expect(b.registry.get(first.id)!.load).toBe(0);
  });

  it('expires a silent peer’s load, and re-converges when it is back', () => {
    const { vt, a, b } = twoPeers();
    const w = a.registry.all()[2];
    const g1 = w.acquire();
    const g2 = w.acquire();
    vt.advance(10);
    expect(b.registry.get(w.id)!.load).toBe(2);
    a.transport.setConnected(false); // a is cut off (NATS outage on its side)
    vt.advance(5000);
    expect(b.registry.get(w.id)!.load).toBe(0);
    expect(b.sync.peerCount).toBe(0);
    expect(b.logs.some((m) => m.includes('stopped heartbeating'))).toBe(true);
    expect(a.sync.syncState).toBe('disconnected');
    g1.release(); // changes while cut off are lost on the wire...
    a.transport.setConnected(true);
    vt.advance(3000);
    // ...but the full state sent on reconnection restores b's view.
    expect(b.registry.get(w.id)!.load).toBe(1);
    expect(a.sync.syncState).toBe('synced');
    g2.release();
    vt.advance(10);
    expect(b.registry.get(w.id)!.load).toBe(0);
  });

  it('a joining replica gets the shared history in a snapshot before it is ready', async () => {
    const vt = new VirtualTime();
    const bus = new MemoryBus((ms, fn) => vt.at(ms, fn), 1);
    const make = cluster(vt, bus);
    const a = make('a');
    vt.advance(2000);
    const placed = new Map<string, string>();
    for (let g = 0; g < 6; g++) {
      const text = `group ${g}: ` + `system prompt of group ${g}. `.repeat(60);
      placed.set(text, a.policy.selectWorker(a.registry.all(), ctx(text + 'first'))!.id);
    }
    vt.advance(10);
    const c = make('c');
    let ready = false;
    void c.sync.ready.then(() => (ready = true));
    vt.advance(50);
    await Promise.resolve();
    expect(ready).toBe(true);
    expect(c.sync.status().snapshot).toMatchObject({ from: 'a' });
    for (const [text, id] of placed) expect(c.policy.selectWorker(c.registry.all(), ctx(text + 'second'))!.id).toBe(id);
  });

  it('refuses messages of another format version, loudly, and ignores malformed ones', () => {
    const vt = new VirtualTime();
    const bus = new MemoryBus((ms, fn) => vt.at(ms, fn), 1);
    const b = cluster(vt, bus)('b');
    vt.advance(2000);
    b.sync.receive(encode({ v: 99, k: 'b', o: 'future', i: 'x', s: 1, l: [[URLS[0], 50]] }));
    b.sync.receive(encode({ v: 99, k: 'b', o: 'future', i: 'x', s: 2, l: [[URLS[0], 50]] }));
    b.sync.receive(new Uint8Array([0xc1, 0x00]));
    expect(b.sync.stats.refusedVersion).toBe(2);
    expect(b.sync.stats.malformed).toBe(1);
    expect(b.logs.filter((m) => m.includes('another state format version'))).toHaveLength(1);
    expect(b.registry.get(URLS[0])!.load).toBe(0);
    expect(b.sync.status().refused_replicas).toEqual(['future']);
  });

  it('kv_aware: peers see in-flight blocks and pending prefill, released on first token and end', () => {
    const { vt, a, b } = twoPeers('kv_aware');
    const tokens = Array.from({ length: 640 }, (_, i) => i % 1000);
    const c1 = ctx(systemPrompt, 'req-1', tokens);
    const w = a.policy.selectWorker(a.registry.all(), c1)!;
    vt.advance(10);
    const kb = b.policy as KvAwarePolicy;
    expect(kb.peerActiveOf(w.id)).toEqual({ blocks: 40, pendingPrefillTokens: 640 });
    a.policy.onFirstToken!(w, c1);
    vt.advance(10);
    expect(kb.peerActiveOf(w.id)).toEqual({ blocks: 40, pendingPrefillTokens: 0 });
    a.policy.onRequestComplete!(w, c1, 'success');
    vt.advance(10);
    expect(kb.peerActiveOf(w.id)).toEqual({ blocks: 0, pendingPrefillTokens: 0 });
  });

  it('a prompt routed to the same worker again within the repeat window is not published again', () => {
    const { vt, a, b } = twoPeers();
    const text = systemPrompt + 'the same question';
    const w = a.policy.selectWorker(a.registry.all(), ctx(text))!;
    vt.advance(10);
    expect(a.sync.stats.routedSent).toBe(1);
    const received = b.sync.stats.routedReceived;
    // Again, 0.5 s later: the peer holds it already; nothing is published.
    vt.advance(500);
    expect(a.policy.selectWorker(a.registry.all(), ctx(text))!.id).toBe(w.id);
    vt.advance(10);
    expect(a.sync.stats.repeatsSuppressed).toBe(1);
    expect(a.sync.stats.routedSent).toBe(1);
    expect(b.sync.stats.routedReceived).toBe(received);
    // Past the window it is published again (the peer's recency is refreshed).
    vt.advance(1000);
    a.policy.selectWorker(a.registry.all(), ctx(text));
    vt.advance(10);
    expect(a.sync.stats.routedSent).toBe(2);
    expect(b.sync.stats.routedReceived).toBe(received + 1);
    // A peer that received it does not publish it either when it routes it there itself.
    expect(b.policy.selectWorker(b.registry.all(), ctx(text))!.id).toBe(w.id);
    vt.advance(10);
    expect(b.sync.stats.repeatsSuppressed).toBe(1);
    // The same prompt on another worker is news, window or not.
    const other = a.registry.all().find((x) => x.id !== w.id)!;
    a.sync.shareFor('main').routed({ model: 'm', workerId: other.id, text });
    vt.advance(10);
    expect(a.sync.stats.routedSent).toBe(3);
    expect(a.sync.stats.repeatsSuppressed).toBe(1);
  });

  it('the peer’s tree holds exactly the local tree after many mixed repeated, growing and unique prompts', () => {
    const { vt, a, b } = twoPeers();
    let seed = 11;
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2147483648) % n);
    const users = Array.from({ length: 40 }, (_, i) => `user ${i}: ` + 'where is my order? '.repeat(1 + (i % 17)));
    let convo = systemPrompt;
    for (let n = 0; n < 600; n++) {
      const kind = rnd(5);
      let text: string;
      if (kind <= 1) text = systemPrompt + users[rnd(users.length)]; // repeats behind one system prompt
      else if (kind === 2) text = convo += users[rnd(users.length)]; // a growing conversation
      else if (kind === 3) text = systemPrompt.slice(0, rnd(systemPrompt.length)) + `unique ${n} ` + 'x'.repeat(rnd(700));
      else text = `short ${rnd(30)}`; // below one chunk
      a.policy.selectWorker(a.registry.all(), ctx(text));
      vt.advance(rnd(3) === 0 ? 300 : 1); // some repeats fall inside the window, some outside
    }
    vt.advance(50);
    expect(a.sync.stats.repeatsSuppressed).toBeGreaterThan(0);
    expect(b.sync.unresolvedTexts).toBe(0);
    const tree = (r: Replica) =>
      [...r.policy.exportHistory!()].map((h) => `${h.model}|${h.workerId}|${h.text}`).sort();
    const local = tree(a);
    expect(local.length).toBeGreaterThan(4);
    expect(tree(b)).toEqual(local);
  });

  it('a peer’s decoded prompts (inserted as prefix and rest) leave its tree as plain inserts would, with evictions between', () => {
    const { vt, a, b } = twoPeers();
    // Replays what b's policy is given as plain inserts of the joined text into a reference tree.
    const cap = 6000;
    const reference = new CharTree({ maxTenantChars: cap });
    const apply = b.policy.applyPeer!.bind(b.policy);
    let parts = 0;
    b.policy.applyPeer = (origin: string, event: PeerRoutingEvent) => {
      apply(origin, event);
      if (event.kind !== 'routed' || event.rec.text === undefined) return;
      if (event.rec.textParts) parts++;
      reference.insert(event.rec.text, event.rec.workerId);
    };
    const bTree = () => (b.policy as unknown as { trees: TreesByModel }).trees.tree('m');
    let seed = 5;
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2147483648) % n);
    const emoji = '😀'.repeat(TEXT_CHUNK / 2 - 1) + 'é'; // chunk ends move a unit to keep pairs whole
    const prompts = [systemPrompt, emoji + systemPrompt, systemPrompt.slice(0, 2 * TEXT_CHUNK + 7)];
    for (let n = 0; n < 400; n++) {
      const base = prompts[rnd(prompts.length)];
      const kind = rnd(4);
      let text: string;
      if (kind === 0) text = base + `user ${n}: ` + 'where? '.repeat(rnd(80)); // unique, behind a shared prefix
      else if (kind === 1) text = base.slice(0, rnd(base.length)) + '😀'.repeat(rnd(3)) + `cut ${n}`; // diverges inside the prefix
      else if (kind === 2) text = base + 'repeat ' + rnd(5); // repeats
      else text = `short ${n} ` + '中'.repeat(rnd(300));
      a.policy.selectWorker(a.registry.all(), ctx(text));
      vt.advance(rnd(4) === 0 ? 400 : 1);
      if (n % 50 === 49) {
        vt.advance(10);
        bTree().evictTenantBySize(cap);
        reference.evictTenantBySize(cap);
        expect(bTree().dump()).toBe(reference.dump());
      }
    }
    vt.advance(50);
    expect(parts).toBeGreaterThan(100);
    expect(b.sync.unresolvedTexts).toBe(0);
    expect(bTree().dump()).toBe(reference.dump());
    expect(bTree().dump()).not.toContain('bad');
  });

  it('a repeated prompt with in-flight accounting still sends the accounting (kv_aware), without the prompt', () => {
    const { vt, a, b } = twoPeers('kv_aware');
    const tokens = Array.from({ length: 640 }, (_, i) => i % 1000);
    const c1 = ctx(systemPrompt, 'req-1', tokens);
    const c2 = ctx(systemPrompt, 'req-2', tokens);
    const w = a.policy.selectWorker(a.registry.all(), c1)!;
    vt.advance(10);
    const bytesAfterFirst = a.sync.stats.bytesSent;
    expect(a.policy.selectWorker(a.registry.all(), c2)!.id).toBe(w.id);
    vt.advance(10);
    expect(a.sync.stats.repeatsSuppressed).toBe(1);
    expect(a.sync.stats.routedSent).toBe(2);
    // The second record carried no prompt: far fewer bytes than the first.
    expect(a.sync.stats.bytesSent - bytesAfterFirst).toBeLessThan(200);
    const kb = b.policy as KvAwarePolicy;
    // Both requests are in flight on the peer; the second has nothing new to prefill (its prefix is pending already).
    expect(kb.peerActiveOf(w.id)).toEqual({ blocks: 80, pendingPrefillTokens: 640 });
    a.policy.onRequestComplete!(w, c1, 'success');
    a.policy.onRequestComplete!(w, c2, 'success');
    vt.advance(10);
    expect(kb.peerActiveOf(w.id)).toEqual({ blocks: 0, pendingPrefillTokens: 0 });
  });

  it('rate-limit use is charged to the same (hashed) bucket on every peer', () => {
    const { vt, a, b } = twoPeers();
    for (let i = 0; i < 3; i++) a.sync.rateLimitTaken('bucket-1');
    a.sync.rateLimitTaken('bucket-2');
    vt.advance(10);
    expect(b.rate).toEqual([
      ['bucket-1', 3],
      ['bucket-2', 1],
    ]);
    expect(a.rate).toEqual([]);
  });

  it('admin changes travel with last-writer-wins', () => {
    const { vt, a, b } = twoPeers();
    a.sync.announceAdmin({ op: 'add', url: 'http://w9:8000', spec: { url: 'http://w9:8000' } });
    vt.advance(10);
    expect(b.admin.map((c) => [c.op, c.url])).toEqual([['add', 'http://w9:8000']]);
  });
});

describe('chunk dictionary', () => {
  it('names a sequence the same on the sender and on a receiver, whatever either knew before', () => {
    const send = new ChunkDictionary();
    const recv = new ChunkDictionary();
    const base = 'β'.repeat(700) + '😀'.repeat(129);
    for (const t of [base, base + 'x', 'short', '', base + 'x']) {
      const p = send.prepareText(t);
      expect(recv.decodeText(send.encodePreparedText(p))).toBe(t);
      expect(recv.lastFingerprint).toBe(p.fingerprint);
      expect(new ChunkDictionary().prepareText(t).fingerprint).toBe(p.fingerprint);
    }
    expect(send.prepareText(base).fingerprint).not.toBe(send.prepareText(base + 'x').fingerprint);
    const tokens = Uint32Array.from({ length: 200 }, (_, i) => i * 31);
    const pt = send.prepareTokens(tokens);
    expect([...recv.decodeTokens(send.encodePreparedTokens(pt))!]).toEqual([...tokens]);
    expect(recv.lastFingerprint).toBe(pt.fingerprint);
    expect(send.prepareTokens(tokens.subarray(0, 199)).fingerprint).not.toBe(pt.fingerprint);
  });

  it('round-trips texts and tokens, sending known prefixes by reference', () => {
    const send = new ChunkDictionary();
    const recv = new ChunkDictionary();
    const t1 = 'α'.repeat(300) + '😀'.repeat(200) + 'tail';
    const e1 = send.encodeText(t1);
    expect(e1[0]).toBe(0);
    expect(recv.decodeText(e1)).toBe(t1);
    const t2 = t1 + ' and more';
    const e2 = send.encodeText(t2);
    expect(e2[0]).toBeGreaterThan(0);
    expect(e2[2].length).toBeLessThan(TEXT_CHUNK + 20);
    expect(recv.decodeText(e2)).toBe(t2);
    const tokens = Uint32Array.from({ length: 1000 }, (_, i) => (i * 7919) % 151_000);
    expect([...recv.decodeTokens(send.encodeTokens(tokens))!]).toEqual([...tokens]);
    const more = Uint32Array.from([...tokens, 1, 2, 3]);
    const e3 = send.encodeTokens(more);
    expect(e3[0]).toBe(15);
    expect([...recv.decodeTokens(e3)!]).toEqual([...more]);
    // A receiver that never saw the prefix cannot rebuild it, and says so.
    const stranger = new ChunkDictionary();
    expect(stranger.decodeText(e2)).toBeUndefined();
    expect(stranger.unresolved).toBe(1);
  });

  it('reuses a recent text’s hashes only where the texts are equal: same wire form as hashing in full', () => {
    const memo = new ChunkDictionary();
    const full = new ChunkDictionary(32 * 1024 * 1024, 0);
    const recv = new ChunkDictionary();
    let seed = 7;
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2147483648) % n);
    const system = 'S'.repeat(TEXT_CHUNK * 3 - 1) + '😀' + 'policy '.repeat(200);
    const pieces = ['a', 'é', '😀', 'word ', '\n', 'x'.repeat(TEXT_CHUNK)];
    let convo = system;
    for (let n = 0; n < 300; n++) {
      let text: string;
      const kind = rnd(4);
      if (kind === 0) text = system + pieces[rnd(pieces.length)].repeat(rnd(600));
      else if (kind === 1) text = convo += pieces[rnd(pieces.length)].repeat(rnd(300) + 1);
      else if (kind === 2) text = system.slice(0, rnd(system.length)) + 'Z'.repeat(rnd(700));
      else text = pieces[rnd(pieces.length)].repeat(rnd(2000));
      const a = memo.encodeText(text);
      expect(a).toEqual(full.encodeText(text));
      expect(recv.decodeText(a)).toBe(text);
    }
  });

  it('a receiver that rebuilds a prefix from its cache still keeps that prefix recent (bounded receiver)', () => {
    const send = new ChunkDictionary();
    const recv = new ChunkDictionary(TEXT_CHUNK * 40);
    const keep = 'k'.repeat(TEXT_CHUNK * 4);
    for (let n = 0; n < 60; n++) {
      // The shared prefix travels by reference and is rebuilt from the decoded-prefix cache...
      const t = keep + `question ${n}`;
      expect(recv.decodeText(send.encodeText(t))).toBe(t);
      // ...while new texts push the receiver past its bound, evicting what was not used lately.
      const filler = String(n).padEnd(TEXT_CHUNK * 3, '-');
      expect(recv.decodeText(send.encodeText(filler))).toBe(filler);
      expect(recv.storedUnits).toBeLessThanOrEqual(TEXT_CHUNK * 40);
    }
    expect(recv.unresolved).toBe(0);
  });

  it('keeps a prefix that is used again after it was evicted and re-added recent, on the sender and on a receiver', () => {
    const send = new ChunkDictionary(TEXT_CHUNK * 40);
    const recv = new ChunkDictionary(TEXT_CHUNK * 40);
    const keep = 'k'.repeat(TEXT_CHUNK * 4);
    const both = (t: string) => {
      const e = send.encodeText(t);
      expect(recv.decodeText(e)).toBe(t);
      return e;
    };
    both(keep + 'a');
    expect(both(keep + 'b')[0]).toBe(4); // the prefix's chunks are now cached on both sides
    for (let n = 0; n < 30; n++) both(String(n).padEnd(TEXT_CHUNK * 3, '-')); // ...and evicted
    expect(both(keep + 'c')[0]).toBe(0); // re-added: new chunk entries
    for (let n = 0; n < 60; n++) {
      // Used every round, so never the least recently used: its refreshes must reach the new entries.
      expect(both(keep + `q${n}`)[0]).toBe(4);
      both(String(n + 100).padEnd(TEXT_CHUNK * 3, '-'));
    }
    expect(recv.unresolved).toBe(0);
  });

  it('stays within its bound, dropping the least recently used chunks', () => {
    const d = new ChunkDictionary(TEXT_CHUNK * 40);
    const keep = 'k'.repeat(TEXT_CHUNK * 4);
    for (let n = 0; n < 50; n++) {
      d.encodeText(keep);
      d.encodeText(String(n).padEnd(TEXT_CHUNK * 3, '-'));
      expect(d.storedUnits).toBeLessThanOrEqual(TEXT_CHUNK * 40);
    }
    // The text used on every round is still known in full: only its tail travels.
    const e = d.encodeText(keep + 'tail');
    expect(e[0]).toBe(4);
    expect(e[2]).toBe('tail');
  });
});
