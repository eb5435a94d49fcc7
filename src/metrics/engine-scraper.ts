import type { Logger } from 'pino';
import { Agent, request } from 'undici';
import type { WorkerTlsOptions } from '../core/tls.js';
import { systemClock, type Clock } from '../core/clock.js';
import type { WorkerRegistry } from '../core/registry.js';

/**
 * Polls every registered engine's Prometheus `/metrics` and writes what it reports into
 * `worker.engineLoad` ({running, waiting, kvUsage, updatedAtMs}), for load policies such as
 * least_kv_cache and least_waiting.
 *
 * Metrics read (first name present in the scrape wins, per field):
 *   running  vllm:num_requests_running   | sglang:num_running_reqs
 *   waiting  vllm:num_requests_waiting   | sglang:num_queue_reqs
 *   kvUsage  vllm:kv_cache_usage_perc    | vllm:gpu_cache_usage_perc (deprecated) | sglang:token_usage
 *
 * Data-parallel ranks: vLLM labels each engine core's series `engine="<rank>"`; SGLang adds
 * `dp_rank="<rank>"` to its scheduler metrics when it runs data parallel (its labels are
 * model_name, engine_type, tp_rank, pp_rank, moe_ep_rank, and dp_rank only with DP). The rank
 * of a series is its `engine` label, else its `dp_rank` label, else none. Several series of one
 * rank (other labels differ, e.g. one per tp_rank or pp_rank reporting the same scheduler) are
 * folded with max: they describe the same queue, so adding them would double count.
 *
 * Per worker of the scraped URL:
 *  - worker with `dpRank` r: the series of rank r. If the engine reports ranked series but none
 *    for r, the worker is not updated (its engineLoad goes stale). If it reports no rank
 *    label at all, the worker gets the engine-wide values (every rank of the URL sees the same).
 *  - worker without `dpRank`: running and waiting summed over the ranks, kvUsage averaged over
 *    them (each rank has its own KV pool of the same size, so the mean is the URL's overall
 *    usage); unranked series when the engine reports no rank label.
 *  - a field whose metric is absent is 0. A scrape with none of the three fields fails.
 *
 * `updatedAtMs` is `clock.now()` of the injected clock: give the load policies the same clock
 * (systemClock in the server) so their staleness check compares like with like. A failed
 * scrape (refused, timeout, non-200, unparsable) leaves engineLoad as it was, so it goes stale.
 *
 * The polling timer is unref'd and never keeps the process alive; a round is skipped while the
 * previous one is still running. The lab and tests call `scrapeOnce()` directly.
 */

export interface EngineScraperOptions {
  /** Poll period (ms). Default 1000. */
  intervalMs?: number;
  /** Per-request timeout (ms). Default min(intervalMs, 2000). */
  timeoutMs?: number;
  /** Stamps `engineLoad.updatedAtMs`. Default systemClock (the policies' clock in the server). */
  clock?: Clock;
  /** TLS to https:// workers (--ca-cert-paths, client certificate). */
  tls?: WorkerTlsOptions;
  /** Largest /metrics body accepted (bytes). Default 16 MiB. */
  maxBodyBytes?: number;
}

export interface PromSample {
  name: string;
  labels: Record<string, string>;
  value: number;
  /** Optional sample timestamp (ms since epoch), as written. */
  timestampMs?: number;
}

export interface RankLoad {
  running: number;
  waiting: number;
  kvUsage: number;
}

export interface EngineLoadSnapshot {
  /** Per rank label value (the `engine` or `dp_rank` label). */
  ranks: Map<string, RankLoad>;
  /** Series without a rank label; undefined when there were none. */
  unranked: RankLoad | undefined;
}

export const RUNNING_METRICS = ['vllm:num_requests_running', 'sglang:num_running_reqs'] as const;
export const WAITING_METRICS = ['vllm:num_requests_waiting', 'sglang:num_queue_reqs'] as const;
export const KV_USAGE_METRICS = ['vllm:kv_cache_usage_perc', 'vllm:gpu_cache_usage_perc', 'sglang:token_usage'] as const;
export const RANK_LABELS = ['engine', 'dp_rank'] as const;

// ---------------------------------------------------------------------------------------------
// Prometheus text format parser
// ---------------------------------------------------------------------------------------------

const NAME_START = /[a-zA-Z_:]/;
const NAME_CHAR = /[a-zA-Z0-9_:]/;
const LABEL_START = /[a-zA-Z_]/;
const LABEL_CHAR = /[a-zA-Z0-9_]/;

class LineError extends Error {}

