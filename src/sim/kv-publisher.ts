/**
 * vLLM-compatible KV-event publisher for the simulated engine (vllm/distributed/kv_events.py,
 * ZmqEventPublisher). Wire contract (docs reference §1.2–1.5):
 *  - PUB socket, 3 frames per batch: topic (utf-8), seq (8-byte big-endian, 0, 1, 2, ...),
 *    msgpack payload `[ts, [events...], dp_rank]` (see ./kv-wire.ts);
 *  - the PUB binds when the endpoint contains "*" or "::" or starts with ipc:// or inproc://,
 *    otherwise it connects (the subscriber binds: "centralized" mode);
 *  - optional replay ROUTER (always binds): a request `[identity, "", start_seq(8B BE)]` is answered
 *    with `[identity, "", seq, payload]` for every buffered batch with seq ≥ start_seq, then
 *    `[identity, "", 0xFFFFFFFFFFFFFFFF, ""]`. Evicted start seqs get what remains, no error.
 *
 * The caller applies the per-rank port offset with `endpointForRank` and passes the final endpoints.
 */
import * as zmq from 'zeromq';
import type { KvEvent } from './kv-events.js';
import { encodeKvEventBatch, type KvWireFormat } from './kv-wire.js';

export { encodeKvEventBatch } from './kv-wire.js';
export type { EncodeKvEventBatchOptions, KvWireFormat } from './kv-wire.js';

export interface KvEventPublisherOptions {
  /** PUB endpoint, already offset for the rank (see endpointForRank). */
  endpoint: string;
  /** ROUTER endpoint for replays (always bound). Replay is disabled when absent. */
  replayEndpoint?: string;
  /** 'array' = legacy positional events (vLLM ≤ 0.23), 'map' = tagged maps (vLLM ≥ 0.24). */
  format: KvWireFormat;
  /** Written as the 3rd element of every batch. */
  dpRank: number;
  /** Frame 0 of every message; default "" (subscribers then subscribe to everything). */
  topic?: string;
  /** Batches kept for replay; default 10000 (vLLM buffer_steps). */
  bufferSteps?: number;
  /** ZMQ send high-water mark of the PUB; default 100000 (vLLM hwm). Past it ZMQ drops silently. */
  hwm?: number;
  /** Max batches waiting in the in-process send queue; default 100000 (vLLM max_queue_size). */
  maxQueueSize?: number;
}

export interface KvEventPublisherStats {
  /** Batches given a seq by publish(). */
  published: number;
  /** Batches handed to the PUB socket. */
  sent: number;
  /** Batches not handed to the PUB socket (queue overflow, send error, closed). Still replayable. */
  dropped: number;
  /** Replay requests answered. */
  replays: number;
  /** Malformed replay requests ignored. */
  invalidReplayRequests: number;
}

/** 8-byte big-endian all-ones: vLLM's END_SEQ ((-1).to_bytes(8, "big", signed=True)). */
const END_SEQ = Buffer.alloc(8, 0xff);
const EMPTY = Buffer.alloc(0);


/** vLLM's heuristic: bind wildcard / local-transport endpoints, connect to anything else. */
export function publisherShouldBind(endpoint: string): boolean {
  return endpoint.includes('*') || endpoint.includes('::') || endpoint.startsWith('ipc://') || endpoint.startsWith('inproc://');
}

function seqFrame(seq: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(seq));
  return b;
}

/** Big-endian unsigned integer of any length (Python int.from_bytes(b, "big")). */
function readUintBE(b: Buffer): bigint {
  let v = 0n;
  for (const byte of b) v = (v << 8n) | BigInt(byte);
  return v;
}

/** Fixed-capacity ring of the most recent (seq, payload); seqs are contiguous. */
class ReplayBuffer {
  private readonly items: Buffer[];
  private head = 0; // index of the oldest entry
  private size = 0;
  private newestSeq = -1;

  constructor(private readonly capacity: number) {
    this.items = new Array<Buffer>(capacity);
  }

  push(seq: number, payload: Buffer): void {
    this.newestSeq = seq;
    if (this.capacity === 0) return;
    if (this.size < this.capacity) {
      this.items[(this.head + this.size) % this.capacity] = payload;
      this.size++;
    } else {
      this.items[this.head] = payload;
      this.head = (this.head + 1) % this.capacity;
    }
  }

