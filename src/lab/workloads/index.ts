/**
 * Workload sources for the policy lab. See README.md in this directory for the spec grammar.
 *
 *   mooncake:PATH[?spread=even|uniform|none&bucket=MS]
 *   azure:PATH[?spread=...&bucket=MS]
 *   shared-prefix[:k=v,...] | multi-turn[:k=v,...] | toolbench-like[:k=v,...] | random[:k=v,...]
 */
import type { Workload } from '../workload.js';
import { loadAzure } from './azure.js';
import { GENERATOR_NAMES, loadGenerator } from './generators.js';
import { loadMooncake } from './mooncake.js';
import { checkOptions, WorkloadError, type WorkloadOptions } from './spec.js';
import { parseTraceSpec } from './trace.js';

export { WorkloadError, type WorkloadOptions } from './spec.js';
export { SegmentedRequest } from './request.js';
export { VOCAB, CHARS_PER_TOKEN, tokenText, tokensToText, textToTokens } from './tokens.js';
export { MOONCAKE_BLOCK_TOKENS } from './mooncake.js';
export { DEFAULT_N, DEFAULT_RPS, DEFAULT_SESSIONS, GENERATOR_PARAMS } from './generators.js';
export { detectQuantisation, spreadBuckets, type Quantisation, type SpreadMode } from './common.js';
export { parseAzureTimestamp } from './azure.js';

/** Every workload type loadWorkload accepts. */
export const WORKLOAD_TYPES: readonly string[] = ['mooncake', 'azure', ...GENERATOR_NAMES];

/**
 * Builds the workload a spec names. Throws WorkloadError (message naming the problem) for an
 * unknown type, a missing or malformed file, an unknown or bad parameter, or bad options.
 *
 * Options apply to every type: timeWindow [start, end) s selects by source time (original
 * timestamps for traces) and re-bases to the window start; rateScale divides arrival times;
 * rps sets a generator's rate (overriding the spec's rps=) or rescales a trace to that mean
 * rate (not together with rateScale); maxRequests keeps the first N by arrival.
 */
export function loadWorkload(spec: string, opts: WorkloadOptions): Workload {
  checkOptions(opts);
  const s = spec.trim();
  if (s === '') throw new WorkloadError(`empty workload spec (types: ${WORKLOAD_TYPES.join(', ')})`);
  const colon = s.indexOf(':');
  const type = colon < 0 ? s : s.slice(0, colon);
  const rest = colon < 0 ? '' : s.slice(colon + 1);
  switch (type) {
    case 'mooncake':
      return loadMooncake(parseTraceSpec(type, rest), opts);
    case 'azure':
      return loadAzure(parseTraceSpec(type, rest), opts);
    default:
      if (GENERATOR_NAMES.includes(type)) return loadGenerator(type, rest, opts);
      throw new WorkloadError(`unknown workload type "${type}" in spec "${spec}" (types: ${WORKLOAD_TYPES.join(', ')})`);
  }
}