/** Parses a float as Prometheus writes it: decimal/scientific, NaN, +Inf, -Inf (any case). */
export function parsePromValue(tok: string): number | undefined {
  if (tok.length === 0) return undefined;
  const lower = tok.toLowerCase();
  if (lower === 'nan' || lower === '+nan' || lower === '-nan') return NaN;
  if (lower === '+inf' || lower === 'inf' || lower === '+infinity' || lower === 'infinity') return Infinity;
  if (lower === '-inf' || lower === '-infinity') return -Infinity;
  if (!/^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(tok)) return undefined;
  return Number(tok);
}

/**
 * Parses Prometheus text exposition format (0.0.4; also the OpenMetrics subset that matters
 * here): `name{label="value",...} value [timestamp]`, with label values escaped as \\, \" and
 * \n, `# HELP`/`# TYPE`/comment and blank lines skipped, CRLF tolerated, OpenMetrics exemplars
 * (` # {...} v`) and `# EOF` ignored, and Prometheus 3 quoted names (`{"my.metric",a="b"} 1`).
 * Malformed lines are skipped (reported to `onInvalid` when given); they never fail the parse.
 */
export function parsePrometheusText(text: string, onInvalid?: (line: string, reason: string) => void): PromSample[] {
  const out: PromSample[] = [];
  let start = 0;
  while (start <= text.length) {
    let end = text.indexOf('\n', start);
    if (end < 0) end = text.length;
    let line = text.slice(start, end);
    start = end + 1;
    if (line.endsWith('\r')) line = line.slice(0, -1);
    const trimmed = line.trim();
    if (trimmed.length === 0 || trimmed.startsWith('#')) continue;
    try {
      out.push(parseLine(trimmed));
    } catch (e) {
      if (e instanceof LineError) onInvalid?.(line, e.message);
      else throw e;
    }
  }
  return out;
}

function parseLine(s: string): PromSample {
  let i = 0;
  const n = s.length;
  let name = '';
  const labels: Record<string, string> = {};

  const skipWs = (): void => {
    while (i < n && (s[i] === ' ' || s[i] === '\t')) i++;
  };
  const readIdent = (startRe: RegExp, charRe: RegExp, what: string): string => {
    if (i >= n || !startRe.test(s[i])) throw new LineError(`expected ${what} at column ${i}`);
    const from = i;
    i++;
    while (i < n && charRe.test(s[i])) i++;
    return s.slice(from, i);
  };
  const readQuoted = (): string => {
    if (s[i] !== '"') throw new LineError(`expected '"' at column ${i}`);
    i++;
    let v = '';
    while (i < n) {
      const c = s[i];
      if (c === '"') {
        i++;
        return v;
      }
      if (c === '\\' && i + 1 < n) {
        const e = s[i + 1];
        v += e === 'n' ? '\n' : e === '\\' ? '\\' : e === '"' ? '"' : '\\' + e;
        i += 2;
        continue;
      }
      v += c;
      i++;
    }
    throw new LineError('unterminated quoted string');
  };

  if (s[0] !== '{') {
    name = readIdent(NAME_START, NAME_CHAR, 'a metric name');
    const afterName = i;
    skipWs(); // `name {labels}` is accepted, as Prometheus' own parser does
    if (s[i] !== '{') i = afterName;
  }
  if (i < n && s[i] === '{') {
    i++;
    let first = true;
    for (;;) {
      skipWs();
      if (i >= n) throw new LineError('unterminated label set');
      if (s[i] === '}') {
        i++;
        break;
      }
      let key: string;
      if (s[i] === '"') {
        key = readQuoted();
        skipWs();
        if (first && name === '' && (s[i] === ',' || s[i] === '}')) {
          // Prometheus 3 quoted metric name: {"name", labels...}
          name = key;
          first = false;
          if (s[i] === ',') i++;
          continue;
        }
      } else {
        key = readIdent(LABEL_START, LABEL_CHAR, 'a label name');
        skipWs();
      }
      if (s[i] !== '=') throw new LineError(`expected '=' after label '${key}'`);
      i++;
      skipWs();
      labels[key] = readQuoted();
      first = false;
      skipWs();
      if (s[i] === ',') {
        i++;
        continue;
      }
      if (s[i] === '}') {
        i++;
        break;
      }
      throw new LineError(`expected ',' or '}' at column ${i}`);
    }
  }
  if (name === '') throw new LineError('missing metric name');
  if (i >= n || (s[i] !== ' ' && s[i] !== '\t')) throw new LineError('expected whitespace before the value');
  skipWs();
  // Drop an OpenMetrics exemplar (" # {...} value").
  let rest = s.slice(i);
  const hash = rest.indexOf(' #');
  if (hash >= 0) rest = rest.slice(0, hash);
  const parts = rest.trim().split(/[ \t]+/);
  if (parts.length === 0 || parts[0] === '') throw new LineError('missing value');
  if (parts.length > 2) throw new LineError('trailing garbage after the value');
  const value = parsePromValue(parts[0]);
  if (value === undefined) throw new LineError(`invalid value '${parts[0]}'`);
  const sample: PromSample = { name, labels, value };
  if (parts.length === 2) {
    const ts = Number(parts[1]);
    if (!Number.isFinite(ts)) throw new LineError(`invalid timestamp '${parts[1]}'`);
    sample.timestampMs = ts;
  }
  return sample;
}

