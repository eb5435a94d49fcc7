import { SeededRng } from '../../core/rng.js';
import type { Workload } from '../workload.js';
import { SegmentedRequest, type SegmentCache } from './request.js';
import { WorkloadError, type WorkloadOptions } from './spec.js';

/** One request before the common post-processing (window, rate, cap, ids). */
export interface Entry {
  /** Time the time window selects on (ms, source clock: the original trace timestamp). */
  windowMs: number;
  /** Arrival (ms, source clock), after any spreading. Entries are sorted by it. */
  arrivalMs: number;
  outputTokens: number;
  keys: ArrayLike<number>;
  lens: ArrayLike<number>;
  /** Token content (shared by the workload's entries): salt and optional segment cache. */
  source: TokenSource;
  group?: string;
}

export interface TokenSource {
  salt: number;
  cache?: SegmentCache | undefined;
}

/** Shortest printable form of a number (for names and notes). */
export function fmt(x: number): string {
  return Number.isInteger(x) ? String(x) : String(Number(x.toPrecision(6)));
}

export interface FinalizeOptions {
  /** Traces: arrivals are re-based to the first timestamp and opts.rps rescales time. */
  trace: boolean;
}

/**
 * Applies the options common to all sources, in this order: timeWindow (on windowMs, [start,
 * end) seconds; arrivals re-based to the window start, or to the first request without a
 * window for traces), then the rate (arrival / rateScale; for traces opts.rps instead rescales
 * to that mean rate), then maxRequests (the first N by arrival). Ids are r0, r1, ... in
 * arrival order.
 */
export function finalize(
  name: string,
  entries: Entry[],
  opts: WorkloadOptions,
  notes: string[],
  fo: FinalizeOptions,
): Workload {
  let list = entries;
  let origin = 0;
  const tags: string[] = [];
  if (opts.timeWindow) {
    const [s, e] = opts.timeWindow;
    const lo = s * 1000;
    const hi = e * 1000;
    list = list.filter((x) => x.windowMs >= lo && x.windowMs < hi);
    origin = lo;
    notes.push(
      `time window [${fmt(s)}, ${fmt(e)}) s: ${list.length} of ${entries.length} requests kept, arrivals re-based to ${fmt(s)} s`,
    );
    tags.push(`window=${fmt(s)}-${fmt(e)}s`);
  } else if (fo.trace && list.length > 0) {
    origin = list[0]!.windowMs;
    if (origin !== 0) notes.push(`arrivals re-based to the first timestamp (${fmt(origin)} ms)`);
  }
  if (list.length === 0) {
    throw new WorkloadError(`${name}: no requests${opts.timeWindow ? ` in time window [${opts.timeWindow.join(', ')}) s` : ''}`);
  }

  let scale = opts.rateScale ?? 1;
  if (fo.trace && opts.rps !== undefined) {
    if (opts.rateScale !== undefined) throw new WorkloadError(`${name}: give either rateScale or rps for a trace, not both`);
    const span = (list[list.length - 1]!.arrivalMs - list[0]!.arrivalMs) / 1000;
    if (list.length < 2 || !(span > 0)) throw new WorkloadError(`${name}: cannot rescale to rps=${opts.rps}: the trace slice has no duration`);
    const natural = (list.length - 1) / span;
    scale = opts.rps / natural;
    notes.push(`rps ${fmt(opts.rps)}: the slice's mean rate ${fmt(natural)} req/s is rescaled by ${fmt(scale)}`);
    tags.push(`rps=${fmt(opts.rps)}`);
  } else if (opts.rateScale !== undefined && opts.rateScale !== 1) {
    notes.push(`rateScale ${fmt(opts.rateScale)}: arrival times divided by ${fmt(opts.rateScale)}`);
  }
  if (opts.rateScale !== undefined) tags.push(`rateScale=${fmt(opts.rateScale)}`);

  if (opts.maxRequests !== undefined && list.length > opts.maxRequests) {
    notes.push(`maxRequests ${opts.maxRequests}: ${list.length - opts.maxRequests} later requests dropped`);
    list = list.slice(0, opts.maxRequests);
  }
  if (opts.maxRequests !== undefined) tags.push(`max=${opts.maxRequests}`);

  const requests = new Array<SegmentedRequest>(list.length);
  let prev = 0;
  for (let i = 0; i < list.length; i++) {
    const x = list[i]!;
    // Rounded to 1 µs so that re-basing and scaling leave no float noise; clamped to stay ordered.
    let t = Math.round(((x.arrivalMs - origin) / scale) * 1000) / 1000;
    if (t < prev) t = prev;
    prev = t;
    requests[i] = new SegmentedRequest(`r${i}`, t, x.outputTokens, x.keys, x.lens, x.source, x.group);
  }
  return { name: tags.length ? `${name} ${tags.join(' ')}` : name, requests, notes };
}

