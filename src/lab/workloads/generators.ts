import { SeededRng } from '../../core/rng.js';
import type { Workload } from '../workload.js';
import { finalize, fmt, type Entry, type TokenSource } from './common.js';
import { SegmentCache } from './request.js';
import { parseParams, WorkloadError, type ParamDef, type ParamValues, type WorkloadOptions } from './spec.js';
import { saltFromSeed } from './tokens.js';

/** Default arrival rate of the generators (requests per second). */
export const DEFAULT_RPS = 10;
/** Default request count of the generators when neither n nor duration is given. */
export const DEFAULT_N = 1000;
/** Refuse to generate more than this many requests (a typo guard). */
const MAX_GENERATED = 5_000_000;

const COMMON: Record<string, ParamDef> = {
  rps: { kind: 'posnumber' },
  n: { kind: 'posint' },
  duration: { kind: 'posnumber' },
};

export const GENERATOR_PARAMS: Record<string, Record<string, ParamDef>> = {
  'shared-prefix': {
    groups: { kind: 'posint', def: 8 },
    system: { kind: 'posint', def: 2000 },
    users: { kind: 'posint', def: 16 },
    question: { kind: 'posint', def: 200 },
    output: { kind: 'posint', def: 100 },
    order: { kind: 'string', def: 'shuffle', choices: ['shuffle', 'random', 'rr'] },
    fresh: { kind: 'string', def: '0', choices: ['0', '1'] },
    ...COMMON,
  },
  'multi-turn': {
    sessions: { kind: 'posint' },
    turns: { kind: 'posint', def: 5 },
    system: { kind: 'int', def: 1000 },
    user: { kind: 'posint', def: 100 },
    answer: { kind: 'posint', def: 100 },
    think: { kind: 'number', def: 10 },
    ...COMMON,
  },
  'toolbench-like': {
    tools: { kind: 'posint', def: 100 },
    zipf: { kind: 'number', def: 1.1 },
    tool: { kind: 'posint', def: 1835 },
    query: { kind: 'posint', def: 320 },
    output: { kind: 'posint', def: 64 },
    ...COMMON,
  },
  random: {
    input: { kind: 'posint', def: 1000 },
    output: { kind: 'posint', def: 100 },
    ...COMMON,
  },
};

/** Default number of multi-turn sessions when neither sessions, n nor duration is given. */
export const DEFAULT_SESSIONS = 32;

interface Resolved {
  p: ParamValues;
  rps: number;
  /** Request cap (undefined = until duration). */
  n: number | undefined;
  /** ms; Infinity when not given. */
  durationMs: number;
  notes: string[];
}

function resolveCommon(type: string, p: ParamValues, opts: WorkloadOptions, defaultN: number | undefined): Resolved {
  const notes: string[] = [];
  let rps = (p['rps'] as number | undefined) ?? DEFAULT_RPS;
  if (opts.rps !== undefined) {
    if (p['rps'] !== undefined && p['rps'] !== opts.rps) notes.push(`rps ${fmt(opts.rps)} from the options overrides the spec's rps=${fmt(p['rps'] as number)}`);
    rps = opts.rps;
  }
  const duration = p['duration'] as number | undefined;
  let n = p['n'] as number | undefined;
  if (n === undefined && duration === undefined) n = defaultN;
  const durationMs = duration === undefined ? Infinity : duration * 1000;
  if (n === undefined && Number.isFinite(durationMs) && durationMs * (rps / 1000) > MAX_GENERATED) {
    throw new WorkloadError(`${type}: duration=${fmt(duration!)} at rps=${fmt(rps)} would generate over ${MAX_GENERATED} requests`);
  }
  if (n !== undefined && n > MAX_GENERATED) throw new WorkloadError(`${type}: n=${n} is above the limit of ${MAX_GENERATED}`);
  return { p, rps, n, durationMs, notes };
}

function label(type: string, p: ParamValues, r: Resolved, seed: number): string {
  const parts: string[] = [];
  for (const [k, v] of Object.entries(p)) {
    if (k === 'rps' || k === 'n' || k === 'duration' || v === undefined) continue;
    parts.push(`${k}=${typeof v === 'number' ? fmt(v) : v}`);
  }
  parts.push(`rps=${fmt(r.rps)}`);
  if (r.n !== undefined) parts.push(`n=${r.n}`);
  if (Number.isFinite(r.durationMs)) parts.push(`duration=${fmt(r.durationMs / 1000)}`);
  parts.push(`seed=${seed}`);
  return `${type}:${parts.join(',')}`;
}

/** Poisson arrival times (ms) at `rps`, until n requests or durationMs, whichever is first. */
function poisson(rng: SeededRng, rps: number, n: number | undefined, durationMs: number): number[] {
  const out: number[] = [];
  let t = 0;
  for (;;) {
    t += (-Math.log(1 - rng.next()) / rps) * 1000;
    if (t >= durationMs || (n !== undefined && out.length >= n)) break;
    out.push(t);
  }
  return out;
}