// ---------------------------------------------------------------------------------------------
// From samples to per-rank engine load
// ---------------------------------------------------------------------------------------------

/** Folds vLLM/SGLang load gauges into per-rank loads (see the module comment for the rules). */
export function engineLoadsFromSamples(samples: readonly PromSample[]): EngineLoadSnapshot {
  const fields = [
    { key: 'running', names: RUNNING_METRICS as readonly string[] },
    { key: 'waiting', names: WAITING_METRICS as readonly string[] },
    { key: 'kvUsage', names: KV_USAGE_METRICS as readonly string[] },
  ] as const;
  // Index usable samples by name.
  const byName = new Map<string, PromSample[]>();
  for (const s of samples) {
    if (!Number.isFinite(s.value)) continue;
    let list = byName.get(s.name);
    if (!list) {
      list = [];
      byName.set(s.name, list);
    }
    list.push(s);
  }
  const perRank = new Map<string, RankLoad>(); // '' = unranked
  for (const f of fields) {
    const name = f.names.find((nm) => byName.has(nm));
    if (name === undefined) continue;
    const seen = new Set<string>();
    for (const s of byName.get(name)!) {
      const rank = rankOf(s.labels);
      let load = perRank.get(rank);
      if (!load) {
        load = { running: 0, waiting: 0, kvUsage: 0 };
        perRank.set(rank, load);
      }
      load[f.key] = seen.has(rank) ? Math.max(load[f.key], s.value) : s.value;
      seen.add(rank);
    }
  }
  const unranked = perRank.get('');
  perRank.delete('');
  return { ranks: perRank, unranked };
}

function rankOf(labels: Record<string, string>): string {
  for (const l of RANK_LABELS) {
    const v = labels[l];
    if (v !== undefined && v !== '') return v;
  }
  return '';
}

/** The load a worker of the scraped URL gets (undefined: nothing for it in this scrape). */
export function loadForWorker(snap: EngineLoadSnapshot, dpRank: number | undefined): RankLoad | undefined {
  if (snap.ranks.size === 0) return snap.unranked && { ...snap.unranked };
  if (dpRank !== undefined) {
    const r = snap.ranks.get(String(dpRank));
    return r && { ...r };
  }
  const sum: RankLoad = { running: 0, waiting: 0, kvUsage: 0 };
  for (const r of snap.ranks.values()) {
    sum.running += r.running;
    sum.waiting += r.waiting;
    sum.kvUsage += r.kvUsage;
  }
  sum.kvUsage /= snap.ranks.size;
  return sum;
}

// ---------------------------------------------------------------------------------------------
// The scraper
// ---------------------------------------------------------------------------------------------

export interface ScrapeRoundResult {
  urls: number;
  failed: number;
  /** Workers whose engineLoad was written. */
  updated: number;
}

export class EngineMetricsScraper {
  readonly intervalMs: number;
  readonly timeoutMs: number;
  readonly maxBodyBytes: number;
  private readonly clock: Clock;
  /** URL scrapes attempted (one per distinct worker URL per round). */
  scrapes = 0;
  /** URL scrapes that failed. */
  failures = 0;
  /** Completed rounds. */
  rounds = 0;
  /** Last error per URL currently failing. */
  readonly lastErrors = new Map<string, string>();
  private agent: Agent | undefined;
  private readonly tls: WorkerTlsOptions | undefined;
  private timer: NodeJS.Timeout | undefined;
  private current: Promise<unknown> | undefined;
  private abort = new AbortController();

