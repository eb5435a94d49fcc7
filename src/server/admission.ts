import { errors, GatewayError } from '../core/errors.js';

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
}

/**
 * Concurrency limit with a bounded FIFO wait queue. A full queue answers 429 (with a
 * Retry-After hint), a wait longer than the timeout 408, a client that leaves while waiting
 * frees its place. A slot is held until the response ends, streams included, and released
 * exactly once.
 */
export class Admission {
  private active = 0;
  private readonly queue: Waiter[] = [];

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

  /** Resolves with a release function once admitted; rejects with 429/408. */
  acquire(signal?: AbortSignal): Promise<Release> {
    if (!this.enabled) return Promise.resolve(noop);
    if (this.active < this.config.maxConcurrent) {
      this.active++;
      return Promise.resolve(this.releaser());
    }
    if (this.queue.length >= this.config.queueSize) {
      return Promise.reject(tooBusy(`kvgate is at its limit of ${this.config.maxConcurrent} concurrent requests and its wait queue (${this.config.queueSize}) is full`));
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

  private drop(w: Waiter): void {
    const i = this.queue.indexOf(w);
    if (i >= 0) this.queue.splice(i, 1);
  }

  private releaser(): Release {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.queue.shift();
      // Hand the slot straight to the next waiter: `active` stays the same.
      if (next) next.grant(this.releaser());
      else this.active--;
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
