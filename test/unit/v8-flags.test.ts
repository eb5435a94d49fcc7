import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { marksOnEventLoop } from '../../src/processes/v8-flags.js';

const dist = fileURLToPath(new URL('../../dist/processes/v8-flags.js', import.meta.url));

/**
 * Runs a node process that applies the setting, then allocates and drops objects until V8 has
 * run several incremental-marking cycles; returns how many lines of V8's trace report marking
 * done on background threads.
 */
function backgroundMarkingLines(mode: string, tokenizerThreads: boolean): number {
  const script = `
    const { applyConcurrentMarking } = await import(${JSON.stringify(dist)});
    applyConcurrentMarking(${JSON.stringify(mode)}, ${tokenizerThreads});
    const keep = [];
    for (let i = 0; i < 3e6; i++) { keep.push({ a: i, b: 'x' + i }); if (keep.length > 1e6) keep.splice(0, 5e5); }
  `;
  const r = spawnSync(process.execPath, ['--trace-incremental-marking', '--input-type=module', '-e', script], { encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  const marking = r.stdout.split('\n').filter((l) => l.includes('[IncrementalMarking] Start marking')).length;
  expect(marking).toBeGreaterThan(0); // the workload did make V8 mark incrementally
  return r.stdout.split('\n').filter((l) => /Marked \d+KB on background threads/.test(l)).length;
}

/** Switches the flag 40 times while allocating (marking in progress at many of the switches); the exit status. */
function switchesUnderAllocation(nodeArgs: string[]): { status: number | null; out: string } {
  const script = `
    const { applyConcurrentMarking } = await import(${JSON.stringify(dist)});
    const keep = []; let changed = 0;
    for (let i = 0; i < 6e6; i++) {
      keep.push({ a: i, b: 'x' + i }); if (keep.length > 1e6) keep.splice(0, 5e5);
      if (i % 150000 === 75000) changed += applyConcurrentMarking(i % 300000 === 75000 ? 'off' : 'on', true) ? 1 : 0;
    }
    console.log('changed', changed);
  `;
  const r = spawnSync(process.execPath, [...nodeArgs, '--input-type=module', '-e', script], { encoding: 'utf8' });
  return { status: r.status, out: r.stdout + r.stderr };
}

describe('V8 concurrent marking (--v8-concurrent-marking)', () => {
  it('switching at run time, after a full collection, while the heap is busy: no abort', () => {
    const r = switchesUnderAllocation([]);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('changed 40');
  });

  it('leaves the flag alone when node was started with GC flags of its own', () => {
    const r = switchesUnderAllocation(['--single-threaded-gc']);
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('changed 0');
  });

  it('auto marks on the event loop only in a process with tokenizer threads', () => {
    expect(marksOnEventLoop('auto', true)).toBe(true);
    expect(marksOnEventLoop('auto', false)).toBe(false);
    expect(marksOnEventLoop('off', false)).toBe(true);
    expect(marksOnEventLoop('on', true)).toBe(false);
  });

  it('takes effect in the running process: no marking on background threads when off', () => {
    expect(backgroundMarkingLines('auto', true)).toBe(0);
    expect(backgroundMarkingLines('off', false)).toBe(0);
    expect(backgroundMarkingLines('on', true)).toBeGreaterThan(0);
    expect(backgroundMarkingLines('auto', false)).toBeGreaterThan(0);
  });
});
