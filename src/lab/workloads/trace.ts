import { existsSync, readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { detectQuantisation, fmt, spreadBuckets, type SpreadMode } from './common.js';
import { parseParams, WorkloadError, type ParamDef } from './spec.js';

/** Options of the trace specs: `TYPE:PATH?spread=even|uniform|none&bucket=MS`. */
export interface TraceSpec {
  path: string;
  spread: SpreadMode;
  /** Bucket width override (ms); undefined = detect. */
  bucketMs: number | undefined;
}

const TRACE_PARAMS: Record<string, ParamDef> = {
  spread: { kind: 'string', def: 'even', choices: ['even', 'uniform', 'none'] },
  bucket: { kind: 'posnumber' },
};

/**
 * Splits `PATH[?key=value&key=value]`. A path that exists as given wins over the split, so a
 * file name containing '?' still works.
 */
export function parseTraceSpec(type: string, rest: string): TraceSpec {
  let path = rest;
  let query = '';
  const q = rest.lastIndexOf('?');
  if (q >= 0 && !existsSync(rest)) {
    path = rest.slice(0, q);
    query = rest.slice(q + 1);
  }
  if (path.trim() === '') throw new WorkloadError(`${type}: missing trace file path (expected ${type}:PATH)`);
  const p = parseParams(type, query.split('&').join(','), TRACE_PARAMS);
  return { path, spread: p['spread'] as SpreadMode, bucketMs: p['bucket'] as number | undefined };
}

export function readTrace(type: string, path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    const why = e.code === 'ENOENT' ? 'no such file' : e.code === 'EISDIR' ? 'is a directory' : (e.code ?? e.message);
    throw new WorkloadError(`${type}: cannot read trace file "${path}": ${why}`);
  }
}

/** Sorts by timestamp if needed (stable); returns the permutation or undefined if already sorted. */
export function sortOrder(ts: ArrayLike<number>): number[] | undefined {
  for (let i = 1; i < ts.length; i++) {
    if (ts[i]! < ts[i - 1]!) {
      const idx = Array.from({ length: ts.length }, (_, k) => k);
      idx.sort((a, b) => ts[a]! - ts[b]! || a - b);
      return idx;
    }
  }
  return undefined;
}

/**
 * Detects quantised timestamps and spreads each bucket's requests (sorted input, ms).
 * Pushes what it found and did to `notes`.
 */
export function spreadArrivals(ts: Float64Array, spec: TraceSpec, seed: number, notes: string[]): Float64Array {
  const q = detectQuantisation(ts);
  const zeroPct = `${fmt(Math.round(q.zeroGapFraction * 1000) / 10)}% of inter-arrival gaps are 0`;
  const bucketMs = spec.bucketMs ?? q.bucketMs;
  if (spec.spread === 'none') {
    notes.push(
      `timestamps ${q.bucketMs > 0 ? `look quantised to ~${fmt(q.bucketMs)} ms buckets` : 'are not quantised'} (${zeroPct}); spread=none: replayed as recorded`,
    );
    return ts;
  }
  if (!(bucketMs > 0)) {
    notes.push(`timestamps are not quantised (${zeroPct}); arrivals replayed as recorded`);
    return ts;
  }
  const how =
    spec.spread === 'even'
      ? 'the k requests of a bucket at t + (i + 0.5) × w / k'
      : 'seeded-uniform inside each bucket';
  const src = spec.bucketMs !== undefined ? `bucket=${fmt(spec.bucketMs)} ms (given; detected ${q.bucketMs > 0 ? `~${fmt(q.bucketMs)} ms` : 'none'})` : `~${fmt(bucketMs)} ms buckets (detected: median of the lowest cluster of non-zero gaps)`;
  notes.push(
    `timestamps quantised to ${src}, ${zeroPct}: arrivals spread ${how}, w = min(bucket, gap to the next timestamp)`,
  );
  return spreadBuckets(ts, bucketMs, spec.spread, seed);
}

export function traceLabel(type: string, spec: TraceSpec): string {
  const extra: string[] = [];
  if (spec.spread !== 'even') extra.push(`spread=${spec.spread}`);
  if (spec.bucketMs !== undefined) extra.push(`bucket=${fmt(spec.bucketMs)}`);
  return `${type}:${basename(spec.path)}${extra.length ? `?${extra.join('&')}` : ''}`;
}
