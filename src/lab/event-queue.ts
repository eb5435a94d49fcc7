/** Min-heap of timed events; ties run in insertion order so runs are deterministic. */
export class EventQueue<T> {
  private times: number[] = [];
  private seqs: number[] = [];
  private items: T[] = [];
  private seq = 0;

  get size(): number {
    return this.items.length;
  }

  push(time: number, item: T): void {
    let i = this.items.length;
    this.times.push(time);
    this.seqs.push(this.seq++);
    this.items.push(item);
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.less(i, p)) break;
      this.swap(i, p);
      i = p;
    }
  }

  peekTime(): number {
    return this.items.length ? this.times[0] : Infinity;
  }

  pop(): { time: number; item: T } | undefined {
    const n = this.items.length;
    if (n === 0) return undefined;
    const out = { time: this.times[0], item: this.items[0] };
    const last = n - 1;
    this.swap(0, last);
    this.times.pop();
    this.seqs.pop();
    this.items.pop();
    let i = 0;
    const m = this.items.length;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let s = i;
      if (l < m && this.less(l, s)) s = l;
      if (r < m && this.less(r, s)) s = r;
      if (s === i) break;
      this.swap(i, s);
      i = s;
    }
    return out;
  }

  private less(a: number, b: number): boolean {
    return this.times[a] < this.times[b] || (this.times[a] === this.times[b] && this.seqs[a] < this.seqs[b]);
  }

  private swap(a: number, b: number): void {
    [this.times[a], this.times[b]] = [this.times[b], this.times[a]];
    [this.seqs[a], this.seqs[b]] = [this.seqs[b], this.seqs[a]];
    [this.items[a], this.items[b]] = [this.items[b], this.items[a]];
  }
}

/** What the lab's discrete-event loop processes besides arrivals. */
export type LabEvent =
  | { kind: 'step'; engine: number }
  | { kind: 'timer'; everyMs: number; fn: () => void; cancelled: { v: boolean } }
  | { kind: 'deliver'; fn: () => void };

export interface EventLoop<R extends { arrivalMs: number }> {
  requests: readonly R[];
  queue: EventQueue<LabEvent>;
  clock: { now(): number; set(t: number): void };
  /** A request arrives (the clock is at its arrival time). */
  arrive: (req: R) => void;
  /** An engine's step ends (the clock is at its end time). */
  stepEnd: (engine: number) => void;
  /** Requests not finished yet: the loop ends when none remain and nothing more arrives. */
  pending: () => number;
  onProgress?: (fraction: number) => void;
}

/**
 * Runs a simulation in virtual time: arrivals in order, interleaved with timed events (engine
 * steps, periodic timers, delayed deliveries) by time, ties to arrivals first. Periodic timers
 * reschedule themselves; they never keep the loop going on their own.
 */
export function runEventLoop<R extends { arrivalMs: number }>(o: EventLoop<R>): void {
  const { requests, queue, clock } = o;
  const progressEvery = Math.max(1, Math.floor(requests.length / 100));
  let next = 0;
  for (;;) {
    const tArrival = next < requests.length ? requests[next].arrivalMs : Infinity;
    if (tArrival === Infinity && o.pending() === 0) break;
    if (tArrival <= queue.peekTime()) {
      clock.set(Math.max(clock.now(), tArrival));
      o.arrive(requests[next++]);
      if (o.onProgress && next % progressEvery === 0) o.onProgress(next / requests.length);
      continue;
    }
    const ev = queue.pop()!;
    clock.set(Math.max(clock.now(), ev.time));
    const item = ev.item;
    if (item.kind === 'timer') {
      if (item.cancelled.v) continue;
      item.fn();
      queue.push(clock.now() + item.everyMs, item);
    } else if (item.kind === 'deliver') item.fn();
    else o.stepEnd(item.engine);
  }
}

interface SteppableEngine {
  readonly busy: boolean;
  step(): { endMs: number } | null;
  stats(): { running: number; waiting: number; kvUsage: number };
}

/** Starts engine i's next step if it is idle, scheduling the step's end on the queue. */
export function stepStarter(engines: readonly SteppableEngine[], queue: EventQueue<LabEvent>): (i: number) => void {
  return (i) => {
    const e = engines[i];
    if (e.busy) return;
    const plan = e.step();
    if (plan) queue.push(plan.endMs, { kind: 'step', engine: i });
  };
}

/**
 * Engine metrics as a scraper would see them: every `everyMs` each engine's running/waiting/KV
 * usage is sampled, and the router's workers see the sample `delayMs` later.
 */
export function scheduleEngineMetrics(o: {
  queue: EventQueue<LabEvent>;
  clock: { now(): number };
  engines: readonly SteppableEngine[];
  workers: ReadonlyArray<{ engineLoad: { running: number; waiting: number; kvUsage: number; updatedAtMs: number } | undefined }>;
  everyMs: number;
  delayMs: number;
}): void {
  const sample = () => {
    const at = o.clock.now();
    const snaps = o.engines.map((e) => e.stats());
    o.queue.push(at + o.delayMs, {
      kind: 'deliver',
      fn: () =>
        snaps.forEach((st, i) => {
          o.workers[i].engineLoad = { running: st.running, waiting: st.waiting, kvUsage: st.kvUsage, updatedAtMs: at };
        }),
    });
  };
  sample();
  o.queue.push(o.clock.now() + o.everyMs, { kind: 'timer', everyMs: o.everyMs, fn: sample, cancelled: { v: false } });
}

/** Periodic work on the lab's event queue, in virtual time (the lab's PolicyDeps.schedule and replica-sync timers). */
export function queueScheduler(queue: EventQueue<LabEvent>, clock: { now(): number }): (everyMs: number, fn: () => void) => () => void {
  return (everyMs, fn) => {
    const cancelled = { v: false };
    queue.push(clock.now() + everyMs, { kind: 'timer', everyMs, fn, cancelled });
    return () => {
      cancelled.v = true;
    };
  };
}
