import type { SyncTransport } from './transport.js';

/** Delivers `fn` after `delayMs` (a timer in tests, the event queue in the lab). */
export type Deliver = (delayMs: number, fn: () => void) => void;

interface Sub {
  subject: string;
  handler: (data: Uint8Array) => void;
  queue?: string;
  owner: MemoryTransport;
}

/**
 * An in-memory message bus shared by several replicas' transports: each published message
 * reaches every subscriber of its subject (one per queue group) `delayMs` later, in publish
 * order. The policy lab models replicas with it; unit tests use it to run several replicas in
 * one process.
 */
export class MemoryBus {
  private readonly subs: Sub[] = [];
  private rr = 0;
  messages = 0;
  bytes = 0;

  constructor(
    private readonly deliver: Deliver,
    private readonly delayMs: number,
  ) {}

  transport(): MemoryTransport {
    return new MemoryTransport(this);
  }

  /** @internal */
  add(sub: Sub): () => void {
    this.subs.push(sub);
    return () => {
      const i = this.subs.indexOf(sub);
      if (i >= 0) this.subs.splice(i, 1);
    };
  }

  /** @internal */
  send(subject: string, data: Uint8Array): void {
    this.messages++;
    this.bytes += data.byteLength;
    const targets: Sub[] = [];
    const groups = new Map<string, Sub[]>();
    for (const s of this.subs) {
      if (s.subject !== subject || !s.owner.connected) continue;
      if (s.queue === undefined) targets.push(s);
      else {
        let g = groups.get(s.queue);
        if (!g) groups.set(s.queue, (g = []));
        g.push(s);
      }
    }
    for (const g of groups.values()) targets.push(g[this.rr++ % g.length]);
    if (targets.length === 0) return;
    this.deliver(this.delayMs, () => {
      for (const t of targets) if (t.owner.connected) t.handler(data);
    });
  }
}

export class MemoryTransport implements SyncTransport {
  private isConnected = true;
  private readonly listeners: Array<(connected: boolean) => void> = [];
  readonly maxPayload = 1024 * 1024;

  constructor(private readonly bus: MemoryBus) {}

  get connected(): boolean {
    return this.isConnected;
  }

  publish(subject: string, data: Uint8Array): boolean {
    if (!this.isConnected) return false;
    this.bus.send(subject, data);
    return true;
  }

  subscribe(subject: string, handler: (data: Uint8Array) => void, queue?: string): () => void {
    return this.bus.add({ subject, handler, queue, owner: this });
  }

  onStatus(listener: (connected: boolean) => void): void {
    this.listeners.push(listener);
  }

  /** Cuts this replica off the bus (or reconnects it), as a NATS outage would (tests). */
  setConnected(connected: boolean): void {
    if (connected === this.isConnected) return;
    this.isConnected = connected;
    for (const l of this.listeners) l(connected);
  }

  async close(): Promise<void> {
    this.isConnected = false;
  }
}
