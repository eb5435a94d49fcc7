/** A workload spec or option that cannot be honoured; the message names the problem. */
export class WorkloadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'WorkloadError';
  }
}

/** Options every workload source accepts (see loadWorkload). */
export interface WorkloadOptions {
  /** Seed for every random choice (arrivals, picks, random token content). */
  seed: number;
  /** Time compression: arrival times are divided by rateScale (2 = twice the rate). */
  rateScale?: number;
  /** Generators: the arrival rate (overrides the spec's rps=). Traces: rescale to this mean rate. */
  rps?: number;
  /** [start, end) in seconds of the source's own time; arrivals are re-based to start at 0. */
  timeWindow?: [number, number];
  /** Keep only the first maxRequests requests (after the time window). */
  maxRequests?: number;
}

export type ParamKind = 'int' | 'posint' | 'number' | 'posnumber' | 'string';

export interface ParamDef {
  kind: ParamKind;
  /** Default; undefined = not set unless given. */
  def?: number | string;
  /** Allowed values for kind 'string'. */
  choices?: readonly string[];
}

export type ParamValues = Record<string, number | string | undefined>;

/**
 * Parses `key=value,key=value` against the definitions. Unknown keys, duplicates, missing '='
 * and bad values are errors that name the workload, the key and the accepted form.
 */
export function parseParams(workload: string, text: string, defs: Record<string, ParamDef>): ParamValues {
  const out: ParamValues = {};
  for (const [k, d] of Object.entries(defs)) out[k] = d.def;
  const seen = new Set<string>();
  const trimmed = text.trim();
  if (trimmed === '') return out;
  for (const part of trimmed.split(',')) {
    const item = part.trim();
    if (item === '') throw new WorkloadError(`${workload}: empty parameter in "${text}" (expected key=value,key=value)`);
    const eq = item.indexOf('=');
    if (eq <= 0) throw new WorkloadError(`${workload}: parameter "${item}" is not key=value`);
    const key = item.slice(0, eq).trim();
    const raw = item.slice(eq + 1).trim();
    const def = defs[key];
    if (!def) {
      throw new WorkloadError(`${workload}: unknown parameter "${key}" (known: ${Object.keys(defs).join(', ')})`);
    }
    if (seen.has(key)) throw new WorkloadError(`${workload}: parameter "${key}" is given twice`);
    seen.add(key);
    out[key] = parseValue(workload, key, raw, def);
  }
  return out;
}

function parseValue(workload: string, key: string, raw: string, def: ParamDef): number | string {
  if (def.kind === 'string') {
    if (def.choices && !def.choices.includes(raw)) {
      throw new WorkloadError(`${workload}: parameter "${key}" must be one of ${def.choices.join(', ')} (got "${raw}")`);
    }
    return raw;
  }
  const v = raw === '' ? NaN : Number(raw);
  const what =
    def.kind === 'int'
      ? 'a non-negative integer'
      : def.kind === 'posint'
        ? 'a positive integer'
        : def.kind === 'number'
          ? 'a non-negative number'
          : 'a positive number';
  const ok =
    Number.isFinite(v) &&
    (def.kind === 'int'
      ? Number.isSafeInteger(v) && v >= 0
      : def.kind === 'posint'
        ? Number.isSafeInteger(v) && v > 0
        : def.kind === 'number'
          ? v >= 0
          : v > 0);
  if (!ok) throw new WorkloadError(`${workload}: parameter "${key}" must be ${what} (got "${raw}")`);
  return v;
}

/** Checks the common options; throws WorkloadError naming the bad one. */
export function checkOptions(opts: WorkloadOptions): void {
  if (!Number.isInteger(opts.seed)) throw new WorkloadError(`seed must be an integer (got ${String(opts.seed)})`);
  if (opts.rateScale !== undefined && !(Number.isFinite(opts.rateScale) && opts.rateScale > 0)) {
    throw new WorkloadError(`rateScale must be a positive number (got ${String(opts.rateScale)})`);
  }
  if (opts.rps !== undefined && !(Number.isFinite(opts.rps) && opts.rps > 0)) {
    throw new WorkloadError(`rps must be a positive number (got ${String(opts.rps)})`);
  }
  if (opts.maxRequests !== undefined && !(Number.isSafeInteger(opts.maxRequests) && opts.maxRequests > 0)) {
    throw new WorkloadError(`maxRequests must be a positive integer (got ${String(opts.maxRequests)})`);
  }
  if (opts.timeWindow !== undefined) {
    const w = opts.timeWindow;
    if (!Array.isArray(w) || w.length !== 2 || !w.every((x) => Number.isFinite(x)) || w[0] < 0 || w[1] <= w[0]) {
      throw new WorkloadError(`timeWindow must be [start, end) seconds with 0 <= start < end (got ${JSON.stringify(w)})`);
    }
  }
}
