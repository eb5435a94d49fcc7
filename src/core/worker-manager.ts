import { Agent, request } from 'undici';
import type { Logger } from 'pino';
import { WorkerRegistry } from './registry.js';
import { Worker, normalizeUrl, type WorkerSpec } from './worker.js';

export interface HealthConfig {
  intervalSecs: number;
  timeoutSecs: number;
  failureThreshold: number;
  successThreshold: number;
  endpoint: string;
}

interface UrlState {
  timer: NodeJS.Timeout | undefined;
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
  private readonly agent = new Agent({ keepAliveTimeout: 10_000, connections: 4 });
  private closed = false;

  constructor(
    readonly registry: WorkerRegistry,
    private readonly health: HealthConfig,
    private readonly log: Logger,
  ) {}

  /** Registers a worker and runs its first health check; resolves after that check. */
  async add(spec: WorkerSpec): Promise<Worker> {
    const url = normalizeUrl(spec.url);
    if (this.registry.byUrl(url).length > 0) throw new Error(`worker '${url}' is already registered`);
    const worker = this.registry.add(new Worker({ ...spec, url }));
    const state: UrlState = { timer: undefined, checking: false, modelFixed: spec.modelId !== undefined, everHealthy: false };
    this.states.set(url, state);
    await this.check(url);
    if (!this.closed && this.states.get(url) === state) {
      state.timer = setInterval(() => void this.check(url), this.health.intervalSecs * 1000);
      state.timer.unref();
    }
    return worker;
  }

  /** Removes every worker (all ranks) of a URL. */
  remove(url: string): Worker[] {
    const norm = normalizeUrl(url);
    const state = this.states.get(norm);
    if (state?.timer) clearInterval(state.timer);
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
    for (const s of this.states.values()) if (s.timer) clearInterval(s.timer);
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
        else for (const w of this.registry.byUrl(url)) this.registry.setModel(w, model);
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
  }

  private async discoverModel(url: string): Promise<string> {
    const res = await request(url + '/v1/models', {
      method: 'GET',
      dispatcher: this.agent,
      signal: AbortSignal.timeout(this.health.timeoutSecs * 1000),
    });
    if (res.statusCode !== 200) {
      await res.body.dump();
      throw new Error(`status ${res.statusCode}`);
    }
    const body = (await res.body.json()) as { data?: Array<{ id?: unknown }> };
    const id = body?.data?.[0]?.id;
    if (typeof id !== 'string' || id.length === 0) throw new Error('no model listed');
    return id;
  }
}
