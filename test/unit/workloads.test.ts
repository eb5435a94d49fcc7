import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { SeededRng } from '../../src/core/rng.js';
import type { LabRequest, Workload } from '../../src/lab/workload.js';
import {
  detectQuantisation,
  loadWorkload,
  parseAzureTimestamp,
  spreadBuckets,
  textToTokens,
  tokensToText,
  tokenText,
  VOCAB,
  WorkloadError,
} from '../../src/lab/workloads/index.js';

const fixture = (name: string): string => fileURLToPath(new URL(`../fixtures/${name}`, import.meta.url));
const SYN = fixture('mooncake_synthetic_head.jsonl');
const CONV = fixture('mooncake_conversation_head.jsonl');
const AZURE = fixture('azure_conv_head.csv');
const FULL_CONV = '/work/shared/data/mooncake/conversation_trace.jsonl';

interface Row {
  timestamp: number;
  input_length: number;
  output_length: number;
  hash_ids: number[];
}
const rows = (path: string): Row[] =>
  readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Row);

function commonPrefix(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}
function commonTextPrefix(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a.charCodeAt(i) === b.charCodeAt(i)) i++;
  return i;
}
/** Text agrees with tokens: the common character prefix covers exactly the common whole tokens. */
function expectTextConsistent(a: LabRequest, b: LabRequest, tokenCommon: number): void {
  const c = commonTextPrefix(a.text(), b.text());
  expect(Math.floor(c / 4)).toBe(tokenCommon);
}
function snapshot(w: Workload): unknown[] {
  return w.requests.map((r) => [r.id, r.arrivalMs, r.outputTokens, r.group, Array.from(r.promptTokens), r.text()]);
}
function expectNonDecreasing(w: Workload): void {
  for (let i = 1; i < w.requests.length; i++) expect(w.requests[i]!.arrivalMs).toBeGreaterThanOrEqual(w.requests[i - 1]!.arrivalMs);
}
function expectError(fn: () => unknown, re: RegExp): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(WorkloadError);
  expect((err as Error).message).toMatch(re);
}

describe('token text', () => {
  it('maps every token id to a distinct 4-character lowercase text, never starting with a space', () => {
    const all = tokensToText(Uint32Array.from({ length: VOCAB }, (_, id) => id));
    expect(all).toMatch(/^(?:[a-z][a-z ]{3})+$/);
    const seen = new Set<string>();
    let spaces = 0;
    for (let id = 0; id < VOCAB; id++) {
      const t = all.slice(4 * id, 4 * id + 4);
      if (t.includes(' ')) spaces++;
      seen.add(t);
    }
    expect(seen.size).toBe(VOCAB);
    expect(spaces / VOCAB).toBeGreaterThan(0.3);
    for (const id of [0, 1, 17_575, 17_576, 52_727, 52_728, VOCAB - 1]) expect(tokenText(id)).toBe(all.slice(4 * id, 4 * id + 4));
    expect(() => tokenText(VOCAB)).toThrow(RangeError);
  });

  it('text is the concatenation of token texts and decodes back', () => {
    const rng = new SeededRng(3);
    const toks = Uint32Array.from({ length: 1000 }, () => rng.int(VOCAB));
    const text = tokensToText(toks);
    expect(text.length).toBe(4000);
    expect(text.slice(8, 12)).toBe(tokenText(toks[2]!));
    expect(Array.from(textToTokens(text))).toEqual(Array.from(toks));
    // prefix-consistency for whole tokens: text prefix <=> token prefix
    const other = toks.slice();
    other[600] = (other[600]! + 1) % VOCAB;
    const c = commonTextPrefix(text, tokensToText(other));
    expect(Math.floor(c / 4)).toBe(600);
  });
});