  /** Snapshot of every buffered entry with seq ≥ startSeq, oldest first. */
  from(startSeq: bigint): Array<[number, Buffer]> {
    const out: Array<[number, Buffer]> = [];
    if (this.size === 0) return out;
    const oldestSeq = this.newestSeq - this.size + 1;
    const first = startSeq <= BigInt(oldestSeq) ? oldestSeq : startSeq > BigInt(this.newestSeq) ? this.newestSeq + 1 : Number(startSeq);
    for (let seq = first; seq <= this.newestSeq; seq++) {
      out.push([seq, this.items[(this.head + (seq - oldestSeq)) % this.capacity]!]);
    }
    return out;
  }
}

function nonNegativeInt(name: string, v: number): number {
  if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`${name} must be a non-negative integer, got ${v}`);
  return v;
}

export class KvEventPublisher {
  /** The configured PUB endpoint (bound or connected to, per publisherShouldBind). */
  readonly endpoint: string;
  private readonly replayEndpointOpt: string | undefined;
  private readonly format: KvWireFormat;
  private readonly dpRank: number;
  private readonly topic: Buffer;
  private readonly hwm: number;
  private readonly maxQueueSize: number;
  private readonly bufferSteps: number;
  private readonly replayBuffer: ReplayBuffer;

  private pub: zmq.Publisher | null = null;
  private router: zmq.Router | null = null;
  private nextSeq = 0;
  private readonly queue: Buffer[][] = [];
  private queueHead = 0;
  private draining: Promise<void> | null = null;
  private replayLoop: Promise<void> | null = null;
  private startPromise: Promise<void> | null = null;
  private closePromise: Promise<void> | null = null;
  private closing = false;
  private lastError: unknown = null;
  private readonly counters: KvEventPublisherStats = { published: 0, sent: 0, dropped: 0, replays: 0, invalidReplayRequests: 0 };

  constructor(opts: {
    endpoint: string;
    replayEndpoint?: string;
    format: 'array' | 'map';
    dpRank: number;
    topic?: string;
    bufferSteps?: number;
    hwm?: number;
    maxQueueSize?: number;
  }) {
    if (!opts.endpoint) throw new Error('KvEventPublisher: endpoint is required');
    if (opts.format !== 'array' && opts.format !== 'map') {
      throw new TypeError(`KvEventPublisher: format must be 'array' or 'map', got ${String(opts.format)}`);
    }
    this.endpoint = opts.endpoint;
    this.replayEndpointOpt = opts.replayEndpoint || undefined;
    this.format = opts.format;
    this.dpRank = nonNegativeInt('dpRank', opts.dpRank);
    this.topic = Buffer.from(opts.topic ?? '', 'utf8');
    this.bufferSteps = nonNegativeInt('bufferSteps', opts.bufferSteps ?? 10_000);
    this.hwm = nonNegativeInt('hwm', opts.hwm ?? 100_000);
    this.maxQueueSize = nonNegativeInt('maxQueueSize', opts.maxQueueSize ?? 100_000);
    this.replayBuffer = new ReplayBuffer(this.bufferSteps);
  }

  /** Opens the PUB (bind or connect per vLLM's rule) and, if configured, binds the replay ROUTER. */
  start(): Promise<void> {
    if (this.closing) return Promise.reject(new Error('KvEventPublisher: start() after close()'));
    this.startPromise ??= this.doStart();
    return this.startPromise;
  }

  private async doStart(): Promise<void> {
    const pub = new zmq.Publisher({ sendHighWaterMark: this.hwm, linger: 0 });
    let router: zmq.Router | null = null;
    try {
      if (publisherShouldBind(this.endpoint)) await pub.bind(this.endpoint);
      else pub.connect(this.endpoint);
      if (this.replayEndpointOpt) {
        // Big enough that a full-buffer replay is not cut short by the per-peer HWM.
        router = new zmq.Router({ sendHighWaterMark: Math.max(1000, this.bufferSteps + 16), linger: 0 });
        await router.bind(this.replayEndpointOpt);
      }
    } catch (err) {
      pub.close();
      router?.close();
      throw err;
    }
    if (this.closing) {
      // close() was called while binding: it waits for us, then tears down what we hand over.
      pub.close();
      router?.close();
      return;
    }
    this.pub = pub;
    this.router = router;
    if (router) this.replayLoop = this.serveReplays(router);
    this.kick(); // batches published before start() completed
  }

