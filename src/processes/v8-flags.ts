import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';

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
 * `auto` without tokenizer threads leaves the flag as node was started with, and so does any mode
 * when node was started with GC flags of its own. Returns whether it changed the flag.
 *
 * Node documents V8 flag changes after start as unpredictable; the risk here is switching while
 * a marking cycle that started with background markers is still running. So a full collection
 * runs first: it finishes any marking in progress and joins its threads, and nothing runs between
 * it and the change that could start another (marking starts from allocation or from a task,
 * never from a flag). Tested by switching 40 times under allocation (test/unit/v8-flags.test.ts).
 */
export function applyConcurrentMarking(mode: ConcurrentMarking, tokenizerThreads: boolean): boolean {
  const off = marksOnEventLoop(mode, tokenizerThreads);
  if (!off && mode !== 'on') return false;
  // Node started with GC flags of its own (e.g. --single-threaded-gc): those decide.
  if (process.execArgv.some((a) => GC_FLAG.test(a))) return false;
  finishCollection();
  v8.setFlagsFromString(off ? '--no-concurrent-marking' : '--concurrent-marking');
  return true;
}

const GC_FLAG = /^--(no-)?(single[-_]threaded[-_]gc|parallel[-_]|concurrent[-_]marking)/;

/** One full, synchronous collection (through a context created with V8's gc extension). */
function finishCollection(): void {
  v8.setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  v8.setFlagsFromString('--no-expose-gc');
  gc();
}
