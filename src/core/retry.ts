import type { Rng } from './rng.js';

export interface RetryConfig {
  /** Total attempts, first one included (>= 1). */
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  multiplier: number;
  /** Delay is multiplied by 1 + U[-jitter, +jitter]. */
  jitter: number;
}

export const defaultRetryConfig: RetryConfig = { maxAttempts: 5, initialBackoffMs: 50, maxBackoffMs: 30_000, multiplier: 1.5, jitter: 0.2 };

/** Statuses worth another worker: timeouts, throttling and server-side failures. */
export const RETRYABLE_STATUSES: ReadonlySet<number> = new Set([408, 429, 500, 502, 503, 504]);

/** Delay before retry number `attempt` (0 = the first retry). */
export function backoffMs(c: RetryConfig, attempt: number, rng: Rng): number {
  const base = Math.min(c.initialBackoffMs * c.multiplier ** attempt, c.maxBackoffMs);
  const factor = 1 + (rng.next() * 2 - 1) * c.jitter;
  return Math.max(0, base * factor);
}