// ---------------------------------------------------------------------------------------------
// Timestamp quantisation (traces)
// ---------------------------------------------------------------------------------------------

export interface Quantisation {
  /** Fraction of inter-arrival gaps that are exactly 0. */
  zeroGapFraction: number;
  /** Detected bucket width (ms), or 0 when the timestamps do not look quantised. */
  bucketMs: number;
}

/** Share of zero gaps above which a trace's timestamps are treated as quantised. */
export const QUANTISED_ZERO_GAP_FRACTION = 0.3;

/**
 * Detects bucketed timestamps (sorted input). A trace is quantised when at least 30% of its
 * inter-arrival gaps are 0. The bucket width is the median of the lowest cluster of non-zero
 * gaps: those at most 1.5 × the 5th-percentile non-zero gap. That is robust to a few ms of
 * jitter between buckets (the Mooncake conversation trace has gaps of 2,999/3,000/3,001 ms) and
 * to empty buckets (which give gaps of 2×, 3× the width).
 */
export function detectQuantisation(ts: ArrayLike<number>): Quantisation {
  const n = ts.length;
  if (n < 2) return { zeroGapFraction: 0, bucketMs: 0 };
  const nonzero: number[] = [];
  let zeros = 0;
  for (let i = 1; i < n; i++) {
    const g = ts[i]! - ts[i - 1]!;
    if (g === 0) zeros++;
    else nonzero.push(g);
  }
  const zeroGapFraction = zeros / (n - 1);
  if (zeroGapFraction < QUANTISED_ZERO_GAP_FRACTION || nonzero.length === 0) return { zeroGapFraction, bucketMs: 0 };
  nonzero.sort((a, b) => a - b);
  const p5 = nonzero[Math.floor(0.05 * nonzero.length)]!;
  let end = 0;
  while (end < nonzero.length && nonzero[end]! <= 1.5 * p5) end++;
  const bucketMs = nonzero[Math.floor((end - 1) / 2)]!;
  return { zeroGapFraction, bucketMs };
}

export type SpreadMode = 'even' | 'uniform' | 'none';

/**
 * Spreads runs of identical timestamps over their bucket. A run of k requests at time t gets
 * width w = min(bucketMs, next distinct timestamp − t) and arrivals
 *   even:    t + (i + 0.5) · w / k        (i = 0..k−1)
 *   uniform: t + sorted seeded-uniform draws in [0, w)
 * so arrivals stay sorted, inside [t, t + w), and no run overtakes the next one. Runs of one
 * request are spread too (an even run of 1 lands mid-bucket), so every bucket is treated alike.
 * Returns the new arrivals and how many requests were moved.
 */
export function spreadBuckets(ts: ArrayLike<number>, bucketMs: number, mode: SpreadMode, seed: number): Float64Array {
  const n = ts.length;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = ts[i]!;
  if (mode === 'none' || !(bucketMs > 0)) return out;
  const rng = new SeededRng(seed ^ 0x5bd1e995);
  let i = 0;
  while (i < n) {
    const t = ts[i]!;
    let j = i + 1;
    while (j < n && ts[j] === t) j++;
    const k = j - i;
    const w = j < n ? Math.min(bucketMs, ts[j]! - t) : bucketMs;
    if (mode === 'even') {
      for (let m = 0; m < k; m++) out[i + m] = t + ((m + 0.5) * w) / k;
    } else {
      const u: number[] = [];
      for (let m = 0; m < k; m++) u.push(rng.next() * w);
      u.sort((a, b) => a - b);
      for (let m = 0; m < k; m++) out[i + m] = t + u[m]!;
    }
    i = j;
  }
  return out;
}
