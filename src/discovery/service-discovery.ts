import type { Logger } from 'pino';
import type { WorkerRegistry } from '../core/registry.js';
import type { Worker, WorkerType } from '../core/worker.js';
import type { PodWatch, PodWatchListener } from './kubernetes.js';
import { matchesSelector, parseModelIdFrom, parseSelector, podKey, podTargets, sameTarget, selectorString, type ModelIdSource, type PodObject, type PodTarget } from './pods.js';

/** The service-discovery part of `kvgate serve`'s configuration. */
export interface DiscoveryConfig {
  serviceDiscoveryNamespace: string | undefined;
  serviceDiscoveryPort: number;
  /** Several ports on every pod (an InferencePool's targetPorts); overrides serviceDiscoveryPort. */
  serviceDiscoveryPorts?: number[];
  selector: string[];
  prefillSelector: string[];
  decodeSelector: string[];
  pdDisaggregation: boolean;
  modelIdFrom: string | undefined;
  modelId: string | undefined;
}

/**
 * How discovery adds and removes workers: the same path as the admin API (health checks, model
 * discovery from /v1/models, DP ranks, KV-event subscriptions).
 */
export interface WorkerSink {
  readonly registry: WorkerRegistry;
  registerWorker(target: PodTarget): Promise<Worker[]>;
  /** Takes every worker of the URL out of the registry at once; in-flight requests finish. */
  removeWorker(url: string): void;
}

/** One selector's pods, mapped to the workers they stand for. */
class PodPool implements PodWatchListener {
  /** Pod key → the targets registered for it, each with the claim that owns its URL. */
  private readonly applied = new Map<string, Array<{ target: PodTarget; claim: number | undefined }>>();
  /** Pod key → its last state seen (matching this pool). */
  private readonly latest = new Map<string, PodObject>();

  constructor(
    readonly type: WorkerType,
    readonly selector: Record<string, string>,
    /** Pods matching this selector belong to another pool (prefill wins over decode, as in the SGLang router). */
    private readonly exclude: Record<string, string> | undefined,
    private readonly owner: ServiceDiscovery,
  ) {}

  private accepts(pod: PodObject): boolean {
    return matchesSelector(pod, this.selector) && !(this.exclude && matchesSelector(pod, this.exclude));
  }

  onSync(pods: PodObject[]): void {
    const seen = new Set<string>();
    for (const pod of pods) {
      if (!this.accepts(pod)) continue;
      seen.add(podKey(pod));
      this.apply(podKey(pod), pod);
    }
    for (const key of [...this.applied.keys()]) if (!seen.has(key)) this.apply(key, undefined);
  }

  onUpsert(pod: PodObject): void {
    this.apply(podKey(pod), this.accepts(pod) ? pod : undefined);
  }

  onDelete(pod: PodObject): void {
    this.apply(podKey(pod), undefined);
  }

  /** Pod keys with at least one registered target. */
  pods(): string[] {
    return [...this.applied.entries()].filter(([, ts]) => ts.some((t) => t.claim !== undefined)).map(([k]) => k);
  }

  /** Applies the pod's latest state again (a URL it wanted has been freed by another pod). */
  retry(key: string): void {
    this.apply(key, this.latest.get(key));
  }

  private apply(key: string, pod: PodObject | undefined): void {
    if (pod) this.latest.set(key, pod);
    else this.latest.delete(key);
    const { targets, problems } = pod ? this.owner.targetsOf(pod, this.type) : { targets: [], problems: [] };
    // Targets whose URL another pod held are not registered: they are tried again.
    const before = (this.applied.get(key) ?? []).filter((b) => b.claim !== undefined);
    const kept = before.filter((b) => targets.some((t) => sameTarget(b.target, t)));
    const gone = before.filter((b) => !kept.includes(b));
    const fresh = targets.filter((t) => !before.some((b) => sameTarget(b.target, t)));
    if (gone.length === 0 && fresh.length === 0) return;
    if (problems.length > 0) this.owner.log.warn({ pod: key, problems }, 'service discovery: pod annotations ignored');
    for (const g of gone) this.owner.release(g.target.url, g.claim, key);
    const now = [...kept, ...fresh.map((t) => ({ target: t, claim: this.owner.claim(t, key, () => this.retry(key)) }))];
    if (now.length > 0) this.applied.set(key, now);
    else this.applied.delete(key);
  }
}

/**
 * Kubernetes pod discovery for `kvgate serve --service-discovery`: one list+watch per selector
 * (regular, or prefill and decode), each routable pod registered as a worker, each pod that
 * turns unready, is deleted or changes IP removed at once. Registration of one URL is
 * serialised (a pod flapping ready/unready never registers its URL twice); removal is
 * synchronous, so it never waits behind a registration's first health check.
 */
export class ServiceDiscovery {
  private readonly pools: PodPool[] = [];
  private readonly watches: PodWatch[] = [];
  private readonly modelIdFrom: ModelIdSource | undefined;
  /** URL → the claim that currently owns it. */
  private readonly claims = new Map<string, { id: number; pod: string }>();
  /** URLs whose registration is queued or running (operations per URL run in order). */
  private readonly busy = new Map<string, Promise<void>>();
  /** URLs this discovery has put in the registry (and not yet taken out). */
  private readonly registered = new Set<string>();
  /** URL → pods waiting for another pod to let it go. */
  private readonly waiters = new Map<string, Set<() => void>>();
  private seq = 0;
  private stopped = false;

