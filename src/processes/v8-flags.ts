import v8 from 'node:v8';

export type ConcurrentMarking = 'auto' | 'on' | 'off';

/**
 * Whether V8 should mark the heap only on the event loop (concurrent marking off).
 *
 * V8's background marking threads run at the event loop's priority. In a process whose tokenizer
 * threads take every idle core while long prompts arrive (and on a machine shared with engines or
 * other processes), each collection adds two more runnable threads, the event loop waits its turn
 * for the cores, and its own marking steps and pauses stretch to whole scheduler ticks (a 64 KB
 * step that takes 0.1 ms measured 4–10 ms). Marking on the event loop instead costs it more CPU
 * (many 0.1 ms steps) but holds it up less: at 100k-token chats × 8 the loop lag p99 was 5–8 ms
 * instead of 7–12 (docs/benchmarks.md §9.11), so `auto` does that where tokenizer threads run.
 * Without them a core is usually spare and background marking is throughput (cache_aware under
 * wrk: ~8% more req/s with it), so `auto` keeps V8's default there.
 */
export function marksOnEventLoop(mode: ConcurrentMarking, tokenizerThreads: boolean): boolean {
  return mode === 'off' || (mode === 'auto' && tokenizerThreads);
}

/**
 * Applies the choice (process-wide; V8 reads the flag when each collection starts marking).
 * `auto` without tokenizer threads leaves the flag as node was started with.
 */
export function applyConcurrentMarking(mode: ConcurrentMarking, tokenizerThreads: boolean): void {
  if (marksOnEventLoop(mode, tokenizerThreads)) v8.setFlagsFromString('--no-concurrent-marking');
  else if (mode === 'on') v8.setFlagsFromString('--concurrent-marking');
}
