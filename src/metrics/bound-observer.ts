import type { Histogram } from 'prom-client';

/** prom-client 15's per-series record of a histogram (what `Histogram#observe` updates). */
interface SeriesValues {
  labels: Record<string, string | number>;
  bucketValues: Record<string, number>;
  sum: number;
  count: number;
  bucketExemplars?: unknown;
}
interface HistogramInternals {
  hashMap?: Record<string, SeriesValues>;
  upperBounds?: readonly number[];
  enableExemplars?: boolean;
}

/**
 * `observe(value)` for one label set of a histogram, for values observed many times a second
 * (inter-token gaps: one per relayed chunk). prom-client's `observe(labels, value)` validates and
 * hashes the labels and allocates a closure on every call; this finds the series once and then
 * only picks the bucket and adds, exactly as `observe` does (same bucket, sum and count). If the
 * series goes away (`remove`, `reset`) the next value goes through `observe` again, which
 * re-creates it. Falls back to plain `observe` when prom-client's internals are not the expected
 * ones (another version), or for exemplars.
 */
export function boundObserver<L extends string>(h: Histogram<L>, labels: Partial<Record<L, string | number>>): (value: number) => void {
  const hi = h as unknown as HistogramInternals;
  const bounds = hi.upperBounds;
  if (typeof hi.hashMap !== 'object' || hi.hashMap === null || !Array.isArray(bounds) || hi.enableExemplars) return (v) => h.observe(labels, v);
  const keys = bucketKeys(bounds);
  let key: string | undefined;
  let series: SeriesValues | undefined;
  const bind = (): void => {
    key = undefined;
    series = undefined;
    for (const [k, s] of Object.entries(hi.hashMap ?? {})) {
      if (sameLabels(s.labels, labels)) {
        key = k;
        series = s;
        return;
      }
    }
  };
  return (v: number) => {
    if (series === undefined || key === undefined || hi.hashMap?.[key] !== series || !Number.isFinite(v)) {
      h.observe(labels, v); // creates the series (or throws on a non-finite value, as before)
      bind();
      return;
    }
    for (let i = 0; i < bounds.length; i++) {
      if (v <= bounds[i]!) {
        series.bucketValues[keys[i]!]! += 1;
        break;
      }
    }
    series.sum += v;
    series.count += 1;
  };
}

/**
 * The bucket keys of a histogram's bounds (its `bucketValues` keys), made once per bounds array:
 * `String(0.005)` and the like are not small integers, so each call made new strings, which V8's
 * number-to-string cache then held past young-generation collections (~1.1 KB promoted per request
 * under wrk, docs/benchmarks.md §3.1, "GC per request").
 */
const keysOf = new WeakMap<readonly number[], string[]>();
function bucketKeys(bounds: readonly number[]): string[] {
  let keys = keysOf.get(bounds);
  if (!keys) keysOf.set(bounds, (keys = bounds.map(String)));
  return keys;
}

function sameLabels(a: Record<string, string | number>, b: Record<string, string | number | undefined>): boolean {
  let n = 0;
  for (const k in b) {
    if (b[k] === undefined) continue;
    n++;
    if (a[k] !== b[k]) return false;
  }
  return Object.keys(a).length === n;
}
