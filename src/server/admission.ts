import { DroppedError, errors, GatewayError } from '../core/errors.js';

export { DroppedError, type DroppedReason } from '../core/errors.js';

export interface AdmissionConfig {
  /** Requests admitted at once; 0 or less disables admission control. */
  maxConcurrent: number;
  /** Requests allowed to wait for a slot (0 = none wait: full means 429 at once). */
  queueSize: number;
  queueTimeoutMs: number;
}

/** Frees an admission slot; calling it again does nothing. */
export type Release = () => void;

interface Waiter {
  grant: (release: Release) => void;
  fail: (err: GatewayError) => void;
  priority: number;
  key: string;
  deadlineMs: number;
  seq: number;
}

/** Who is asking for a slot: higher priority first (negative = sheddable), fair across keys. */
export interface AdmissionRequest {
  /** Default 0. Negative: sheddable — refused at once (429 saturated) when no slot is free. */
  priority?: number;
  /** Fairness key (API key, header): waiters of one priority are served across keys in turn. */
  key?: string;
  /** When the request should have started (its TTFT objective), on performance.now(); orders waiters of one priority and key. */
  deadlineMs?: number;
}

/**
 * Concurrency limit with a bounded wait queue. Waiters are served by priority (highest first),
 * then fairly across fairness keys (the key served least so far within the priority goes
 * first), then by deadline, then in arrival order. A sheddable request (priority < 0) never
 * waits: without a free slot it is refused at once (429, reason `saturated`). A full queue
 * refuses the newcomer — unless it outranks the lowest-priority waiter, which is then refused
 * in its place (so batch traffic yields to interactive traffic). A wait longer than the timeout
 * is 408; a client that leaves while waiting frees its place. A slot is held until the response
 * ends, streams included, and released exactly once.
 */
export class Admission {
  private active = 0;
  private readonly queue: Waiter[] = [];
  private seq = 0;
  /** Grants per fairness key (decayed: halved whenever a key passes 1024), for fair ordering. */
  private readonly served = new Map<string, number>();

  constructor(private readonly config: AdmissionConfig) {}

  get enabled(): boolean {
    return this.config.maxConcurrent > 0;
  }

  get inUse(): number {
    return this.active;
  }

  get waiting(): number {
    return this.queue.length;
  }

  /** True when a request would have to wait (or be shed) now. */
  get saturated(): boolean {
    return this.enabled && this.active >= this.config.maxConcurrent;
  }

  /**
   * Whether a request of this priority would be refused at once now (sheddable, no free slot).
   * Depends on nothing but the priority and the slots, so the gateway asks it when the headers
   * arrive, before reading the body; `acquire` gives the same answer later.
   */
  shedsAtOnce(priority: number): boolean {
    return priority < 0 && this.saturated;
  }

  /** The 429 (`saturated`) a sheddable request gets when no slot is free. */
  shedError(priority: number): DroppedError {
    return new DroppedError(429, `kvgate is at its limit of ${this.config.maxConcurrent} concurrent requests: sheddable requests (priority ${priority}) are refused instead of queued`, 'saturated');
  }

  /** Resolves with a release function once admitted; rejects with 429/408. */
  acquire(signal?: AbortSignal, who: AdmissionRequest = {}): Promise<Release> {
    if (!this.enabled) return Promise.resolve(noop);
    const priority = who.priority ?? 0;
    const key = who.key ?? '';
    if (this.active < this.config.maxConcurrent) {
      this.active++;
      this.count(key);
      return Promise.resolve(this.releaser());
    }
    if (priority < 0) return Promise.reject(this.shedError(priority));
    if (this.queue.length >= this.config.queueSize) {
      // Full: the newcomer takes the place of the lowest-priority waiter if it outranks it.
      let lowest: Waiter | undefined;
      for (const w of this.queue) if (!lowest || w.priority < lowest.priority || (w.priority === lowest.priority && w.seq > lowest.seq)) lowest = w;
      if (!lowest || lowest.priority >= priority) {
        return Promise.reject(tooBusy(`kvgate is at its limit of ${this.config.maxConcurrent} concurrent requests and its wait queue (${this.config.queueSize}) is full`));
      }
      this.drop(lowest);
      lowest.fail(new DroppedError(429, `Refused while queued: a request of higher priority (${priority} > ${lowest.priority}) took its place`, 'saturated'));
    }
    return new Promise<Release>((resolve, reject) => {
      const waiter: Waiter = {
        grant: (release) => {
          cleanup();
          resolve(release);
        },
        fail: (err) => {
          cleanup();
          reject(err);
        },
        priority,
        key,
        deadlineMs: who.deadlineMs ?? Infinity,
        seq: this.seq++,
      };
      const timer = setTimeout(() => {
        this.drop(waiter);
        waiter.fail(errors.requestTimeout(`Waited ${this.config.queueTimeoutMs / 1000} s for a free slot without getting one`));
      }, this.config.queueTimeoutMs);
      const onAbort = () => {
        this.drop(waiter);
        waiter.fail(errors.badRequest('Client went away while queued', 'client_aborted'));
      };
      const cleanup = () => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.queue.push(waiter);
    });
  }

