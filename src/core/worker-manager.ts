import { Agent, request } from 'undici';
import type { WorkerTlsOptions } from './tls.js';
import type { Logger } from 'pino';
import { CircuitBreaker, type BreakerConfig, type BreakerState } from './circuit-breaker.js';
import type { Clock } from './clock.js';
import { WorkerRegistry } from './registry.js';
import { Worker, normalizeUrl, type WorkerSpec } from './worker.js';

export interface HealthConfig {
  intervalSecs: number;
  timeoutSecs: number;
  failureThreshold: number;
  successThreshold: number;
  endpoint: string;
  /** A new worker may take this long to pass its first check before it is reported as failed. */
  startupTimeoutSecs: number;
  /** Seconds between checks of a worker not yet healthy once (--worker-startup-check-interval; default 1). */
  startupCheckIntervalSecs?: number;
}

export interface WorkerManagerOptions {
  health: HealthConfig;
  breaker: BreakerConfig;
  clock: Clock;
  onBreakerTransition?: (worker: Worker, from: BreakerState, to: BreakerState) => void;
  /** TLS to https:// workers (--ca-cert-paths, --client-cert-path/--client-key-path). */
  tls?: WorkerTlsOptions;
}

/** While a worker has never passed a check, it is polled at least this often. */
const STARTUP_POLL_MS = 1000;

interface UrlState {
  timer: NodeJS.Timeout | undefined;
  addedAtMs: number;
  startupReported: boolean;
  checking: boolean;
  /** Whether the model id was given by configuration (never overwritten by discovery). */
  modelFixed: boolean;
  /** True once the URL has passed one check since it was added. */
  everHealthy: boolean;
}

/**
 * Adds and removes workers and keeps their health. Health is per URL (all data-parallel ranks
 * of a URL share it): a worker becomes routable on its first passed check after being added,
 * then needs `failureThreshold` consecutive failures to be dropped and `successThreshold`
 * consecutive passes to come back, so one slow answer under load does not flap it.
 * Model ids are read from the worker's GET /v1/models unless configured.
 */
export class WorkerManager {
  private readonly states = new Map<string, UrlState>();
  private readonly agent: Agent;
  private closed = false;
  private readonly health: HealthConfig;

  constructor(
    readonly registry: WorkerRegistry,
    private readonly opts: WorkerManagerOptions,
    private readonly log: Logger,
  ) {
    this.health = opts.health;
    this.agent = new Agent({ keepAliveTimeout: 10_000, connections: 4, ...(opts.tls ? { connect: { ...opts.tls } } : {}) });
  }

  /** The dispatcher for admin fan-outs to workers (same TLS settings as health checks). */
  get dispatcher(): Agent {
    return this.agent;
  }

  /**
   * Registers a worker and runs its first health check; resolves after that check with the
   * registered workers: one, or with `dpAware` one per data-parallel rank (`url@rank`), the
   * rank count read from the worker's /get_server_info (`dp_size`) or else `dpSize`.
   */
  async add(spec: WorkerSpec & { dpAware?: boolean }): Promise<Worker[]> {
    const url = normalizeUrl(spec.url);
    if (this.registry.byUrl(url).length > 0) throw new Error(`worker '${url}' is already registered`);
    let ranks: Array<number | undefined> = [undefined];
    if (spec.dpAware) {
      const size = (await this.discoverDpSize(url, spec.apiKey)) ?? spec.dpSize ?? 1;
      ranks = Array.from({ length: size }, (_, r) => r);
    }
    const workers = ranks.map((rank) => {
      const worker = new Worker({ ...spec, url, dpRank: rank, dpSize: rank === undefined ? undefined : ranks.length });
      worker.breaker = new CircuitBreaker(this.opts.breaker, this.opts.clock, (from, to) => {
        this.log.warn({ worker: worker.id, from, to }, 'circuit breaker');
        this.opts.onBreakerTransition?.(worker, from, to);
      });
      return this.registry.add(worker);
    });
    const state: UrlState = { timer: undefined, addedAtMs: Date.now(), startupReported: false, checking: false, modelFixed: spec.modelId !== undefined, everHealthy: false };
    this.states.set(url, state);
    await this.check(url);
    this.schedule(url, state);
    return workers;
  }

  /** dp_size from SGLang's /get_server_info (or kvgate sim's); undefined if unavailable. */
  private async discoverDpSize(url: string, apiKey: string | undefined): Promise<number | undefined> {
    try {
      const res = await request(url + '/get_server_info', {
        method: 'GET',
        dispatcher: this.agent,
        headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {},
        signal: AbortSignal.timeout(this.health.timeoutSecs * 1000),
      });
      if (res.statusCode !== 200) {
        await res.body.dump();
        return undefined;
      }
      const info = (await res.body.json()) as { dp_size?: unknown };
      const n = Number(info.dp_size);
      return Number.isInteger(n) && n >= 1 ? n : undefined;
    } catch {
      return undefined;
    }
  }