  constructor(
    private readonly registry: WorkerRegistry,
    options: EngineScraperOptions = {},
    private readonly log?: Logger,
  ) {
    this.tls = options.tls;
    this.intervalMs = options.intervalMs ?? 1000;
    if (!(this.intervalMs > 0) || !Number.isFinite(this.intervalMs)) throw new RangeError(`intervalMs must be a finite number > 0 (got ${this.intervalMs})`);
    this.timeoutMs = options.timeoutMs ?? Math.min(this.intervalMs, 2000);
    if (!(this.timeoutMs > 0) || !Number.isFinite(this.timeoutMs)) throw new RangeError(`timeoutMs must be a finite number > 0 (got ${this.timeoutMs})`);
    this.maxBodyBytes = options.maxBodyBytes ?? 16 * 1024 * 1024;
    this.clock = options.clock ?? systemClock;
  }

  get running(): boolean {
    return this.timer !== undefined;
  }

  /** Scrapes now, then every intervalMs (unref'd timer). No-op if already started. */
  start(): void {
    if (this.timer) return;
    if (this.abort.signal.aborted) this.abort = new AbortController();
    this.timer = setInterval(() => this.tick(), this.intervalMs);
    this.timer.unref();
    this.tick();
  }

  /** Stops the timer, aborts a scrape in flight and closes the connections. */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.abort.abort();
    await this.current?.catch(() => {});
    const agent = this.agent;
    this.agent = undefined;
    await agent?.destroy();
  }

  /** One round: every distinct worker URL of the registry, in parallel. */
  async scrapeOnce(): Promise<ScrapeRoundResult> {
    if (this.abort.signal.aborted && !this.timer) this.abort = new AbortController();
    const agent = (this.agent ??= new Agent({ keepAliveTimeout: 30_000, connections: 2, ...(this.tls ? { connect: { ...this.tls } } : {}) }));
    const urls = [...new Set(this.registry.all().map((w) => w.url))];
    const results = await Promise.all(urls.map((u) => this.scrapeUrl(u, agent)));
    this.rounds++;
    let failed = 0;
    let updated = 0;
    for (const r of results) {
      if (r < 0) failed++;
      else updated += r;
    }
    return { urls: urls.length, failed, updated };
  }

  private tick(): void {
    if (this.current) return; // previous round still running
    const round = this.scrapeOnce().catch((e: Error) => this.log?.error({ err: e }, 'engine metrics round failed'));
    this.current = round;
    void round.finally(() => {
      if (this.current === round) this.current = undefined;
    });
  }

  /** Returns the number of workers updated, or -1 on failure. */
  private async scrapeUrl(url: string, agent: Agent): Promise<number> {
    this.scrapes++;
    try {
      const text = await this.fetchMetrics(url, agent);
      const snap = engineLoadsFromSamples(parsePrometheusText(text));
      if (snap.ranks.size === 0 && !snap.unranked) throw new Error('no vLLM or SGLang load metrics in /metrics');
      const now = this.clock.now();
      let updated = 0;
      for (const w of this.registry.byUrl(url)) {
        const load = loadForWorker(snap, w.dpRank);
        if (!load) continue;
        w.engineLoad = { ...load, updatedAtMs: now };
        updated++;
      }
      if (this.lastErrors.delete(url)) this.log?.info({ url }, 'engine metrics scrape recovered');
      return updated;
    } catch (e) {
      // Stopped while this scrape ran (shutdown): nothing is wrong with the worker.
      if (this.abort.signal.aborted) return -1;
      this.failures++;
      const err = e as Error;
      const why = err.name === 'TimeoutError' ? `timed out after ${this.timeoutMs} ms` : err.message;
      if (!this.lastErrors.has(url)) this.log?.warn({ url, reason: why }, 'engine metrics scrape failed');
      this.lastErrors.set(url, why);
      return -1;
    }
  }

  private async fetchMetrics(url: string, agent: Agent): Promise<string> {
    const signal = AbortSignal.any([AbortSignal.timeout(this.timeoutMs), this.abort.signal]);
    const res = await request(url + '/metrics', {
      method: 'GET',
      dispatcher: agent,
      headers: { accept: 'text/plain;version=0.0.4;q=1,*/*;q=0.1' },
      signal,
    });
    if (res.statusCode !== 200) {
      await res.body.dump();
      throw new Error(`/metrics answered ${res.statusCode}`);
    }
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of res.body) {
      const buf = chunk as Buffer;
      size += buf.length;
      if (size > this.maxBodyBytes) {
        res.body.destroy();
        throw new Error(`/metrics body exceeds ${this.maxBodyBytes} bytes`);
      }
      chunks.push(buf);
    }
    return Buffer.concat(chunks, size).toString('utf8');
  }
}