  private count(key: string): void {
    const n = (this.served.get(key) ?? 0) + 1;
    this.served.set(key, n);
    if (n > 1024) for (const [k, v] of this.served) this.served.set(k, v / 2);
  }

  /** The waiter to serve next: priority, then the least-served key, then deadline, then arrival. */
  private next(): Waiter | undefined {
    let best: Waiter | undefined;
    for (const w of this.queue) {
      if (!best) {
        best = w;
        continue;
      }
      if (w.priority !== best.priority) {
        if (w.priority > best.priority) best = w;
        continue;
      }
      const sw = this.served.get(w.key) ?? 0;
      const sb = this.served.get(best.key) ?? 0;
      if (sw !== sb) {
        if (sw < sb) best = w;
        continue;
      }
      if (w.deadlineMs !== best.deadlineMs) {
        if (w.deadlineMs < best.deadlineMs) best = w;
        continue;
      }
      if (w.seq < best.seq) best = w;
    }
    return best;
  }

  private drop(w: Waiter): void {
    const i = this.queue.indexOf(w);
    if (i >= 0) this.queue.splice(i, 1);
  }

  private releaser(): Release {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.next();
      // Hand the slot straight to the next waiter: `active` stays the same.
      if (next) {
        this.drop(next);
        this.count(next.key);
        next.grant(this.releaser());
      } else this.active--;
    };
  }
}

function noop(): void {}

function tooBusy(message: string): GatewayError {
  const e = errors.tooManyRequests(message);
  return e;
}

/** Per-key token bucket: `rps` requests per second, bursts up to `rps`. */
export class KeyRateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(
    private readonly rps: number,
    private readonly now: () => number = () => performance.now(),
  ) {}

  /** Takes one token for `key`; returns the ms to wait for the next one when none is left. */
  take(key: string): { ok: true } | { ok: false; retryAfterMs: number } {
    const t = this.now();
    let b = this.buckets.get(key);
    if (!b) {
      b = { tokens: this.rps, at: t };
      this.buckets.set(key, b);
    }
    b.tokens = Math.min(this.rps, b.tokens + ((t - b.at) / 1000) * this.rps);
    b.at = t;
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return { ok: true };
    }
    return { ok: false, retryAfterMs: ((1 - b.tokens) / this.rps) * 1000 };
  }

  /** Charges `n` tokens another replica took for `key` (replica sync); may go below zero briefly. */
  consume(key: string, n: number): void {
    const t = this.now();
    let b = this.buckets.get(key);
    if (!b) {
      b = { tokens: this.rps, at: t };
      this.buckets.set(key, b);
    }
    b.tokens = Math.min(this.rps, b.tokens + ((t - b.at) / 1000) * this.rps) - n;
    b.at = t;
  }
}

/**
 * Per-key token budget: `perMinute` tokens (prompt + completion) per minute, refilled
 * continuously, bursts up to `perMinute`. A request is let in while the key's balance is
 * positive and charged when its usage is known, so the balance may go below zero by one
 * request's tokens; the key then waits until it refills.
 */
export class KeyTokenLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(
    private readonly perMinute: number,
    private readonly now: () => number = () => performance.now(),
  ) {}

  private bucket(key: string): { tokens: number; at: number } {
    const t = this.now();
    let b = this.buckets.get(key);
    if (!b) {
      b = { tokens: this.perMinute, at: t };
      this.buckets.set(key, b);
    }
    b.tokens = Math.min(this.perMinute, b.tokens + ((t - b.at) / 60_000) * this.perMinute);
    b.at = t;
    return b;
  }

  /** Whether `key` may send a request now; else the ms until its balance is positive again. */
  check(key: string): { ok: true } | { ok: false; retryAfterMs: number } {
    const b = this.bucket(key);
    if (b.tokens > 0) return { ok: true };
    return { ok: false, retryAfterMs: ((-b.tokens + 1) / this.perMinute) * 60_000 };
  }

  /** Charges `tokens` used by a request of `key`. */
  charge(key: string, tokens: number): void {
    if (!(tokens > 0)) return;
    this.bucket(key).tokens -= tokens;
  }

  /** The key's balance now (tests, metrics). */
  balance(key: string): number {
    return this.bucket(key).tokens;
  }
}