  /** Next check: every interval once healthy, more often while a worker is still starting. */
  private schedule(url: string, state: UrlState): void {
    if (this.closed || this.states.get(url) !== state) return;
    const every = this.health.intervalSecs * 1000;
    const delay = state.everHealthy ? every : Math.min(every, this.health.startupCheckIntervalSecs !== undefined ? this.health.startupCheckIntervalSecs * 1000 : STARTUP_POLL_MS);
    state.timer = setTimeout(() => {
      void this.check(url).finally(() => this.schedule(url, state));
    }, delay);
    state.timer.unref();
  }

  /** Removes every worker (all ranks) of a URL. */
  remove(url: string): Worker[] {
    const norm = normalizeUrl(url);
    const state = this.states.get(norm);
    if (state?.timer) clearTimeout(state.timer);
    this.states.delete(norm);
    const removed: Worker[] = [];
    for (const w of this.registry.byUrl(norm)) {
      this.registry.remove(w.id);
      removed.push(w);
    }
    return removed;
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const s of this.states.values()) if (s.timer) clearTimeout(s.timer);
    this.states.clear();
    await this.agent.destroy();
  }

  /** One health check of a URL; updates every rank registered under it. */
  async check(url: string): Promise<void> {
    const state = this.states.get(url);
    if (!state || state.checking) return;
    state.checking = true;
    try {
      let ok = false;
      let why: string | undefined;
      try {
        const res = await request(url + this.health.endpoint, {
          method: 'GET',
          dispatcher: this.agent,
          headers: this.authHeaders(url),
          signal: AbortSignal.timeout(this.health.timeoutSecs * 1000),
        });
        await res.body.dump();
        ok = res.statusCode >= 200 && res.statusCode < 300;
        if (!ok) why = `health endpoint answered ${res.statusCode}`;
      } catch (e) {
        why = (e as Error).name === 'TimeoutError' ? `health check timed out after ${this.health.timeoutSecs} s` : (e as Error).message;
      }
      if (ok && !state.modelFixed) {
        const model = await this.discoverModel(url).catch((e: Error) => {
          why = `GET /v1/models failed: ${e.message}`;
          return undefined;
        });
        if (model === undefined) ok = false;
        else
          for (const w of this.registry.byUrl(url)) {
            this.registry.setModel(w, model.id);
            w.loraAdapters = model.adapters;
          }
      }
      if (this.states.get(url) !== state) return; // removed meanwhile
      this.record(url, state, ok, why);
    } finally {
      state.checking = false;
    }
  }

  private record(url: string, state: UrlState, ok: boolean, why: string | undefined): void {
    for (const w of this.registry.byUrl(url)) {
      if (ok) {
        w.consecutiveHealthSuccesses++;
        w.consecutiveHealthFailures = 0;
        w.lastHealthError = undefined;
        w.startupFailed = false;
        const threshold = state.everHealthy ? this.health.successThreshold : 1;
        if (!w.healthy && w.consecutiveHealthSuccesses >= threshold) {
          w.healthy = true;
          this.log.info({ worker: w.id, model: w.modelId }, 'worker healthy');
        }
      } else {
        w.consecutiveHealthFailures++;
        w.consecutiveHealthSuccesses = 0;
        w.lastHealthError = why;
        if (w.healthy && w.consecutiveHealthFailures >= this.health.failureThreshold) {
          w.healthy = false;
          this.log.warn({ worker: w.id, reason: why }, 'worker unhealthy');
        }
      }
    }
    if (ok) state.everHealthy = true;
    else if (!state.everHealthy && !state.startupReported && Date.now() - state.addedAtMs > this.health.startupTimeoutSecs * 1000) {
      state.startupReported = true;
      for (const w of this.registry.byUrl(url)) w.startupFailed = true;
      this.log.error({ url, reason: why, startupTimeoutSecs: this.health.startupTimeoutSecs }, 'worker failed to start; still polling it');
    }
  }

  /** The worker's own key, if it has one (vLLM/SGLang started with --api-key). */
  authHeaders(url: string): Record<string, string> {
    const key = this.registry.byUrl(url)[0]?.apiKey;
    return key ? { authorization: `Bearer ${key}` } : {};
  }

  /**
   * The worker's model (the first `/v1/models` entry without a `parent`, else the first) and its
   * LoRA adapters (entries whose `parent` names that model: vLLM's and SGLang's listing).
   */
  private async discoverModel(url: string): Promise<{ id: string; adapters: string[] }> {
    const res = await request(url + '/v1/models', {
      method: 'GET',
      dispatcher: this.agent,
      headers: this.authHeaders(url),
      signal: AbortSignal.timeout(this.health.timeoutSecs * 1000),
    });
    if (res.statusCode !== 200) {
      await res.body.dump();
      throw new Error(`status ${res.statusCode}`);
    }
    const body = (await res.body.json()) as { data?: Array<{ id?: unknown; parent?: unknown }> };
    const data = Array.isArray(body?.data) ? body.data.filter((m) => m !== null && typeof m === 'object') : [];
    const base = data.find((m) => m.parent === undefined || m.parent === null) ?? data[0];
    const id = base?.id;
    if (typeof id !== 'string' || id.length === 0) throw new Error('no model listed');
    const adapters = data.filter((m) => m.parent === id && typeof m.id === 'string' && m.id !== id).map((m) => m.id as string);
    return { id, adapters };
  }
}