describe('mooncake loader', () => {
  for (const [label, path] of [
    ['synthetic', SYN],
    ['conversation', CONV],
  ] as const) {
    it(`${label}: prompts have input_length tokens, outputs match, sharing follows hash ids exactly`, () => {
      const src = rows(path);
      const w = loadWorkload(`mooncake:${path}`, { seed: 1 });
      expect(w.requests.length).toBe(src.length);
      w.requests.forEach((r, i) => {
        expect(r.id).toBe(`r${i}`);
        expect(r.promptTokens.length).toBe(src[i]!.input_length);
        expect(r.outputTokens).toBe(Math.max(1, src[i]!.output_length));
        expect(r.text().length).toBe(4 * src[i]!.input_length);
        expect(r.promptTokens.every((t) => t < VOCAB)).toBe(true);
      });
      // Every pair (i < j), plus each request with itself.
      const toks = w.requests.map((r) => r.promptTokens);
      const texts = w.requests.map((r) => r.text());
      let sharing = 0;
      let partial = 0;
      for (let i = 0; i < src.length; i++) {
        for (let j = i; j < src.length; j++) {
          const a = src[i]!;
          const b = src[j]!;
          const c = commonPrefix(a.hash_ids, b.hash_ids);
          const expected = Math.min(512 * c, a.input_length, b.input_length);
          const got = commonPrefix(toks[i]!, toks[j]!);
          if (got !== expected) expect(got, `requests ${i} and ${j}`).toBe(expected);
          const textCommon = commonTextPrefix(texts[i]!, texts[j]!);
          if (Math.floor(textCommon / 4) !== got) expect(Math.floor(textCommon / 4), `text of ${i} and ${j}`).toBe(got);
          if (i !== j && got > 0) sharing++;
          if (i !== j && c > 0 && expected % 512 !== 0) partial++;
        }
      }
      expect(sharing).toBeGreaterThan(label === 'synthetic' ? 10 : 1000);
      expect(partial).toBeGreaterThan(0); // some pairs end inside a shared, cut last block
    });
  }

  it('maps a hash id to the same tokens wherever it appears, independent of the seed', () => {
    const src = rows(CONV);
    const w1 = loadWorkload(`mooncake:${CONV}`, { seed: 1 });
    const w2 = loadWorkload(`mooncake:${CONV}`, { seed: 99 });
    const blocks = new Map<number, number[]>();
    w1.requests.forEach((r, i) => {
      const ids = src[i]!.hash_ids;
      const toks = Array.from(r.promptTokens);
      ids.forEach((h, b) => {
        const seg = toks.slice(512 * b, 512 * (b + 1));
        const known = blocks.get(h);
        if (known) expect(seg).toEqual(known.slice(0, seg.length));
        if (!known || known.length < seg.length) blocks.set(h, seg);
      });
      expect(Array.from(w2.requests[i]!.promptTokens)).toEqual(toks);
    });
    // block 0 is the shared system prefix of every conversation request
    expect(src.every((r) => r.hash_ids[0] === 0)).toBe(true);
  });

  it('promptTokens is stable across reads and cheap to index', () => {
    const w = loadWorkload(`mooncake:${SYN}`, { seed: 1 });
    const r = w.requests[3]!;
    expect(r.promptTokens).toBe(r.promptTokens);
    let sum = 0;
    for (let i = 0; i < r.promptTokens.length; i++) sum += r.promptTokens[i]!;
    expect(sum).toBeGreaterThan(0);
  });

  it('spreads quantised buckets evenly, in order, inside the bucket, preserving counts', () => {
    const src = rows(CONV);
    const w = loadWorkload(`mooncake:${CONV}`, { seed: 1 });
    expect(w.notes.join('\n')).toMatch(/quantised to ~3000 ms buckets/);
    expectNonDecreasing(w);
    let i = 0;
    let buckets = 0;
    while (i < src.length) {
      const t = src[i]!.timestamp;
      let j = i;
      while (j < src.length && src[j]!.timestamp === t) j++;
      const k = j - i;
      const width = j < src.length ? Math.min(3000, src[j]!.timestamp - t) : 3000;
      for (let m = i; m < j; m++) {
        const a = w.requests[m]!.arrivalMs;
        expect(a).toBeGreaterThanOrEqual(t);
        expect(a).toBeLessThan(t + width);
        expect(a).toBeCloseTo(t + ((m - i + 0.5) * width) / k, 2);
        if (m > i) expect(a).toBeGreaterThan(w.requests[m - 1]!.arrivalMs);
      }
      buckets++;
      i = j;
    }
    expect(buckets).toBeGreaterThan(20);
    expect(buckets).toBeLessThan(src.length / 3);
  });

  it('spread=uniform stays in the bucket and depends on the seed; spread=none keeps timestamps', () => {
    const src = rows(CONV);
    const u1 = loadWorkload(`mooncake:${CONV}?spread=uniform`, { seed: 1 });
    const u2 = loadWorkload(`mooncake:${CONV}?spread=uniform`, { seed: 2 });
    expectNonDecreasing(u1);
    u1.requests.forEach((r, i) => {
      expect(r.arrivalMs).toBeGreaterThanOrEqual(src[i]!.timestamp);
      expect(r.arrivalMs).toBeLessThan(src[i]!.timestamp + 3000);
    });
    expect(u1.requests.map((r) => r.arrivalMs)).not.toEqual(u2.requests.map((r) => r.arrivalMs));
    const none = loadWorkload(`mooncake:${CONV}?spread=none`, { seed: 1 });
    expect(none.requests.map((r) => r.arrivalMs)).toEqual(src.map((r) => r.timestamp));
    const b = loadWorkload(`mooncake:${CONV}?bucket=1000`, { seed: 1 });
    b.requests.forEach((r, i) => expect(r.arrivalMs).toBeLessThan(src[i]!.timestamp + 1000));
  });

  it('does not spread an unquantised trace', () => {
    const src = rows(SYN);
    const w = loadWorkload(`mooncake:${SYN}`, { seed: 1 });
    expect(w.notes.join('\n')).toMatch(/not quantised/);
    expect(w.requests.map((r) => r.arrivalMs)).toEqual(src.map((r) => r.timestamp - src[0]!.timestamp));
  });

  it('timeWindow selects by original timestamp and re-bases; rateScale, rps and maxRequests', () => {
    const src = rows(CONV);
    const full = loadWorkload(`mooncake:${CONV}`, { seed: 1 });
    const w = loadWorkload(`mooncake:${CONV}`, { seed: 1, timeWindow: [30, 60] });
    const idx = src.map((r, i) => [r, i] as const).filter(([r]) => r.timestamp >= 30_000 && r.timestamp < 60_000);
    expect(w.requests.length).toBe(idx.length);
    expect(idx.length).toBeGreaterThan(50);
    idx.forEach(([r, i], k) => {
      const got = w.requests[k]!;
      expect(got.promptTokens.length).toBe(r.input_length);
      expect(Array.from(got.promptTokens)).toEqual(Array.from(full.requests[i]!.promptTokens));
      expect(got.arrivalMs).toBeCloseTo(full.requests[i]!.arrivalMs - 30_000, 3);
      expect(got.arrivalMs).toBeGreaterThanOrEqual(0);
      expect(got.arrivalMs).toBeLessThan(33_000);
    });
    const fast = loadWorkload(`mooncake:${CONV}`, { seed: 1, timeWindow: [30, 60], rateScale: 2.5 });
    fast.requests.forEach((r, k) => expect(r.arrivalMs).toBeCloseTo(w.requests[k]!.arrivalMs / 2.5, 2));
    const atRps = loadWorkload(`mooncake:${CONV}`, { seed: 1, rps: 20 });
    const span = (atRps.requests.at(-1)!.arrivalMs - atRps.requests[0]!.arrivalMs) / 1000;
    expect((atRps.requests.length - 1) / span).toBeCloseTo(20, 1);
    const cut = loadWorkload(`mooncake:${CONV}`, { seed: 1, maxRequests: 25 });
    expect(cut.requests.length).toBe(25);
    expect(cut.requests.map((r) => r.arrivalMs)).toEqual(full.requests.slice(0, 25).map((r) => r.arrivalMs));
    expect(cut.notes.join('\n')).toMatch(/maxRequests 25/);
  });

  it.skipIf(!existsSync(FULL_CONV))('loads the full conversation trace fast and matches its published statistics', () => {
    const t0 = performance.now();
    const w = loadWorkload(`mooncake:${FULL_CONV}`, { seed: 1 });
    const loadMs = performance.now() - t0;
    expect(loadMs).toBeLessThan(1500);
    expect(w.requests.length).toBe(12_031);
    let tokens = 0;
    let out = 0;
    let big = w.requests[0]!;
    for (const r of w.requests) {
      const n = r.promptTokens.length;
      tokens += n;
      out += r.outputTokens;
      if (n > big.promptTokens.length) big = r;
    }
    expect(Math.round(tokens / w.requests.length)).toBe(12_035);
    expect(Math.round(out / w.requests.length)).toBe(343);
    expect(big.promptTokens.length).toBe(126_195);
    expect(w.requests.at(-1)!.arrivalMs / 1000).toBeGreaterThan(3537);
    const text = big.text();
    expect(big.text()).toBe(text);
    expect(text.length).toBe(4 * 126_195);
    const half = loadWorkload(`mooncake:${FULL_CONV}`, { seed: 1, timeWindow: [0, 1800] });
    expect(half.requests.length).toBeGreaterThan(5000);
    expect(half.requests.length).toBeLessThan(7000);
  });
});

