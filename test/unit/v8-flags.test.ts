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

describe('V8 concurrent marking (--v8-concurrent-marking)', () => {
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
