/**
 * Injected time source. Everything that needs "now" (policies, the engine model, eviction
 * timestamps, sliding windows) takes a Clock so the same code runs in real time (server)
 * and in virtual time (policy lab).
 *
 * Units: milliseconds, as a float. Only differences are meaningful.
 */
export interface Clock {
  now(): number;
}

/** Monotonic wall clock (performance.now), immune to system clock jumps. */
export const systemClock: Clock = {
  now: () => performance.now(),
};

/** A clock whose time is set by its owner (the discrete-event simulator, tests). */
export class ManualClock implements Clock {
  constructor(private t = 0) {}
  now(): number {
    return this.t;
  }
  set(t: number): void {
    if (t < this.t) throw new Error(`ManualClock cannot go backwards (${t} < ${this.t})`);
    this.t = t;
  }
  advance(ms: number): void {
    this.set(this.t + ms);
  }
}