function cachedSource(seed: number): TokenSource {
  const salt = saltFromSeed(seed, 2);
  return { salt, cache: new SegmentCache(salt) };
}

/** Allocates segment keys 0, 1, 2, ... so that no two segments of a workload share a first token. */
class Keys {
  private next = 0;
  take(): number {
    return this.next++;
  }
}

/**
 * shared-prefix (SGLang generated-shared-prefix, llm-d / inference-perf shared_prefix):
 * `groups` system prompts of `system` tokens; each group has `users` users with a question of
 * `question` tokens; prompt = group's system prompt + the user's question.
 * - order=shuffle (default): requests go round by round, each round a seeded shuffle of all
 *   groups × users pairs (every user asks once per round; one round is SGLang's benchmark);
 *   order=random: group and user uniform with replacement; order=rr: request i → group
 *   i mod groups, user (i div groups) mod users.
 * - fresh=0 (default): a user's question is the same every time (a repeat hits the whole prompt);
 *   fresh=1: every request has a new question (only the system prompt is ever shared).
 * Default n = groups × users (one round).
 */
function sharedPrefix(p: ParamValues, opts: WorkloadOptions): Workload {
  const type = 'shared-prefix';
  const groups = p['groups'] as number;
  const users = p['users'] as number;
  const system = p['system'] as number;
  const question = p['question'] as number;
  const output = p['output'] as number;
  const order = p['order'] as string;
  const fresh = p['fresh'] === '1';
  const r = resolveCommon(type, p, opts, groups * users);
  const rng = new SeededRng(opts.seed);
  const arrivals = poisson(rng, r.rps, r.n, r.durationMs);
  const source = cachedSource(opts.seed);
  const keys = new Keys();
  const sysKeys = Array.from({ length: groups }, () => keys.take());
  const userKeys = fresh ? [] : Array.from({ length: groups * users }, () => keys.take());
  const pick = new SeededRng(opts.seed ^ 0x2545f491);
  const round = Array.from({ length: groups * users }, (_, k) => k);
  let inRound = round.length;
  const entries: Entry[] = arrivals.map((t, i) => {
    let pair: number;
    if (order === 'rr') pair = (i % groups) * users + (Math.floor(i / groups) % users);
    else if (order === 'random') pair = pick.int(groups) * users + pick.int(users);
    else {
      if (inRound === round.length) {
        for (let k = round.length - 1; k > 0; k--) {
          const j = pick.int(k + 1);
          [round[k], round[j]] = [round[j]!, round[k]!];
        }
        inRound = 0;
      }
      pair = round[inRound++]!;
    }
    const g = Math.floor(pair / users);
    const u = pair % users;
    return {
      windowMs: t,
      arrivalMs: t,
      outputTokens: output,
      keys: [sysKeys[g]!, fresh ? keys.take() : userKeys[pair]!],
      lens: [system, question],
      source,
      group: `g${g}/u${u}`,
    };
  });
  r.notes.unshift(
    `shared-prefix: ${groups} groups × ${users} users, system prompt ${system} + question ${question} tokens (${fresh ? 'fresh per request' : 'fixed per user'}), order=${order}, Poisson arrivals at ${fmt(r.rps)} req/s`,
  );
  return finalize(label(type, p, r, opts.seed), entries, opts, r.notes, { trace: false });
}

/**
 * multi-turn (production-stack multi-round-qa, AIBrix synthetic_multiturn): sessions of `turns`
 * turns. Turn k's prompt = system + (user_i + answer_i for i < k) + user_k, so it extends turn
 * k−1's prompt by that turn's answer and a new user message; outputTokens = answer. The system
 * prompt (`system` tokens, 0 for none) is shared by all sessions. Session starts are Poisson
 * at rps / turns (long-run request rate ≈ rps); turn k arrives think × k seconds after the
 * session start. Open loop: turns do not wait for the previous answer, and the answer tokens in
 * later prompts are synthetic (not the ids the simulated engine generates).
 * Sessions: `sessions`, else ceil(n / turns), else until duration, else 32. Requests are cut to
 * the first n by arrival and to arrivals < duration.
 */
