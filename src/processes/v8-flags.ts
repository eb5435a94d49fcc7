import v8 from 'node:v8';

export type ConcurrentMarking = 'auto' | 'on' | 'off';

/**
 * Whether V8 should mark the heap only on the event loop (concurrent marking off).
 *
 * With background marking threads, an incremental-marking step on the event loop sometimes
 * waits for them or is preempted by them; when every core is busy those threads are often
 * descheduled, and the event loop stalls for a scheduler tick or two (4–10 ms). That is the case
 * in a process whose tokenizer threads take every idle core while long prompts arrive, so
 * `auto` marks on the event loop there (docs/benchmarks.md §9.11: loop lag p99 at 100k-token
 * chats × 8 from 7–12 to 5–8 ms). Without tokenizer threads a core is usually spare and
 * background marking is throughput (cache_aware under wrk: ~8% more req/s with it), so `auto`
 * keeps V8's default there.
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
