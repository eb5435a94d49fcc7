import type { Clock } from '../core/clock.js';
import type { Engine, RequestRecord, StepPlan, SubmitRequest, TokenOutput } from './engine.js';

/**
 * Simulated time running `speed` times faster than the wall clock (speed 1 = real time).
 * All engines of one server share it, so their timestamps are comparable.
 */
export class ScaledClock implements Clock {
  private readonly wallStart = performance.now();
  constructor(readonly speed = 1) {
    if (!(speed > 0) || !Number.isFinite(speed)) throw new RangeError(`speed must be a finite number > 0 (got ${speed})`);
  }
  now(): number {
    return (performance.now() - this.wallStart) * this.speed;
  }
  /** Wall milliseconds until simulated time `t` (<= 0 if already reached). */
  wallMsUntil(t: number): number {
    return (t - this.now()) / this.speed;
  }
}

/** Receives what the engine produces for one request. */
export interface RequestListener {
  onToken(out: TokenOutput): void;
  /** The request ended (finished, or aborted by {@link RealtimeDriver.abort}). Called once. */
  onFinish(record: RequestRecord): void;
}

/**
 * Runs an Engine in real time: whenever the engine has work it starts a step, waits until the
 * (scaled) clock reaches the step's end, completes it and dispatches the outputs to the request
 * listeners, then starts the next step. The speed factor lives in the ScaledClock, not in the
 * engine: the engine's timestamps and the metrics derived from them are in simulated time.
 *
 * Steps are stamped at their planned end (engine contract) even if the timer fires late, so
 * event-loop jitter does not distort the modelled latencies; the next step starts at
 * max(now, previous end).
 */
export class RealtimeDriver {
  private readonly listeners = new Map<string, RequestListener>();
  private timer: { timeout: NodeJS.Timeout } | { immediate: NodeJS.Immediate } | null = null;
  private stopped = false;

  constructor(
    readonly engine: Engine,
    private readonly clock: ScaledClock,
  ) {}

  /** Submit a request; throws (EngineRequestError) without registering the listener if invalid. */
  submit(req: SubmitRequest, listener: RequestListener): void {
    if (this.stopped) throw new Error('driver stopped');
    this.engine.submit(req);
    this.listeners.set(req.id, listener);
    this.kick();
  }

  /** Abort a request (client went away): frees its blocks now; its listener gets onFinish. */
  abort(id: string): boolean {
    const listener = this.listeners.get(id);
    const rec = this.engine.abort(id);
    if (!rec) return false;
    this.listeners.delete(id);
    listener?.onFinish(rec);
    return true;
  }

  /** Requests with a listener (in the engine, not yet finished). */
  get inFlight(): number {
    return this.listeners.size;
  }

  /** Stop stepping; pending requests are aborted. */
  stop(): void {
    this.stopped = true;
    this.clearTimer();
    for (const id of [...this.listeners.keys()]) this.abort(id);
  }

  private kick(): void {
    if (this.stopped || this.timer || this.engine.busy) return;
    const plan = this.engine.step();
    if (plan) this.waitFor(plan);
  }

  private waitFor(plan: StepPlan): void {
    const wallMs = this.clock.wallMsUntil(plan.endMs);
    const wake = (): void => {
      this.timer = null;
      if (this.stopped) return;
      if (this.clock.wallMsUntil(plan.endMs) > 0.5) {
        this.waitFor(plan); // woke early (timer granularity)
        return;
      }
      this.complete();
    };
    this.timer = wallMs >= 1 ? { timeout: setTimeout(wake, wallMs) } : { immediate: setImmediate(wake) };
  }

  private complete(): void {
    const res = this.engine.completeStep();
    for (const out of res.outputs) this.listeners.get(out.id)?.onToken(out);
    for (const rec of res.finished) {
      const l = this.listeners.get(rec.id);
      this.listeners.delete(rec.id);
      l?.onFinish(rec);
    }
    this.kick();
  }

  private clearTimer(): void {
    if (!this.timer) return;
    if ('timeout' in this.timer) clearTimeout(this.timer.timeout);
    else clearImmediate(this.timer.immediate);
    this.timer = null;
  }
}