function multiTurn(p: ParamValues, opts: WorkloadOptions): Workload {
  const type = 'multi-turn';
  const turns = p['turns'] as number;
  const system = p['system'] as number;
  const user = p['user'] as number;
  const answer = p['answer'] as number;
  const thinkMs = (p['think'] as number) * 1000;
  let sessions = p['sessions'] as number | undefined;
  const r = resolveCommon(type, p, opts, undefined);
  if (sessions === undefined) {
    if (p['n'] !== undefined) sessions = Math.ceil((p['n'] as number) / turns);
    else if (!Number.isFinite(r.durationMs)) sessions = DEFAULT_SESSIONS;
  }
  if (sessions !== undefined && sessions * turns > MAX_GENERATED) {
    throw new WorkloadError(`${type}: sessions × turns = ${sessions * turns} is above the limit of ${MAX_GENERATED}`);
  }
  const rng = new SeededRng(opts.seed);
  const starts = poisson(rng, r.rps / turns, sessions, r.durationMs);
  const source = cachedSource(opts.seed);
  const keys = new Keys();
  const sysKey = keys.take();
  const entries: Entry[] = [];
  starts.forEach((t0, s) => {
    const segKeys: number[] = system > 0 ? [sysKey] : [];
    const segLens: number[] = system > 0 ? [system] : [];
    for (let k = 0; k < turns; k++) {
      const t = t0 + k * thinkMs;
      segKeys.push(keys.take());
      segLens.push(user);
      if (t < r.durationMs) {
        entries.push({ windowMs: t, arrivalMs: t, outputTokens: answer, keys: segKeys.slice(), lens: segLens.slice(), source, group: `s${s}` });
      }
      segKeys.push(keys.take());
      segLens.push(answer);
    }
  });
  entries.sort((a, b) => a.arrivalMs - b.arrivalMs);
  if (r.n !== undefined && entries.length > r.n) entries.length = r.n;
  r.notes.unshift(
    `multi-turn: ${starts.length} sessions × ${turns} turns, system ${system} (shared), user ${user}, answer ${answer} tokens, think ${fmt(thinkMs / 1000)} s after the previous turn's arrival (open loop), session starts Poisson at ${fmt(r.rps / turns)}/s`,
  );
  return finalize(label(type, { ...p, sessions: sessions ?? p['sessions'] }, r, opts.seed), entries, opts, r.notes, { trace: false });
}

/**
 * toolbench-like (Preble's ToolBench setting): `tools` tool prefixes of `tool` tokens with
 * Zipf(`zipf`) popularity — tool of rank r (1-based, tool id r−1) is picked with probability
 * ∝ r^−zipf — followed by a fresh query of `query` tokens. Defaults give Preble's ToolBench
 * mean prompt of ~2.1k tokens with a shared proportion of 0.85.
 */
function toolbenchLike(p: ParamValues, opts: WorkloadOptions): Workload {
  const type = 'toolbench-like';
  const tools = p['tools'] as number;
  const s = p['zipf'] as number;
  const tool = p['tool'] as number;
  const query = p['query'] as number;
  const output = p['output'] as number;
  const r = resolveCommon(type, p, opts, DEFAULT_N);
  const rng = new SeededRng(opts.seed);
  const arrivals = poisson(rng, r.rps, r.n, r.durationMs);
  const cdf = new Float64Array(tools);
  let acc = 0;
  for (let k = 0; k < tools; k++) cdf[k] = acc += Math.pow(k + 1, -s);
  for (let k = 0; k < tools; k++) cdf[k]! /= acc;
  const source = cachedSource(opts.seed);
  const keys = new Keys();
  const toolKeys = Array.from({ length: tools }, () => keys.take());
  const pick = new SeededRng(opts.seed ^ 0x2545f491);
  const entries: Entry[] = arrivals.map((t) => {
    const u = pick.next();
    let lo = 0;
    let hi = tools - 1;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (cdf[mid]! > u) hi = mid;
      else lo = mid + 1;
    }
    return { windowMs: t, arrivalMs: t, outputTokens: output, keys: [toolKeys[lo]!, keys.take()], lens: [tool, query], source, group: `tool${lo}` };
  });
  r.notes.unshift(
    `toolbench-like: ${tools} tools of ${tool} tokens, Zipf(${fmt(s)}) popularity, fresh ${query}-token queries, Poisson arrivals at ${fmt(r.rps)} req/s`,
  );
  return finalize(label(type, p, r, opts.seed), entries, opts, r.notes, { trace: false });
}

/** random: unique prompts of `input` tokens (nothing shared), Poisson arrivals. */
function random(p: ParamValues, opts: WorkloadOptions): Workload {
  const type = 'random';
  const input = p['input'] as number;
  const output = p['output'] as number;
  const r = resolveCommon(type, p, opts, DEFAULT_N);
  const rng = new SeededRng(opts.seed);
  const arrivals = poisson(rng, r.rps, r.n, r.durationMs);
  const source: TokenSource = { salt: saltFromSeed(opts.seed, 2) }; // unique segments: no cache
  const entries: Entry[] = arrivals.map((t, i) => ({ windowMs: t, arrivalMs: t, outputTokens: output, keys: [i], lens: [input], source }));
  r.notes.unshift(`random: unique ${input}-token prompts (no sharing), Poisson arrivals at ${fmt(r.rps)} req/s`);
  return finalize(label(type, p, r, opts.seed), entries, opts, r.notes, { trace: false });
}

const GENERATORS: Record<string, (p: ParamValues, opts: WorkloadOptions) => Workload> = {
  'shared-prefix': sharedPrefix,
  'multi-turn': multiTurn,
  'toolbench-like': toolbenchLike,
  random,
};

export const GENERATOR_NAMES = Object.keys(GENERATORS);

export function loadGenerator(type: string, params: string, opts: WorkloadOptions): Workload {
  const defs = GENERATOR_PARAMS[type];
  const gen = GENERATORS[type];
  if (!defs || !gen) throw new WorkloadError(`unknown workload type "${type}"`);
  return gen(parseParams(type, params, defs), opts);
}
