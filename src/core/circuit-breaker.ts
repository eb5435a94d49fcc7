import type { Clock } from './clock.js';

export type BreakerState = 'closed' | 'open' | 'half_open';

export interface BreakerConfig {
  /** Consecutive failures that open the breaker. */
  failureThreshold: number;
  /** Consecutive successes in half-open that close it. */
  successThreshold: number;
  /** Time open before a trial (half-open), ms. */
  openMs: number;
  /** Never open (--disable-circuit-breaker). */
  disabled: boolean;
  /** Failures older than this stop counting toward failureThreshold, ms (--cb-window-duration-secs; 0/absent = no window). */
  windowMs?: number;
}

export const defaultBreakerConfig: BreakerConfig = { failureThreshold: 10, successThreshold: 3, openMs: 60_000, disabled: false };

/**
 * Per-worker circuit breaker on consecutive outcomes. Closed → open after `failureThreshold`
 * consecutive failures; open → half-open once `openMs` has passed (checked when asked); half-open
 * → closed after `successThreshold` consecutive successes, or back to open on any failure.
 * A success in the closed state resets the failure count. With `windowMs`, only the failures of
 * the last `windowMs` count (the SGLang router's --cb-window-duration-secs): a trickle of failures
 * spread over hours never opens the breaker.
 */
export class CircuitBreaker {
  private s: BreakerState = 'closed';
  private failures = 0;
  /** Times of the counted failures (with windowMs), oldest first. */
  private failureTimes: number[] = [];
  private successes = 0;
  private openedAt = 0;

  constructor(
    private readonly config: BreakerConfig,
    private readonly clock: Clock,
    private readonly onTransition?: (from: BreakerState, to: BreakerState) => void,
  ) {}

  get state(): BreakerState {
    if (this.s === 'open' && this.clock.now() - this.openedAt >= this.config.openMs) this.move('half_open');
    return this.s;
  }

  get consecutiveFailures(): number {
    return this.failures;
  }

  /** Whether a request may be sent to the worker now. */
  canExecute(): boolean {
    return this.config.disabled || this.state !== 'open';
  }

  recordSuccess(): void {
    const state = this.state;
    this.failures = 0;
    this.failureTimes = [];
    if (state === 'half_open') {
      this.successes++;
      if (this.successes >= this.config.successThreshold) this.move('closed');
    }
  }

  recordFailure(): void {
    if (this.config.disabled) return;
    const state = this.state;
    this.successes = 0;
    if (state === 'half_open') {
      this.open();
      return;
    }
    const window = this.config.windowMs ?? 0;
    if (window > 0) {
      const now = this.clock.now();
      this.failureTimes.push(now);
      while (this.failureTimes.length > 0 && now - this.failureTimes[0] > window) this.failureTimes.shift();
      this.failures = this.failureTimes.length;
    } else this.failures++;
    if (state === 'closed' && this.failures >= this.config.failureThreshold) this.open();
  }

  private open(): void {
    this.openedAt = this.clock.now();
    this.move('open');
  }

  private move(to: BreakerState): void {
    const from = this.s;
    if (from === to) return;
    this.s = to;
    if (to !== 'half_open') this.successes = 0;
    if (to === 'closed') this.failures = 0;
    if (to !== 'half_open') this.failureTimes = [];
    this.onTransition?.(from, to);
  }
}