describe('azure loader', () => {
  const lines = readFileSync(AZURE, 'utf8').trim().split('\n').slice(1);

  it('parses timestamps with 7 fractional digits', () => {
    const [w0, f0] = parseAzureTimestamp('2023-11-16 18:15:46.6805900')!;
    const [w1, f1] = parseAzureTimestamp('2023-11-16 18:15:50.9951690')!;
    expect(w1 - w0 + f1 - f0).toBeCloseTo(4314.579, 6);
    expect(parseAzureTimestamp('16/11/2023 18:15')).toBeUndefined();
  });

  it('loads counts, lengths and arrivals relative to the first row', () => {
    const w = loadWorkload(`azure:${AZURE}`, { seed: 5 });
    expect(w.requests.length).toBe(lines.length);
    expect(w.requests[0]!.arrivalMs).toBe(0);
    expect(w.requests[1]!.arrivalMs).toBeCloseTo(4314.579, 3);
    expectNonDecreasing(w);
    w.requests.forEach((r, i) => {
      const [, ctx, gen] = lines[i]!.split(',');
      expect(r.promptTokens.length).toBe(Number(ctx));
      expect(r.outputTokens).toBe(Number(gen));
      expect(r.text()).toBe(tokensToText(r.promptTokens));
    });
  });

  it('shares nothing between requests and draws tokens from the seed', () => {
    const w = loadWorkload(`azure:${AZURE}`, { seed: 5 });
    const firsts = new Set(w.requests.map((r) => r.promptTokens[0]));
    expect(firsts.size).toBe(w.requests.length); // pairwise common prefix 0
    for (let i = 1; i < w.requests.length; i++) expect(commonPrefix(w.requests[i - 1]!.promptTokens, w.requests[i]!.promptTokens)).toBe(0);
    const all = new Set<number>();
    for (const r of w.requests) for (const t of r.promptTokens) all.add(t);
    const total = w.requests.reduce((s, r) => s + r.promptTokens.length, 0);
    expect(all.size / Math.min(total, VOCAB)).toBeGreaterThan(0.5); // spread over the vocabulary
    const again = loadWorkload(`azure:${AZURE}`, { seed: 5 });
    expect(snapshot(again)).toEqual(snapshot(w));
    const other = loadWorkload(`azure:${AZURE}`, { seed: 6 });
    expect(Array.from(other.requests[0]!.promptTokens)).not.toEqual(Array.from(w.requests[0]!.promptTokens));
  });

  it('applies timeWindow and rateScale', () => {
    const full = loadWorkload(`azure:${AZURE}`, { seed: 5 });
    const w = loadWorkload(`azure:${AZURE}`, { seed: 5, timeWindow: [10, 20], rateScale: 2 });
    const inWin = full.requests.filter((r) => r.arrivalMs >= 10_000 && r.arrivalMs < 20_000);
    expect(w.requests.length).toBe(inWin.length);
    expect(w.requests.length).toBeGreaterThan(5);
    w.requests.forEach((r, k) => {
      expect(r.arrivalMs).toBeCloseTo((inWin[k]!.arrivalMs - 10_000) / 2, 2);
      expect(r.promptTokens.length).toBe(inWin[k]!.promptTokens.length);
    });
  });
});