  constructor(
    private readonly config: DiscoveryConfig,
    private readonly sink: WorkerSink,
    readonly log: Logger,
  ) {
    this.modelIdFrom = config.modelIdFrom ? parseModelIdFrom(config.modelIdFrom) : undefined;
    if (config.pdDisaggregation) {
      const prefill = parseSelector(config.prefillSelector);
      if (config.prefillSelector.length > 0) this.pools.push(new PodPool('prefill', prefill, undefined, this));
      if (config.decodeSelector.length > 0) this.pools.push(new PodPool('decode', parseSelector(config.decodeSelector), config.prefillSelector.length > 0 ? prefill : undefined, this));
    } else {
      this.pools.push(new PodPool('regular', parseSelector(config.selector), undefined, this));
    }
  }

  /** Connects to the API server (kubeconfig or in-cluster) and starts the watches; does not wait for the first list. */
  async start(): Promise<void> {
    const k8s = await import('./kubernetes.js');
    const { kc, source } = k8s.loadKubeConfig();
    for (const pool of this.pools) {
      const w = new k8s.PodWatch(kc, { namespace: this.config.serviceDiscoveryNamespace, labelSelector: selectorString(pool.selector) }, pool, this.log);
      this.watches.push(w);
    }
    this.log.info(
      { apiServer: source, namespace: this.config.serviceDiscoveryNamespace ?? '(all)', selectors: this.pools.map((p) => ({ type: p.type, selector: selectorString(p.selector) })) },
      'service discovery: watching pods',
    );
    for (const w of this.watches) w.start();
  }

  /** Stops the watches; with `removeWorkers`, also takes out every worker this discovery added (a pool that changed or went away). */
  async stop(removeWorkers = false): Promise<void> {
    this.stopped = true;
    await Promise.all(this.watches.map((w) => w.stop()));
    if (removeWorkers) {
      for (const url of [...this.registered]) this.sink.removeWorker(url);
      this.registered.clear();
    }
  }

  /** Pods currently registered, per pool type (for tests and diagnostics). */
  status(): Record<string, string[]> {
    return Object.fromEntries(this.pools.map((p) => [p.type, p.pods()]));
  }

  /** Watch counters (lists, watches, events, 410s, failures) per pool. */
  watchStats(): Array<PodWatch['stats']> {
    return this.watches.map((w) => ({ ...w.stats }));
  }

  targetsOf(pod: PodObject, type: WorkerType) {
    return podTargets(pod, { type, defaultPort: this.config.serviceDiscoveryPort, defaultPorts: this.config.serviceDiscoveryPorts, modelIdFrom: this.modelIdFrom, modelId: this.config.modelId });
  }

  /**
   * Registers a target's URL for a pod; undefined if another pod or a static worker holds it.
   * When another pod holds it (e.g. a pod moving between the prefill and decode pools, whose two
   * watches report it in either order), `retry` runs once that pod lets it go.
   */
  claim(target: PodTarget, pod: string, retry: () => void): number | undefined {
    const { url } = target;
    const holder = this.claims.get(url);
    if (holder) {
      this.log.debug({ url, pod, heldBy: holder.pod }, 'service discovery: URL held by another pod; waiting for it to leave');
      let set = this.waiters.get(url);
      if (!set) this.waiters.set(url, (set = new Set()));
      set.add(retry);
      return undefined;
    }
    if (!this.registered.has(url) && this.sink.registry.byUrl(url).length > 0) {
      this.log.warn({ url, pod }, 'service discovery: URL already registered (--worker-urls or the admin API); leaving it as it is');
      return undefined;
    }
    const id = ++this.seq;
    this.claims.set(url, { id, pod });
    this.enqueue(url, async () => {
      if (this.stopped || this.claims.get(url)?.id !== id) return;
      this.registered.add(url);
      try {
        const workers = await this.sink.registerWorker(target);
        this.log.info({ pod, url, type: target.type, workers: workers.map((w) => w.id), healthy: workers[0]?.healthy, bootstrapPort: target.bootstrapPort ?? undefined }, 'service discovery: worker added');
      } catch (e) {
        this.log.error({ pod, url, err: (e as Error).message }, 'service discovery: cannot register worker');
      }
      // Left (unready, deleted, new IP) while its first check ran: take it out again.
      if (this.claims.get(url)?.id !== id) this.unregister(url);
    });
    return id;
  }

  /** The pod no longer stands for this URL: its workers leave the registry now. */
  release(url: string, claim: number | undefined, pod: string): void {
    if (claim === undefined || this.claims.get(url)?.id !== claim) return;
    this.claims.delete(url);
    const waiting = this.waiters.get(url);
    this.waiters.delete(url);
    for (const retry of waiting ?? []) queueMicrotask(retry);
    if (this.registered.has(url)) {
      this.sink.removeWorker(url);
      this.log.info({ pod, url }, 'service discovery: worker removed');
      // A registration still running finishes first and then removes what it added.
      if (!this.busy.has(url)) this.registered.delete(url);
    }
  }

  private unregister(url: string): void {
    this.sink.removeWorker(url);
    this.registered.delete(url);
  }

  private enqueue(url: string, op: () => Promise<void>): void {
    const next = (this.busy.get(url) ?? Promise.resolve()).then(op, op);
    this.busy.set(url, next);
    void next.finally(() => {
      if (this.busy.get(url) === next) this.busy.delete(url);
    });
  }
}