  /**
   * Assigns the next seq to a non-empty batch, encodes it, keeps it for replay and queues it for
   * sending. Never blocks; never throws because of the network (drops are counted in stats).
   * Throws only for malformed events (the encoder rejects them) and then consumes no seq.
   * After close() it is a no-op.
   */
  publish(events: KvEvent[]): void {
    if (events.length === 0 || this.closing) return;
    const payload = encodeKvEventBatch(events, { format: this.format, dpRank: this.dpRank, ts: Date.now() / 1000 });
    const seq = this.nextSeq++;
    this.counters.published++;
    this.replayBuffer.push(seq, payload);
    if (this.queue.length - this.queueHead >= this.maxQueueSize) {
      this.counters.dropped++; // a subscriber will see a seq gap and can replay it
      return;
    }
    this.queue.push([this.topic, seqFrame(seq), payload]);
    this.kick();
  }

  /** Seq of the most recently published batch; -1 before the first one. */
  get lastSeq(): number {
    return this.nextSeq - 1;
  }

  /** The PUB endpoint actually bound (resolves "tcp://*:*" to a port), else the configured one. */
  get boundEndpoint(): string | null {
    return this.pub ? (this.pub.lastEndpoint ?? this.endpoint) : null;
  }

  /** The replay ROUTER endpoint actually bound, or null when replay is off / not started. */
  get boundReplayEndpoint(): string | null {
    return this.router?.lastEndpoint ?? (this.router ? (this.replayEndpointOpt ?? null) : null);
  }

  get stats(): Readonly<KvEventPublisherStats> {
    return { ...this.counters };
  }

  /** The last socket error swallowed by the send or replay loop (for diagnostics). */
  get lastSocketError(): unknown {
    return this.lastError;
  }

  private kick(): void {
    if (this.draining || !this.pub || this.queueHead >= this.queue.length) return;
    this.draining = this.drain(this.pub).finally(() => {
      this.draining = null;
      // A publish() that raced with the end of the loop leaves work behind.
      if (!this.closing) this.kick();
    });
  }

  /** Sends queued batches strictly in seq order, one send in flight at a time (zeromq v6 rule). */
  private async drain(pub: zmq.Publisher): Promise<void> {
    while (this.queueHead < this.queue.length) {
      const msg = this.queue[this.queueHead]!;
      this.queue[this.queueHead++] = EMPTY_MSG;
      if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
        this.queue.splice(0, this.queueHead);
        this.queueHead = 0;
      }
      try {
        await pub.send(msg);
        this.counters.sent++;
      } catch (err) {
        this.counters.dropped++;
        this.lastError = err;
        if (pub.closed) {
          this.counters.dropped += this.queue.length - this.queueHead;
          this.queue.length = 0;
          this.queueHead = 0;
          return;
        }
      }
    }
    this.queue.length = 0;
    this.queueHead = 0;
  }

  private async serveReplays(router: zmq.Router): Promise<void> {
    try {
      for await (const frames of router) {
        if (frames.length !== 3) {
          this.counters.invalidReplayRequests++;
          continue;
        }
        const [identity, , startBytes] = frames as [Buffer, Buffer, Buffer];
        const entries = this.replayBuffer.from(readUintBE(startBytes));
        for (const [seq, payload] of entries) {
          await router.send([identity, EMPTY, seqFrame(seq), payload]);
        }
        await router.send([identity, EMPTY, END_SEQ, EMPTY]);
        this.counters.replays++;
      }
    } catch (err) {
      // Socket closed mid-send, or a ZMQ error: the loop ends; close() still works.
      if (!router.closed) this.lastError = err;
    }
  }

  /** Flushes the send queue, closes both sockets and ends the replay loop. Idempotent. */
  close(): Promise<void> {
    this.closePromise ??= this.doClose();
    return this.closePromise;
  }

  private async doClose(): Promise<void> {
    this.closing = true;
    if (this.startPromise) await this.startPromise.catch(() => undefined);
    // PUB sends never block (ZMQ drops at the HWM), so the flush is short; bound it anyway.
    if (this.draining) await withTimeout(this.draining, 2000);
    const dropped = this.queue.length - this.queueHead;
    if (dropped > 0) this.counters.dropped += dropped;
    this.queue.length = 0;
    this.queueHead = 0;
    this.pub?.close();
    this.router?.close();
    if (this.replayLoop) await withTimeout(this.replayLoop, 2000);
    this.pub = null;
    this.router = null;
  }
}

const EMPTY_MSG: Buffer[] = [];

async function withTimeout(p: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    p.catch(() => undefined),
    new Promise<void>((resolve) => {
      timer = setTimeout(resolve, ms);
    }),
  ]);
  clearTimeout(timer);
}
