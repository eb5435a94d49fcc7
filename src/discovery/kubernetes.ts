import { existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { CoreV1Api, KubeConfig, Watch, type V1PodList } from '@kubernetes/client-node';
import type { PodObject } from './pods.js';

/**
 * List+watch of the pods matching one label selector, the way Kubernetes clients keep a cache:
 * list (which gives a resourceVersion), then watch from that version with bookmarks; each event
 * advances the version, so a reconnect resumes where the last one stopped. When the version is
 * too old (410 Gone, as an ERROR event or an HTTP status) the pods are listed again and the
 * listener reconciles. A closed watch reconnects at once; a failed one after a jittered
 * exponential backoff. No polling: between events nothing is sent.
 */
export interface PodWatchListener {
  /** The full set after a (re-)list: anything not in it has gone. */
  onSync(pods: PodObject[]): void;
  onUpsert(pod: PodObject): void;
  onDelete(pod: PodObject): void;
}

export interface PodWatchOptions {
  /** undefined = all namespaces. */
  namespace: string | undefined;
  labelSelector: string;
  /** Server-side watch timeout (the API server ends the watch after it; we resume). */
  watchTimeoutSecs?: number;
  backoffInitialMs?: number;
  backoffMaxMs?: number;
}

/** Where the API server came from: KUBECONFIG, ~/.kube/config, or the pod's service account. */
export function loadKubeConfig(): { kc: KubeConfig; source: string } {
  const kc = new KubeConfig();
  let source: string;
  if (process.env.KUBECONFIG) source = `KUBECONFIG=${process.env.KUBECONFIG}`;
  else if (existsSync(join(safeHomedir(), '.kube', 'config'))) source = '~/.kube/config';
  else if (process.env.KUBERNETES_SERVICE_HOST && existsSync('/var/run/secrets/kubernetes.io/serviceaccount/token')) source = 'in-cluster service account';
  else throw new Error('no Kubernetes API server found: not in a pod (no service account) and neither KUBECONFIG nor ~/.kube/config is set');
  kc.loadFromDefault();
  const cluster = kc.getCurrentCluster();
  if (!cluster) throw new Error(`no current cluster in the kubeconfig (${source})`);
  return { kc, source: `${source} (${cluster.server})` };
}

function safeHomedir(): string {
  try {
    return homedir();
  } catch {
    return '/nonexistent'; // a uid without a passwd entry and no HOME
  }
}

class GoneError extends Error {
  readonly code = 410;
}

function statusOf(err: unknown): number | undefined {
  const e = err as { statusCode?: unknown; code?: unknown } | null;
  if (typeof e?.statusCode === 'number') return e.statusCode;
  if (typeof e?.code === 'number') return e.code;
  return undefined;
}

export class PodWatch {
  private readonly api: CoreV1Api;
  private readonly watch: Watch;
  private stopped = false;
  private resourceVersion = '';
  private abortCurrent: (() => void) | undefined;
  private wake: (() => void) | undefined;
  private loop: Promise<void> | undefined;
  /** Counters, for logs and tests. */
  readonly stats = { lists: 0, watches: 0, events: 0, gone: 0, failures: 0 };

  constructor(
    kc: KubeConfig,
    private readonly opts: PodWatchOptions,
    private readonly listener: PodWatchListener,
    private readonly log: Logger,
  ) {
    this.api = kc.makeApiClient(CoreV1Api);
    this.watch = new Watch(kc);
  }

  start(): void {
    this.loop ??= this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.abortCurrent?.();
    this.wake?.();
    await this.loop;
  }

  private get path(): string {
    return this.opts.namespace ? `/api/v1/namespaces/${encodeURIComponent(this.opts.namespace)}/pods` : '/api/v1/pods';
  }

  private async run(): Promise<void> {
    const initial = this.opts.backoffInitialMs ?? 500;
    const max = this.opts.backoffMaxMs ?? 30_000;
    let backoff = initial;
    while (!this.stopped) {
      try {
        if (!this.resourceVersion) await this.list();
        if (this.stopped) break;
        const { events } = await this.watchOnce();
        // A watch that ends cleanly is resumed at once; one that ends without delivering
        // anything counts as a failure so a misbehaving server is not hammered.
        if (events > 0) {
          backoff = initial;
        } else if (!this.stopped) {
          await this.sleep(this.jitter(backoff));
          backoff = Math.min(max, backoff * 2);
        }
      } catch (err) {
        if (this.stopped) break;
        if (err instanceof GoneError || statusOf(err) === 410) {
          this.stats.gone++;
          this.log.info({ selector: this.opts.labelSelector }, 'pod watch: resourceVersion expired (410 Gone), listing again');
          this.resourceVersion = '';
          continue;
        }
        this.stats.failures++;
        const delay = this.jitter(backoff);
        this.log.warn({ selector: this.opts.labelSelector, err: (err as Error).message, retryInMs: Math.round(delay) }, 'pod watch failed');
        if (!this.stopped) await this.sleep(delay);
        backoff = Math.min(max, backoff * 2);
      }
    }
  }

  private jitter(ms: number): number {
    return ms * (0.8 + 0.4 * Math.random());
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.wake = undefined;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(t);
        this.wake = undefined;
        resolve();
      };
    });
  }

  private async list(): Promise<void> {
    const labelSelector = this.opts.labelSelector;
    const list: V1PodList = this.opts.namespace
      ? await this.api.listNamespacedPod({ namespace: this.opts.namespace, labelSelector })
      : await this.api.listPodForAllNamespaces({ labelSelector });
    this.stats.lists++;
    if (this.stopped) return;
    // The generated client turns the JSON into model objects with the same field names.
    this.listener.onSync((list.items ?? []) as unknown as PodObject[]);
    this.resourceVersion = list.metadata?.resourceVersion ?? '';
  }

  /** One watch request; resolves when the server closes it, rejects on failure or 410. */
  private watchOnce(): Promise<{ events: number }> {
    return new Promise((resolve, reject) => {
      let events = 0;
      let gone = false;
      let settled = false;
      let controller: AbortController | undefined;
      const finish = (err: unknown) => {
        if (settled) return;
        settled = true;
        this.abortCurrent = undefined;
        controller?.abort();
        if (gone) reject(new GoneError('watch: 410 Gone'));
        else if (err && !this.stopped) reject(err);
        else resolve({ events });
      };
      this.abortCurrent = () => finish(null);
      this.stats.watches++;
      const query = {
        labelSelector: this.opts.labelSelector,
        resourceVersion: this.resourceVersion,
        allowWatchBookmarks: true,
        timeoutSeconds: this.opts.watchTimeoutSecs ?? Math.round(300 * (1 + Math.random())),
      };
      this.watch
        .watch(
          this.path,
          query,
          (type: string, obj: unknown) => {
            if (settled) return;
            const o = obj as PodObject & { code?: number; message?: string; kind?: string };
            if (type === 'ERROR') {
              if (o.code === 410) gone = true;
              finish(gone ? null : Object.assign(new Error(`watch error: ${o.message ?? JSON.stringify(obj)}`), { code: o.code }));
              return;
            }
            events++;
            this.stats.events++;
            if (type === 'ADDED' || type === 'MODIFIED') this.listener.onUpsert(o);
            else if (type === 'DELETED') this.listener.onDelete(o);
            // BOOKMARK: only the version moves.
            const rv = o.metadata?.resourceVersion;
            if (rv) this.resourceVersion = rv;
          },
          (err: unknown) => finish(err),
        )
        .then((c) => {
          controller = c;
          if (settled) c.abort();
        }, finish);
    });
  }
}
