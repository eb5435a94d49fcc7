import type { Workload } from '../workload.js';
import { finalize, type Entry, type TokenSource } from './common.js';
import { WorkloadError, type WorkloadOptions } from './spec.js';
import { saltFromSeed } from './tokens.js';
import { readTrace, sortOrder, spreadArrivals, traceLabel, type TraceSpec } from './trace.js';

const TS_RE = /^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z?$/;

/**
 * Parses `2023-11-16 18:15:46.6805900` (UTC, up to 9 fractional digits) to
 * [whole seconds since the epoch in ms, fractional part in ms].
 */
export function parseAzureTimestamp(s: string): [number, number] | undefined {
  const m = TS_RE.exec(s.trim());
  if (!m) return undefined;
  const [, y, mo, d, h, mi, se, frac] = m;
  const whole = Date.UTC(Number(y), Number(mo) - 1, Number(d), Number(h), Number(mi), Number(se));
  if (!Number.isFinite(whole)) return undefined;
  return [whole, frac ? Number(`0.${frac}`) * 1000 : 0];
}

/**
 * Azure LLM inference trace (2023) CSV: `TIMESTAMP,ContextTokens,GeneratedTokens` (columns found
 * by header name). Arrivals are ms since the first row (100 ns precision kept). There is no
 * prefix information: every request gets its own segment (key = row index, seeded salt), i.e.
 * unique random tokens whose first token differs from every other request's, so prompts share
 * nothing — the no-sharing control workload. GeneratedTokens 0 becomes 1 (noted).
 */
export function loadAzure(spec: TraceSpec, opts: WorkloadOptions): Workload {
  const type = 'azure';
  const text = readTrace(type, spec.path);
  const lines = text.split(/\r?\n/);
  const header = (lines[0] ?? '').split(',').map((h) => h.trim().toLowerCase());
  const cTs = header.indexOf('timestamp');
  const cIn = header.indexOf('contexttokens');
  const cOut = header.indexOf('generatedtokens');
  if (cTs < 0 || cIn < 0 || cOut < 0) {
    throw new WorkloadError(`${type}: ${spec.path}: expected a header TIMESTAMP,ContextTokens,GeneratedTokens (got "${lines[0] ?? ''}")`);
  }
  const whole: number[] = [];
  const frac: number[] = [];
  const inputs: number[] = [];
  const outputs: number[] = [];
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '') continue;
    const f = line.split(',');
    const bad = (what: string): never => {
      throw new WorkloadError(`${type}: ${spec.path} line ${i + 1}: ${what}`);
    };
    const t = parseAzureTimestamp(f[cTs] ?? '');
    if (!t) bad(`bad TIMESTAMP "${f[cTs] ?? ''}" (expected YYYY-MM-DD hh:mm:ss.fffffff)`);
    const input = Number(f[cIn]);
    const output = Number(f[cOut]);
    if (!Number.isSafeInteger(input) || input < 1) bad(`ContextTokens must be a positive integer (got "${f[cIn] ?? ''}")`);
    if (!Number.isSafeInteger(output) || output < 0) bad(`GeneratedTokens must be a non-negative integer (got "${f[cOut] ?? ''}")`);
    whole.push(t![0]);
    frac.push(t![1]);
    inputs.push(input);
    outputs.push(output);
  }
  const n = whole.length;
  if (n === 0) throw new WorkloadError(`${type}: ${spec.path} holds no requests`);

  // ms since the first row, exact to 100 ns: whole-second differences are exact integers.
  const rel = new Float64Array(n);
  for (let i = 0; i < n; i++) rel[i] = Math.round((whole[i]! - whole[0]! + frac[i]! - frac[0]!) * 10_000) / 10_000;
  const notes: string[] = [`azure trace ${spec.path}: ${n} requests, no prefix sharing (unique seeded random tokens per request)`];
  const order = sortOrder(rel);
  if (order) notes.push('timestamps were not in order: requests sorted by timestamp (stable)');
  const idx = order ?? Array.from({ length: n }, (_, k) => k);
  const ts = Float64Array.from(idx, (k) => rel[k]!);
  const arrivals = spreadArrivals(ts, spec, opts.seed, notes);

  const source: TokenSource = { salt: saltFromSeed(opts.seed, 1) }; // unique segments: no cache
  let zeroOut = 0;
  const entries: Entry[] = new Array(n);
  for (let i = 0; i < n; i++) {
    const k = idx[i]!;
    if (outputs[k] === 0) zeroOut++;
    entries[i] = {
      windowMs: ts[i]!,
      arrivalMs: arrivals[i]!,
      outputTokens: Math.max(1, outputs[k]!),
      keys: [i],
      lens: [inputs[k]!],
      source,
    };
  }
  if (zeroOut) notes.push(`${zeroOut} requests had GeneratedTokens 0: generate 1 token`);
  return finalize(traceLabel(type, spec), entries, opts, notes, { trace: true });
}