describe('bucket detection', () => {
  it('finds the bucket width despite jitter and empty buckets; ignores unquantised series', () => {
    const rng = new SeededRng(1);
    const ts: number[] = [];
    let t = 0;
    for (let b = 0; b < 400; b++) {
      t += (rng.int(5) === 0 ? 6000 : 3000) + rng.int(3) - 1; // some empty buckets, ±1 ms jitter
      const k = 1 + rng.int(12);
      for (let i = 0; i < k; i++) ts.push(t);
    }
    const q = detectQuantisation(ts);
    expect(q.bucketMs).toBeGreaterThanOrEqual(2999);
    expect(q.bucketMs).toBeLessThanOrEqual(3001);
    const spread = spreadBuckets(ts, q.bucketMs, 'even', 1);
    for (let i = 1; i < spread.length; i++) expect(spread[i]!).toBeGreaterThan(spread[i - 1]!);
    const poisson: number[] = [];
    let p = 0;
    for (let i = 0; i < 500; i++) poisson.push((p += 1 + rng.int(500)));
    expect(detectQuantisation(poisson).bucketMs).toBe(0);
  });
});

describe('generators', () => {
  it('shared-prefix: same group shares exactly the system prompt; one round covers every user once', () => {
    const w = loadWorkload('shared-prefix:groups=4,system=300,users=5,question=50,output=7,rps=20', { seed: 3 });
    expect(w.requests.length).toBe(20);
    expect(new Set(w.requests.map((r) => r.group)).size).toBe(20);
    for (const a of w.requests) {
      expect(a.promptTokens.length).toBe(350);
      expect(a.outputTokens).toBe(7);
      for (const b of w.requests) {
        if (a === b) continue;
        const c = commonPrefix(a.promptTokens, b.promptTokens);
        const sameGroup = a.group!.split('/')[0] === b.group!.split('/')[0];
        expect(c).toBe(sameGroup ? 300 : 0);
        expectTextConsistent(a, b, c);
      }
    }
    expect(w.name).toContain('groups=4');
    // Later rounds: a user repeats its question (whole prompt shared), unless fresh=1.
    const rep = loadWorkload('shared-prefix:groups=2,system=100,users=3,question=20,n=30', { seed: 3 });
    for (const a of rep.requests) {
      for (const b of rep.requests) {
        if (a === b) continue;
        const c = commonPrefix(a.promptTokens, b.promptTokens);
        expect(c).toBe(a.group === b.group ? 120 : a.group![1] === b.group![1] ? 100 : 0);
      }
    }
    const fresh = loadWorkload('shared-prefix:groups=2,system=100,users=3,question=20,n=30,fresh=1', { seed: 3 });
    for (let i = 0; i < fresh.requests.length; i++) {
      for (let j = i + 1; j < fresh.requests.length; j++) {
        const a = fresh.requests[i]!;
        const b = fresh.requests[j]!;
        expect(commonPrefix(a.promptTokens, b.promptTokens)).toBe(a.group![1] === b.group![1] ? 100 : 0);
      }
    }
    const rr = loadWorkload('shared-prefix:groups=3,users=2,system=10,question=5,order=rr,n=6', { seed: 1 });
    expect(rr.requests.map((r) => r.group)).toEqual(['g0/u0', 'g1/u0', 'g2/u0', 'g0/u1', 'g1/u1', 'g2/u1']);
  });

  it('Poisson arrivals at rps; opts.rps overrides the spec; duration bounds the arrivals', () => {
    const w = loadWorkload('random:n=4000,input=8,output=2,rps=50', { seed: 9 });
    const gaps = w.requests.slice(1).map((r, i) => r.arrivalMs - w.requests[i]!.arrivalMs);
    const mean = gaps.reduce((s, g) => s + g, 0) / gaps.length;
    expect(mean).toBeGreaterThan(20 * 0.93);
    expect(mean).toBeLessThan(20 * 1.07);
    const sd = Math.sqrt(gaps.reduce((s, g) => s + (g - mean) ** 2, 0) / gaps.length);
    expect(sd / mean).toBeGreaterThan(0.9); // exponential gaps: coefficient of variation 1
    expect(sd / mean).toBeLessThan(1.1);
    const o = loadWorkload('random:n=2000,rps=50', { seed: 9, rps: 5 });
    expect(o.requests.at(-1)!.arrivalMs / 1000).toBeGreaterThan(300);
    expect(o.notes.join('\n')).toMatch(/overrides/);
    const d = loadWorkload('random:duration=30,rps=10', { seed: 9 });
    expect(d.requests.length).toBeGreaterThan(200);
    expect(d.requests.length).toBeLessThan(400);
    expect(d.requests.at(-1)!.arrivalMs).toBeLessThan(30_000);
    const firsts = new Set(w.requests.map((r) => r.promptTokens[0]));
    expect(firsts.size).toBe(w.requests.length);
  });

  it('multi-turn: each turn extends the previous prompt by its answer and a new user message', () => {
    const w = loadWorkload('multi-turn:sessions=6,turns=4,system=200,user=30,answer=20,think=5,rps=2', { seed: 4 });
    expect(w.requests.length).toBe(24);
    expectNonDecreasing(w);
    const bySession = new Map<string, LabRequest[]>();
    for (const r of w.requests) bySession.set(r.group!, [...(bySession.get(r.group!) ?? []), r]);
    expect(bySession.size).toBe(6);
    for (const turns of bySession.values()) {
      expect(turns.length).toBe(4);
      turns.forEach((r, k) => {
        expect(r.promptTokens.length).toBe(200 + k * 50 + 30);
        expect(r.outputTokens).toBe(20);
        if (k === 0) return;
        const prev = turns[k - 1]!;
        expect(commonPrefix(prev.promptTokens, r.promptTokens)).toBe(prev.promptTokens.length);
        expect(r.text().startsWith(prev.text())).toBe(true);
        expect(r.arrivalMs - prev.arrivalMs).toBeCloseTo(5000, 2);
      });
    }
    const sessions = [...bySession.values()];
    for (let i = 0; i < sessions.length; i++) {
      for (let j = i + 1; j < sessions.length; j++) {
        expect(commonPrefix(sessions[i]![3]!.promptTokens, sessions[j]![3]!.promptTokens)).toBe(200);
      }
    }
    const capped = loadWorkload('multi-turn:turns=3,n=10', { seed: 4 });
    expect(capped.requests.length).toBe(10);
    const noSys = loadWorkload('multi-turn:sessions=3,turns=2,system=0', { seed: 4 });
    expect(commonPrefix(noSys.requests[0]!.promptTokens, noSys.requests.find((r) => r.group !== noSys.requests[0]!.group)!.promptTokens)).toBe(0);
  });

  it('toolbench-like: tool popularity follows Zipf and a tool prefix is shared exactly', () => {
    const w = loadWorkload('toolbench-like:tools=40,zipf=1.1,tool=64,query=16,output=8,n=30000,rps=100', { seed: 8 });
    expect(w.requests.length).toBe(30000);
    const counts = new Array<number>(40).fill(0);
    for (const r of w.requests) counts[Number(r.group!.slice(4))]!++;
    // log(count) vs log(rank) over the top 20 ranks: slope ≈ −1.1
    const xs: number[] = [];
    const ys: number[] = [];
    for (let k = 0; k < 20; k++) {
      xs.push(Math.log(k + 1));
      ys.push(Math.log(counts[k]!));
    }
    const mx = xs.reduce((a, b) => a + b) / xs.length;
    const my = ys.reduce((a, b) => a + b) / ys.length;
    const slope = xs.reduce((s, x, i) => s + (x - mx) * (ys[i]! - my), 0) / xs.reduce((s, x) => s + (x - mx) ** 2, 0);
    expect(slope).toBeGreaterThan(-1.25);
    expect(slope).toBeLessThan(-0.95);
    expect(counts[0]! / counts[1]!).toBeGreaterThan(1.8);
    expect(counts[0]! / counts[1]!).toBeLessThan(2.5);
    const sample = w.requests.slice(0, 200);
    for (const a of sample) {
      expect(a.promptTokens.length).toBe(80);
      for (const b of sample) {
        if (a === b) continue;
        expect(commonPrefix(a.promptTokens, b.promptTokens)).toBe(a.group === b.group ? 64 : 0);
      }
    }
  });

  it('is deterministic: same seed, same workload; another seed, another one', () => {
    for (const spec of [
      'shared-prefix:n=60',
      'multi-turn:sessions=5,turns=3',
      'toolbench-like:n=50,tool=100,query=10',
      'random:n=40,input=30',
    ]) {
      const a = loadWorkload(spec, { seed: 42 });
      const b = loadWorkload(spec, { seed: 42 });
      const c = loadWorkload(spec, { seed: 43 });
      expect(snapshot(a)).toEqual(snapshot(b));
      expect(a.name).toBe(b.name);
      expect(a.requests.map((r) => r.arrivalMs)).not.toEqual(c.requests.map((r) => r.arrivalMs));
      expect(Array.from(a.requests[0]!.promptTokens)).not.toEqual(Array.from(c.requests[0]!.promptTokens));
    }
    expect(snapshot(loadWorkload(`mooncake:${CONV}?spread=uniform`, { seed: 7 }))).toEqual(
      snapshot(loadWorkload(`mooncake:${CONV}?spread=uniform`, { seed: 7 })),
    );
  });
});

