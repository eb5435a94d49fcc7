import type { Workload } from '../workload.js';
import { finalize, type Entry, type TokenSource } from './common.js';
import { SegmentCache } from './request.js';
import { WorkloadError, type WorkloadOptions } from './spec.js';
import { readTrace, sortOrder, spreadArrivals, traceLabel, type TraceSpec } from './trace.js';

/** Tokens per Mooncake prefix block (`hash_ids`). */
export const MOONCAKE_BLOCK_TOKENS = 512;

/**
 * Token content of Mooncake blocks does not depend on the seed: hash id h always maps to the
 * same 512 tokens (segment key h, salt 0), in every request, run and trace.
 */
export const MOONCAKE_SALT = 0;

interface Row {
  timestamp: number;
  input: number;
  output: number;
  hashIds: number[];
}

function parseLine(type: string, path: string, lineNo: number, line: string): Row {
  let o: unknown;
  try {
    o = JSON.parse(line);
  } catch (err) {
    throw new WorkloadError(`${type}: ${path} line ${lineNo}: invalid JSON (${(err as Error).message})`);
  }
  const bad = (what: string): never => {
    throw new WorkloadError(`${type}: ${path} line ${lineNo}: ${what}`);
  };
  if (typeof o !== 'object' || o === null || Array.isArray(o)) return bad('expected a JSON object');
  const r = o as Record<string, unknown>;
  const ts = r['timestamp'];
  const input = r['input_length'];
  const output = r['output_length'];
  const ids = r['hash_ids'];
  if (typeof ts !== 'number' || !Number.isFinite(ts) || ts < 0) return bad(`"timestamp" must be a non-negative number of ms`);
  if (typeof input !== 'number' || !Number.isSafeInteger(input) || input < 1) return bad(`"input_length" must be a positive integer`);
  if (typeof output !== 'number' || !Number.isSafeInteger(output) || output < 0) return bad(`"output_length" must be a non-negative integer`);
  if (!Array.isArray(ids) || ids.length === 0) return bad(`"hash_ids" must be a non-empty array`);
  for (const h of ids) if (typeof h !== 'number' || !Number.isSafeInteger(h) || h < 0) return bad(`"hash_ids" must hold non-negative integers`);
  return { timestamp: ts, input, output, hashIds: ids as number[] };
}

/**
 * Mooncake FAST'25 JSONL trace: one request per line,
 * `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`.
 *
 * The prompt is the concatenation of its blocks' tokens (512 per hash id, see tokens.ts), the
 * last block cut so the prompt has exactly input_length tokens. Requests sharing a hash-id
 * prefix of length c therefore share exactly min(512·c, both input lengths) tokens.
 * Lines whose hash_ids cover fewer than input_length tokens are cut to 512 × len(hash_ids)
 * (noted); surplus hash ids are ignored (noted). output_length 0 becomes 1 (noted).
 */
export function loadMooncake(spec: TraceSpec, opts: WorkloadOptions): Workload {
  const type = 'mooncake';
  const text = readTrace(type, spec.path);
  const rows: Row[] = [];
  let lineNo = 0;
  let start = 0;
  while (start < text.length) {
    let end = text.indexOf('\n', start);
    if (end < 0) end = text.length;
    lineNo++;
    const line = text.slice(start, end).trim();
    start = end + 1;
    if (line === '') continue;
    rows.push(parseLine(type, spec.path, lineNo, line));
  }
  if (rows.length === 0) throw new WorkloadError(`${type}: ${spec.path} holds no requests`);

  const notes: string[] = [`mooncake trace ${spec.path}: ${rows.length} requests, ${MOONCAKE_BLOCK_TOKENS}-token blocks`];
  const order = sortOrder(rows.map((r) => r.timestamp));
  const sorted = order ? order.map((i) => rows[i]!) : rows;
  if (order) notes.push('timestamps were not in order: requests sorted by timestamp (stable)');

  const ts = new Float64Array(sorted.length);
  for (let i = 0; i < sorted.length; i++) ts[i] = sorted[i]!.timestamp;
  const arrivals = spreadArrivals(ts, spec, opts.seed, notes);

  let cut = 0;
  let surplus = 0;
  let zeroOut = 0;
  const source: TokenSource = { salt: MOONCAKE_SALT, cache: new SegmentCache(MOONCAKE_SALT) };
  const entries: Entry[] = new Array(sorted.length);
  for (let i = 0; i < sorted.length; i++) {
    const r = sorted[i]!;
    const cover = r.hashIds.length * MOONCAKE_BLOCK_TOKENS;
    let input = r.input;
    if (input > cover) {
      input = cover;
      cut++;
    }
    const nBlocks = Math.ceil(input / MOONCAKE_BLOCK_TOKENS);
    if (nBlocks < r.hashIds.length) surplus++;
    const big = r.hashIds.some((h) => h > 0xffffffff);
    const keys = big ? Float64Array.from(r.hashIds.slice(0, nBlocks)) : Uint32Array.from(r.hashIds.slice(0, nBlocks));
    const lens = new Uint32Array(nBlocks).fill(MOONCAKE_BLOCK_TOKENS);
    lens[nBlocks - 1] = input - MOONCAKE_BLOCK_TOKENS * (nBlocks - 1);
    if (r.output === 0) zeroOut++;
    entries[i] = {
      windowMs: r.timestamp,
      arrivalMs: arrivals[i]!,
      outputTokens: Math.max(1, r.output),
      keys,
      lens,
      source,
    };
  }
  if (cut) notes.push(`${cut} requests had input_length > 512 × len(hash_ids): prompts cut to the blocks given`);
  if (surplus) notes.push(`${surplus} requests had more hash_ids than ceil(input_length / 512): surplus ids ignored`);
  if (zeroOut) notes.push(`${zeroOut} requests had output_length 0: generate 1 token`);
  return finalize(traceLabel(type, spec), entries, opts, notes, { trace: true });
}
