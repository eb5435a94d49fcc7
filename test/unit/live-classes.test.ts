import { describe, expect, it } from 'vitest';
import { parseClasses } from '../../src/lab/live.js';

describe('live --classes', () => {
  it('parses classes with their headers and objectives', () => {
    expect(parseClasses('interactive=0.3:ttft-ms=1000,batch=0.7:priority=-1:tpot-ms=50')).toEqual([
      { name: 'interactive', share: 0.3, headers: { 'x-slo-ttft-ms': '1000' }, ttftMs: 1000 },
      { name: 'batch', share: 0.7, headers: { 'x-kvgate-priority': '-1', 'x-slo-tpot-ms': '50' } },
    ]);
  });

  it('refuses what it does not understand', () => {
    expect(() => parseClasses('a')).toThrow(/name=share/);
    expect(() => parseClasses('a=0')).toThrow(/name=share/);
    expect(() => parseClasses('a=1:colour=red')).toThrow(/unknown option 'colour=red'/);
    expect(() => parseClasses('')).toThrow(/no class/);
  });
});
