import { xxh3 } from '@node-rs/xxhash';
export type WorkerType = 'regular' | 'prefill' | 'decode';

/** Load as the engine itself reports it (scraped from its /metrics), per DP rank. */
export interface EngineLoad {
  running: number;
  waiting: number;
  /** KV cache usage, 0..1. */
  kvUsage: number;
  /** When it was scraped (Date.now() ms); stale after the scraper's threshold. */
  updatedAtMs: number;
}

import type { CircuitBreaker } from './circuit-breaker.js';

export interface WorkerSpec {
  /** Base URL of the engine's HTTP server, e.g. http://10.0.0.1:8000 (no trailing slash). */
  url: string;
  modelId?: string;
  type?: WorkerType;
  dpRank?: number;
  dpSize?: number;
  /** SGLang PD: the prefill worker's bootstrap port (null = not configured). */
  bootstrapPort?: number | null;
  /** Sent to the worker as `Authorization: Bearer` (never logged). */
  apiKey?: string;
}

/**
 * Released exactly once, whatever path ends the request (success, error, abort, timeout).
 * Calling release() again is a no-op, so every path can call it without coordination.
 */
export class LoadGuard {
  private released = false;
  constructor(
    readonly worker: Worker,
    private readonly onRelease?: (worker: Worker) => void,
  ) {
    worker.localLoad++;
    worker.loadObserver?.(worker);
  }

  get isReleased(): boolean {
    return this.released;
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    this.worker.localLoad--;
    this.worker.processed++;
    this.worker.loadObserver?.(this.worker);
    this.onRelease?.(this.worker);
  }
}

/**
 * One routable target: an engine URL, or one data-parallel rank behind it (id `url@rank`).
 * Holds the live state policies read: health and in-flight load.
 */
export class Worker {
  readonly id: string;
  readonly url: string;
  modelId: string | undefined;
  readonly type: WorkerType;
  readonly dpRank: number | undefined;
  readonly dpSize: number | undefined;
  readonly bootstrapPort: number | null;
  readonly apiKey: string | undefined;
  /** Set by the worker manager; open means no traffic (see circuit-breaker.ts). */
  breaker: CircuitBreaker | undefined;
  /** Until the first successful health check the worker is not routable. */
  healthy = false;
  /** In-flight requests this process routed here and that have not finished. Only LoadGuard changes it. */
  localLoad = 0;
  /**
   * In-flight requests other kvgate replicas routed here (replica sync; 0 without it). Set by
   * the sync module from its peers' reports, never by policies.
   */
  peerLoad = 0;
  /** Told after every change of localLoad (replica sync publishes it). */
  loadObserver: ((worker: Worker) => void) | undefined;
  /** Requests finished (any outcome) on this worker. */
  processed = 0;
  /**
   * LoRA adapters the engine serves (the entries of its `GET /v1/models` with a `parent`, as vLLM
   * and SGLang list them), refreshed with each model check. A request naming one is routed among
   * this model's workers, keyed by the adapter (see RequestContext.loraName).
   */
  loraAdapters: readonly string[] = [];
  /** Its KV-event subscription's state (written by the KV-event hub's silence check; GET /workers `kv_events`). */
  kvEvents: object | undefined;
  /** Engine-reported load (vLLM/SGLang metrics), when a scraper runs. */
  engineLoad: EngineLoad | undefined;
  consecutiveHealthFailures = 0;
  consecutiveHealthSuccesses = 0;
  lastHealthError: string | undefined;
  /** Did not pass a health check within the start-up timeout (still polled). */
  startupFailed = false;
  readonly addedAt = Date.now();

  constructor(spec: WorkerSpec) {
    this.url = normalizeUrl(spec.url);
    this.dpRank = spec.dpRank;
    this.dpSize = spec.dpSize;
    this.id = spec.dpRank === undefined ? this.url : `${this.url}@${spec.dpRank}`;
    this.modelId = spec.modelId;
    this.type = spec.type ?? 'regular';
    this.bootstrapPort = spec.bootstrapPort ?? null;
    this.apiKey = spec.apiKey;
  }

  /** In-flight requests on this worker as far as this router knows: its own plus its peers'. */
  get load(): number {
    return this.localLoad + this.peerLoad;
  }

  /** For tests and tools that set a load directly: sets this process's share. */
  set load(value: number) {
    this.localLoad = value - this.peerLoad;
  }

  /** Healthy and allowed to take traffic by its circuit breaker. */
  isAvailable(): boolean {
    return this.healthy && (this.breaker === undefined || this.breaker.canExecute());
  }

  acquire(onRelease?: (worker: Worker) => void): LoadGuard {
    return new LoadGuard(this, onRelease);
  }

  toJSON(): Record<string, unknown> {
    return {
      id: this.id,
      worker_id: workerIdOf(this.url),
      url: this.url,
      model_id: this.modelId ?? null,
      worker_type: this.type,
      is_healthy: this.healthy,
      model: this.modelId ?? null,
      type: this.type,
      dp_rank: this.dpRank ?? null,
      lora_adapters: this.loraAdapters.length > 0 ? this.loraAdapters : undefined,
      kv_events: this.kvEvents,
      bootstrap_port: this.type === 'prefill' ? this.bootstrapPort : undefined,
      healthy: this.healthy,
      circuit_breaker: this.breaker?.state ?? null,
      load: this.load,
      local_load: this.localLoad,
      processed: this.processed,
      last_health_error: this.lastHealthError ?? null,
      startup_failed: this.startupFailed,
    };
  }
}

/**
 * The admin API's id of a worker URL (all its data-parallel ranks): stable (a function of the
 * normalised URL only, so the same across restarts and replicas) and URL-safe (16 hex digits of
 * xxh3-64), as the SGLang router's `worker_id` in `/workers/{worker_id}`.
 */
export function workerIdOf(url: string): string {
  return xxh3.xxh64(url).toString(16).padStart(16, '0');
}

export function normalizeUrl(raw: string): string {
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new Error(`invalid worker URL '${raw}'`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new Error(`invalid worker URL '${raw}': only http:// and https:// are supported`);
  }
  if (u.search || u.hash) throw new Error(`invalid worker URL '${raw}': no query or fragment allowed`);
  const path = u.pathname.replace(/\/+$/, '');
  return `${u.protocol}//${u.host}${path}`;
}
