import { ManualClock } from '../../src/core/clock.js';

/** A tiny discrete-event scheduler for tests: timers and deliveries in virtual time. */
export class VirtualTime {
  readonly clock = new ManualClock(0);
  private queue: Array<{ at: number; seq: number; fn: () => void; cancelled: boolean }> = [];
  private seq = 0;

  at(delayMs: number, fn: () => void): () => void {
    const ev = { at: this.clock.now() + delayMs, seq: this.seq++, fn, cancelled: false };
    this.queue.push(ev);
    this.queue.sort((a, b) => a.at - b.at || a.seq - b.seq);
    return () => {
      ev.cancelled = true;
    };
  }

  readonly timers = {
    once: (ms: number, fn: () => void) => this.at(ms, fn),
    every: (ms: number, fn: () => void) => {
      let cancel = () => {};
      const tick = () => {
        fn();
        cancel = this.at(ms, tick);
      };
      cancel = this.at(ms, tick);
      return () => cancel();
    },
  };

  /** Runs every event due up to `ms` from now. */
  advance(ms: number): void {
    const end = this.clock.now() + ms;
    for (;;) {
      const ev = this.queue[0];
      if (!ev || ev.at > end) break;
      this.queue.shift();
      if (ev.cancelled) continue;
      this.clock.set(ev.at);
      ev.fn();
    }
    this.clock.set(end);
  }
}