describe('spec errors', () => {
  const dir = mkdtempSync(join(tmpdir(), 'kvgate-workloads-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('names the problem', () => {
    expectError(() => loadWorkload('sharegpt:foo.json', { seed: 1 }), /unknown workload type "sharegpt"/);
    expectError(() => loadWorkload('', { seed: 1 }), /empty workload spec/);
    expectError(() => loadWorkload('mooncake:/nonexistent/trace.jsonl', { seed: 1 }), /cannot read trace file "\/nonexistent\/trace.jsonl": no such file/);
    expectError(() => loadWorkload('mooncake:', { seed: 1 }), /missing trace file path/);
    expectError(() => loadWorkload('azure:/nonexistent.csv', { seed: 1 }), /azure: cannot read trace file/);
    expectError(() => loadWorkload('shared-prefix:groups=abc', { seed: 1 }), /parameter "groups" must be a positive integer \(got "abc"\)/);
    expectError(() => loadWorkload('shared-prefix:groups=0', { seed: 1 }), /"groups" must be a positive integer/);
    expectError(() => loadWorkload('toolbench-like:zipf=-1', { seed: 1 }), /"zipf" must be a non-negative number/);
    expectError(() => loadWorkload('multi-turn:turn=3', { seed: 1 }), /unknown parameter "turn" \(known: sessions, turns/);
    expectError(() => loadWorkload('random:n=5,n=6', { seed: 1 }), /"n" is given twice/);
    expectError(() => loadWorkload('random:n', { seed: 1 }), /"n" is not key=value/);
    expectError(() => loadWorkload('shared-prefix:order=zigzag', { seed: 1 }), /"order" must be one of shuffle, random, rr/);
    expectError(() => loadWorkload(`mooncake:${CONV}?spread=sideways`, { seed: 1 }), /"spread" must be one of even, uniform, none/);
    expectError(() => loadWorkload('random:n=5', { seed: 1, rateScale: 0 }), /rateScale must be a positive number/);
    expectError(() => loadWorkload('random:n=5', { seed: 1, timeWindow: [10, 5] }), /timeWindow must be/);
    expectError(() => loadWorkload(`mooncake:${CONV}`, { seed: 1, timeWindow: [5000, 6000] }), /no requests in time window/);
    expectError(() => loadWorkload(`mooncake:${CONV}`, { seed: 1, rps: 5, rateScale: 2 }), /either rateScale or rps/);
  });

  it('reports malformed trace lines with their line number', () => {
    const bad = join(dir, 'bad.jsonl');
    writeFileSync(bad, '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [0]}\n{"timestamp": 1, oops}\n');
    expectError(() => loadWorkload(`mooncake:${bad}`, { seed: 1 }), /bad\.jsonl line 2: invalid JSON/);
    const noIds = join(dir, 'noids.jsonl');
    writeFileSync(noIds, '{"timestamp": 0, "input_length": 10, "output_length": 1}\n');
    expectError(() => loadWorkload(`mooncake:${noIds}`, { seed: 1 }), /line 1: "hash_ids" must be a non-empty array/);
    const csv = join(dir, 'bad.csv');
    writeFileSync(csv, 'TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\nyesterday,1,1\n');
    expectError(() => loadWorkload(`azure:${csv}`, { seed: 1 }), /bad\.csv line 3: bad TIMESTAMP "yesterday"/);
    const hdr = join(dir, 'hdr.csv');
    writeFileSync(hdr, 'a,b,c\n1,2,3\n');
    expectError(() => loadWorkload(`azure:${hdr}`, { seed: 1 }), /expected a header TIMESTAMP,ContextTokens,GeneratedTokens/);
  });
});
